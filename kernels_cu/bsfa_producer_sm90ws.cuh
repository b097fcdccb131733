// The producer of the warp-specialised sm_90a forward: one thread of the
// producer warpgroup walks the same tile list as the consumers and issues
// every TMA copy -- the Q tile of each work tile, then K and V of its
// 128-key blocks, last block first (the consumers' order), into the
// two-stage rings.  It waits only for free slots: a slot is refilled once
// all consumer warps have released it.  V is loaded for every visited block,
// skipped or not (speculative): the producer never waits for a gate decision.
// TR::kProducerChecksV (bsfa_fwd_headpair): the consumers hand a skipped
// block's V slot back without waiting for its copy, so the producer checks
// that each V copy landed before the slot is reused, and before it exits.
// kLoadV = false serves bsfa_block_max (Q and K only; its K ring takes the
// V ring's slots too: kBlockMaxStages).
//
// kVarlen (bsfa_fwd_varlen): the maps describe the packed (total, H, D)
// tensors as one batch element, and a sequence's boxes start at its first
// row.  A box reaching past the sequence's end reads the next sequence's
// rows (zeros past the packed tensor's end): its queries are masked out and
// never stored, its keys masked, and its values zeroed by the consumers
// before any P V reads them (bsfa_consumer_sm90ws.cuh).  Query tiles past
// the sequence's end load nothing.
//
// kSplit (bsfa_fwd_split): a work tile is one key split of a query tile, and
// only that split's key blocks are loaded (KeyBlocks); an empty split loads
// nothing, not even its Q tile.  With two heads a tile (TR::kPackHeads,
// bsfa_fwd_split_pack) the Q tile is the first 64 rows of query heads 2 w.h
// and 2 w.h + 1, one box of 64 rows each (tq is made with 64-row boxes) into
// the two warpgroups' halves of the Q buffer; bsfa_fwd_headpair's is the
// same with 128-row boxes (TR::kWgRows), and 64-key blocks.
//
// Includes what it needs; TR is a TraitsSm90Ws.
#pragma once

#include "bsfa_mask.cuh"
#include "bsfa_params.cuh"
#include "bsfa_problem.cuh"
#include "bsfa_pipeline_sm90.cuh"
#include "bsfa_smem_sm90ws.cuh"
#include "bsfa_tile_scheduler_sm90.cuh"
#include "bsfa_wgmma_sm90.cuh"

