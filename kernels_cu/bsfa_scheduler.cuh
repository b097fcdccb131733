// Grid decode: which (query tile, head, batch) a CTA works on (the batch
// index is a packed sequence's for bsfa_fwd_varlen, bsfa_problem.cuh).  The host side
// of both rules lives in bsfa_cupy/_launch.py, which reads the module's
// BSFA_GRID to pick one:
//
//   BSFA_GRID 0 (kGridPerHead), the mma.sync kernels (bsfa_fwd_sm80.cu):
//     grid (nQ, Hq, B): blockIdx.x the query tile, blockIdx.y the head,
//     blockIdx.z the batch.
//   BSFA_GRID 1 (kGridChunked), the sm_90a kernels (bsfa_fwd_sm90.cu):
//     grid (w, nQ, B*Hq/w), w = 4, else 2, else 1 (the largest of these
//     dividing B*Hq), widened further (to the smallest divisor w of B*Hq
//     with B*Hq/w <= 65535) only when B*Hq/w exceeds 65535, gridDim.z's
//     limit.
//   BSFA_GRID 2 (kGridPersistent), the warp-specialised sm_90a forward
//     (bsfa_fwd_sm90ws.cu): grid (min(SMs, tiles), 1, 1), each CTA walking
//     the tile list of bsfa_tile_scheduler_sm90.cuh.
//
// Causal kernels take the query tiles heavy-first: the longest query tiles
// (most key tiles to visit) are dispatched first, so they do not start last
// and stretch the tail.  The order is a bijection on query tiles.
//
// Includes what it needs.
#pragma once

#include "bsfa_traits.cuh"

namespace bsfa {

// The grid shapes, as BSFA_GRID exports them.
enum GridKind : int {
    kGridPerHead = 0,
    kGridChunked = 1,
    kGridPersistent = 2,  // (min(SMs, tiles), 1, 1): bsfa_tile_scheduler_sm90.cuh
};

// kGridPerHead: the query tile of this CTA.
template <class TR, bool kHeavyFirst>
__device__ __forceinline__ int query_tile_index(int Nq) {
    if constexpr (kHeavyFirst) {
        return ceil_div(Nq, TR::kBlockM) - 1 - (int)blockIdx.x;
    } else {
        return blockIdx.x;
    }
}

// kGridChunked, dispatched x fastest: the (batch, head) pairs, flattened as
// b * Hq + h, are taken w at a time, and within such a chunk the CTAs go rank
// by rank (blockIdx.y), all w heads per rank.  Heavy-first, rank r is query
// tile nQ-1-r, so every chunk starts with its longest tiles and its short
// ones fill in behind them.  A whole head at a time (w = 1) starts the last
// head's long tiles right before the end and stretches it; all heads at once
// would spread the CTAs in flight over every head's K and V and defeat L2
// reuse.  (The mma.sync kernels keep kGridPerHead: their hdim-128 bsfa_fwd
// uses 254-255 registers and has none to spare for the division.)
template <class TR, bool kHeavyFirst>
__device__ __forceinline__ int chunked_query_tile(int Nq) {
    return kHeavyFirst ? ceil_div(Nq, TR::kBlockM) - 1 - (int)blockIdx.y : (int)blockIdx.y;
}

struct CtaHead {
    int h;
    int b;
};

// kGridChunked: the head and batch of this CTA.
template <bool kFresh = false>
__device__ __forceinline__ CtaHead chunked_head(int Hq) {
    unsigned x = blockIdx.x, z = blockIdx.z;
    if constexpr (kFresh) {  // not merged with earlier calls: an epilogue recomputes b, h instead of keeping them live
        asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(x));
        asm volatile("mov.u32 %0, %%ctaid.z;" : "=r"(z));
    }
    const int bh = (int)(z * gridDim.x + x);
    return CtaHead{bh % Hq, bh / Hq};
}

}  // namespace bsfa
