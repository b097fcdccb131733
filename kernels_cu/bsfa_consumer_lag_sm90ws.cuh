// The gated key loop of bsfa_fwd_lag (TraitsSm90WsLag): each consumer
// warpgroup issues S of the next block (at head dim 128 its first half)
// before the gate exchange of the current one, so that the tensor cores
// have work while the two warpgroups settle a decision.  At head dim 64 a
// block's votes are posted as soon as its S retires, a step before they
// are resolved.
//
// Includes what it needs; TR is a TraitsSm90Ws.
#pragma once

#include "bsfa_block_sm90ws.cuh"
#include "bsfa_dense_block_sm90ws.cuh"
#include "bsfa_gate.cuh"
#include "bsfa_mask.cuh"
#include "bsfa_params.cuh"
#include "bsfa_pipeline_sm90.cuh"
#include "bsfa_smem_sm90ws.cuh"
#include "bsfa_tile_loop_sm90ws.cuh"
#include "bsfa_tile_scheduler_sm90.cuh"
#include "bsfa_wgmma_sm90.cuh"

namespace bsfa {

// The tensor-core turn of a lag step for block n, whose S (issued a step
// earlier; with TR::kLagHalf only its first 64-key half) is in Sc: waits for
// the next block's K (kHasNext) and for block n + 1's V where it is
// multiplied, then issues, as separate wgmma groups, kLagHalf: block n's
// second half; the next block's S into Sn (kLagHalf: its first half; an
// empty group without a next block); the P V of block n + 1 (prev_kept
// halves, an empty group where none).
template <class TR, bool kCausal, bool kHasNext>
__device__ __forceinline__ void lag_turn(const TileLoop<TR, kCausal, false>& t, unsigned prev_kept,
                                         float (&Sc)[TR::kBlockSNBlocks][4],
                                         float (&Sn)[TR::kLagHalf ? TR::kSNBlocks : TR::kBlockSNBlocks][4],
                                         const PipeState<TR::kStages>& kv, const PipeState<TR::kStages>& next,
                                         const PipeState<TR::kStages>& prev, float (&O)[TR::kONBlocks][4],
                                         const unsigned (&P)[TR::kKeySteps][4]) {
    if constexpr (kHasNext) mbar_wait(t.sm.bar(TR::kBarKFull + next.stage), next.phase);
    if (prev_kept != 0) mbar_wait(t.sm.bar(TR::kBarVFull + prev.stage), prev.phase);
    named_sync(t.my_turn(), TR::kTurnThreads);
    if constexpr (TR::kLagHalf) qk_half<TR>(half_of<TR>(Sc, 1), t.q_desc(), t.k_desc(kv.stage), 1);
    if constexpr (!kHasNext) {
        wgmma_commit();  // an empty group: the waits count the same on every path
    } else if constexpr (TR::kLagHalf) {
        qk_half<TR>(Sn, t.q_desc(), t.k_desc(next.stage), 0);
    } else {
        qk_block<TR>(Sn, t.q_desc(), t.k_desc(next.stage));
    }
    if (prev_kept != 0) {
        pv_block<TR>(O, P, t.v_desc(prev.stage), prev_kept);
    } else {
        wgmma_commit();
    }
    named_arrive(t.their_turn(), TR::kTurnThreads);
}

// One step of consumer_tile_lag at head dim 128 (TR::kLagHalf): lag_turn,
// then block n is gated once its second half is in and its softmax taken
// while the next block's first half and the P V run; P takes block n's
// probabilities once all have retired (waiting for the P V alone, with S
// still pending, makes ptxas serialise every wgmma: C7515), and Sn moves
// into Sc's first half (32 moves).  The tile's first block (n == last) has
// no previous one to retire.  Returns n's kept halves.
template <class TR, bool kCausal, bool kHasNext>
__device__ __forceinline__ unsigned lag_step(const TileLoop<TR, kCausal, false>& t, int n, int first, int last,
                                             unsigned prev_kept, float (&Sc)[TR::kBlockSNBlocks][4],
                                             float (&Sn)[TR::kSNBlocks][4], PipeState<TR::kStages>& kv,
                                             unsigned& vote_idx, float (&O)[TR::kONBlocks][4],
                                             unsigned (&P)[TR::kKeySteps][4], float (&m)[2], float (&l)[2]) {
    static_assert(TR::kLagHalf, "half a block ahead: head dim 128");
    const PipeState<TR::kStages> prev = kv.previous();
    PipeState<TR::kStages> next = kv;
    next.advance();
    lag_turn<TR, kCausal, kHasNext>(t, prev_kept, Sc, Sn, kv, next, prev, O, P);
    wgmma_wait<2>();  // block n's S is in: the groups before this turn's last two
    float vmx[TR::kKeyHalves][2];
    const PostedGate g = finish_qk<TR, kCausal, false>(t, Sc, n, first, kv, vote_idx, vmx);
    const unsigned kept = gate_resolve<TR>(g, n, t.sm, vote_idx, t.keep_row);
    float alpha[2];
    bool rescale = false;
    if (kept != 0) rescale = softmax_block<TR, true>(Sc, kept, m, l, P, alpha, t.scale_log2, g.gated(), vmx);
    dense_retire(t, prev_kept, prev, O, P, rescale, alpha, n != last);
    if (kept != 0) pack_p<TR>(Sc, P);
    if constexpr (kHasNext) {
        float(&Sc0)[TR::kSNBlocks][4] = half_of<TR>(Sc, 0);
#pragma unroll
        for (int i = 0; i < TR::kSNBlocks; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) Sc0[i][j] = Sn[i][j];
    }
    kv.advance();
    return kept;
}

// One step of consumer_tile_lag at head dim 64 (a whole block ahead): block
// n's S is in Sc, masked, and its votes were posted (g, vmx) at the end of
// the step before, when it retired -- the other warpgroup's too, so the
// exchange finds them waiting instead of waiting for that warpgroup's next
// turn.  lag_turn, then block n's decision and softmax while the next S and
// the P V run; once both retired P takes block n's probabilities, and the
// next block's S is masked and its votes posted, a step before they are
// resolved.  Sa / Sb trade roles every step.  Returns n's kept halves.
template <class TR, bool kCausal, bool kHasNext>
__device__ __forceinline__ unsigned lag_step_posted(const TileLoop<TR, kCausal, false>& t, int n, int first,
                                                    int last, unsigned prev_kept, float (&Sc)[TR::kBlockSNBlocks][4],
                                                    float (&Sn)[TR::kBlockSNBlocks][4], PostedGate& g,
                                                    float (&vmx)[TR::kKeyHalves][2], PipeState<TR::kStages>& kv,
                                                    unsigned& vote_idx, float (&O)[TR::kONBlocks][4],
                                                    unsigned (&P)[TR::kKeySteps][4], float (&m)[2], float (&l)[2]) {
    static_assert(!TR::kLagHalf, "a whole block ahead: head dim 64");
    const PipeState<TR::kStages> prev = kv.previous();
    PipeState<TR::kStages> next = kv;
    next.advance();
    lag_turn<TR, kCausal, kHasNext>(t, prev_kept, Sc, Sn, kv, next, prev, O, P);
    const unsigned kept = gate_resolve<TR>(g, n, t.sm, vote_idx, t.keep_row);
    float alpha[2];
    bool rescale = false;
    if (kept != 0) rescale = softmax_block<TR, true>(Sc, kept, m, l, P, alpha, t.scale_log2, g.gated(), vmx);
    dense_retire(t, prev_kept, prev, O, P, rescale, alpha, n != last);  // the next S has retired too
    if (kept != 0) pack_p<TR>(Sc, P);
    if constexpr (kHasNext) g = finish_qk<TR, kCausal, false>(t, Sn, n - 1, first, next, vote_idx, vmx);
    kv.advance();
    return kept;
}

// The gated key blocks of one work tile with S a block ahead
// (TR::kLagGate, bsfa_fwd_lag): while block n is gated -- the exchange with
// the other warpgroup's votes -- and its softmax taken, the tensor cores
// already hold this warpgroup's S of block n - 1 beside the P V of block
// n + 1, so that the exchange no longer leaves them idle (bench/NOTES.md,
// v11-v17: the cost of the gate that spans both warpgroups; v21-v22 for
// this entry).  P is packed late to make room for the second S.  Decisions
// and the order of the blocks are consumer_tile's, and each warp still
// posts and resolves its exchanges alternately, in order: the results are
// bsfa_fwd's bitwise.
template <class TR, bool kCausal>
__device__ __forceinline__ void consumer_tile_lag(const Params& p, const SmemWs<TR>& sm, const WorkTile& w,
                                                  const QueryTile<TR, kCausal>& qt, const KeyBlocks& kb,
                                                  PipeState<TR::kStages>& kv, unsigned& q_phase,
                                                  unsigned& vote_idx, unsigned char* keep_row,
                                                  float (&O)[TR::kONBlocks][4], float (&m)[2], float (&l)[2]) {
    static_assert(TR::kLatePack, "the lagged gate packs P late");
    const GatePlan<TR> plan(qt, p.thresholds, p.thr_scalar, p.thr_mode, p.thr_T, w.h);
    const TileLoop<TR, kCausal, false> t{p, sm, qt, plan, p.softmax_scale * kLog2e, keep_row, MaskBounds{0, 0, 0}};
    mbar_wait(sm.bar(TR::kBarQFull), q_phase);
    q_phase ^= 1u;

    unsigned P[TR::kKeySteps][4];
    int n = kb.last;
    unsigned prev_kept = 0;
    if constexpr (TR::kLagHalf) {
        float Sc[TR::kBlockSNBlocks][4];
        float En[TR::kSNBlocks][4];
        // The first block's first half, alone in its turn.
        mbar_wait(sm.bar(TR::kBarKFull + kv.stage), kv.phase);
        named_sync(t.my_turn(), TR::kTurnThreads);
        qk_half<TR>(half_of<TR>(Sc, 0), t.q_desc(), t.k_desc(kv.stage), 0);
        named_arrive(t.their_turn(), TR::kTurnThreads);
#pragma unroll 1
        for (; n > kb.first; --n) {
            prev_kept = lag_step<TR, kCausal, true>(t, n, kb.first, kb.last, prev_kept, Sc, En, kv, vote_idx, O, P, m, l);
        }
        prev_kept = lag_step<TR, kCausal, false>(t, n, kb.first, kb.last, prev_kept, Sc, En, kv, vote_idx, O, P, m, l);
    } else {
    float Sa[TR::kBlockSNBlocks][4], Sb[TR::kBlockSNBlocks][4];
    // The first block's S, alone in its turn, masked and its votes posted.
    mbar_wait(sm.bar(TR::kBarKFull + kv.stage), kv.phase);
    named_sync(t.my_turn(), TR::kTurnThreads);
    qk_block<TR>(Sa, t.q_desc(), t.k_desc(kv.stage));
    named_arrive(t.their_turn(), TR::kTurnThreads);
    wgmma_wait<0>();
    float vmx[TR::kKeyHalves][2];
    PostedGate g = finish_qk<TR, kCausal, false>(t, Sa, n, kb.first, kv, vote_idx, vmx);
#pragma unroll 1
    while (true) {
        if (n == kb.first) {
            prev_kept = lag_step_posted<TR, kCausal, false>(t, n, kb.first, kb.last, prev_kept, Sa, Sb, g, vmx, kv,
                                                            vote_idx, O, P, m, l);
            break;
        }
        prev_kept = lag_step_posted<TR, kCausal, true>(t, n, kb.first, kb.last, prev_kept, Sa, Sb, g, vmx, kv,
                                                       vote_idx, O, P, m, l);
        if (--n == kb.first) {
            prev_kept = lag_step_posted<TR, kCausal, false>(t, n, kb.first, kb.last, prev_kept, Sb, Sa, g, vmx, kv,
                                                            vote_idx, O, P, m, l);
            break;
        }
        prev_kept = lag_step_posted<TR, kCausal, true>(t, n, kb.first, kb.last, prev_kept, Sb, Sa, g, vmx, kv,
                                                       vote_idx, O, P, m, l);
        --n;
    }
    }

    // The last block's P V, as consumer_tile ends.
    const PipeState<TR::kStages> prev = kv.previous();
    mbar_wait(sm.bar(TR::kBarVFull + prev.stage), prev.phase);
    if (prev_kept != 0) {
        named_sync(t.my_turn(), TR::kTurnThreads);
        pv_block<TR>(O, P, t.v_desc(prev.stage), prev_kept);
        named_arrive(t.their_turn(), TR::kTurnThreads);
    }
    wgmma_wait<0>();
    fence_regs(flat(O));
    fence_regs(P);
    if (t.lane() == 0) mbar_arrive_cluster<TR::kClusterCtas>(sm.bar(TR::kBarVEmpty + prev.stage));
}

}  // namespace bsfa
