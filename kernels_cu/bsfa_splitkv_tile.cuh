// The per-key-tile steps the two split kernels share (bsfa_kernel_splitkv.cuh:
// 64 / 128 packed rows; bsfa_kernel_split16.cuh: 16 rows, each warp a 16-key
// slice of the tile): the key mask, the cross-warp head vote, dropping the
// rows of heads that skip a tile, and the online-softmax update.  Each thread
// holds two accumulator rows (c0c1 and c2c3 of its m16 block) and S as
// Sc[0][nb][.] over its warp's keys of the tile.
//
// Includes what it needs; TR is a TraitsSplitKv.
#pragma once

#include "bsfa_ptx.cuh"
#include "bsfa_softmax.cuh"
#include "bsfa_splitkv_cta.cuh"

namespace bsfa {

// OR of a 32-bit word over the warp (redux.sync, sm_80+).
__device__ __forceinline__ unsigned warp_or(unsigned v) {
    unsigned r;
    asm volatile("redux.sync.or.b32 %0, %1, 0xffffffff;\n" : "=r"(r) : "r"(v));
    return r;
}

// A real row's bit in the per-slot keep mask (slots < 32, bsfa_cupy/_splitkv.py); 0 for pad rows,
// which thus never vote and read as skipping (harmless: they are never written).
__device__ __forceinline__ void row_bits(const PackedRow (&row)[2], unsigned (&bit)[2]) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) bit[hf] = row[hf].valid ? 1u << row[hf].slot : 0u;
}

// Key j valid for row i iff j <= lim(i) (causal bottom-right, ragged Nk);
// col0 is the key of the thread's Sc[0][0][0].  Pad rows get the whole tile
// (they are never read back).
template <class TR, bool kCausal>
__device__ __forceinline__ void mask_keys(float (&Sc)[1][TR::kSNBlocks][4], const PackedRow (&row)[2], int col0,
                                          int Nk, int shift) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int lim = kCausal ? imin(Nk - 1, row[hf].i + shift) : Nk - 1;
        const int rel = lim - col0;
#pragma unroll
        for (int nb = 0; nb < TR::kSNBlocks; ++nb)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                if (nb * TR::kMmaN + e > rel) Sc[0][nb][2 * hf + e] = neg_inf();
    }
}

// The head slots keeping gated tile c: the OR over the CTA's warps of each
// slot's real rows with (row max * scale >= thr), through two vote slots in
// shared memory by tile parity (one barrier per gated tile).
template <class TR>
__device__ __forceinline__ unsigned vote_slots(const float (&tile_mx)[1][2], const float (&thr)[2],
                                               const unsigned (&row_bit)[2], float scale, unsigned sVote, int c,
                                               int lane, int warp) {
    unsigned bits = 0;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
        if (tile_mx[0][hf] * scale >= thr[hf]) bits |= row_bit[hf];
    bits = warp_or(bits);
    const unsigned slot_addr = sVote + ((c & 1) * TR::kNWarps) * 4;
    if (lane == 0) sts32(slot_addr + warp * 4, bits);
    cta_sync();
    unsigned kept = 0;
#pragma unroll
    for (int w = 0; w < TR::kNWarps; ++w) kept |= __float_as_uint(lds_f32(slot_addr + w * 4));
    return kept;
}

// Rows of heads that skip a tile others keep: -inf scores, as if the tile did not exist.
template <class TR>
__device__ __forceinline__ void drop_skipping_rows(float (&Sc)[1][TR::kSNBlocks][4], float (&tile_mx)[1][2],
                                                   unsigned kept, const unsigned (&row_bit)[2]) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        if (!(kept & row_bit[hf])) {
            tile_mx[0][hf] = neg_inf();
#pragma unroll
            for (int nb = 0; nb < TR::kSNBlocks; ++nb) {
                Sc[0][nb][2 * hf] = neg_inf();
                Sc[0][nb][2 * hf + 1] = neg_inf();
            }
        }
    }
}

// The online-softmax update of a kept tile: P, and m, l and O rescaled.
template <class TR>
__device__ __forceinline__ void softmax_update(const float (&Sc)[1][TR::kSNBlocks][4], const float (&tile_mx)[1][2],
                                               float (&m)[1][2], float (&l)[1][2], float (&O)[1][TR::kONBlocks][4],
                                               unsigned (&P)[1][TR::kKeySteps][4], float scale_log2) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const float alpha = softmax_row<TR>(Sc, 0, hf, tile_mx[0][hf], m[0][hf], l[0][hf], P, scale_log2);
#pragma unroll
        for (int nb = 0; nb < TR::kONBlocks; ++nb) {
            O[0][nb][2 * hf] *= alpha;
            O[0][nb][2 * hf + 1] *= alpha;
        }
    }
}

// A kept tile's online-softmax update: the rows of heads that skip it (a
// vote kept it for others) dropped first.
template <class TR>
__device__ __forceinline__ void kept_tile_update(float (&Sc)[1][TR::kSNBlocks][4], float (&tile_mx)[1][2],
                                                 unsigned kept, const unsigned (&row_bit)[2], bool is_forced,
                                                 float (&m)[1][2], float (&l)[1][2], float (&O)[1][TR::kONBlocks][4],
                                                 unsigned (&P)[1][TR::kKeySteps][4], float scale_log2) {
    if (!is_forced) drop_skipping_rows<TR>(Sc, tile_mx, kept, row_bit);
    softmax_update<TR>(Sc, tile_mx, m, l, O, P, scale_log2);
}

// The P V of a kept tile runs a tile late, inside the next tile's step
// (bsfa_kernel_splitkv.cuh): the head slots keeping the pending tile (0:
// nothing pending) and whether its V came behind a vote.
struct PendingPv {
    unsigned kept = 0;
    bool voted = false;
};

// Tile c's step once its scores are masked and their row maxima known, in
// both split kernels.  V c+1 (pending) lands for this thread before a barrier
// makes it the CTA's: tile c's vote (vote(), returning the keeping head
// slots) or, when tile c is kept without one, a barrier of its own.  Then the
// keep entry, tile c's V load if a vote kept it, the pending P V (pv(c + 1,
// kept)) and tile c's online-softmax update (update(kept)), whose P is the
// next pending P V.
template <class TR, class Cta, class Vote, class Pv, class Update>
__device__ __forceinline__ void gate_step(PendingPv& pend, const Cta& cta, const SplitKvLoads<TR>& kv,
                                          unsigned char* keep, int c, bool is_forced, unsigned all_slots, Vote vote,
                                          Pv pv, Update update) {
    if (pend.kept != 0) SplitKvPipe<TR>::wait_v_next(pend.voted);
    unsigned kept = all_slots;
    if (!is_forced) {
        kept = vote();
    } else if (pend.kept != 0 && (pend.voted || SplitKvPipe<TR>::kForcedVWait)) {
        cta_sync();
    }
    cta.write_keep(keep, c, kept);
    kv.commit_gate(c, !is_forced && kept != 0);
    if (pend.kept != 0) pv(c + 1, pend.kept);
    if (kept != 0) update(kept);
    pend.kept = kept;
    pend.voted = !is_forced;
}

// After the last tile (lo): its pending P V.
template <class Pv>
__device__ __forceinline__ void drain_pv(const PendingPv& pend, int lo, Pv pv) {
    if (pend.kept != 0) {
        cp_async_wait<0>();
        cta_sync();
        pv(lo, pend.kept);
    }
}

}  // namespace bsfa
