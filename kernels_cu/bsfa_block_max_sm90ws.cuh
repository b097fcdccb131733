// bsfa_block_max on the warp-specialised sm_90a machinery: the producer
// loads Q and K only (K into a ring of kBlockMaxStages slots, the V ring's
// included), and each consumer warpgroup runs the S path of
// bsfa_fwd (the same wgmma m64n128 S, masks and lane-local row maxima, so
// the maxima are bit-identical to what the forward's gate compares), one
// block ahead: block n-1's S is issued before block n's is masked.  Each
// warp posts its maximum of each 64-key half to a slot of the ring and
// arrives at the slot's mbarrier; one thread waits there, a block later,
// and writes the two tile maxima.  No warp waits for another otherwise.  A
// warp posts block e+kBlockMaxStages only once every warp has released block
// e's K slot, i.e. posted e, and the writer reads e a step after posting
// e+1: at most kBlockMaxStages + 1 postings are live, fewer than the ring's
// kVoteSlots.  The kernel around it is in bsfa_kernel_sm90ws.cuh.
//
// Includes what it needs; TR is a TraitsSm90Ws.
#pragma once

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

// Folds v (this lane's maximum of half h) over the warp; lane 0 stores it as
// posting w's value of half h in the ring slot at maxes.
template <class TR>
__device__ __forceinline__ void store_warp_max(float v, int lane, unsigned maxes, int w, int h) {
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) v = fmax2(v, shfl_xor(v, off));
    if (lane == 0) sts_f32(maxes + (w * TR::kKeyHalves + h) * 4, v);
}

// Block n's tile maxima from the ring slot at maxes, the maximum of `warps`
// postings per half, scaled and written where a key tile is valid (c <= c_end).
template <class TR>
__device__ __forceinline__ void write_slot_maxima(const Params& p, unsigned maxes, int warps, int n, int c_end,
                                                  float* tm_row) {
#pragma unroll
    for (int h = 0; h < TR::kKeyHalves; ++h) {
        const int c = n * TR::kKeyHalves + h;
        float v = lds_f32(maxes + h * 4);
#pragma unroll
        for (int w = 1; w < warps; ++w) v = fmax2(v, lds_f32(maxes + (w * TR::kKeyHalves + h) * 4));
        if (c <= c_end) tm_row[c] = v * p.softmax_scale;
    }
}

// Masks block n's S (issued earlier), hands its K slot back and posts this
// warp's maximum of each half to the ring.
template <class TR, bool kCausal>
__device__ __forceinline__ void post_block_maxima(const Params& p, const SmemWs<TR>& sm,
                                                  const QueryTile<TR, kCausal>& qt, float (&S)[TR::kBlockSNBlocks][4],
                                                  int n, int row0, int lane, int consumer_warp,
                                                  const PipeState<TR::kBlockMaxStages>& kv, unsigned post_idx) {
    fence_regs(flat(S));
    if (lane == 0) {
        mbar_arrive_cluster<TR::kClusterCtas>(sm.bar(TR::kBarKEmpty + kv.stage));
        if (n == 0) mbar_arrive(sm.bar(TR::kBarQEmpty));
    }
    const unsigned slot = post_idx % TR::kVoteSlots;
    const unsigned maxes = sm.maxes() + slot * TR::kMaxSlotBytes;
#pragma unroll
    for (int h = 0; h < TR::kKeyHalves; ++h) {
        const int c = n * TR::kKeyHalves + h;
        float(&Sh)[1][TR::kSNBlocks][4] = key_half<TR>(S, h);
        if (qt.needs_mask(c)) mask_tile<TR, kCausal>(Sh, c, row0, lane, p.Nq, p.Nk, p.qk_shift);
        float mx[1][2];
        row_max<TR, false>(Sh, mx);
        store_warp_max<TR>(fmax2(mx[0][0], mx[0][1]), lane, maxes, consumer_warp, h);
    }
    if (lane == 0) mbar_arrive(sm.bar(TR::kBarVote + slot));
}

// The writer thread: the tile maxima of block n from its slot, once every
// warp has posted there.
template <class TR, bool kCausal>
__device__ __forceinline__ void write_block_maxima(const Params& p, const SmemWs<TR>& sm,
                                                   const QueryTile<TR, kCausal>& qt, float* tm_row, int n,
                                                   unsigned post_idx) {
    const unsigned slot = post_idx % TR::kVoteSlots;
    const unsigned maxes = sm.maxes() + slot * TR::kMaxSlotBytes;
    mbar_wait(sm.bar(TR::kBarVote + slot), (post_idx / TR::kVoteSlots) & 1u);
    write_slot_maxima<TR>(p, maxes, TR::kConsumerWarps, n, qt.c_end, tm_row);
}

