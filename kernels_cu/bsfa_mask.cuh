// Which keys a query tile sees: the tile's position relative to the keys
// (QueryTile: the key tiles it visits, which of them need masking, its
// diagonal tiles) and the masking of invalid scores to -inf.  Shared by every
// kernel, so the gate of bsfa_fwd and the tile maxima of bsfa_block_max see
// the same valid entries.
//
// mask_tile works on the mma.sync C-fragment layout (the wgmma accumulator is
// the same layout repeated along N): TR needs kWarpMBlocks, kSNBlocks, kMmaM,
// kMmaN and kBlockN.  Includes what it needs.
#pragma once

#include "bsfa_problem.cuh"
#include "bsfa_ptx.cuh"
#include "bsfa_traits.cuh"

namespace bsfa {

// Where a query tile sits relative to its problem's keys (bsfa_problem.cuh):
// causal query row i may see key j iff j <= i + shift, shift = q_pos - k_pos
// (Nk - Nq by default: bottom-right).  Everything the key-tile loop needs is
// reduced to a few ints so that little besides the accumulators stays live
// across it.
template <class TR, bool kCausal>
struct QueryTile {
    int q0;         // first query row of the tile
    int diag_off;   // q0 + shift: causal key limit of row q0
    int tile_pos;   // absolute position of row q0 (the threshold position's source)
    int c_end;      // last key tile holding a valid entry, -1 if there is none
    int mask_from;  // key tiles c >= mask_from need masking (they are visited first)
    int diag_lo;    // key tiles [diag_lo, diag_hi] are "diagonal" (always kept);
    int diag_hi;    // an empty range (diag_lo > diag_hi) when none is

    __device__ __forceinline__ QueryTile(int a, const Problem& pr) {
        const int Nq = pr.Nq, Nk = pr.Nk;
        const int shift = pr.shift;
        q0 = a * TR::kBlockM;
        diag_off = q0 + shift;
        tile_pos = pr.k_pos + diag_off;
        const int q_last = imin(q0 + TR::kBlockM, Nq) - 1;
        const int hi = q_last + shift;  // causal key limit of the last valid row
        const int nK = ceil_div(Nk, TR::kBlockN);
        c_end = kCausal ? (hi < 0 ? -1 : imin(nK - 1, hi / TR::kBlockN)) : nK - 1;
        // Tiles entirely inside the valid region take the mask-free path: the
        // ragged key tile (first c with (c+1)*64 > Nk is Nk/64) and, causal,
        // tiles reaching past row q0's limit (c*64 + 63 > diag_off).  All
        // tiles of a ragged query tile are masked: rows past Nq are masked out
        // completely so that their (zero-Q) scores never reach a tile max.
        mask_from = Nk / TR::kBlockN;
        if (kCausal) {
            const int x = diag_off + 1;  // floor division, x may be negative
            const int first = x >= 0 ? x / TR::kBlockN : -((-x + TR::kBlockN - 1) / TR::kBlockN);
            mask_from = imin(mask_from, imax(first, 0));
        }
        if (q0 + TR::kBlockM > Nq) mask_from = 0;
        // Diagonal tiles are defined the same way in causal and non-causal
        // mode: the keys overlapping the tile's absolute span [tile_pos,
        // tile_pos + rows - 1], each end raised to 0 (bottom-right rows before
        // the sequence start sit at 0), clipped to this problem's keys.  In
        // key indices the low end is max(diag_off, -k_pos, 0) = max(diag_off,
        // 0) (k_pos >= 0), the high end max(hi, -k_pos); with the default
        // offsets (k_pos = 0) the span always meets the keys.
        const int lo = imax(diag_off, 0);
        const int dh = imin(imax(hi, -pr.k_pos), Nk - 1);
        const bool any = lo <= dh;
        diag_lo = any ? lo / TR::kBlockN : 1;
        diag_hi = any ? dh / TR::kBlockN : 0;
    }

    __device__ __forceinline__ bool needs_mask(int c) const { return c >= mask_from; }
};

// Sets invalid scores of key tile c to -inf, whatever they hold (NaN from a
// non-finite input included: an invalid key never reaches a row's max, sum or
// output).  Only called on tiles that need it.  Row limits are recomputed
// here rather than kept live across the loop: key j is valid for query row i
// iff j <= lim(i), lim = -1 for rows >= Nq.  Nq, Nk and shift are the
// Problem's.  row0 = q0 + warp * kWarpRows + lane / 4, the thread's first accumulator row.
template <class TR, bool kCausal>
__device__ __forceinline__ void mask_tile(float (&S)[TR::kWarpMBlocks][TR::kSNBlocks][4], int c, int row0,
                                          int lane, int Nq, int Nk, int shift) {
    const int col0 = c * TR::kBlockN + 2 * (lane & 3);
    const float ninf = neg_inf();
#pragma unroll
    for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int i = row0 + mb * TR::kMmaM + hf * 8;  // rows of c0c1 / c2c3
            const int lim = i >= Nq ? -1 : (kCausal ? imin(Nk - 1, i + shift) : Nk - 1);
            const int rel = lim - col0;  // last valid column offset of this thread
#pragma unroll
            for (int nb = 0; nb < TR::kSNBlocks; ++nb) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    if (nb * TR::kMmaN + e > rel) S[mb][nb][2 * hf + e] = ninf;
                }
            }
        }
    }
}

}  // namespace bsfa
