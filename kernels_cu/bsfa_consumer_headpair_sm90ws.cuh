// The consumers of bsfa_fwd_headpair (TraitsSm90WsHeadPair): consumer
// warpgroup w holds the 128 rows of query head 2 h + w of the work tile's
// head pair h -- a whole BSFA tile, two m64 row halves -- and walks its
// 64-key blocks (one BSFA key tile each, last first) beside the other
// warpgroup, which holds the other head of the same GQA group and reads the
// same K and V slots.  A decision is the warpgroup's own: the lane-local
// maxima of its 128 rows voted in one barrier reduction over its threads
// (named_or), so that a gated block never waits for the other warpgroup,
// the exchange that bsfa_fwd's gate pays (bench/NOTES.md, v11-v23).  No
// ping-pong: each warpgroup issues its products as soon as it is ready, and
// the tensor cores interleave the two (measured against turns in v26).
//
// Within a warpgroup, two schedules (TR::kPInRegs, by head dim):
// - overlapped (head dim 128): S of block n is issued with the P V of block
//   n + 1, and block n's gate and softmax run while that P V is on the
//   tensor cores.  O of 128 rows takes the registers that P would (128 a
//   thread), so the softmax stores P to shared memory, a buffer for even
//   blocks and one for odd, and P V reads it from there;
// - sequential (head dim 64): a block is one step, S, the gate and for a
//   kept block the softmax, P packed into P V's register operands, and P V,
//   each waited for; the other warpgroup's products fill the tensor cores
//   meanwhile.  P never crosses shared memory, and a skipped block's path
//   is the shortest.
// The P buffers are the output staging at the tile's end.
//
// Includes what it needs; TR is a TraitsSm90WsHeadPair.
#pragma once

#include "bsfa_block_sm90ws.cuh"
#include "bsfa_epilogue_sm90ws.cuh"
#include "bsfa_gate.cuh"
#include "bsfa_mask.cuh"
#include "bsfa_mma_sm90.cuh"
#include "bsfa_params.cuh"
#include "bsfa_pipeline_sm90.cuh"
#include "bsfa_problem.cuh"
#include "bsfa_smem_sm90ws.cuh"
#include "bsfa_softmax.cuh"
#include "bsfa_tile_loop_sm90ws.cuh"
#include "bsfa_tile_scheduler_sm90.cuh"
#include "bsfa_wgmma_sm90.cuh"

namespace bsfa {

// The descriptor of row half mb of warpgroup wg's rows in a map of Q's shape
// (Q, P, the output staging) at base.
template <class TR>
__device__ __forceinline__ unsigned long long hp_rows_desc(unsigned base, int wg, int mb) {
    return make_desc(base + (wg * TR::kWgRows + mb * TR::kWgmmaM) * kSwizzleBytes, 16, kSwizzleAtomBytes);
}

// S = Q K^T of one 64-key block for the warpgroup's 128 rows, the two row
// halves' m64n64 chains interleaved, one group.  Q's address is made opaque
// here, so that its sixteen descriptors are derived afresh for each block
// rather than hoisted out of the key loop and kept live (they spilled); the
// shuffle from lane 0 then hands it back to ptxas as warp-uniform, so that
// the descriptors are made in uniform registers rather than in vector ones,
// each moved across with R2UR before its wgmma (with the empty group gone:
// 0.6-2.9 % of a sparse call at rho <= 0.25, bench/NOTES.md v32).
template <class TR>
__device__ __forceinline__ void hp_qk(float (&S)[TR::kWarpMBlocks][TR::kSNBlocks][4], unsigned q_base, int wg,
                                      unsigned long long k_desc) {
    asm volatile("" : "+r"(q_base));
    q_base = __shfl_sync(0xffffffffu, q_base, 0);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < TR::kDSteps; ++kk) {
        const unsigned col = (kk % TR::kStepsPerPanel) * TR::kMmaK * TR::kElemBytes;
        const unsigned pn = kk / TR::kStepsPerPanel;
#pragma unroll
        for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) {
            wgmma_ss_n64<TR::kBf16>(flat(S[mb]), desc_add(hp_rows_desc<TR>(q_base, wg, mb), pn * TR::kQPanelBytes + col),
                                    desc_add(k_desc, pn * TR::kKVPanelBytes + col), kk > 0 ? 1 : 0);
        }
    }
    wgmma_commit();
}

