// The end of a work tile in the warp-specialised sm_90a forward: each warp
// normalises its own 16 rows of O, stages them in its rows of the output
// buffer (swizzled: conflict-free fragment stores), and writes them out as
// 16-byte chunks, with the rows' log-sum-exp.  Warp-local throughout: no
// barrier with the other warps, so a warpgroup that finishes a tile moves on.
// Rows without a valid key give zeros and lse -inf; a NaN row sum gives NaN
// (bsfa_softmax.cuh, row_lse).  Every row is stored on its own, and only
// rows of the problem (q0 + r < Nq): a packed sequence's (kVarlen) last tile
// never writes into the next sequence's rows.
//
// epilogue_part_ws ends a key split's work tile (bsfa_fwd_split) instead:
// the rows normalised by the split's own sums, in fp32, and the split's lse,
// stored straight from the accumulators into the partials that bsfa_combine
// merges (bsfa_combine.cuh; the layout of bsfa_params.cuh's o_part and
// lse_part): a quad's four float2 of one n8 block are one 32-byte sector.
//
// Includes what it needs; TR is a TraitsSm90Ws.
#pragma once

#include "bsfa_params.cuh"
#include "bsfa_problem.cuh"
#include "bsfa_ptx.cuh"
#include "bsfa_smem_sm90ws.cuh"
#include "bsfa_softmax.cuh"
#include "bsfa_tile_scheduler_sm90.cuh"
#include "bsfa_wgmma_sm90.cuh"

namespace bsfa {

// kVarlen: w.b is a packed sequence, whose offsets are read afresh here
// (bsfa_problem.cuh) rather than kept live across the key loop.
template <class TR, bool kVarlen = false>
__device__ __forceinline__ void epilogue_ws(const Params& p, const SmemWs<TR>& sm, int wg, int warp, int lane,
                                            const WorkTile& w, int q0, const float (&O)[TR::kONBlocks][4],
                                            const float (&m)[2], const float (&l)[2]) {
    // Opaque copies of the staging address and the lane: the per-thread
    // offsets derived from them would otherwise be hoisted out of the
    // persistent loop and kept live (spilled) across every key loop.
    unsigned so = sm.o();
    asm volatile("" : "+r"(so));
    asm volatile("" : "+r"(lane));
    const int t = lane & 3;
    int Nq;
    float* lse_row;
    unsigned short* og;
    if constexpr (kVarlen) {
        const Problem pr = cta_problem<true, true>(p, w.b);
        Nq = pr.Nq;
        lse_row = p.lse + pr.lse_off + (long long)w.h * pr.lse_sh;
        og = p.out + pr.o_off + (long long)w.h * p.o_sh;
    } else {
        Nq = p.Nq;
        lse_row = p.lse + ((long long)w.b * p.Hq + w.h) * Nq;
    }
    const int warp_row0 = wg * TR::kWgmmaM + warp * TR::kWarpRows;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const float lt = quad_sum(l[hf]);
        const float inv = lt > 0.f ? 1.f / lt : 0.f;
        const int r = warp_row0 + (lane >> 2) + hf * 8;
#pragma unroll
        for (int nb = 0; nb < TR::kONBlocks; ++nb) {
            const unsigned addr =
                so + (nb / TR::kChunksPerPanelRow) * TR::kQPanelBytes + swizzled(r, nb % TR::kChunksPerPanelRow) + 4 * t;
            sts32(addr, pack2<TR::kBf16>(O[nb][2 * hf] * inv, O[nb][2 * hf + 1] * inv));
        }
        if (t == 0 && q0 + r < Nq) lse_row[q0 + r] = row_lse(lt, m[hf], p.softmax_scale);
    }
    warp_sync();
    if constexpr (!kVarlen) og = p.out + (long long)w.b * p.o_sb + (long long)w.h * p.o_sh;
    constexpr int kCpr = TR::kHeadDim / TR::kChunkElems;
#pragma unroll
    for (int i = 0; i < TR::kWarpRows * kCpr / 32; ++i) {
        const int idx = lane + i * 32;
        const int r = warp_row0 + idx / kCpr;
        const int cc = idx % kCpr;
        if (q0 + r < Nq) {
            unsigned vals[4];
            lds128(vals, so + (cc / TR::kChunksPerPanelRow) * TR::kQPanelBytes + swizzled(r, cc % TR::kChunksPerPanelRow));
            stg128(og + (long long)(q0 + r) * p.o_sn + cc * TR::kChunkElems, vals);
        }
    }
    warp_sync();  // the next tile's staging overwrites these rows
}

template <class TR>
__device__ __forceinline__ void epilogue_part_ws(const Params& p, int wg, int warp, int lane, const WorkTile& w, int q0,
                                                 const float (&O)[TR::kONBlocks][4], const float (&m)[2],
                                                 const float (&l)[2]) {
    const long long rows = (long long)p.B * p.Hq * p.Nq;  // rows of one split's partials
    const long long row0 = (long long)w.s * rows + ((long long)w.b * p.Hq + wg_head<TR>(w, wg)) * p.Nq + q0;
    const int t = lane & 3;
    const int warp_row0 = (TR::kPackHeads ? 0 : wg * TR::kWgmmaM) + warp * TR::kWarpRows;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const float lt = quad_sum(l[hf]);
        const float inv = lt > 0.f ? 1.f / lt : 0.f;
        const int r = warp_row0 + (lane >> 2) + hf * 8;
        if (q0 + r < p.Nq) {
            float* orow = p.o_part + (row0 + r) * TR::kHeadDim + 2 * t;
#pragma unroll
            for (int nb = 0; nb < TR::kONBlocks; ++nb) {
                *reinterpret_cast<float2*>(orow + nb * TR::kMmaN) =
                    make_float2(O[nb][2 * hf] * inv, O[nb][2 * hf + 1] * inv);
            }
            if (t == 0) p.lse_part[row0 + r] = row_lse(lt, m[hf], p.softmax_scale);
        }
    }
}

}  // namespace bsfa
