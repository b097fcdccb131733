// The persistent schedule of the warp-specialised kernel (BSFA_GRID 2,
// kGridPersistent): a grid of at most one CTA per SM walks the list of work
// tiles (query tile, head, batch), or (query tile, key split, head, batch)
// for the split-KV entry (kSplit: the key blocks of each query tile cut into
// p.num_splits contiguous ranges, KeyBlocks).  The list is ordered heaviest first for
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
    int s;  // key split (0 without kSplit)
};

// kSplit: within one query-tile rank the splits go split by split, heads
// fastest, so the CTAs in flight at once read the same key range of a GQA
// group's K/V head side by side (L2), as without splits.
template <bool kHeavyFirst, bool kSplit = false>
struct PersistentSchedule {
    int nQ;
    int Hq;
    int total;  // nQ * B * Hq (* splits), < 2^31 (checked on the host)
    int BH;     // B * Hq (kSplit)

    __device__ __forceinline__ PersistentSchedule(int nQ_, int Hq_, int B, int splits = 1)
        : nQ(nQ_), Hq(Hq_), total(kSplit ? nQ_ * Hq_ * B * splits : nQ_ * Hq_ * B), BH(kSplit ? Hq_ * B : 0) {}

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
        const int per_rank = total / nQ;
        const int rank = j / per_rank;
        int bh = j - rank * per_rank;
        int s = 0;
        if constexpr (kSplit) {
            s = bh / BH;
            bh -= s * BH;
        }
        return WorkTile{kHeavyFirst ? nQ - 1 - rank : rank, bh % Hq, bh / Hq, s};
    }
};

// The query head whose rows consumer warpgroup wg holds in work tile w: w.h
// itself, or with two heads a tile (TR::kPackHeads) head 2 w.h + wg of the
// pair w.h.
template <class TR>
__device__ __forceinline__ int wg_head(const WorkTile& w, int wg) {
    return TR::kPackHeads ? 2 * w.h + wg : w.h;
}

// The 128-key blocks a work tile visits, last first: [first, last] where any
// (none: no key to visit).  Without kSplit every block up to the query
// tile's last valid key tile c_end (>= -1); with it, split s of S takes the
// s-th of S balanced contiguous ranges of those blocks (none for some splits
// when there are fewer blocks than splits: such a split writes an empty
// partial, lse -inf).
struct KeyBlocks {
    int first;
    int last;
    bool any;
};

template <bool kSplit, int kKeyHalves>
__device__ __forceinline__ KeyBlocks key_blocks(int c_end, int s, int S) {
    if constexpr (kSplit) {
        const int blocks = (c_end + kKeyHalves) / kKeyHalves;
        const int first = (int)((long long)s * blocks / S);
        const int last = (int)((long long)(s + 1) * blocks / S) - 1;
        return KeyBlocks{first, last, last >= first};
    } else {
        // last is only read when any (c_end >= 0): an unsigned division, a shift.
        return KeyBlocks{0, (int)((unsigned)c_end / kKeyHalves), c_end >= 0};
    }
}

}  // namespace bsfa