// O += P V of one block, P from shared memory (hp_softmax), one group.
template <class TR>
__device__ __forceinline__ void hp_pv(float (&O)[TR::kWarpMBlocks][TR::kONBlocks][4], unsigned p_base, int wg,
                                      unsigned long long v_desc) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < TR::kKeySteps; ++kk) {
#pragma unroll
        for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) {
            const unsigned long long a = desc_add(hp_rows_desc<TR>(p_base, wg, mb), kk * TR::kMmaK * TR::kElemBytes);
            const unsigned long long b = desc_add(v_desc, kk * TR::kMmaK * kSwizzleBytes);
            if constexpr (TR::kHeadDim == 128) {
                wgmma_ss_n128<TR::kBf16, false>(flat(O[mb]), a, b, 1);
            } else {
                wgmma_ss_n64<TR::kBf16, false>(flat(O[mb]), a, b, 1);
            }
        }
    }
    wgmma_commit();
}

// What a warpgroup carries through the blocks of a work tile besides the
// accumulators.
template <class TR, bool kCausal>
struct HeadPairLoop {
    const Params& p;
    const SmemWs<TR>& sm;
    const QueryTile<TR, kCausal>& qt;
    const GatePlan<TR>& plan;
    unsigned char* keep_row;  // this head's row of keep, in its writer thread only
    int wg;

    __device__ __forceinline__ static int lane() { return (int)threadIdx.x & 31; }
    __device__ __forceinline__ unsigned long long k_desc(int stage) const {
        return make_desc(sm.k() + stage * TR::kKVBytes, 16, kSwizzleAtomBytes);
    }
    __device__ __forceinline__ unsigned long long v_desc(int stage) const {
        return make_desc(sm.v() + stage * TR::kKVBytes, TR::kKVPanelBytes, kSwizzleAtomBytes);
    }
    // P of block n: one buffer for even n and one for odd, so that a block's
    // softmax stores its P while the previous block's P V reads the other.
    __device__ __forceinline__ unsigned p_buffer(int n) const { return sm.p() + (n & 1) * TR::kPBytes; }
};

// Block n's S is in: its K slot (and, after the tile's last block, first,
// the Q tile) goes back, the invalid scores are masked, and the block is
// decided -- kept without a vote where it is diagonal or the call dense,
// else iff a score of the warpgroup's 128 rows reaches the threshold (the
// gated tile's lane-local row maxima stay in vmx, and gated is set).
// Returns the decision, warp-uniform as ptxas sees it: a P V under a
// condition it cannot prove uniform serialises every wgmma.  A vote makes
// it so (every lane already holds the reduction's result); a shuffle from
// lane 0 did too, but its latency sat on every gated block's path (up to 4 %
// of a sparse call, bench/NOTES.md v29).
template <class TR, bool kCausal>
__device__ __forceinline__ bool hp_decide(const HeadPairLoop<TR, kCausal>& t,
                                          float (&S)[TR::kWarpMBlocks][TR::kSNBlocks][4], int n, int first,
                                          const PipeState<TR::kStages>& kv, float (&vmx)[TR::kWarpMBlocks][2],
                                          bool& gated) {
#pragma unroll
    for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) fence_regs(flat(S[mb]));
    const int lane = t.lane();
    if (lane == 0) {
        mbar_arrive(t.sm.bar(TR::kBarKEmpty + kv.stage));
        if (n == first) mbar_arrive(t.sm.bar(TR::kBarQEmpty));
    }
    if (t.qt.needs_mask(n)) {
        const int row0 = t.qt.q0 + (((int)threadIdx.x & 127) >> 5) * TR::kWarpRows + (lane >> 2);
        mask_tile<TR, kCausal>(S, n, row0, lane, t.p.Nq, t.p.Nk, t.p.qk_shift);
    }
    gated = !t.plan.forced(n);
    bool kept = true;
    if (gated) {
        row_max<TR, false>(S, vmx);
        const bool any = named_or(TR::kBarGate + t.wg, 128, t.plan.vote(vmx, t.p.softmax_scale));
        kept = __any_sync(0xffffffffu, any);
    }
    if (t.keep_row != nullptr) t.keep_row[n] = kept ? 1 : 0;
    return kept;
}

