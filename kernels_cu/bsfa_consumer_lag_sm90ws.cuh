// The gated key loop of bsfa_fwd_lag (TraitsSm90WsLag): each consumer
// warpgroup issues S of the next block before the gate exchange of the
// current one, so that the tensor cores have work while the two warpgroups
// settle a decision, and posts a block's votes as soon as its S retires, a
// step before they are resolved.
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

// The P V of block n + 1 (prev_kept halves), P from registers or, with
// TR::kPInSmem, from shared memory.
template <class TR, bool kCausal>
__device__ __forceinline__ void lag_pv(const TileLoop<TR, kCausal, false>& t, float (&O)[TR::kONBlocks][4],
                                       const unsigned (&P)[TR::kKeySteps][4], unsigned long long v_desc,
                                       unsigned prev_kept) {
    if constexpr (TR::kPInSmem) {
        pv_block_smem<TR>(O, t.p_desc(), v_desc, prev_kept);
    } else {
        pv_block<TR>(O, P, v_desc, prev_kept);
    }
}

// One step of consumer_tile_lag for block n: its S is in Sc, masked, and its
// votes were posted (g, vmx) at the end of the step before, when it retired
// -- the other warpgroup's too, so the exchange finds them waiting instead
// of waiting for that warpgroup's next turn.  The turn waits for the next
// block's K (kHasNext) and for block n + 1's V where it is multiplied, then
// issues the next block's S into Sn (an empty group without one) and the
// P V of block n + 1 (an empty group where none); block n's decision and
// softmax run while they do.  Once both retired P takes block n's
// probabilities (late: Sn needs P's registers, or at head dim 128 P lives in
// shared memory), and the next block's S is masked and its votes posted, a
// step before they are resolved.  Sa / Sb trade roles every step.  The
// tile's first block (n == last) has no previous one to retire.  Returns
// n's kept halves.
template <class TR, bool kCausal, bool kHasNext>
__device__ __forceinline__ unsigned lag_step(const TileLoop<TR, kCausal, false>& t, int n, int first, int last,
                                             unsigned prev_kept, float (&Sc)[TR::kBlockSNBlocks][4],
                                             float (&Sn)[TR::kBlockSNBlocks][4], PostedGate& g,
                                             float (&vmx)[TR::kKeyHalves][2], PipeState<TR::kStages>& kv,
                                             unsigned& vote_idx, float (&O)[TR::kONBlocks][4],
                                             unsigned (&P)[TR::kKeySteps][4], float (&m)[2], float (&l)[2]) {
    const PipeState<TR::kStages> prev = kv.previous();
    PipeState<TR::kStages> next = kv;
    next.advance();
    if constexpr (kHasNext) mbar_wait(t.sm.bar(TR::kBarKFull + next.stage), next.phase);
    if (prev_kept != 0) mbar_wait(t.sm.bar(TR::kBarVFull + prev.stage), prev.phase);
    named_sync(t.my_turn(), TR::kTurnThreads);
    if constexpr (kHasNext) {
        qk_block<TR>(Sn, t.q_desc(), t.k_desc(next.stage));
    } else {
        wgmma_commit();  // an empty group: the wait counts the same on every path
    }
    if (prev_kept != 0) {
        lag_pv(t, O, P, t.v_desc(prev.stage), prev_kept);
    } else {
        wgmma_commit();
    }
    named_arrive(t.their_turn(), TR::kTurnThreads);
    const unsigned kept = gate_resolve<TR>(g, n, t.sm, vote_idx, t.keep_row);
    float alpha[2];
    bool rescale = false;
    if (kept != 0) rescale = softmax_block<TR, true>(Sc, kept, m, l, P, alpha, t.scale_log2, g.gated(), vmx);
    dense_retire(t, prev_kept, prev, O, P, rescale, alpha, n != last);  // the next S has retired too
    if (kept != 0) {
        if constexpr (TR::kPInSmem) {
            store_p<TR>(Sc, t.sm.p(), t.wg());
        } else {
            pack_p<TR>(Sc, P);
        }
    }
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
// this entry).  P is packed late to make room for the second S (at head
// dim 128 it goes to shared memory: TR::kPInSmem).  Decisions
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
            prev_kept = lag_step<TR, kCausal, false>(t, n, kb.first, kb.last, prev_kept, Sa, Sb, g, vmx, kv,
                                                     vote_idx, O, P, m, l);
            break;
        }
        prev_kept = lag_step<TR, kCausal, true>(t, n, kb.first, kb.last, prev_kept, Sa, Sb, g, vmx, kv,
                                                    vote_idx, O, P, m, l);
        if (--n == kb.first) {
            prev_kept = lag_step<TR, kCausal, false>(t, n, kb.first, kb.last, prev_kept, Sb, Sa, g, vmx, kv,
                                                     vote_idx, O, P, m, l);
            break;
        }
        prev_kept = lag_step<TR, kCausal, true>(t, n, kb.first, kb.last, prev_kept, Sb, Sa, g, vmx, kv,
                                                    vote_idx, O, P, m, l);
        --n;
    }

    // The last block's P V, as consumer_tile ends.
    const PipeState<TR::kStages> prev = kv.previous();
    mbar_wait(sm.bar(TR::kBarVFull + prev.stage), prev.phase);
    if (prev_kept != 0) {
        named_sync(t.my_turn(), TR::kTurnThreads);
        lag_pv(t, O, P, t.v_desc(prev.stage), prev_kept);
        named_arrive(t.their_turn(), TR::kTurnThreads);
    }
    wgmma_wait<0>();
    fence_regs(flat(O));
    fence_regs(P);
    if (t.lane() == 0) mbar_arrive_cluster<TR::kClusterCtas>(sm.bar(TR::kBarVEmpty + prev.stage));
}

}  // namespace bsfa
