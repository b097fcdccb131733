// The persistent schedule of the warp-specialised kernel (BSFA_GRID 2,
// kGridPersistent): a grid of at most one CTA per SM walks the list of work
// tiles (query tile, head, batch), or (query tile, key split, head, batch)
// for the split-KV entry (kSplit: the key blocks of each query tile cut into
// p.num_splits contiguous ranges, KeyBlocks).  CTA i takes tile i of round 0,
// then rounds go boustrophedon (round r takes r * G + i, or r * G + G-1-i
// when r is odd): the CTA that got the heaviest tile of one round gets the
// lightest of the next, which evens out the causal triangle without an
// atomic counter, and producer and consumers derive the same sequence on
// their own.
//
// Without kSplit the list is cut into sections of whole GQA groups of
// heads (b * Hq + h), each at least kSectionRounds rounds long and ordered
// section by section, within one heaviest query tile first for causal,
// heads fastest.  The CTAs in flight at once then share the K/V heads of
// one or two sections, so that each K/V block fetched from DRAM serves many
// of them through L2, as many with one query head per K/V head as with a
// group of four (one section, the whole list query tile by query tile,
// served a K/V head to G / (B * Hkv) CTAs at a time: 4 at Hq = Hkv = 32;
// bench/NOTES.md, v18).  Each section is padded to a whole number of round
// pairs (padded slots have no tile, index -1), so that every boustrophedon
// pair of rounds lies within one monotone section: unpadded, a pair across
// a seam gives some CTAs two of the heaviest tiles (13-16 % slower at 8K
// with 4-round sections, v18).  Sections of 16 rounds, padded, keep the
// busiest CTA within 0.5 % of the mean in a model of the causal schedule
// at N = 8K-128K, Hkv = 8 and 32, B = 8 x 2K, B = 32 x 1K; a problem that
// one section covers (8K here) keeps the plain list.  Tile pairs
// (kPairTiles) take narrower sections where their padding allows, down to
// about G / 16 heads: at Hq = Hkv = 32, where K/V outgrow L2, 3-7 %
// faster at 8K-16K, causal or not (bench/NOTES.md, v37).  kSplit keeps
// one section: within one query-tile rank the splits go split by split,
// heads fastest, so the CTAs in flight at once read the same key range of
// a GQA group's K/V head.
//
// kCtas 2 (the cluster entries, TraitsSm90WsMc): the list is over pairs of
// query heads of one GQA group, walked by clusters (cluster i is CTAs 2i and
// 2i+1, G the number of clusters), and the CTA of rank r takes head 2 h + r
// of the pair h: both CTAs of a cluster visit the same key blocks.  With
// kPairTiles (TraitsSm90WsPair) the list is over pairs of query tiles of one
// head instead: entry rank p holds tiles 2p and 2p + 1 (counted from the
// heaviest, for causal), the CTA of rank r takes the r-th, and a tile index
// outside [0, nQ) (an odd nQ's last pair) leaves that CTA without a tile of
// its own.  The pair's CTAs then visit the key blocks of its longer tile.
//
// Includes what it needs.
#pragma once

#include "bsfa_mask.cuh"
#include "bsfa_params.cuh"
#include "bsfa_problem.cuh"
#include "bsfa_traits.cuh"

namespace bsfa {

struct WorkTile {
    int a;  // query tile
    int h;
    int b;
    int s;  // key split (0 without kSplit)
};

template <bool kHeavyFirst, bool kSplit = false, int kCtas = 1, bool kPairTiles = false>
struct PersistentSchedule {
    static_assert(kCtas == 1 || !kSplit, "no cluster entry splits the key range");
    static_assert(!kPairTiles || kCtas == 2, "tile pairs are walked by clusters of two");
    static constexpr int kSectionRounds = 16;
    int nQ;
    int Hq;
    int total;  // nQ * B * Hq (* splits), < 2^31 (checked on the host)
    int BH;     // B * Hq
    int width;  // (b, h) pairs a section (without kSplit)
    int span;   // list slots a section, padding included
    int slots;  // list slots in all, padding included
    int tiles;  // kPairTiles: query tiles (nQ counts pairs of them)

    // group: query heads per K/V head (Hq / Hkv; a divisor of Hq).  With
    // kCtas 2, Hq_ and group count pairs of query heads; with kPairTiles,
    // nQ_ counts pairs of the tiles_ query tiles, and Hq_ and group heads.
    __device__ __forceinline__ PersistentSchedule(int nQ_, int Hq_, int B, int group, int splits = 1, int tiles_ = 0)
        : nQ(nQ_), Hq(Hq_), total(kSplit ? nQ_ * Hq_ * B * splits : nQ_ * Hq_ * B), BH(Hq_ * B), width(BH),
          span(total), slots(total), tiles(tiles_) {
        if constexpr (!kSplit) {
            const int pair = 2 * grid();
            const int w = ceil_div(kSectionRounds * grid(), nQ_ * group) * group;
            // Padding adds at most a pair of rounds a section; a list near
            // 2^31 slots (never in practice) stays in one section.
            if (w < BH && total <= (1 << 29)) {
                width = w;
                span = ceil_div(w * nQ_, pair) * pair;
                slots = ceil_div(BH, w) * span;
            }
            if constexpr (kPairTiles) {
                // Tile pairs (dense calls of odd groups, Hq = Hkv included) from 32 pairs a head: the
                // narrowest sections, from about G / 16 heads, whose padding stays within 1/32 of the list,
                // so that the clusters in flight share fewer K/V heads and each K/V block fetched from DRAM
                // serves more of them (at 8K, G = 66: 8 heads a section, against all 32 in one).
                if (nQ_ >= 32 && total <= (1 << 29)) {
                    const int lo = imax(group, ceil_div(grid(), 16) / group * group);
                    for (int v = lo; v < width; v += group) {
                        const int sp = ceil_div(v * nQ_, pair) * pair;
                        const long long sl = (long long)ceil_div(BH, v) * sp;
                        if ((sl - total) * 32 <= total) {
                            width = v;
                            span = sp;
                            slots = (int)sl;
                            break;
                        }
                    }
                }
            }
        }
    }