namespace bsfa {

// One ring slot (or the Q buffer): waits until it is free (parity of the
// slot's previous use), announces its bytes on `full`, and copies the
// 64-column panels of the box at rows row0.. of head h, batch b into dst.
// kCtas 2 (a K or V slot of the cluster entries): this CTA copies every
// other panel (from its rank on) into the slot of both CTAs, whose
// producers together fill it; `empty` then counts both CTAs' consumers.
template <class TR, int kPanelStride, int kCtas = 1>
__device__ __forceinline__ void fill_slot(unsigned dst, const TmaDesc& desc, unsigned empty, unsigned full,
                                          unsigned parity, int row0, int h, int b) {
    mbar_wait(empty, parity);
    mbar_arrive_expect_tx(full, TR::kPanels * kPanelStride);
    if constexpr (kCtas == 1) {
#pragma unroll
        for (int pn = 0; pn < TR::kPanels; ++pn) {
            tma_load_4d(dst + pn * kPanelStride, desc, full, pn * TR::kPanelCols, row0, h, b);
        }
    } else {
        static_assert(TR::kPanels % kCtas == 0, "whole panels per CTA");
        const int rank = (int)cluster_ctarank();
#pragma unroll
        for (int i = 0; i < TR::kPanels / kCtas; ++i) {
            const int pn = i * kCtas + rank;
            tma_load_4d_multicast(dst + pn * kPanelStride, desc, full, pn * TR::kPanelCols, row0, h, b,
                                  (unsigned short)((1u << kCtas) - 1));
        }
    }
}

template <class TR, bool kCausal, bool kLoadV = true, bool kVarlen = false, bool kSplit = false>
__device__ __forceinline__ void producer_loop(const Params& p, const TmaDesc& tq, const TmaDesc& tk,
                                              const TmaDesc& tv, const SmemWs<TR>& sm) {
    const int group = p.Hq / p.Hkv;
    constexpr int kC = TR::kClusterCtas;
    const int nQ = ceil_div(p.Nq, TR::kBlockM);
    const auto sched = schedule_sm90ws<TR, kCausal, kSplit>(p, nQ, group);
    PipeState<kLoadV ? TR::kStages : TR::kBlockMaxStages> kv;
    unsigned q_phase = 0;
#pragma unroll 1
    for (int r = 0; sched.rounds_left(r); ++r) {
        const int j = sched.index(r);
        if (j < 0) continue;
        const WorkTile w = sched.tile(j);
        const Problem pr = cta_problem<kVarlen>(p, w.b);
        if constexpr (kVarlen) {
            if (w.a * TR::kBlockM >= pr.Nq) continue;  // past the sequence's end: nothing to load
        }
        const QueryTile<TR, kCausal> qt(w.a, pr);
        // kPairTiles: the pair's blocks, and the Q tile only where this CTA's
        // own tile has keys (it may have none, or be no tile at all).
        const KeyBlocks kb = TR::kPairTiles ? pair_key_blocks<TR, kCausal>(sched, j, pr)
                                            : key_blocks<kSplit, TR::kKeyHalves>(qt.c_end, w.s, p.num_splits);
        if (!kb.any) continue;  // no key to visit: the consumers write zeros without Q
        const bool load_q = !TR::kPairTiles || (w.a >= 0 && w.a < nQ && qt.c_end >= 0);
        const int h0 = wg_head<TR>(w, 0);  // the tile's (first) query head
        const int hkv = h0 / group;
        // The box's batch coordinate: the packed tensors are one batch element.
        const int bc = kVarlen ? 0 : w.b;

        if (load_q) {
            if constexpr (TR::kPackHeads) {
                mbar_wait(sm.bar(TR::kBarQEmpty), q_phase ^ 1u);
                mbar_arrive_expect_tx(sm.bar(TR::kBarQFull), TR::kPanels * TR::kQPanelBytes);
#pragma unroll
                for (int pn = 0; pn < TR::kPanels; ++pn) {
#pragma unroll
                    for (int hh = 0; hh < TR::kConsumerWGs; ++hh) {
                        tma_load_4d(sm.q() + pn * TR::kQPanelBytes + hh * TR::kWgRows * kSwizzleBytes, tq,
                                    sm.bar(TR::kBarQFull), pn * TR::kPanelCols, pr.q_row + qt.q0, h0 + hh, bc);
                    }
                }
            } else {
                fill_slot<TR, TR::kQPanelBytes>(sm.q(), tq, sm.bar(TR::kBarQEmpty), sm.bar(TR::kBarQFull),
                                                 q_phase ^ 1u, pr.q_row + qt.q0, w.h, bc);
            }
            q_phase ^= 1u;
        }

#pragma unroll 1
        for (int n = kb.last; n >= kb.first; --n) {
            const int s = kv.stage;
            const int key0 = pr.k_row + n * TR::kBlockKeys;
            if constexpr (TR::kKAhead && kLoadV) {
                // K a block ahead of V: the next block's K goes out before this
                // block's V, as soon as its slot is free.  The lagged gate waits
                // for it before the current block's turn; behind V it came a
                // block late (bench/NOTES.md, v22).
                if (n == kb.last) {
                    fill_slot<TR, TR::kKVPanelBytes, kC>(sm.k() + s * TR::kKVBytes, tk, sm.bar(TR::kBarKEmpty + s),
                                                         sm.bar(TR::kBarKFull + s), kv.phase ^ 1u, key0, hkv, bc);
                }
                if (n > kb.first) {
                    PipeState<TR::kStages> nx = kv;
                    nx.advance();
                    fill_slot<TR, TR::kKVPanelBytes, kC>(sm.k() + nx.stage * TR::kKVBytes, tk,
                                                         sm.bar(TR::kBarKEmpty + nx.stage),
                                                         sm.bar(TR::kBarKFull + nx.stage), nx.phase ^ 1u,
                                                         key0 - TR::kBlockKeys, hkv, bc);
                }
            } else {
                if constexpr (TR::kProducerChecksV && kLoadV) {
                    // The V slot's previous copy landed (its consumers may
                    // have released it unseen) before this block's K goes
                    // out: a consumer that saw this K never waits on the V
                    // barrier a phase early (the same parity).
                    mbar_wait(sm.bar(TR::kBarVFull + s), kv.phase ^ 1u);
                }
                fill_slot<TR, TR::kKVPanelBytes, kC>(sm.k() + s * TR::kKVBytes, tk, sm.bar(TR::kBarKEmpty + s),
                                                     sm.bar(TR::kBarKFull + s), kv.phase ^ 1u, key0, hkv, bc);
            }
            if constexpr (kLoadV) {
                fill_slot<TR, TR::kKVPanelBytes, kC>(sm.v() + s * TR::kKVBytes, tv, sm.bar(TR::kBarVEmpty + s),
                                                     sm.bar(TR::kBarVFull + s), kv.phase ^ 1u, key0, hkv, bc);
            }
            kv.advance();
        }
    }
    if constexpr (TR::kProducerChecksV && kLoadV) {
        // Nobody may have waited for the last copies: none is left in flight
        // into shared memory when the CTA exits.
#pragma unroll 1
        for (int i = 0; i < TR::kStages; ++i) {
            mbar_wait(sm.bar(TR::kBarVFull + kv.stage), kv.phase ^ 1u);
            kv.advance();
        }
    }
}

}  // namespace bsfa
