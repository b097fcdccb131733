// bsfa_combine: the merge of the split-KV partials (bsfa_kernel_splitkv.cuh)
// into out and lse, in fp32, by the rule of bsfa_reference.merge_partials:
// lse = m + log sum_c exp(lse_c - m), out = sum_c exp(lse_c - lse) * out_c;
// parts with lse_c = -inf weigh 0, a row whose parts are all -inf keeps
// lse = -inf (out = sum of 0 * out_c), and a NaN or +inf lse_c poisons the
// whole row (lse and every out column NaN).  The parts are summed in split
// order, so a result depends on the split count only through this rounding.
//
// One warp per (b, h, i) row; grid (ceil(B*Hq*Nq / kCombineWarps)).
//
// Includes what it needs.
#pragma once

#include "bsfa_params.cuh"
#include "bsfa_ptx.cuh"

namespace bsfa {

constexpr int kCombineWarps = 4;

template <int kHeadDim, bool kBf16>
__device__ __forceinline__ void combine_kernel(const Params& p) {
    const int lane = threadIdx.x & 31;
    const long long rows = (long long)p.B * p.Hq * p.Nq;
    const long long t = (long long)blockIdx.x * kCombineWarps + (threadIdx.x >> 5);
    if (t >= rows) return;
    const int S = p.num_splits;
    const int i = (int)(t % p.Nq);
    const long long bh = t / p.Nq;
    const int h = (int)(bh % p.Hq);
    const long long b = bh / p.Hq;
    const float* lp = p.lse_part + t;

    // Every lane reads every lse_c (a handful of broadcast loads).
    bool poisoned = false;
    float mx = neg_inf();
    for (int c = 0; c < S; ++c) {
        const float x = lp[c * rows];
        poisoned |= (x != x) || x == -neg_inf();
        mx = fmax2(mx, x);  // max.f32 skips a NaN; a poisoned row is overwritten below
    }
    const bool empty = mx == neg_inf();
    const float shift = empty ? 0.f : mx;
    float sum = 0.f;
    for (int c = 0; c < S; ++c) sum += expf(lp[c * rows] - shift);
    const float lse = empty ? neg_inf() : shift + logf(sum);
    const float ref = empty ? 0.f : lse;

    constexpr int kPairs = kHeadDim / 2;
    static_assert(kPairs % 32 == 0, "each lane owns whole column pairs");
    float acc[kPairs / 32][2];
#pragma unroll
    for (int j = 0; j < kPairs / 32; ++j) acc[j][0] = acc[j][1] = 0.f;
    for (int c = 0; c < S; ++c) {
        const float w = expf(lp[c * rows] - ref);
        const float* op = p.o_part + (c * rows + t) * kHeadDim;
#pragma unroll
        for (int j = 0; j < kPairs / 32; ++j) {
            const float2 v2 = *reinterpret_cast<const float2*>(op + 2 * (lane + 32 * j));
            acc[j][0] += w * v2.x;
            acc[j][1] += w * v2.y;
        }
    }
    const float nan = __int_as_float(0x7fc00000);
    unsigned short* og = p.out + b * p.o_sb + (long long)i * p.o_sn + (long long)h * p.o_sh;
#pragma unroll
    for (int j = 0; j < kPairs / 32; ++j) {
        const float x = poisoned ? nan : acc[j][0];
        const float y = poisoned ? nan : acc[j][1];
        *reinterpret_cast<unsigned*>(og + 2 * (lane + 32 * j)) = pack2<kBf16>(x, y);
    }
    if (lane == 0) p.lse[(b * p.Hq + h) * p.Nq + i] = poisoned ? nan : lse;
}

}  // namespace bsfa
