// bsfa_block_max_wide: bsfa_block_max on 256-row query tiles, each consumer
// warpgroup holding a whole 128-row BSFA tile (TraitsSm90WsBlockMaxWide).
// Every kernel of the warp-specialised family moves ~4 TB/s from L2 into
// the SMs (bench/NOTES.md, v16), and bsfa_block_max, which reads a K block
// per 64 rows' worth of S on each warpgroup, needs more than that to keep
// the tensor cores busy; with two BSFA tiles sharing each K block a CTA
// reads half the bytes per FLOP.  A warpgroup's S of a 128-key block is two
// m64n128 wgmma groups (its two 64-row halves, 128 registers), so there is
// no second S buffer: the other warpgroup's S keeps the tensor cores busy
// while a warpgroup takes its maxima.  The tile maximum spans only the
// warpgroup's own rows: its four warps post to a ring of their own and one
// thread of the warpgroup writes each block's maxima a block late, as in
// bsfa_block_max, whose S, masks and maxima these are, bitwise.
//
// Includes what it needs; TR is a TraitsSm90WsBlockMaxWide.
#pragma once

#include "bsfa_block_max_sm90ws.cuh"
#include "bsfa_block_sm90ws.cuh"
#include "bsfa_mask.cuh"
#include "bsfa_params.cuh"
#include "bsfa_problem.cuh"
#include "bsfa_pipeline_sm90.cuh"
#include "bsfa_ptx.cuh"
#include "bsfa_smem_sm90ws.cuh"
#include "bsfa_softmax.cuh"
#include "bsfa_tile_scheduler_sm90.cuh"
#include "bsfa_wgmma_sm90.cuh"

