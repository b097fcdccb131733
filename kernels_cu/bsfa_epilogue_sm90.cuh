// The end of the sm_90a bsfa_fwd: O normalised by the row sums, written as
// out in the input dtype, and the rows' log-sum-exp.
//
// Includes what it needs; TR is a TraitsSm90.
#pragma once

#include "bsfa_args.cuh"
#include "bsfa_problem.cuh"
#include "bsfa_ptx.cuh"
#include "bsfa_scheduler.cuh"
#include "bsfa_softmax.cuh"
#include "bsfa_wgmma_sm90.cuh"

namespace bsfa {

// Every warp's wgmma reads of Q are over once all warps are here; each warp
// then stages its own normalised rows in those rows of the Q tile (swizzled:
// conflict-free fragment stores) and writes them out as 16-byte chunks.  The
// head, batch and problem (bsfa_problem.cuh) are rebuilt afresh rather than
// kept live across the key loop.  A row without a valid key (l = 0) is
// written as zeros with lse -inf; a row with a NaN l has NaN in O as well (the same NaN P fed both) and
// is written as NaN, lse NaN.
template <class TR, bool kVarlen>
__device__ __forceinline__ void fwd_epilogue(const FwdArgs& args, int q0, int tid, int row_in_tile, unsigned sQ,
                                             const float (&O)[TR::kHalves][TR::kONBlocks][4],
                                             const float (&m)[TR::kHalves][2], const float (&l)[TR::kHalves][2]) {
    constexpr int MB = TR::kHalves;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    cta_sync();
    const int t = lane & 3;
    const CtaHead ce = chunked_head<true>(args.Hq);
    const Problem pe = cta_problem<kVarlen, true>(args, ce.b);
    float* lse_row = args.lse + pe.lse_off + (long long)ce.h * pe.lse_sh;
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const float lt = quad_sum(l[mb][hf]);
            const bool has_keys = lt > 0.f;
            const float inv = has_keys ? 1.f / lt : 0.f;
            const int r = mb * TR::kWgmmaM + row_in_tile + hf * 8;
#pragma unroll
            for (int nb = 0; nb < TR::kONBlocks; ++nb) {
                const unsigned addr = sQ + (nb / TR::kChunksPerPanelRow) * TR::kQPanelBytes +
                                      swizzled(r, nb % TR::kChunksPerPanelRow) + 4 * t;
                sts32(addr, pack2<TR::kBf16>(O[mb][nb][2 * hf] * inv, O[mb][nb][2 * hf + 1] * inv));
            }
            if (t == 0 && q0 + r < pe.Nq) {
                lse_row[q0 + r] = row_lse(lt, m[mb][hf], args.softmax_scale);
            }
        }
    }
    warp_sync();
    unsigned short* og = args.out + pe.o_off + ce.h * args.o_sh;
    constexpr int kCpr = TR::kHeadDim / TR::kChunkElems;
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
        for (int i = 0; i < TR::kWarpRows * kCpr / 32; ++i) {
            const int idx = lane + i * 32;
            const int r = mb * TR::kWgmmaM + warp * TR::kWarpRows + idx / kCpr;
            const int cc = idx % kCpr;
            if (q0 + r < pe.Nq) {
                unsigned vals[4];
                lds128(vals, sQ + (cc / TR::kChunksPerPanelRow) * TR::kQPanelBytes +
                                 swizzled(r, cc % TR::kChunksPerPanelRow));
                stg128(og + (long long)(q0 + r) * args.o_sn + cc * TR::kChunkElems, vals);
            }
        }
    }
}

}  // namespace bsfa
