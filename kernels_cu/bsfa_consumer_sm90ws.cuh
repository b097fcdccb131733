// The consumers of the warp-specialised sm_90a forward: each of the two
// consumer warpgroups owns 64 rows of the 128-row query tile (three of a
// 192-row tile in bsfa_fwd_dense_wide) and walks the tile list with the
// producer.  This file holds the work-tile loop (consumer_tile) and the
// walk over the list (consumer_loop); the per-block pieces are in
// bsfa_tile_loop_sm90ws.cuh and bsfa_dense_block_sm90ws.cuh, the gate with
// S a block ahead in bsfa_consumer_lag_sm90ws.cuh.  Within a work tile the 128-key blocks are
// software-pipelined across the warpgroup's own wgmma groups: the S of
// block n is issued, then the P V of block n+1, and the gate and softmax of
// block n run while that P V is still on the tensor cores; O is rescaled
// only after it retires.  Every smem slot is released by each consumer warp
// (one arrival per warp) once its reads are over.
//
// Ping-pong: the two warpgroups take turns to issue their tensor-core work
// (named barriers kBarTurn + wg), each handing the turn over as soon as its
// wgmma are issued, so that one warpgroup's softmax can run while the
// other's GEMMs occupy the tensor cores.  Both take the same turns (the
// gate's decisions are uniform over the CTA), warpgroup 0 first.
//
// kVarlen (bsfa_fwd_varlen): the work tile's problem is a packed sequence
// (bsfa_problem.cuh), whose lengths the masks take from registers instead of
// the Params.  A query tile past the sequence's end only clears its keep
// row.  The boxes of a sequence's last, ragged key block hold the next
// sequence's keys and values past its end (bsfa_producer_sm90ws.cuh): the
// masks set their scores to -inf, but a zero P times a non-finite V is NaN in
// P V, so the consumers zero those V rows in shared memory first
// (zero_v_tail).
//
// kSplit (bsfa_fwd_split): a work tile is one key split of a query tile
// (KeyBlocks, bsfa_tile_scheduler_sm90.cuh); its rows end in fp32 partials,
// normalised by the split's own row sums, with the split's lse
// (epilogue_part_ws), which bsfa_combine merges.  Decisions are the same
// per (query tile, key tile) whichever split visits the tile.  With two
// heads a tile (TR::kPackHeads, bsfa_fwd_split_pack) w.h is a pair of query
// heads and each warpgroup holds its own head's rows (wg_head), from row 0
// of its 64: masks, gates, keep row and partials are per warpgroup, and the
// warpgroups take every turn whatever they keep, since their decisions
// differ.
//
// Includes what it needs; TR is a TraitsSm90Ws.
#pragma once

#include "bsfa_block_sm90ws.cuh"
#include "bsfa_consumer_lag_sm90ws.cuh"
#include "bsfa_dense_block_sm90ws.cuh"
#include "bsfa_epilogue_sm90ws.cuh"
#include "bsfa_gate.cuh"
#include "bsfa_mask.cuh"
#include "bsfa_params.cuh"
#include "bsfa_problem.cuh"
#include "bsfa_pipeline_sm90.cuh"
#include "bsfa_smem_sm90ws.cuh"
#include "bsfa_softmax.cuh"
#include "bsfa_tile_loop_sm90ws.cuh"
#include "bsfa_tile_scheduler_sm90.cuh"
#include "bsfa_wgmma_sm90.cuh"