// The online-softmax update of a kept block over both row halves, P packed
// into P V's A fragments (softmax_row); returns whether any row of the warp
// changed its max (O then needs the rescale by alpha).  vmx: the gate's
// lane-local maxima where it took them (gated).  Overlapped schedule: each
// row half's P is stored into this warpgroup's rows of P buffer p_base with
// stmatrix as soon as it is complete, so that no more than a half's P is
// held in registers beside O and S; the fence makes the stores visible to
// the wgmma that reads them after hp_p_ready's barrier.  Sequential: P stays
// in registers for issue_pv.
template <class TR>
__device__ __forceinline__ bool hp_softmax(const float (&S)[TR::kWarpMBlocks][TR::kSNBlocks][4], bool gated,
                                           const float (&vmx)[TR::kWarpMBlocks][2],
                                           float (&m)[TR::kWarpMBlocks][2], float (&l)[TR::kWarpMBlocks][2],
                                           float (&alpha)[TR::kWarpMBlocks][2], float scale_log2,
                                           unsigned (&P)[TR::kWarpMBlocks][TR::kKeySteps][4], unsigned p_base,
                                           int wg) {
    float mx[TR::kWarpMBlocks][2];
    if (gated) {
#pragma unroll
        for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) {
            mx[mb][0] = vmx[mb][0];
            mx[mb][1] = vmx[mb][1];
        }
        quad_max(mx);
    } else {
        row_max<TR, true>(S, mx);
    }
    bool changed = false;
#pragma unroll
    for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const float m_old = m[mb][hf];
            // A margin of 2^8 spares most kept blocks O's rescale: the kept block is issue-bound.
            alpha[mb][hf] = softmax_row<TR, TR::kWarpMBlocks, 8>(S, mb, hf, mx[mb][hf], m[mb][hf], l[mb][hf], P,
                                                                 scale_log2);
            changed |= m[mb][hf] != m_old;
        }
        if constexpr (!TR::kPInRegs) {
#pragma unroll
            for (int kk = 0; kk < TR::kKeySteps; ++kk) {
                stsm_x4(a_frag_addr<TR>(p_base, wg * TR::kWarpMBlocks + mb, kk), P[mb][kk]);
            }
        }
    }
    if constexpr (!TR::kPInRegs) fence_proxy_async();
    return warp_any(changed);
}

// P of the last kept block, stored by all four warps of the warpgroup, is
// complete before its P V reads it: a barrier of the warpgroup's 128
// threads (its turn barrier's id, which no ping-pong uses here).
template <class TR, bool kCausal>
__device__ __forceinline__ void hp_p_ready(const HeadPairLoop<TR, kCausal>& t) {
    named_sync(TR::kBarTurn + t.wg, 128);
}

// The key blocks kb of one work tile (at least one) for this warpgroup's
// head, the overlapped schedule: O, m, l come in initialised and leave
// unnormalised.
template <class TR, bool kCausal>
__device__ __forceinline__ void headpair_tile_overlapped(const HeadPairLoop<TR, kCausal>& t, const KeyBlocks& kb,
                                              PipeState<TR::kStages>& kv, unsigned& q_phase,
                                              float (&O)[TR::kWarpMBlocks][TR::kONBlocks][4],
                                              float (&m)[TR::kWarpMBlocks][2], float (&l)[TR::kWarpMBlocks][2]) {
    const SmemWs<TR>& sm = t.sm;
    const float scale_log2 = t.p.softmax_scale * kLog2e;
    mbar_wait(sm.bar(TR::kBarQFull), q_phase);
    q_phase ^= 1u;

    float S[TR::kWarpMBlocks][TR::kSNBlocks][4];
    float alpha[TR::kWarpMBlocks][2];
    float vmx[TR::kWarpMBlocks][2];
    unsigned P[TR::kWarpMBlocks][TR::kKeySteps][4];
    bool gated;
    int n = kb.last;

    // The first block: nothing to overlap with yet, and O is still zero.
    mbar_wait(sm.bar(TR::kBarKFull + kv.stage), kv.phase);
    hp_qk<TR>(S, sm.q(), t.wg, t.k_desc(kv.stage));
    wgmma_wait<0>();
    bool kept = hp_decide<TR, kCausal>(t, S, n, kb.first, kv, vmx, gated);
    if (kept) hp_softmax<TR>(S, gated, vmx, m, l, alpha, scale_log2, P, t.p_buffer(n), t.wg);
    bool prev_kept = kept;
    kv.advance();

#pragma unroll 1
    for (--n; n >= kb.first; --n) {
        const PipeState<TR::kStages> prev = kv.previous();
        mbar_wait(sm.bar(TR::kBarKFull + kv.stage), kv.phase);
        if (prev_kept) mbar_wait(sm.bar(TR::kBarVFull + prev.stage), prev.phase);
        hp_qk<TR>(S, sm.q(), t.wg, t.k_desc(kv.stage));
        if (prev_kept) {
            hp_p_ready(t);
            hp_pv<TR>(O, t.p_buffer(n + 1), t.wg, t.v_desc(prev.stage));
            wgmma_wait<1>();  // S is ready; P V may still run
        } else {
            wgmma_wait<0>();  // S alone: no empty group, which ptxas makes a real (if tiny) wgmma
        }
        kept = hp_decide<TR, kCausal>(t, S, n, kb.first, kv, vmx, gated);
        bool rescale = false;
        if (kept) rescale = hp_softmax<TR>(S, gated, vmx, m, l, alpha, scale_log2, P, t.p_buffer(n), t.wg);
        // Unconditional, so that ptxas sees O retired on every path.
        wgmma_wait<0>();
#pragma unroll
        for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) fence_regs(flat(O[mb]));
        // Block n + 1's V goes back here, a skipped block's unwaited (the
        // producer checks that it landed, TR::kProducerChecksV; 0.8-4 % of a
        // sparse call at rho <= 0.5, bench/NOTES.md v35).  The arrival counts
        // towards the right phase: block n's K, seen above, went out after
        // that V, which went out only once every consumer had released the
        // slot's previous block.
        if (t.lane() == 0) mbar_arrive(sm.bar(TR::kBarVEmpty + prev.stage));
        if (rescale) {
#pragma unroll
            for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) rescale_rows(O[mb], alpha[mb]);
        }
        prev_kept = kept;
        kv.advance();
    }

    // The last block's P V.
    const PipeState<TR::kStages> prev = kv.previous();
    // Waited for even where skipped: no later K is seen in this tile, and
    // an arrival before this V went out could count towards the slot's
    // previous phase.
    mbar_wait(sm.bar(TR::kBarVFull + prev.stage), prev.phase);
    if (prev_kept) {
        hp_p_ready(t);
        hp_pv<TR>(O, t.p_buffer(kb.first), t.wg, t.v_desc(prev.stage));
    } else {
        wgmma_commit();
    }
    wgmma_wait<0>();
