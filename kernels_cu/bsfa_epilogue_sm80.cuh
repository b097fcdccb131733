// The end of the mma.sync bsfa_fwd: O normalised by the row sums, written as
// out in the input dtype, and the rows' log-sum-exp.
//
// Includes what it needs; TR is a TraitsSm80.
#pragma once

#include "bsfa_args.cuh"
#include "bsfa_problem.cuh"
#include "bsfa_ptx.cuh"
#include "bsfa_softmax.cuh"

namespace bsfa {

// Each warp stages its normalised rows in its own rows of the Q tile (only
// this warp ever read them), then writes 16-byte chunks.  A row without a
// valid key (l = 0) is written as zeros with lse -inf; a row with a NaN l has
// NaN in O as well (the same NaN P fed both) and is written as NaN, lse NaN.
// The problem (bsfa_problem.cuh) is rebuilt here rather than kept live
// across the key loop.
template <class TR, bool kVarlen>
__device__ __forceinline__ void fwd_epilogue(const FwdArgs& args, int q0, int h, long long b, unsigned sQ,
                                             const float (&O)[TR::kWarpMBlocks][TR::kONBlocks][4],
                                             const float (&m)[TR::kWarpMBlocks][2],
                                             const float (&l)[TR::kWarpMBlocks][2]) {
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    warp_sync();
    const int g = lane >> 2;
    const int t = lane & 3;
    const Problem pe = cta_problem<kVarlen, true>(args, b);
    float* lse_row = args.lse + pe.lse_off + (long long)h * pe.lse_sh;
#pragma unroll
    for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const float lt = quad_sum(l[mb][hf]);
            const bool has_keys = lt > 0.f;
            const float inv = has_keys ? 1.f / lt : 0.f;
            const int r = warp * TR::kWarpRows + mb * TR::kMmaM + hf * 8 + g;
#pragma unroll
            for (int nb = 0; nb < TR::kONBlocks; ++nb) {
                sts32(sQ + r * TR::kRowBytes + (nb * TR::kMmaN + 2 * t) * TR::kElemBytes,
                      pack2<TR::kBf16>(O[mb][nb][2 * hf] * inv, O[mb][nb][2 * hf + 1] * inv));
            }
            if (t == 0 && q0 + r < pe.Nq) {
                lse_row[q0 + r] = row_lse(lt, m[mb][hf], args.softmax_scale);
            }
        }
    }
    warp_sync();
    unsigned short* og = args.out + pe.o_off + h * args.o_sh;
    constexpr int kCpr = TR::kChunksPerRow;
#pragma unroll
    for (int i = 0; i < TR::kWarpRows * kCpr / 32; ++i) {
        const int idx = lane + i * 32;
        const int r = warp * TR::kWarpRows + idx / kCpr;
        const int cc = idx % kCpr;
        if (q0 + r < pe.Nq) {
            unsigned vals[4];
            lds128(vals, sQ + r * TR::kRowBytes + cc * 16);
            stg128(og + (long long)(q0 + r) * args.o_sn + cc * TR::kChunkElems, vals);
        }
    }
}

}  // namespace bsfa
