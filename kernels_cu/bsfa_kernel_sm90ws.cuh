// The bodies of the warp-specialised sm_90a bsfa_fwd and bsfa_block_max
// (bsfa_fwd_sm90ws.cu exports them): barrier set-up, then one role per
// warpgroup.  Warpgroup 0 hands most of its registers to the consumers and
// one of its threads runs the TMA producer (bsfa_producer_sm90ws.cuh);
// warpgroups 1 and 2 (and 3 in bsfa_fwd_dense_wide) are the consumers
// (bsfa_consumer_sm90ws.cuh, or bsfa_block_max_sm90ws.cuh), 64 query rows
// each (bsfa_consumer_headpair_sm90ws.cuh: a query head's 128 each).  Persistent:
// the grid has at most one CTA per SM (bsfa_tile_scheduler_sm90.cuh).
//
// Includes what it needs; TR is a TraitsSm90Ws.
#pragma once

#include "bsfa_block_max_sm90ws.cuh"
#include "bsfa_block_max_wide_sm90ws.cuh"
#include "bsfa_consumer_headpair_sm90ws.cuh"
#include "bsfa_consumer_sm90ws.cuh"
#include "bsfa_copy_sm90.cuh"
#include "bsfa_params.cuh"
#include "bsfa_pipeline_sm90.cuh"
#include "bsfa_producer_sm90ws.cuh"
#include "bsfa_ptx.cuh"
#include "bsfa_smem_sm90ws.cuh"

namespace bsfa {

// Full barriers: the producer's arrival plus the TMA bytes; empty barriers
// and the exchange ring: one arrival per consumer warp (K and V slots: of
// every CTA of the cluster that fills them, TR::kClusterCtas).  One thread,
// before the CTA (or cluster) barrier that publishes them.
template <class TR>
__device__ __forceinline__ void init_barriers_ws(const SmemWs<TR>& sm) {
    mbar_init(sm.bar(TR::kBarQFull), 1);
    mbar_init(sm.bar(TR::kBarQEmpty), TR::kConsumerWarps);
#pragma unroll
    for (int s = 0; s < TR::kBlockMaxStages; ++s) {
        mbar_init(sm.bar(TR::kBarKFull + s), 1);
        mbar_init(sm.bar(TR::kBarKEmpty + s), TR::kConsumerWarps * TR::kClusterCtas);
    }
#pragma unroll
    for (int s = 0; s < TR::kStages; ++s) {
        mbar_init(sm.bar(TR::kBarVFull + s), 1);
        mbar_init(sm.bar(TR::kBarVEmpty + s), TR::kConsumerWarps * TR::kClusterCtas);
    }
#pragma unroll
    for (int v = 0; v < TR::kVoteSlots; ++v) mbar_init(sm.bar(TR::kBarVote + v), TR::kVoteWarps);
    mbar_init_fence();
}

// Either kernel (kFwd: bsfa_fwd, else bsfa_block_max, which loads no V and
// takes tk in place of tv): barrier set-up, then one role per warpgroup.
// kVarlen (kFwd only): bsfa_fwd_varlen, whose work tiles are (query tile,
// head, packed sequence) and whose maps describe the packed tensors.
// kSplit (kFwd only): bsfa_fwd_split, whose work tiles are key splits of
// (query tile, head, batch) and which writes fp32 partials.  kGated false
// (kFwd only): an entry for dense calls (thr_mode 0), without the gate.
template <class TR, bool kCausal, bool kFwd, bool kVarlen = false, bool kSplit = false, bool kGated = true>
__device__ __forceinline__ void kernel_sm90ws(const Params& p, const TmaDesc& tq, const TmaDesc& tk,
                                              const TmaDesc& tv) {
    const SmemWs<TR> sm(aligned_smem_base());
    if (threadIdx.x == 0) init_barriers_ws<TR>(sm);
    // Cluster entries: the peer's barriers are initialised before any copy
    // or release of this CTA reaches them.
    if constexpr (TR::kClusterCtas > 1) {
        cluster_sync();
    } else {
        cta_sync();
    }
    const int wg = threadIdx.x / 128;
    if (wg == 0) {
        setmaxnreg_dec<TR::kProducerRegs>();
        if (threadIdx.x == 0) {
            tma_prefetch_desc(tq);
            tma_prefetch_desc(tk);
            if constexpr (kFwd) tma_prefetch_desc(tv);
            producer_loop<TR, kCausal, kFwd, kVarlen, kSplit>(p, tq, tk, tv, sm);
        }
    } else {
        setmaxnreg_inc<TR::kConsumerRegs>();
        if constexpr (kFwd && TR::kOwnTiles) {
            static_assert(!kVarlen && kGated, "bsfa_fwd_headpair: fixed-length calls");
            headpair_consumer_loop<TR, kCausal, kSplit>(p, sm, wg - 1, threadIdx.x - 128 * wg);
        } else if constexpr (kFwd) {
            consumer_loop<TR, kCausal, kVarlen, kSplit, kGated>(p, sm, wg - 1, threadIdx.x - 128 * wg);
        } else {
            if constexpr (TR::kWgRows > TR::kWgmmaM) {
                block_max_consumer_wide<TR, kCausal>(p, sm, wg - 1, threadIdx.x - 128 * wg);
            } else {
                block_max_consumer<TR, kCausal>(p, sm, wg - 1, threadIdx.x - 128 * wg);
            }
        }
    }
    // Cluster entries: no CTA leaves while the peer may still copy into its
    // slots or release them (the last blocks' arrivals cross CTAs).
    if constexpr (TR::kClusterCtas > 1) cluster_sync();
}

}  // namespace bsfa
