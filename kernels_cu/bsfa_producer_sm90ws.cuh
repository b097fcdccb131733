// The producer of the warp-specialised sm_90a forward: one thread of the
// producer warpgroup walks the same tile list as the consumers and issues
// every TMA copy -- the Q tile of each work tile, then K and V of its
// 128-key blocks, last block first (the consumers' order), into the
// two-stage rings.  It waits only for free slots: a slot is refilled once
// all consumer warps have released it.  V is loaded for every visited block,
// skipped or not (speculative): the producer never waits for a gate decision.
// kLoadV = false serves bsfa_block_max (Q and K only).
//
// Includes what it needs; TR is a TraitsSm90Ws.
#pragma once

#include "bsfa_mask.cuh"
#include "bsfa_params.cuh"
#include "bsfa_problem.cuh"
#include "bsfa_pipeline_sm90.cuh"
#include "bsfa_smem_sm90ws.cuh"
#include "bsfa_tile_scheduler_sm90.cuh"

namespace bsfa {

template <class TR, bool kCausal, bool kLoadV = true>
__device__ __forceinline__ void producer_loop(const Params& p, const TmaDesc& tq, const TmaDesc& tk,
                                              const TmaDesc& tv, const SmemWs<TR>& sm) {
    const PersistentSchedule<kCausal> sched(ceil_div(p.Nq, TR::kBlockM), p.Hq, p.B);
    const int group = p.Hq / p.Hkv;
    PipeState<TR::kStages> kv;
    unsigned q_phase = 0;
#pragma unroll 1
    for (int r = 0; sched.rounds_left(r); ++r) {
        const int j = sched.index(r);
        if (j < 0) continue;
        const WorkTile w = sched.tile(j);
        const QueryTile<TR, kCausal> qt(w.a, cta_problem<false>(p, w.b));
        if (qt.c_end < 0) continue;  // no key to visit: the consumers write zeros without Q
        const int hkv = w.h / group;

        mbar_wait(sm.bar(TR::kBarQEmpty), q_phase ^ 1u);
        mbar_arrive_expect_tx(sm.bar(TR::kBarQFull), TR::kQBytes);
#pragma unroll
        for (int pn = 0; pn < TR::kPanels; ++pn) {
            tma_load_4d(sm.q() + pn * TR::kQPanelBytes, tq, sm.bar(TR::kBarQFull), pn * TR::kPanelCols, qt.q0, w.h,
                        w.b);
        }
        q_phase ^= 1u;

#pragma unroll 1
        for (int n = qt.c_end / TR::kKeyHalves; n >= 0; --n) {
            const int s = kv.stage;
            const int key0 = n * TR::kBlockKeys;
            mbar_wait(sm.bar(TR::kBarKEmpty + s), kv.phase ^ 1u);
            mbar_arrive_expect_tx(sm.bar(TR::kBarKFull + s), TR::kKVBytes);
#pragma unroll
            for (int pn = 0; pn < TR::kPanels; ++pn) {
                tma_load_4d(sm.k() + s * TR::kKVBytes + pn * TR::kKVPanelBytes, tk, sm.bar(TR::kBarKFull + s),
                            pn * TR::kPanelCols, key0, hkv, w.b);
            }
            if constexpr (kLoadV) {
                mbar_wait(sm.bar(TR::kBarVEmpty + s), kv.phase ^ 1u);
                mbar_arrive_expect_tx(sm.bar(TR::kBarVFull + s), TR::kKVBytes);
#pragma unroll
                for (int pn = 0; pn < TR::kPanels; ++pn) {
                    tma_load_4d(sm.v() + s * TR::kKVBytes + pn * TR::kKVPanelBytes, tv, sm.bar(TR::kBarVFull + s),
                                pn * TR::kPanelCols, key0, hkv, w.b);
                }
            }
            kv.advance();
        }
    }
}

}  // namespace bsfa
