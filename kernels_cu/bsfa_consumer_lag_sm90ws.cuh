// The gated key loop of bsfa_fwd_lag (TraitsSm90WsLag): each consumer
// warpgroup issues S of the next block (at head dim 128 its first half)
// before the gate exchange of the current one, so that the tensor cores
// have work while the two warpgroups settle a decision.
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

// One step of consumer_tile_lag for block n, whose S (issued a step
// earlier; with TR::kLagHalf only its first 64-key half) is in Sc.  The turn
// issues, as separate wgmma groups, kLagHalf: block n's second half; then
// the next block's S into Sn (kHasNext; kLagHalf: its first half); then the
// P V of block n + 1 (prev_kept halves).  Block n is gated and its softmax
// taken while they run; P takes block n's probabilities once all have
// retired (waiting for the P V alone, with S still pending, makes ptxas
// serialise every wgmma: C7515), and kLagHalf moves Sn into Sc's first half
// (32 moves; Sa / Sb trade roles otherwise).  The tile's first block
// (n == last) has no previous one to retire.  Returns n's kept halves.
template <class TR, bool kCausal, bool kHasNext>
__device__ __forceinline__ unsigned lag_step(const TileLoop<TR, kCausal, false>& t, int n, int first, int last,
                                             unsigned prev_kept, float (&Sc)[TR::kBlockSNBlocks][4],
                                             float (&Sn)[TR::kLagHalf ? TR::kSNBlocks : TR::kBlockSNBlocks][4],
                                             PipeState<TR::kStages>& kv, unsigned& vote_idx,
                                             float (&O)[TR::kONBlocks][4], unsigned (&P)[TR::kKeySteps][4],
                                             float (&m)[2], float (&l)[2]) {
    const PipeState<TR::kStages> prev = kv.previous();
    PipeState<TR::kStages> next = kv;
    next.advance();
    if constexpr (kHasNext) mbar_wait(t.sm.bar(TR::kBarKFull + next.stage), next.phase);
    if (prev_kept != 0) mbar_wait(t.sm.bar(TR::kBarVFull + prev.stage), prev.phase);
    named_sync(t.my_turn(), TR::kTurnThreads);
    if constexpr (TR::kLagHalf) qk_half<TR>(half_of<TR>(Sc, 1), t.q_desc(), t.k_desc(kv.stage), 1);
    if constexpr (!kHasNext) {
        wgmma_commit();  // an empty group: the waits below count the same on every path
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
    wgmma_wait<2>();  // block n's S is in: the groups before this turn's last two
    float vmx[TR::kKeyHalves][2];
    const PostedGate g = finish_qk<TR, kCausal, false>(t, Sc, n, first, kv, vote_idx, vmx);
    const unsigned kept = gate_resolve<TR>(g, n, t.sm, vote_idx, t.keep_row);
    float alpha[2];
    bool rescale = false;
    if (kept != 0) rescale = softmax_block<TR, true>(Sc, kept, m, l, P, alpha, t.scale_log2, g.gated(), vmx);
    dense_retire(t, prev_kept, prev, O, P, rescale, alpha, n != last);
    if (kept != 0) pack_p<TR>(Sc, P);
    if constexpr (TR::kLagHalf && kHasNext) {
        float(&Sc0)[TR::kSNBlocks][4] = half_of<TR>(Sc, 0);
#pragma unroll
        for (int i = 0; i < TR::kSNBlocks; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) Sc0[i][j] = Sn[i][j];
    }
    kv.advance();
    return kept;
}

// The gated key blocks of one work tile with S a block ahead
// (TR::kLagGate, bsfa_fwd_lag): while block n is gated -- the exchange with
// the other warpgroup's votes -- and its softmax taken, the tensor cores
// already hold this warpgroup's S of block n - 1 beside the P V of block
// n + 1, so that the exchange no longer leaves them idle (bench/NOTES.md,
// v11-v17: the cost of the gate that spans both warpgroups).  Two S buffers
// trade roles every step (two steps a trip, no copies); P is packed late to
// make room for the second.  Decisions, the order of the blocks and of the
// exchanges are consumer_tile's: the results are bsfa_fwd's bitwise.
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
    // The first block's S, alone in its turn.
    mbar_wait(sm.bar(TR::kBarKFull + kv.stage), kv.phase);
    named_sync(t.my_turn(), TR::kTurnThreads);
    qk_block<TR>(Sa, t.q_desc(), t.k_desc(kv.stage));
    named_arrive(t.their_turn(), TR::kTurnThreads);
#pragma unroll 1
    while (true) {
        if (n == kb.first) {
            prev_kept = lag_step<TR, kCausal, false>(t, n, kb.first, kb.last, prev_kept, Sa, Sb, kv, vote_idx, O, P, m, l);
            break;
        }
        prev_kept = lag_step<TR, kCausal, true>(t, n, kb.first, kb.last, prev_kept, Sa, Sb, kv, vote_idx, O, P, m, l);
        if (--n == kb.first) {
            prev_kept = lag_step<TR, kCausal, false>(t, n, kb.first, kb.last, prev_kept, Sb, Sa, kv, vote_idx, O, P, m, l);
            break;
        }
        prev_kept = lag_step<TR, kCausal, true>(t, n, kb.first, kb.last, prev_kept, Sb, Sa, kv, vote_idx, O, P, m, l);
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
