// The steps of a dense work tile in the warp-specialised sm_90a forward
// (the entries compiled without the gate): one block's tensor-core turn and
// retirement, dense_block for the straight-line body of the key loop, and
// dense_block_partial for the blocks of a 192-row tile
// (TraitsSm90WsWide) that reach past a warpgroup's own BSFA tile.
//
// Includes what it needs; TR is a TraitsSm90Ws.
#pragma once

#include "bsfa_block_sm90ws.cuh"
#include "bsfa_mma_sm90.cuh"
#include "bsfa_pipeline_sm90.cuh"
#include "bsfa_softmax.cuh"
#include "bsfa_tile_loop_sm90ws.cuh"
#include "bsfa_wgmma_sm90.cuh"

namespace bsfa {

// The tensor-core turn of a dense step: waits for block n's K (and for
// the previous block's V where it is multiplied), issues S of n with the
// P V of the previous block (prev_kept halves, an empty group where none),
// hands the turn on and waits for S; P V may still run.
template <class TR, bool kCausal, bool kVarlen>
__device__ __forceinline__ void dense_turn(const TileLoop<TR, kCausal, kVarlen>& t, unsigned prev_kept,
                                           const PipeState<TR::kStages>& kv,
                                           const PipeState<TR::kStages>& prev, float (&S)[TR::kBlockSNBlocks][4],
                                           float (&O)[TR::kONBlocks][4], const unsigned (&P)[TR::kKeySteps][4]) {
    mbar_wait(t.sm.bar(TR::kBarKFull + kv.stage), kv.phase);
    if (prev_kept != 0) mbar_wait(t.sm.bar(TR::kBarVFull + prev.stage), prev.phase);
    named_sync(t.my_turn(), TR::kTurnThreads);
    qk_block<TR>(S, t.q_desc(), t.k_desc(kv.stage));
    if (prev_kept != 0) {
        pv_block<TR>(O, P, t.v_desc(prev.stage), prev_kept);
    } else {
        wgmma_commit();
    }
    named_arrive(t.their_turn(), TR::kTurnThreads);
    wgmma_wait<1>();
}

// The end of a dense step, once the softmax is done: waits for the P V,
// hands the previous block's V slot back (after its copy landed, where it
// was not multiplied) and rescales O.  has_prev false (the work tile's first
// block, in the lagged gate's steps): no previous block of this tile, no
// slot to hand back -- another tile's slot released twice puts the ring's
// phases out of step with the producer's, which then hangs.
template <class TR, bool kCausal, bool kVarlen>
__device__ __forceinline__ void dense_retire(const TileLoop<TR, kCausal, kVarlen>& t, unsigned prev_kept,
                                             const PipeState<TR::kStages>& prev, float (&O)[TR::kONBlocks][4],
                                             unsigned (&P)[TR::kKeySteps][4], bool rescale, const float (&alpha)[2],
                                             bool has_prev = true) {
    wgmma_wait<0>();
    fence_regs(flat(O));
    fence_regs(P);
    if (has_prev) {
        if (prev_kept == 0) mbar_wait(t.sm.bar(TR::kBarVFull + prev.stage), prev.phase);
        if (t.lane() == 0) mbar_arrive_cluster<TR::kClusterCtas>(t.sm.bar(TR::kBarVEmpty + prev.stage));
    }
    if (rescale) rescale_rows(O, alpha);
}

// Block n (< kb.last) of a dense work tile, the mainloop step of
// consumer_tile without the gate: S of n issued with the P V of block n + 1
// (prev_kept: the tile's first block's valid halves, or both), then n's
// softmax over both halves while that P V runs.  With prev_kept a constant
// the block is straight-line code: the gate's branches and the per-half
// bookkeeping cost dense calls 5-12 % (bench/NOTES.md, v17).
template <class TR, bool kCausal, bool kVarlen>
__device__ __forceinline__ void dense_block(const TileLoop<TR, kCausal, kVarlen>& t, int n, int first,
                                            unsigned prev_kept, PipeState<TR::kStages>& kv,
                                            float (&O)[TR::kONBlocks][4], unsigned (&P)[TR::kKeySteps][4],
                                            float (&m)[2], float (&l)[2]) {
    constexpr unsigned kBoth = (1u << TR::kKeyHalves) - 1;
    const PipeState<TR::kStages> prev = kv.previous();
    float S[TR::kBlockSNBlocks][4];
    dense_turn(t, prev_kept, kv, prev, S, O, P);
    finish_qk_dense<TR, kCausal, kVarlen>(t, S, n, first, kv);
    float alpha[2];
    float no_vmx[TR::kKeyHalves][2];  // not read: the softmax takes its own row maxima (have_vmx 0)
    if constexpr (TR::kLatePack) {
        const bool rescale = softmax_block<TR, true>(S, kBoth, m, l, P, alpha, t.scale_log2, 0u, no_vmx);
        dense_retire(t, prev_kept, prev, O, P, rescale, alpha);
        pack_p<TR>(S, P);
    } else {
        unsigned Pn[TR::kKeySteps][4];
        const bool rescale = softmax_block<TR>(S, kBoth, m, l, Pn, alpha, t.scale_log2, 0u, no_vmx);
        dense_retire(t, prev_kept, prev, O, P, rescale, alpha);
        copy_regs(P, Pn);
    }
    kv.advance();
}

// Block n's halves (bit h) whose key tile lies within c_end.
template <class TR>
__device__ __forceinline__ unsigned halves_within(int n, int c_end) {
    unsigned bits = 0;
#pragma unroll
    for (int h = 0; h < TR::kKeyHalves; ++h) bits |= (n * TR::kKeyHalves + h <= c_end ? 1u : 0u) << h;
    return bits;
}

// Block n of a dense work tile of 192 rows (!TR::kBsfaRows) while this
// warpgroup's own BSFA tile may not reach all of it: dense_block with the
// halves kept a variable, those of the tile's key range (own: a mask of
// halves_within) among the valid ones.  A key tile is multiplied into O only
// by the rows of BSFA tiles that keep it, as in the reference, where a
// non-finite v reaches exactly those rows (0 * inf in P V).  Returns block
// n's kept halves, which the next step multiplies.
template <class TR, bool kCausal, bool kVarlen>
__device__ __forceinline__ unsigned dense_block_partial(const TileLoop<TR, kCausal, kVarlen>& t, int n, int first,
                                                        unsigned prev_kept, unsigned own,
                                                        PipeState<TR::kStages>& kv,
                                                        float (&O)[TR::kONBlocks][4], unsigned (&P)[TR::kKeySteps][4],
                                                        float (&m)[2], float (&l)[2]) {
    static_assert(TR::kLatePack, "the 192-row entry packs P late");
    const PipeState<TR::kStages> prev = kv.previous();
    float S[TR::kBlockSNBlocks][4];
    dense_turn(t, prev_kept, kv, prev, S, O, P);
    const unsigned kept = finish_qk_dense<TR, kCausal, kVarlen>(t, S, n, first, kv) & own;
    float alpha[2];
    float no_vmx[TR::kKeyHalves][2];  // not read (have_vmx 0)
    bool rescale = false;
    if (kept != 0) rescale = softmax_block<TR, true>(S, kept, m, l, P, alpha, t.scale_log2, 0u, no_vmx);
    dense_retire(t, prev_kept, prev, O, P, rescale, alpha);
    if (kept != 0) pack_p<TR>(S, P);
    kv.advance();
    return kept;
}

}  // namespace bsfa