// One step for block n, whose S is in flight in Sc: issue block n-1's S
// into Sn (kHasNext: n > 0, a compile-time branch, as in the forward), then
// retire, mask and post block n, and let the writer thread write block
// n+1's maxima -- a block late, so that it never waits for the other warps.
template <class TR, bool kCausal, bool kHasNext>
__device__ __forceinline__ void block_max_step(const Params& p, const SmemWs<TR>& sm,
                                               const QueryTile<TR, kCausal>& qt, float* tm_row,
                                               unsigned long long q_desc, const unsigned (&Qf)[TR::kDSteps][4],
                                               float (&Sc)[TR::kBlockSNBlocks][4],
                                               float (&Sn)[TR::kBlockSNBlocks][4], int n, int row0, int lane,
                                               int consumer_warp, bool writer, PipeState<TR::kBlockMaxStages>& kv,
                                               unsigned& post_idx) {
    const PipeState<TR::kBlockMaxStages> cur = kv;
    if constexpr (kHasNext) {
        kv.advance();
        mbar_wait(sm.bar(TR::kBarKFull + kv.stage), kv.phase);
        qk_block_from<TR>(Sn, q_desc, Qf, make_desc(sm.k() + kv.stage * TR::kKVBytes, 16, kSwizzleAtomBytes));
    }
    wgmma_wait<kHasNext ? 1 : 0>();
    post_block_maxima<TR, kCausal>(p, sm, qt, Sc, n, row0, lane, consumer_warp, cur, post_idx);
    if (writer && n < qt.c_end / TR::kKeyHalves) write_block_maxima<TR, kCausal>(p, sm, qt, tm_row, n + 1, post_idx - 1);
    ++post_idx;
}

template <class TR, bool kCausal>
__device__ __forceinline__ void block_max_consumer(const Params& p, const SmemWs<TR>& sm, int wg, int tid) {
    const int lane = tid & 31;
    const int consumer_warp = wg * 4 + (tid >> 5);
    const bool writer = wg == 0 && tid == 0;
    const int nQ = ceil_div(p.Nq, TR::kBlockM);
    const int nK = ceil_div(p.Nk, TR::kBlockN);
    constexpr int kC = TR::kClusterCtas;
    static_assert(!TR::kPairTiles, "no bsfa_block_max over tile pairs");
    const PersistentSchedule<kCausal, false, kC> sched(nQ, p.Hq / kC, p.B, p.Hq / p.Hkv / kC);
    const unsigned long long q_desc = make_desc(sm.q() + wg * TR::kWgmmaM * kSwizzleBytes, 16, kSwizzleAtomBytes);
    PipeState<TR::kBlockMaxStages> kv;
    unsigned q_phase = 0;
    unsigned post_idx = 0;
#pragma unroll 1
    for (int r = 0; sched.rounds_left(r); ++r) {
        const int j = sched.index(r);
        if (j < 0) continue;
        const WorkTile w = sched.tile(j);
        const QueryTile<TR, kCausal> qt(w.a, cta_problem<false>(p, w.b));
        float* tm_row = p.tile_max + (((long long)w.b * p.Hq + w.h) * nQ + w.a) * nK;
        if (wg == 0) {
            for (int c = qt.c_end + 1 + tid; c < nK; c += 128) tm_row[c] = neg_inf();
        }
        if (qt.c_end < 0) continue;
        const int row0 = qt.q0 + wg * TR::kWgmmaM + (tid >> 5) * TR::kWarpRows + (lane >> 2);
        mbar_wait(sm.bar(TR::kBarQFull), q_phase);
        q_phase ^= 1u;
        unsigned Qf[TR::kDSteps][4];
        if constexpr (TR::kQInRegs) load_q_frags<TR>(sm.q(), wg, Qf);

        float Sa[TR::kBlockSNBlocks][4], Sb[TR::kBlockSNBlocks][4];
        int n = qt.c_end / TR::kKeyHalves;
        mbar_wait(sm.bar(TR::kBarKFull + kv.stage), kv.phase);
        qk_block_from<TR>(Sa, q_desc, Qf, make_desc(sm.k() + kv.stage * TR::kKVBytes, 16, kSwizzleAtomBytes));
        // Two steps per trip, so that the S buffers trade roles without copies.
        bool in_a = true;
#pragma unroll 1
        while (n > 0) {
            block_max_step<TR, kCausal, true>(p, sm, qt, tm_row, q_desc, Qf, Sa, Sb, n, row0, lane, consumer_warp, writer,
                                              kv, post_idx);
            if (--n == 0) {
                in_a = false;
                break;
            }
            block_max_step<TR, kCausal, true>(p, sm, qt, tm_row, q_desc, Qf, Sb, Sa, n, row0, lane, consumer_warp, writer,
                                              kv, post_idx);
            --n;
        }
        if (in_a) {
            block_max_step<TR, kCausal, false>(p, sm, qt, tm_row, q_desc, Qf, Sa, Sb, 0, row0, lane, consumer_warp,
                                               writer, kv, post_idx);
        } else {
            block_max_step<TR, kCausal, false>(p, sm, qt, tm_row, q_desc, Qf, Sb, Sa, 0, row0, lane, consumer_warp,
                                               writer, kv, post_idx);
        }
        kv.advance();
        if (writer) write_block_maxima<TR, kCausal>(p, sm, qt, tm_row, 0, post_idx - 1);
    }
}

}  // namespace bsfa
