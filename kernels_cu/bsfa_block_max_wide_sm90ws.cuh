// bsfa_block_max_wide: bsfa_block_max on 256-row query tiles, each consumer
// warpgroup holding a whole 128-row BSFA tile (TraitsSm90WsBlockMaxWide).
// Every kernel of the warp-specialised family moves ~4 TB/s from L2 into
// the SMs (bench/NOTES.md, v16), and bsfa_block_max, which reads a K block
// per 64 rows' worth of S on each warpgroup, needs more than that to keep
// the tensor cores busy; with two BSFA tiles sharing each K block a CTA
// reads half the bytes per FLOP.  A warpgroup's rows of Q sit in registers
// (64 a thread at head dim 128), so that S, the register-sourced m64n128
// wgmma of bsfa_block_max's Q-in-registers form, reads only K from shared
// memory: wgmma takes at most 128 bytes a cycle from there, which products
// with both operands in shared memory nearly use up (NOTES v28).  A
// block's two row halves are two groups, issued together; the first one's
// maxima are folded while the second runs, and the other warpgroup's S keeps
// the tensor cores busy while a warpgroup takes the rest.  The tile maximum
// spans only the warpgroup's own rows: its four warps post to a ring of
// their own and one thread of the warpgroup writes each block's maxima a
// block late, while the next block's S runs, as in bsfa_block_max, whose S,
// masks and maxima these are, bitwise.
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

// The descriptor of the K slot of stage `stage` (128 keys, B of S = Q K^T).
template <class TR>
__device__ __forceinline__ unsigned long long k_desc_of(const SmemWs<TR>& sm, int stage) {
    return make_desc(sm.k() + stage * TR::kKVBytes, 16, kSwizzleAtomBytes);
}

// The ring slot of this warpgroup's posting post_idx.
template <class TR>
__device__ __forceinline__ unsigned wide_max_slot(int wg, unsigned post_idx) {
    return (unsigned)wg * TR::kVoteRing + post_idx % TR::kVoteRing;
}

// Masks row half rh of block n's S (the keys of the warpgroup's own BSFA
// tile qo, those past its c_end excluded) and folds this lane's maximum of
// each 64-key half into v.
template <class TR, bool kCausal>
__device__ __forceinline__ void fold_wide_maxima(const Params& p, const QueryTile<typename TR::BsfaTile, kCausal>& qo,
                                                 float (&S)[TR::kBlockSNBlocks][4], int n, int rh, int warp, int lane,
                                                 float (&v)[TR::kKeyHalves]) {
    using BT = typename TR::BsfaTile;
    fence_regs(flat(S));
#pragma unroll
    for (int h = 0; h < TR::kKeyHalves; ++h) {
        const int c = n * TR::kKeyHalves + h;
        float(&Sh)[1][TR::kSNBlocks][4] = key_half<TR>(S, h);
        const int row0 = qo.q0 + rh * TR::kWgmmaM + warp * TR::kWarpRows + (lane >> 2);
        if (qo.needs_mask(c)) mask_tile<BT, kCausal>(Sh, c, row0, lane, p.Nq, p.Nk, p.qk_shift);
        float mx[1][2];
        row_max<TR, false>(Sh, mx);
        v[h] = fmax2(v[h], fmax2(mx[0][0], mx[0][1]));
    }
}

// Posts this warp's maxima v of block n's two key tiles to the warpgroup's
// ring.
template <class TR>
__device__ __forceinline__ void post_wide_maxima(const SmemWs<TR>& sm, const float (&v)[TR::kKeyHalves], int wg,
                                                 int warp, int lane, unsigned post_idx) {
    const unsigned slot = wide_max_slot<TR>(wg, post_idx);
    const unsigned maxes = sm.maxes() + slot * TR::kMaxSlotBytes;
#pragma unroll
    for (int h = 0; h < TR::kKeyHalves; ++h) store_warp_max<TR>(v[h], lane, maxes, warp, h);
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
        // Blocks from the CTA's last down to 0; this warpgroup computes those
        // with a key of its own tile, and hands every slot back.  Its rows of
        // Q are in registers (its two row halves' A fragments, read once),
        // so that S reads only K from shared memory; each row half's S of a
        // block is a group of its own, both issued together and retired
        // within the block's step (a group kept in flight into the next step
        // made ptxas serialise every wgmma here, NOTES v28).
        int n = qt.c_end / TR::kKeyHalves;
#pragma unroll 1
        for (; n >= 0 && n * TR::kKeyHalves > own_c_end; --n) {
            mbar_wait(sm.bar(TR::kBarKFull + kv.stage), kv.phase);
            if (lane == 0) {
                mbar_arrive(sm.bar(TR::kBarKEmpty + kv.stage));
                if (n == 0) mbar_arrive(sm.bar(TR::kBarQEmpty));
            }
            kv.advance();
        }
        if (n < 0) continue;
        unsigned Qf[TR::kRowHalves][TR::kDSteps][4];
#pragma unroll
        for (int rh = 0; rh < TR::kRowHalves; ++rh) {
#pragma unroll
            for (int kk = 0; kk < TR::kDSteps; ++kk) {
                ldsm_x4(Qf[rh][kk], a_frag_addr<TR>(sm.q(), wg * TR::kRowHalves + rh, kk));
            }
        }
        if (lane == 0) mbar_arrive(sm.bar(TR::kBarQEmpty));  // read: the next tile's Q may come in
        int pending = -1;  // the block posted last, written a block late
#pragma unroll 1
        for (; n >= 0; --n) {
            float Sa[TR::kBlockSNBlocks][4], Sb[TR::kBlockSNBlocks][4];
            float v[TR::kKeyHalves] = {neg_inf(), neg_inf()};
            mbar_wait(sm.bar(TR::kBarKFull + kv.stage), kv.phase);
            qk_block_rs<TR>(Sa, Qf[0], k_desc_of<TR>(sm, kv.stage));
            qk_block_rs<TR>(Sb, Qf[1], k_desc_of<TR>(sm, kv.stage));
            // The previous block's maxima, while the tensor cores run these.
            if (writer && pending >= 0) write_wide_maxima<TR, kCausal>(p, sm, qo, tm_row, pending, wg, post_idx - 1);
            wgmma_wait<1>();
            fold_wide_maxima<TR, kCausal>(p, qo, Sa, n, 0, warp, lane, v);
            wgmma_wait<0>();
            if (lane == 0) mbar_arrive(sm.bar(TR::kBarKEmpty + kv.stage));  // both row halves have read it
            fold_wide_maxima<TR, kCausal>(p, qo, Sb, n, 1, warp, lane, v);
            post_wide_maxima<TR>(sm, v, wg, warp, lane, post_idx);
            pending = n;
            ++post_idx;
            kv.advance();
        }
        if (writer) write_wide_maxima<TR, kCausal>(p, sm, qo, tm_row, pending, wg, post_idx - 1);
    }
}

}  // namespace bsfa
