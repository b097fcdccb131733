// The persistent schedule of the warp-specialised kernel (BSFA_GRID 2,
// kGridPersistent): a grid of at most one CTA per SM walks the list of work
// tiles (query tile, head, batch).  The list is ordered heaviest first for
// causal (the query tiles with the most key tiles first), and within one
// query-tile rank by b * Hq + h, so the heads that share a K/V head run side
// by side and read it through L2 once.  CTA i takes tile i of round 0, then
// rounds go boustrophedon (round r takes r * G + i, or r * G + G-1-i when r
// is odd): the CTA that got the heaviest tile of one round gets the lightest
// of the next, which evens out the causal triangle without an atomic
// counter, and producer and consumers derive the same sequence on their own.
//
// Includes what it needs.
#pragma once

#include "bsfa_traits.cuh"

namespace bsfa {

struct WorkTile {
    int a;  // query tile
    int h;
    int b;
};

template <bool kHeavyFirst>
struct PersistentSchedule {
    int nQ;
    int Hq;
    int total;  // nQ * B * Hq, < 2^31 (checked on the host)

    __device__ __forceinline__ PersistentSchedule(int nQ_, int Hq_, int B) : nQ(nQ_), Hq(Hq_), total(nQ_ * Hq_ * B) {}

    // The index of this CTA's tile in round r, or -1 once the list is done.
    // Rounds are walked while r * G < total.
    __device__ __forceinline__ int index(int r) const {
        const int G = gridDim.x;
        const int i = (r & 1) ? G - 1 - (int)blockIdx.x : (int)blockIdx.x;
        const int j = r * G + i;
        return j < total ? j : -1;
    }

    __device__ __forceinline__ bool rounds_left(int r) const { return r * (int)gridDim.x < total; }

    __device__ __forceinline__ WorkTile tile(int j) const {
        const int BH = total / nQ;
        const int rank = j / BH;
        const int bh = j - rank * BH;
        return WorkTile{kHeavyFirst ? nQ - 1 - rank : rank, bh % Hq, bh / Hq};
    }
};

}  // namespace bsfa