namespace bsfa {

// Zeroes rows row0.. (row0 > 0) of every panel of V slot kv.stage, once its
// copy has landed: in a 128-byte swizzled panel the swizzle only permutes
// the 16-byte chunks within a row, so those rows are the panel's tail bytes.
// Both consumer warpgroups share the work, then fence their generic-proxy
// stores against the wgmma (async-proxy) reads and meet at a barrier of
// their own, before either issues a P V on the slot.  Uniform over both
// warpgroups (the same work tile), and before any turn of this tile: it
// cannot deadlock against the ping-pong.
template <class TR>
__device__ __forceinline__ void zero_v_tail(const SmemWs<TR>& sm, const PipeState<TR::kStages>& kv, int row0) {
    mbar_wait(sm.bar(TR::kBarVFull + kv.stage), kv.phase);
    const unsigned slot = sm.v() + kv.stage * TR::kKVBytes;
    const int first = row0 * kSwizzleBytes + ((int)threadIdx.x - 128) * 16;
#pragma unroll
    for (int pn = 0; pn < TR::kPanels; ++pn) {
#pragma unroll 1
        for (int off = first; off < TR::kKVPanelBytes; off += TR::kConsumerThreads * 16) {
            sts128_zero(slot + pn * TR::kKVPanelBytes + off);
        }
    }
    fence_proxy_async();
    named_sync(TR::kBarVZero, TR::kConsumerThreads);
}

// The key blocks kb of one work tile (at least one): O, m, l come in
// initialised and leave unnormalised (per-lane partial row sums in l).
// kVarlen: seq is the packed sequence's extent, and rows v_zero_row.. of the
// first block's V are zeroed (none when v_zero_row is kBlockKeys).
// kGated false (a dense launch, thr_mode 0): no gate; the first block keeps
// its valid halves and the later ones run dense_block.
template <class TR, bool kCausal, bool kVarlen, bool kGated>
__device__ __forceinline__ void consumer_tile(const Params& p, const SmemWs<TR>& sm, const WorkTile& w,
                                              const QueryTile<TR, kCausal>& qt, const KeyBlocks& kb,
                                              PipeState<TR::kStages>& kv,
                                              unsigned& q_phase, unsigned& vote_idx, unsigned char* keep_row,
                                              float (&O)[TR::kONBlocks][4], float (&m)[2], float (&l)[2],
                                              const MaskBounds& seq, int v_zero_row) {
    const GatePlan<TR> plan(qt, p.thresholds, p.thr_scalar, p.thr_mode, p.thr_T,
                            wg_head<TR>(w, ((int)threadIdx.x >> 7) - 1));
    const TileLoop<TR, kCausal, kVarlen> t{p, sm, qt, plan, p.softmax_scale * kLog2e, keep_row, seq};
    const int my_turn = TR::kBarTurn + t.wg();
    const int their_turn = next_turn<TR>(t.wg());
    // TileLoop::k_desc / v_desc spelled out on this function's sm: through
    // t the gated loop schedules differently (its SASS, kept since v16).
    auto k_desc = [&](int s) { return make_desc(sm.k() + s * TR::kKVBytes, 16, kSwizzleAtomBytes); };
    auto v_desc = [&](int s) { return make_desc(sm.v() + s * TR::kKVBytes, TR::kKVPanelBytes, kSwizzleAtomBytes); };

    if constexpr (kVarlen) {
        if (v_zero_row < TR::kBlockKeys) zero_v_tail<TR>(sm, kv, v_zero_row);
    }
    mbar_wait(sm.bar(TR::kBarQFull), q_phase);
    q_phase ^= 1u;
    // Dense: O (zero here) opaque from now on, so that no zero is folded into
    // the first P V's accumulators, a definition inside its wgmma stage
    // (C7515).  The gated loop's P V is conditional and never sees one.
    if constexpr (!kGated) fence_regs(flat(O));

    float S[TR::kBlockSNBlocks][4];
    float alpha[2];
    unsigned P[TR::kKeySteps][4];
    int n = kb.last;

    // The first block: nothing to overlap with yet, and O is still zero.
    mbar_wait(sm.bar(TR::kBarKFull + kv.stage), kv.phase);
    named_sync(my_turn, TR::kTurnThreads);
    qk_block<TR>(S, t.q_desc(), k_desc(kv.stage));
    named_arrive(their_turn, TR::kTurnThreads);
    wgmma_wait<0>();
    float vmx[TR::kKeyHalves][2];
    PostedGate g{0};
    unsigned kept;
    if constexpr (kGated) {
        g = finish_qk<TR, kCausal, kVarlen>(t, S, n, kb.first, kv, vote_idx, vmx);
        kept = gate_resolve<TR>(g, n, sm, vote_idx, keep_row);
    } else {
        kept = finish_qk_dense<TR, kCausal, kVarlen>(t, S, n, kb.first, kv);
    }
    // 192-row tiles: the last key tile of this warpgroup's BSFA tile.
    int own_c_end = 0;
    if constexpr (!TR::kBsfaRows) {
        const int row0 = w.a * TR::kBlockM + t.wg() * TR::kWgmmaM;
        own_c_end = QueryTile<typename TR::BsfaTile, kCausal>(row0 / TileShape::kBlockM, cta_problem<false>(p, w.b)).c_end;
        // Broadcast, so that ptxas sees it (and the halves kept with it) as
        // warp-uniform: a P V under a condition it cannot prove uniform
        // serialises every wgmma (C7520).
        own_c_end = __shfl_sync(0xffffffffu, own_c_end, 0);
        kept &= halves_within<TR>(n, own_c_end);
    }
    if (kept != 0) softmax_block<TR>(S, kept, m, l, P, alpha, t.scale_log2, g.gated(), vmx);
    unsigned prev_kept = kept;
    kv.advance();

    if constexpr (kGated) {
#pragma unroll 1
        for (--n; n >= kb.first; --n) {
            const PipeState<TR::kStages> prev = kv.previous();
            mbar_wait(sm.bar(TR::kBarKFull + kv.stage), kv.phase);
            if (prev_kept != 0) mbar_wait(sm.bar(TR::kBarVFull + prev.stage), prev.phase);
            named_sync(my_turn, TR::kTurnThreads);
            qk_block<TR>(S, t.q_desc(), k_desc(kv.stage));
            if (prev_kept != 0) {
                pv_block<TR>(O, P, v_desc(prev.stage), prev_kept);
            } else {
                wgmma_commit();  // an empty group: the waits below count the same on both paths
            }
            named_arrive(their_turn, TR::kTurnThreads);
            wgmma_wait<1>();  // S is ready; P V may still run
            g = finish_qk<TR, kCausal, kVarlen>(t, S, n, kb.first, kv, vote_idx, vmx);
            kept = gate_resolve<TR>(g, n, sm, vote_idx, keep_row);
            unsigned Pn[TR::kKeySteps][4];
            bool rescale = false;
            if (kept != 0) rescale = softmax_block<TR>(S, kept, m, l, Pn, alpha, t.scale_log2, g.gated(), vmx);
            // Unconditional, so that ptxas sees O retired on every path (a wait
            // under the same condition as the issue makes it serialise all wgmma).
            wgmma_wait<0>();
            fence_regs(flat(O));
            fence_regs(P);
            // Skipped blocks still wait for their (speculative) V: the slot is
            // only handed back once the copy into it is over.
            if (prev_kept == 0) mbar_wait(sm.bar(TR::kBarVFull + prev.stage), prev.phase);
            if (t.lane() == 0) mbar_arrive_cluster<TR::kClusterCtas>(sm.bar(TR::kBarVEmpty + prev.stage));
            if (rescale) rescale_rows(O, alpha);
            if (kept != 0) {
#pragma unroll
                for (int kk = 0; kk < TR::kKeySteps; ++kk)
#pragma unroll
                    for (int j = 0; j < 4; ++j) P[kk][j] = Pn[kk][j];
            }
            prev_kept = kept;
            kv.advance();
        }
    } else {
        constexpr unsigned kBoth = (1u << TR::kKeyHalves) - 1;
        if constexpr (!TR::kBsfaRows) {
            // 192-row tiles: the blocks at the top of the key range (visited
            // first) may lie partly or wholly past this warpgroup's own BSFA
            // tile; from the first block wholly within it, preceded by one
            // wholly within, dense_block.
#pragma unroll 1
            for (--n; n >= kb.first && (prev_kept != kBoth || halves_within<TR>(n, own_c_end) != kBoth); --n) {
                prev_kept = dense_block_partial<TR, kCausal, kVarlen>(t, n, kb.first, prev_kept,
                                                                      halves_within<TR>(n, own_c_end), kv, O, P,
                                                                      m, l);
            }
#pragma unroll 1
            for (; n >= kb.first; --n) dense_block<TR, kCausal, kVarlen>(t, n, kb.first, kBoth, kv, O, P, m, l);
        } else {
        // The second block takes the first's P V, which may hold one half;
        // from the third on, both halves of both blocks.
        if (--n >= kb.first) {
            dense_block<TR, kCausal, kVarlen>(t, n, kb.first, prev_kept, kv, O, P, m, l);
            prev_kept = (1u << TR::kKeyHalves) - 1;
        }
#pragma unroll 1
        for (--n; n >= kb.first; --n) {
            dense_block<TR, kCausal, kVarlen>(t, n, kb.first, (1u << TR::kKeyHalves) - 1, kv, O, P, m, l);
        }
        }
    }

    const PipeState<TR::kStages> prev = kv.previous();
    mbar_wait(sm.bar(TR::kBarVFull + prev.stage), prev.phase);
    // Two heads, or 192 rows: another warpgroup may keep the block where
    // this one does not, and waits for this turn.
    if (TR::kPackHeads || !TR::kBsfaRows || prev_kept != 0) {
        named_sync(my_turn, TR::kTurnThreads);
        if (prev_kept != 0) {
            pv_block<TR>(O, P, v_desc(prev.stage), prev_kept);
        } else {
            wgmma_commit();  // as in the loop: an empty group on the skipping path
        }
        named_arrive(their_turn, TR::kTurnThreads);
    }
    wgmma_wait<0>();
    fence_regs(flat(O));
    fence_regs(P);
    if (t.lane() == 0) mbar_arrive_cluster<TR::kClusterCtas>(sm.bar(TR::kBarVEmpty + prev.stage));
}

// kPairTiles: hands `count` K and V slots back unread, once each has
// landed (a slot is refilled only after both CTAs released it, and the
// barrier phases stay in step): the blocks that the pair's longer tile
// visits past this CTA's own range, which come first.  Every consumer warp,
// no turn taken: both warpgroups drain the same blocks.
template <class TR>
__device__ __forceinline__ void drain_blocks(const SmemWs<TR>& sm, PipeState<TR::kStages>& kv, int count) {
#pragma unroll 1
    for (int i = 0; i < count; ++i) {
        mbar_wait(sm.bar(TR::kBarKFull + kv.stage), kv.phase);
        mbar_wait(sm.bar(TR::kBarVFull + kv.stage), kv.phase);
        if ((threadIdx.x & 31) == 0) {
            mbar_arrive_cluster<TR::kClusterCtas>(sm.bar(TR::kBarKEmpty + kv.stage));
            mbar_arrive_cluster<TR::kClusterCtas>(sm.bar(TR::kBarVEmpty + kv.stage));
        }
        kv.advance();
    }
}

template <class TR, bool kCausal, bool kVarlen = false, bool kSplit = false, bool kGated = true>
__device__ __forceinline__ void consumer_loop(const Params& p, const SmemWs<TR>& sm, int wg, int tid) {
    static_assert(!(kVarlen && kSplit), "no split-KV entry for packed batches");
    static_assert(!TR::kPairTiles || (!kVarlen && !kSplit && !kGated), "tile pairs: dense fixed-length calls only");
    static_assert(TR::kBsfaRows || (!kVarlen && !kSplit && !kGated && !TR::kPairTiles),
                  "tiles of other than the BSFA tile's rows: dense fixed-length calls only, without keep");
    static_assert(!TR::kQInRegs, "Q in registers: bsfa_block_max only");
    static_assert(!TR::kLagGate || (!kVarlen && kGated && TR::kBsfaRows && !TR::kPackHeads),
                  "the lagged gate: gated fixed-length calls, one head a 128-row tile");
    // bsfa_fwd_split_lag writes no keep: the row's pointer, live through its
    // key loop, spilled at head dim 128; calls that return keep take
    // bsfa_fwd_split.
    constexpr bool kKeepRow = TR::kBsfaRows && !(TR::kLagGate && kSplit);
    const ConsumerThread ct(wg, tid);
    const int nQ = ceil_div(p.Nq, TR::kBlockM);
    const int nK = ceil_div(p.Nk, TR::kBlockN);
    const auto sched = schedule_sm90ws<TR, kCausal, kSplit>(p, nQ, p.Hq / p.Hkv);
    PipeState<TR::kStages> kv;
    unsigned q_phase = 0;
    unsigned vote_idx = 0;
    if (wg == TR::kConsumerWGs - 1) named_arrive(TR::kBarTurn + 0, TR::kTurnThreads);  // warpgroup 0 takes the first turn
#pragma unroll 1
    for (int r = 0; sched.rounds_left(r); ++r) {
        const int j = sched.index(r);
        if (j < 0) continue;
        const WorkTile w = sched.tile(j);
        if constexpr (TR::kPairTiles) {
            const Problem pr = cta_problem<false>(p, w.b);
            const KeyBlocks pair = pair_key_blocks<TR, kCausal>(sched, j, pr);
            if (w.a < 0 || w.a >= nQ) {  // no tile of its own: every block of the pair goes back
                drain_blocks<TR>(sm, kv, pair.any ? pair.last + 1 : 0);
                continue;
            }
            const QueryTile<TR, kCausal> qt(w.a, pr);
            const int own_last = qt.c_end >= 0 ? qt.c_end / TR::kKeyHalves : -1;
            drain_blocks<TR>(sm, kv, pair.last - own_last);  // pair.last >= own_last >= -1
        }
        if constexpr (kVarlen) {
            const Problem pr = cta_problem<true>(p, w.b);
            if (w.a * TR::kBlockM >= pr.Nq) {  // past the sequence's end: no rows, no decisions
                if (p.keep != nullptr && wg == 0) {
                    unsigned char* row = p.keep + (((long long)w.b * p.Hq + w.h) * nQ + w.a) * nK;
                    for (int c = tid; c < nK; c += 128) row[c] = 0;
                }
                continue;
            }
        }
        const Problem pr = cta_problem<kVarlen>(p, w.b);
        const QueryTile<TR, kCausal> qt(w.a, pr);
        const KeyBlocks kb = key_blocks<kSplit, TR::kKeyHalves>(qt.c_end, w.s, p.num_splits);
        unsigned char* keep_row = nullptr;
        if (kKeepRow && p.keep != nullptr) {
            // One warpgroup writes the row of the tile's head, or each its own head's.
            const int writer = TR::kPackHeads ? wg : 0;
            unsigned char* row = p.keep + (((long long)w.b * p.Hq + wg_head<TR>(w, wg)) * nQ + w.a) * nK;
            if (wg == writer && w.s == 0) {  // the tiles no split visits
                for (int c = qt.c_end + 1 + tid; c < nK; c += 128) row[c] = 0;
            }
            if (wg == writer && tid == 0) keep_row = row;
        }
        float O[TR::kONBlocks][4];
        float m[2];
        float l[2];
        {
            float(&O1)[1][TR::kONBlocks][4] = *reinterpret_cast<float(*)[1][TR::kONBlocks][4]>(&O);
            float(&m1)[1][2] = *reinterpret_cast<float(*)[1][2]>(&m);
            float(&l1)[1][2] = *reinterpret_cast<float(*)[1][2]>(&l);
            init_softmax_state(O1, m1, l1);
        }
        if (kb.any) {
            MaskBounds seq{0, 0, 0};
            int v_zero_row = TR::kBlockKeys;
            if constexpr (kVarlen) {
                seq = MaskBounds{pr.Nq, pr.Nk, pr.shift};
                // The first block visited is the sequence's last one iff c_end
                // lies in it; it is ragged iff Nk is no multiple of its keys.
                const int last = (pr.Nk - 1) / TR::kBlockKeys;
                if (qt.c_end / TR::kKeyHalves == last) v_zero_row = pr.Nk - last * TR::kBlockKeys;
            }
            if constexpr (TR::kLagGate) {
                consumer_tile_lag<TR, kCausal>(p, sm, w, qt, kb, kv, q_phase, vote_idx, keep_row, O, m, l);
            } else {
                consumer_tile<TR, kCausal, kVarlen, kGated>(p, sm, w, qt, kb, kv, q_phase, vote_idx, keep_row, O, m, l,
                                                            seq, v_zero_row);
            }
        }
        // The tile's coordinates are decoded afresh from j (an opaque copy the
        // compiler cannot merge with the first decode), so that they are not
        // kept live across the key loop.
        int j_fresh = j;
        asm volatile("" : "+r"(j_fresh));
        const WorkTile we = sched.tile(j_fresh);
        if constexpr (kSplit) {
            epilogue_part_ws<TR>(p, ct.wg, ct.warp, ct.lane, we, we.a * TR::kBlockM, O, m, l);
        } else {
            epilogue_ws<TR, kVarlen>(p, sm, ct.wg, ct.warp, ct.lane, we, we.a * TR::kBlockM, O, m, l);
        }
    }
}

}  // namespace bsfa
