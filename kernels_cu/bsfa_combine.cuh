// The merge of the split-KV partials (bsfa_kernel_splitkv.cuh) into out and
// lse, in fp32, by the rule of bsfa_reference.merge_partials:
// lse = m + log sum_c exp(lse_c - m), out = sum_c exp(lse_c - lse) * out_c;
// parts with lse_c = -inf weigh 0, a row whose parts are all -inf keeps
// lse = -inf (out = sum of 0 * out_c), and a NaN or +inf lse_c poisons the
// whole row (lse and every out column NaN).  The parts are summed in split
// order, so a result depends on the split count only through this rounding.
//
// Two ways, picked per split kernel (bsfa_fwd_splitkv.cu):
//   merge_if_last  the 16-row kernel: the last CTA of a row group (the splits
//                  of one packed query tile) to finish merges the group's
//                  at most 16 rows.  A separate merge kernel cost a second
//                  launch and the gap between the two, 15-20 us of a
//                  130-150 us one-row decode step on an H200.
//   combine_kernel the 64- and 128-row kernels: a second launch, one warp per
//                  row over the whole grid.  One CTA merging 64-128 rows a
//                  warp after another was slower than that launch (H200,
//                  16 x 128K: 0.232 ms against 0.166 ms).
//
// Includes what it needs.
#pragma once

#include "bsfa_params.cuh"
#include "bsfa_ptx.cuh"

namespace bsfa {

// Row t of (B, Hq, Nq), by one whole warp.  The partials were written by
// other CTAs: read through L2 (ld.global.cg), never from this SM's L1.
template <int kHeadDim, bool kBf16>
__device__ __forceinline__ void combine_row(const Params& p, long long t, int lane) {
    const long long rows = (long long)p.B * p.Hq * p.Nq;
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
        const float x = __ldcg(lp + c * rows);
        poisoned |= (x != x) || x == -neg_inf();
        mx = fmax2(mx, x);  // max.f32 skips a NaN; a poisoned row is overwritten below
    }
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) mx = fmax2(mx, shfl_xor(mx, o));
    poisoned = __any_sync(0xffffffffu, poisoned);
    const bool empty = mx == neg_inf();
    const float shift = empty ? 0.f : mx;
    float sum = 0.f;
    for (int c = lane; c < S; c += 32) sum += expf(__ldcg(lp + c * rows) - shift);
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
        const float w_lane = c0 + lane < S ? expf(__ldcg(lp + (c0 + lane) * rows) - ref) : 0.f;
        const int n = S - c0 < 32 ? S - c0 : 32;
        for (int u = 0; u < n; u += kUnroll) {
            float2 v2[kUnroll][kJ];
#pragma unroll
            for (int e = 0; e < kUnroll; ++e) {
                const int c = c0 + u + e < S ? c0 + u + e : S - 1;  // past S: loaded, weighed 0
                const float* op = p.o_part + (c * rows + t) * kHeadDim;
#pragma unroll
                for (int j = 0; j < kJ; ++j) v2[e][j] = __ldcg(reinterpret_cast<const float2*>(op + 2 * (lane + 32 * j)));
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

constexpr int kCombineWarps = 4;

// One warp per (b, h, i) row; grid (ceil(B*Hq*Nq / kCombineWarps)).
template <int kHeadDim, bool kBf16>
__device__ __forceinline__ void combine_kernel(const Params& p) {
    const long long t = (long long)blockIdx.x * kCombineWarps + (threadIdx.x >> 5);
    if (t < (long long)p.B * p.Hq * p.Nq) combine_row<kHeadDim, kBf16>(p, t, threadIdx.x & 31);
}

// Called by every thread of a split CTA after its partial rows are stored;
// `flag` is 4 bytes of shared memory no thread reads any more.  Each CTA
// publishes its stores (fence, barrier) and counts itself in the group's
// counter; the one that completes the count merges the group's rows, one
// warp per row, and resets the counter for the next launch (the launcher
// hands over zeroed counters once; stream order keeps launches apart).
// Rows of the group: head slots [0, n_slots) from query head h0, query rows
// [q0, q0 + R) clipped to Nq, of batch element b.
template <int kHeadDim, bool kBf16, int kThreads>
__device__ __forceinline__ void merge_if_last(const Params& p, unsigned flag, long long b, int h0, int n_slots, int q0,
                                              int R) {
    const long long group = blockIdx.y + (long long)gridDim.y * blockIdx.z;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) sts32(flag, atomicAdd(p.split_done + group, 1) == p.num_splits - 1 ? 1u : 0u);
    __syncthreads();
    if (__float_as_uint(lds_f32(flag)) == 0u) return;
    __threadfence();
    const int lane = threadIdx.x & 31;
    for (int r = threadIdx.x >> 5; r < n_slots * R; r += kThreads / 32) {
        const int i = q0 + r % R;
        if (i < p.Nq) combine_row<kHeadDim, kBf16>(p, (b * p.Hq + h0 + r / R) * (long long)p.Nq + i, lane);
    }
    if (threadIdx.x == 0) p.split_done[group] = 0;
}

}  // namespace bsfa
