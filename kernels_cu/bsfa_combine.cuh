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

    // The lse_c are spread over the lanes (lane c: splits c, c + 32, ...) and
    // reduced across the warp: one round of loads, not S dependent ones.  A
    // decode step merges 30-60 splits of a few rows, so the merge's latency,
    // not its bytes, is what it adds to the call.
    bool poisoned = false;
    float mx = neg_inf();
    for (int c = lane; c < S; c += 32) {
        const float x = lp[c * rows];
        poisoned |= (x != x) || x == -neg_inf();
        mx = fmax2(mx, x);  // max.f32 skips a NaN; a poisoned row is overwritten below
    }
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) mx = fmax2(mx, shfl_xor(mx, o));
    poisoned = __any_sync(0xffffffffu, poisoned);
    const bool empty = mx == neg_inf();
    const float shift = empty ? 0.f : mx;
    float sum = 0.f;
    for (int c = lane; c < S; c += 32) sum += expf(lp[c * rows] - shift);
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) sum += shfl_xor(sum, o);
    const float lse = empty ? neg_inf() : shift + logf(sum);
    const float ref = empty ? 0.f : lse;

    // out = sum_c w_c out_c in split order; w_c computed by lane c % 32 and
    // broadcast, the partial rows loaded kUnroll splits at a time.
    constexpr int kPairs = kHeadDim / 2;
    static_assert(kPairs % 32 == 0, "each lane owns whole column pairs");
    constexpr int kJ = kPairs / 32;
    constexpr int kUnroll = 8;
    float acc[kJ][2];
#pragma unroll
    for (int j = 0; j < kJ; ++j) acc[j][0] = acc[j][1] = 0.f;
    for (int c0 = 0; c0 < S; c0 += 32) {
        const float w_lane = c0 + lane < S ? expf(lp[(c0 + lane) * rows] - ref) : 0.f;
        const int n = S - c0 < 32 ? S - c0 : 32;
        for (int u = 0; u < n; u += kUnroll) {
            float2 v2[kUnroll][kJ];
#pragma unroll
            for (int e = 0; e < kUnroll; ++e) {
                const int c = c0 + u + e < S ? c0 + u + e : S - 1;  // past S: loaded, weighed 0
                const float* op = p.o_part + (c * rows + t) * kHeadDim;
#pragma unroll
                for (int j = 0; j < kJ; ++j) v2[e][j] = *reinterpret_cast<const float2*>(op + 2 * (lane + 32 * j));
            }
#pragma unroll
            for (int e = 0; e < kUnroll; ++e) {
                const float w = __shfl_sync(0xffffffffu, w_lane, (u + e) & 31);
                if (u + e < n) {
#pragma unroll
                    for (int j = 0; j < kJ; ++j) {
                        acc[j][0] += w * v2[e][j].x;
                        acc[j][1] += w * v2[e][j].y;
                    }
                }
            }
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