    // Walkers of the list (CTAs, or clusters with kCtas 2) and this one's index.
    __device__ __forceinline__ static int grid() { return (int)gridDim.x / kCtas; }
    __device__ __forceinline__ static int walker() { return (int)blockIdx.x / kCtas; }

    // The index of this CTA's tile in round r, or -1 once the list is done
    // or where round r gives it a padding slot.  Rounds are walked while r * G < slots.
    __device__ __forceinline__ int index(int r) const {
        const int G = grid();
        const int i = (r & 1) ? G - 1 - walker() : walker();
        const int j = r * G + i;
        if (j >= slots) return -1;
        if constexpr (!kSplit) {
            const int sec = j / span;
            const int w0 = sec * width;
            const int w = BH - w0 < width ? BH - w0 : width;  // the last section may be narrower
            if (j - sec * span >= w * nQ) return -1;
        }
        return j;
    }

    __device__ __forceinline__ bool rounds_left(int r) const { return r * grid() < slots; }

    __device__ __forceinline__ WorkTile tile(int j) const { return tile_of(j, (int)blockIdx.x % kCtas); }

    // The tile of list slot j that the cluster's CTA of rank r takes (tile():
    // this CTA's own rank; kPairTiles also asks for the partner's).
    __device__ __forceinline__ WorkTile tile_of(int j, int r) const {
        if constexpr (kSplit) {
            const int per_rank = total / nQ;
            const int rank = j / per_rank;
            int bh = j - rank * per_rank;
            const int s = bh / BH;
            bh -= s * BH;
            return WorkTile{kHeavyFirst ? nQ - 1 - rank : rank, bh % Hq, bh / Hq, s};
        } else {
            const int sec = j / span;
            const int w0 = sec * width;
            const int w = BH - w0 < width ? BH - w0 : width;
            const int within = j - sec * span;
            const int rank = within / w;
            const int bh = w0 + within - rank * w;
            if constexpr (kCtas == 1) {
                return WorkTile{kHeavyFirst ? nQ - 1 - rank : rank, bh % Hq, bh / Hq, 0};
            } else if constexpr (kPairTiles) {  // rank is a pair of query tiles; r picks one, maybe none
                const int t = rank * kCtas + r;
                return WorkTile{kHeavyFirst ? tiles - 1 - t : t, bh % Hq, bh / Hq, 0};
            } else {  // bh % Hq is a pair of heads; the CTA's rank in its cluster picks one
                return WorkTile{kHeavyFirst ? nQ - 1 - rank : rank, (bh % Hq) * kCtas + r, bh / Hq, 0};
            }
        }
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

// The schedule of the warp-specialised kernels' producer and consumers
// (TR a TraitsSm90Ws): nQ query tiles of the Params' heads and batch, over
// pairs of heads (TraitsSm90WsMc), pairs of tiles (TraitsSm90WsPair) or
// neither.
template <class TR, bool kCausal, bool kSplit>
using ScheduleSm90Ws = PersistentSchedule<kCausal, kSplit, TR::kClusterCtas, TR::kPairTiles>;

// group: Hq / Hkv.
template <class TR, bool kCausal, bool kSplit>
__device__ __forceinline__ ScheduleSm90Ws<TR, kCausal, kSplit> schedule_sm90ws(const Params& p, int nQ, int group) {
    constexpr int kC = TR::kClusterCtas;
    if constexpr (TR::kPairTiles) {
        return ScheduleSm90Ws<TR, kCausal, kSplit>(ceil_div(nQ, 2), p.Hq, p.B, group, 1, nQ);
    } else {
        return ScheduleSm90Ws<TR, kCausal, kSplit>(nQ, TR::kPackHeads ? p.Hq / 2 : p.Hq / kC, p.B, group / kC,
                                                   p.num_splits);
    }
}

// kPairTiles: the 128-key blocks that the pair of tiles of list slot j
// visits, those of its longer tile ([0, last], none where neither tile has
// a key), so that the producers of both CTAs load the same blocks.
template <class TR, bool kCausal, class Sched>
__device__ __forceinline__ KeyBlocks pair_key_blocks(const Sched& sched, int j, const Problem& pr) {
    int last = -1;
#pragma unroll
    for (int r = 0; r < TR::kClusterCtas; ++r) {
        const int a = sched.tile_of(j, r).a;
        if (a >= 0 && a < sched.tiles) {
            const QueryTile<TR, kCausal> qt(a, pr);
            if (qt.c_end >= 0) last = imax(last, qt.c_end / TR::kKeyHalves);
        }
    }
    return KeyBlocks{0, last, last >= 0};
}

}  // namespace bsfa