#pragma unroll
    for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) fence_regs(flat(O[mb]));
    if (t.lane() == 0) mbar_arrive(sm.bar(TR::kBarVEmpty + prev.stage));
}

// The same, the sequential schedule: a block's P is made and consumed within
// its own step, so that P's registers are never live beside S's.
template <class TR, bool kCausal>
__device__ __forceinline__ void headpair_tile_sequential(const HeadPairLoop<TR, kCausal>& t, const KeyBlocks& kb,
                                                         PipeState<TR::kStages>& kv, unsigned& q_phase,
                                                         float (&O)[TR::kWarpMBlocks][TR::kONBlocks][4],
                                                         float (&m)[TR::kWarpMBlocks][2],
                                                         float (&l)[TR::kWarpMBlocks][2]) {
    const SmemWs<TR>& sm = t.sm;
    const float scale_log2 = t.p.softmax_scale * kLog2e;
    mbar_wait(sm.bar(TR::kBarQFull), q_phase);
    q_phase ^= 1u;

#pragma unroll 1
    for (int n = kb.last; n >= kb.first; --n) {
        float S[TR::kWarpMBlocks][TR::kSNBlocks][4];
        float vmx[TR::kWarpMBlocks][2];
        bool gated;
        mbar_wait(sm.bar(TR::kBarKFull + kv.stage), kv.phase);
        hp_qk<TR>(S, sm.q(), t.wg, t.k_desc(kv.stage));
        wgmma_wait<0>();
        const bool kept = hp_decide<TR, kCausal>(t, S, n, kb.first, kv, vmx, gated);
        // This block's V, kept or not: a skipped block's (speculative) copy
        // is handed back only once it landed.
        mbar_wait(sm.bar(TR::kBarVFull + kv.stage), kv.phase);
        if (kept) {
            unsigned P[TR::kWarpMBlocks][TR::kKeySteps][4];
            float alpha[TR::kWarpMBlocks][2];
            if (hp_softmax<TR>(S, gated, vmx, m, l, alpha, scale_log2, P, 0u, t.wg)) {
#pragma unroll
                for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) rescale_rows(O[mb], alpha[mb]);
            }
            issue_pv<TR>(O, P, t.v_desc(kv.stage));  // P from registers
            wgmma_wait<0>();
#pragma unroll
            for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) fence_regs(flat(O[mb]));
            fence_regs(P);
        }
        if (t.lane() == 0) mbar_arrive(sm.bar(TR::kBarVEmpty + kv.stage));
        kv.advance();
    }
}