namespace bsfa {

// The ring slot of this warpgroup's posting post_idx.
template <class TR>
__device__ __forceinline__ unsigned wide_max_slot(int wg, unsigned post_idx) {
    return (unsigned)wg * TR::kVoteRing + post_idx % TR::kVoteRing;
}

// Masks block n's S (both row halves; the keys of the warpgroup's own BSFA
// tile qo, those past its c_end excluded) and posts this warp's maximum of
// each 64-key half to the warpgroup's ring.
template <class TR, bool kCausal>
__device__ __forceinline__ void post_wide_maxima(const Params& p, const SmemWs<TR>& sm,
                                                 const QueryTile<typename TR::BsfaTile, kCausal>& qo,
                                                 float (&S)[TR::kRowHalves][TR::kBlockSNBlocks][4], int n, int wg,
                                                 int warp, int lane, unsigned post_idx) {
    using BT = typename TR::BsfaTile;
    const unsigned slot = wide_max_slot<TR>(wg, post_idx);
    const unsigned maxes = sm.maxes() + slot * TR::kMaxSlotBytes;
#pragma unroll
    for (int h = 0; h < TR::kKeyHalves; ++h) {
        const int c = n * TR::kKeyHalves + h;
        float v = neg_inf();
#pragma unroll
        for (int r = 0; r < TR::kRowHalves; ++r) {
            float(&Sh)[1][TR::kSNBlocks][4] = key_half<TR>(S[r], h);
            const int row0 = qo.q0 + r * TR::kWgmmaM + warp * TR::kWarpRows + (lane >> 2);
            if (qo.needs_mask(c)) mask_tile<BT, kCausal>(Sh, c, row0, lane, p.Nq, p.Nk, p.qk_shift);
            float mx[1][2];
            row_max<TR, false>(Sh, mx);
            v = fmax2(v, fmax2(mx[0][0], mx[0][1]));
        }
        store_warp_max<TR>(v, lane, maxes, warp, h);
    }
    if (lane == 0) mbar_arrive(sm.bar(TR::kBarVote + slot));
}

// The writer thread of a warpgroup: block n's tile maxima from its slot,
// once the warpgroup's four warps have posted there.
template <class TR, bool kCausal>
__device__ __forceinline__ void write_wide_maxima(const Params& p, const SmemWs<TR>& sm,
                                                  const QueryTile<typename TR::BsfaTile, kCausal>& qo, float* tm_row,
                                                  int n, int wg, unsigned post_idx) {
    const unsigned slot = wide_max_slot<TR>(wg, post_idx);
    const unsigned maxes = sm.maxes() + slot * TR::kMaxSlotBytes;
    mbar_wait(sm.bar(TR::kBarVote + slot), (post_idx / TR::kVoteRing) & 1u);
    write_slot_maxima<TR>(p, maxes, TR::kVoteWarps, n, qo.c_end, tm_row);
}

template <class TR, bool kCausal>
__device__ __forceinline__ void block_max_consumer_wide(const Params& p, const SmemWs<TR>& sm, int wg, int tid) {
    using BT = typename TR::BsfaTile;
    static_assert(TR::kClusterCtas == 1 && !TR::kPairTiles, "one CTA a tile");
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const bool writer = tid == 0;  // one a warpgroup: its own tile's row of tile maxima
    const int nQ = ceil_div(p.Nq, TR::kBlockM);     // the CTA's tiles
    const int nQb = ceil_div(p.Nq, BT::kBlockM);    // the BSFA tiles, tile_max's rows
    const int nK = ceil_div(p.Nk, TR::kBlockN);
    const auto sched = schedule_sm90ws<TR, kCausal, false>(p, nQ, p.Hq / p.Hkv);
    PipeState<TR::kBlockMaxStages> kv;
    unsigned q_phase = 0;
    unsigned post_idx = 0;
#pragma unroll 1
    for (int r = 0; sched.rounds_left(r); ++r) {
        const int j = sched.index(r);
        if (j < 0) continue;
        const WorkTile w = sched.tile(j);
        const Problem pr = cta_problem<false>(p, w.b);
        const QueryTile<TR, kCausal> qt(w.a, pr);  // the CTA's 256 rows: the blocks the producer loads
        const int a_own = w.a * TR::kConsumerWGs + wg;
        const bool has_rows = a_own < nQb;
        const QueryTile<BT, kCausal> qo(a_own, pr);  // this warpgroup's BSFA tile
        const int own_c_end = has_rows ? qo.c_end : -1;
        float* tm_row = p.tile_max + (((long long)w.b * p.Hq + w.h) * nQb + a_own) * nK;
        if (has_rows) {
            for (int c = own_c_end + 1 + tid; c < nK; c += 128) tm_row[c] = neg_inf();
        }
        if (qt.c_end < 0) continue;  // no key for any row of the CTA: nothing loaded
        mbar_wait(sm.bar(TR::kBarQFull), q_phase);
        q_phase ^= 1u;
        const unsigned long long q_desc =
            make_desc(sm.q() + wg * TR::kWgRows * kSwizzleBytes, 16, kSwizzleAtomBytes);
        // Blocks from the CTA's last down to 0; this warpgroup computes those
        // with a key of its own tile, and hands every slot back.
        int pending = -1;  // the block posted last, written a block late
#pragma unroll 1
        for (int n = qt.c_end / TR::kKeyHalves; n >= 0; --n) {
            mbar_wait(sm.bar(TR::kBarKFull + kv.stage), kv.phase);
            const bool mine = n * TR::kKeyHalves <= own_c_end;  // uniform over the warpgroup
            if (mine) {
                float S[TR::kRowHalves][TR::kBlockSNBlocks][4];
                const unsigned long long k_desc = make_desc(sm.k() + kv.stage * TR::kKVBytes, 16, kSwizzleAtomBytes);
#pragma unroll
                for (int rh = 0; rh < TR::kRowHalves; ++rh) {
                    qk_block<TR>(S[rh], desc_add(q_desc, rh * TR::kWgmmaM * kSwizzleBytes), k_desc);
                }
                wgmma_wait<0>();
                fence_regs(flat(S[0]));
                fence_regs(flat(S[1]));
                if (lane == 0) {
                    mbar_arrive(sm.bar(TR::kBarKEmpty + kv.stage));
                    if (n == 0) mbar_arrive(sm.bar(TR::kBarQEmpty));
                }
                post_wide_maxima<TR, kCausal>(p, sm, qo, S, n, wg, warp, lane, post_idx);
                if (writer && pending >= 0) write_wide_maxima<TR, kCausal>(p, sm, qo, tm_row, pending, wg, post_idx - 1);
                pending = n;
                ++post_idx;
            } else if (lane == 0) {
                mbar_arrive(sm.bar(TR::kBarKEmpty + kv.stage));
                if (n == 0) mbar_arrive(sm.bar(TR::kBarQEmpty));
            }
            kv.advance();
        }
        if (writer && pending >= 0) write_wide_maxima<TR, kCausal>(p, sm, qo, tm_row, pending, wg, post_idx - 1);
    }
}

}  // namespace bsfa