template <class TR, bool kCausal>
__device__ __forceinline__ void headpair_tile(const HeadPairLoop<TR, kCausal>& t, const KeyBlocks& kb,
                                              PipeState<TR::kStages>& kv, unsigned& q_phase,
                                              float (&O)[TR::kWarpMBlocks][TR::kONBlocks][4],
                                              float (&m)[TR::kWarpMBlocks][2], float (&l)[TR::kWarpMBlocks][2]) {
    if constexpr (TR::kPInRegs) {
        headpair_tile_sequential<TR, kCausal>(t, kb, kv, q_phase, O, m, l);
    } else {
        headpair_tile_overlapped<TR, kCausal>(t, kb, kv, q_phase, O, m, l);
    }
}

// The walk over the list of (query tile, head pair, batch) work tiles; each
// warpgroup writes its own head's keep row, out rows and lse.  kSplit
// (bsfa_fwd_split_headpair): a work tile is one key split of a query tile
// (KeyBlocks), whose rows end in fp32 partials normalised by the split's own
// sums, with the split's lse, for bsfa_combine; an empty split writes an
// empty partial.  Decisions are the same whichever split visits a tile.
template <class TR, bool kCausal, bool kSplit>
__device__ __forceinline__ void headpair_consumer_loop(const Params& p, const SmemWs<TR>& sm, int wg, int tid) {
    static_assert(TR::kOwnTiles && TR::kPackHeads && TR::kClusterCtas == 1 && TR::kProducerChecksV,
                  "a TraitsSm90WsHeadPair");
    // Warp-uniform for ptxas: descriptors and barrier ids made from wg stay in uniform registers.
    wg = __shfl_sync(0xffffffffu, wg, 0);
    const ConsumerThread ct(wg, tid);
    const int nQ = ceil_div(p.Nq, TR::kBlockM);
    const int nK = ceil_div(p.Nk, TR::kBlockN);
    const auto sched = schedule_sm90ws<TR, kCausal, kSplit>(p, nQ, p.Hq / p.Hkv);
    PipeState<TR::kStages> kv;
    unsigned q_phase = 0;
#pragma unroll 1
    for (int r = 0; sched.rounds_left(r); ++r) {
        const int j = sched.index(r);
        if (j < 0) continue;
        const WorkTile w = sched.tile(j);
        const Problem pr = cta_problem<false>(p, w.b);
        const QueryTile<TR, kCausal> qt(w.a, pr);
        const KeyBlocks kb = key_blocks<kSplit, TR::kKeyHalves>(qt.c_end, w.s, p.num_splits);
        const int head = wg_head<TR>(w, wg);
        unsigned char* keep_row = nullptr;
        if (p.keep != nullptr) {
            unsigned char* row = p.keep + (((long long)w.b * p.Hq + head) * nQ + w.a) * nK;
            if (w.s == 0) {  // the tiles no block (of any split) visits
                for (int c = qt.c_end + 1 + tid; c < nK; c += 128) row[c] = 0;
            }
            if (tid == 0) keep_row = row;
        }
        float O[TR::kWarpMBlocks][TR::kONBlocks][4];
        float m[TR::kWarpMBlocks][2];
        float l[TR::kWarpMBlocks][2];
        init_softmax_state(O, m, l);
        if (kb.any) {
            const GatePlan<TR> plan(qt, p.thresholds, p.thr_scalar, p.thr_mode, p.thr_T, head);
            const HeadPairLoop<TR, kCausal> t{p, sm, qt, plan, keep_row, wg};
            headpair_tile<TR, kCausal>(t, kb, kv, q_phase, O, m, l);
        }
        // Decoded afresh (an opaque copy of j), so that the tile's coordinates
        // are not kept live across the key loop.
        int j_fresh = j;
        asm volatile("" : "+r"(j_fresh));
        const WorkTile we = sched.tile(j_fresh);
        if constexpr (kSplit) {
            // Each row half as a tile of its own, 64 rows further down.
#pragma unroll
            for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) {
                epilogue_part_ws<TR>(p, wg, ct.warp, ct.lane, we, we.a * TR::kBlockM + mb * TR::kWgmmaM, O[mb], m[mb],
                                     l[mb]);
            }
        } else {
            const WorkTile own{we.a, wg_head<TR>(we, wg), we.b, 0};
            // This warpgroup's rows of the staging map: the epilogue's row
            // halves (its "warpgroups") then count from them.
            const SmemWs<TR> staging(sm.base + wg * TR::kWgRows * kSwizzleBytes);
#pragma unroll
            for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) {
                epilogue_ws<TR>(p, staging, mb, ct.warp, ct.lane, own, we.a * TR::kBlockM, O[mb], m[mb], l[mb]);
            }
        }
    }
}

}  // namespace bsfa
