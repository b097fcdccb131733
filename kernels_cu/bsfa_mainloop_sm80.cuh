// The key-tile loop of the mma.sync bsfa_fwd: the prologue copies (Q and the
// first K tiles), then per key tile Q K^T, mask, gate, online softmax and
// P V, with the K ring and V copies pipelined around them.
//
// One CTA per (128-query tile, head, batch); key tiles of 64 are walked from
// the last one that can hold a valid entry down to 0, so the masked (diagonal
// / ragged) tiles come first and the running max starts high.
//
// Includes what it needs; TR is a TraitsSm80.
#pragma once

#include "bsfa_args.cuh"
#include "bsfa_copy_sm80.cuh"
#include "bsfa_gate.cuh"
#include "bsfa_mask.cuh"
#include "bsfa_mma_sm80.cuh"
#include "bsfa_problem.cuh"
#include "bsfa_ptx.cuh"
#include "bsfa_softmax.cuh"

namespace bsfa {

// Shared-memory addresses of a bsfa_fwd thread: the CTA's Q tile and its
// lane's ldmatrix addresses into Q, the K ring and the V buffer.
template <class TR>
struct FwdSmemSm80 {
    unsigned smem;
    unsigned sQ;
    unsigned q_lane;
    unsigned k_lane;
    unsigned v_lane;

    // From threadIdx.x itself, as everything below, rather than from a tid
    // argument: the compiler simplifies these functions before inlining them,
    // and only a direct read tells it the range of the thread index.
    __device__ __forceinline__ FwdSmemSm80() {
        const int lane = threadIdx.x & 31;
        const int warp = threadIdx.x >> 5;
        smem = dyn_smem_base();
        sQ = smem + TR::kSmemQ;
        q_lane = sQ + warp * TR::kWarpRows * TR::kRowBytes + lane_off_a<TR>(lane);
        k_lane = smem + TR::kSmemK + lane_off_k<TR>(lane);
        v_lane = smem + TR::kSmemV + lane_off_a<TR>(lane);
    }
};

// Online-softmax update for a kept tile (softmax_row, per row): P is packed
// straight away into the 16-bit A fragments of the P V product (half the live
// registers of fp32 P); O is rescaled by exp2(m_old - m_new); l stays a
// per-thread partial row sum (the quad is reduced once, in the epilogue).
template <class TR>
__device__ __forceinline__ void softmax_update(const float (&S)[TR::kWarpMBlocks][TR::kSNBlocks][4],
                                               const float (&tile_mx)[TR::kWarpMBlocks][2],
                                               float (&m)[TR::kWarpMBlocks][2], float (&l)[TR::kWarpMBlocks][2],
                                               float (&O)[TR::kWarpMBlocks][TR::kONBlocks][4],
                                               unsigned (&P)[TR::kWarpMBlocks][TR::kKeySteps][4], float scale_log2) {
#pragma unroll
    for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const float alpha = softmax_row<TR>(S, mb, hf, tile_mx[mb][hf], m[mb][hf], l[mb][hf], P, scale_log2);
#pragma unroll
            for (int nb = 0; nb < TR::kONBlocks; ++nb) {
                O[mb][nb][2 * hf] *= alpha;
                O[mb][nb][2 * hf + 1] *= alpha;
            }
        }
    }
}

// The prologue's cp.async groups, [Q], [K c_end], [K c_end-1] (empty when
// c_end = 0), and, with Q in registers, the Q fragments once Q has landed.
// load_k(c, slot) copies key tile c into K ring slot `slot`.
template <class TR, bool kCausal, class LoadK>
__device__ __forceinline__ void fwd_prologue(const FwdArgs& args, const Problem& pr, const QueryTile<TR, kCausal>& qt,
                                             int h,
                                             unsigned sQ, unsigned q_lane, LoadK&& load_k,
                                             unsigned (&qf)[TR::kQFragRegs]) {
    using Copy = TileCopy<TR>;
    const int tid = threadIdx.x;
    {
        // Q without per-row checks when the whole tile lies inside Nq.
        const unsigned short* qg =
            args.q + pr.q_off + h * args.q_sh + qt.q0 * args.q_sn + Copy::thread_offset(tid, args.q_sn);
        if constexpr (Copy::kFixedColumn) {
            if (qt.q0 + TR::kBlockM <= pr.Nq) {
                Copy::template load_full<TR::kBlockM>(sQ, qg, args.q_sn, tid);
            } else {
                Copy::template load<TR::kBlockM>(sQ, qg, args.q_sn, pr.Nq - qt.q0, tid, args.q);
            }
        } else {
            Copy::template load<TR::kBlockM>(sQ, qg, args.q_sn, pr.Nq - qt.q0, tid, args.q);
        }
    }
    cp_async_commit();
    load_k(qt.c_end, 0);
    cp_async_commit();
    if (qt.c_end > 0) load_k(qt.c_end - 1, 1);
    cp_async_commit();

    if constexpr (TR::kQInRegs) {
        cp_async_wait<TR::kKStages - 1>();
        cta_sync();
        load_q_frags<TR>(qf, q_lane);
    }
}

// Everything bsfa_fwd does for a query tile with at least one key tile to
// visit (qt.c_end >= 0): O, m, l come in initialised and leave holding the
// unnormalised output, row max and per-lane partial row sums.
//
// About 130 lines on purpose: the copy lambdas below are shared by the
// prologue and the loop and capture this function's locals by reference, and
// the per-tile body needs most of those locals; cut apart, every piece would
// take a dozen of them as arguments.
//
// kVarlen (b a packed sequence): the sequence's lengths are not kept live
// across the loop but re-read (cta_problem<true, true>) where the loop needs
// them, on masked tiles and ragged key tiles only; kept live, the hdim-128
// kernel spills.
template <class TR, bool kCausal, bool kVarlen>
__device__ __forceinline__ void fwd_mainloop(const FwdArgs& args, const Problem& pr, const QueryTile<TR, kCausal>& qt,
                                             int h, long long b, unsigned char* keep_row, const FwdSmemSm80<TR>& sm,
                                             float (&O)[TR::kWarpMBlocks][TR::kONBlocks][4],
                                             float (&m)[TR::kWarpMBlocks][2], float (&l)[TR::kWarpMBlocks][2]) {
    constexpr int MB = TR::kWarpMBlocks;
    constexpr int KS = TR::kKStages;
    using Copy = TileCopy<TR>;
    // Fast loads: inside the key loop, tile c's element offset is carried
    // (k_off: K tile c-KS+1, v_off: V tile c, both stepped down by 64 rows per
    // tile) and tiles c < n_full (every row < Nk) are copied without per-row
    // checks.  Only with a fixed copy column (not at hdim 96, see TileCopy).
    constexpr bool kFastLoads = Copy::kFixedColumn;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const unsigned smem = sm.smem;

    const int hkv = h / (args.Hq / args.Hkv);
    // This thread's first chunk of key tile 0 (see TileCopy).
    const unsigned short* kg = args.k + pr.k_off + hkv * args.k_sh + Copy::thread_offset(tid, args.k_sn);
    const unsigned short* vg = args.v + pr.v_off + hkv * args.v_sh + Copy::thread_offset(tid, args.v_sn);
    const float scale_log2 = args.softmax_scale * kLog2e;
    const GatePlan<TR> plan(qt, args.thresholds, args.thr_scalar, args.thr_mode, args.thr_T, h);
    auto lengths = [&]() { return kVarlen ? cta_problem<kVarlen, true>(args, b) : pr; };

    auto load_k = [&](int c, int slot) {
        Copy::template load<TR::kBlockN>(smem + TR::kSmemK + slot * TR::kKVTileBytes,
                                         kg + (long long)c * TR::kBlockN * args.k_sn, args.k_sn,
                                         lengths().Nk - c * TR::kBlockN, tid, args.k);
    };
    auto load_v = [&](int c, int slot) {
        Copy::template load<TR::kBlockN>(smem + TR::kSmemV + slot * TR::kKVTileBytes,
                                         vg + (long long)c * TR::kBlockN * args.v_sn, args.v_sn,
                                         lengths().Nk - c * TR::kBlockN, tid, args.v);
    };
    const int n_full = pr.Nk / TR::kBlockN;
    const long long k_tile_step = (long long)TR::kBlockN * args.k_sn;
    const long long v_tile_step = (long long)TR::kBlockN * args.v_sn;
    long long k_off = (long long)(qt.c_end - (TR::kKStages - 1)) * k_tile_step;
    long long v_off = (long long)qt.c_end * v_tile_step;
    auto load_k_at = [&](int c, int slot, long long off) {
        if constexpr (kFastLoads) {
            if (c < n_full) {
                Copy::template load_full<TR::kBlockN>(smem + TR::kSmemK + slot * TR::kKVTileBytes, kg + off,
                                                      args.k_sn, tid);
            } else {
                load_k(c, slot);
            }
        } else {
            load_k(c, slot);
        }
    };
    auto load_v_at = [&](int c, int slot, long long off) {
        if constexpr (kFastLoads) {
            if (c < n_full) {
                Copy::template load_full<TR::kBlockN>(smem + TR::kSmemV + slot * TR::kKVTileBytes, vg + off,
                                                      args.v_sn, tid);
            } else {
                load_v(c, slot);
            }
        } else {
            load_v(c, slot);
        }
    };
    auto forced = [&](int c) { return plan.forced(c); };

    // cp.async groups.  Prologue: [Q], [K c_end], [K c_end-1].  Each visited
    // tile c then commits at its top one group G_c = [K c-2 (+ V c if the
    // tile is kept without a gate)], committed even when empty so that
    // counting stays uniform; a gated tile that is kept adds [V c] after the
    // gate, and every kept tile waits for everything (wait_group 0) before
    // its P V.  Hence at the top of tile c the only group that may still be
    // pending besides the one holding K c is G_{c+1} (K c was in G_{c+2}, or
    // the prologue): wait_group KS-2.
    unsigned qf[TR::kQFragRegs];
    fwd_prologue<TR>(args, pr, qt, h, sm.sQ, sm.q_lane, load_k, qf);

    // ks: K ring slot of tile c = (c_end - c) % KS.  V has one buffer.
    int ks = 0;
#pragma unroll 1
    for (int c = qt.c_end; c >= 0; --c, ks = ks + 1 == KS ? 0 : ks + 1, k_off -= k_tile_step, v_off -= v_tile_step) {
        // Tile c's K landed; every warp is done with tile c+1, so its K slot
        // (the slot of tile c-KS+1) and the V buffer may be refilled.  V of a
        // tile kept without a gate goes in at once, behind its Q K^T.
        cp_async_wait<KS - 2>();
        cta_sync();
        {
            const int cn = c - (KS - 1);
            if (cn >= 0) load_k_at(cn, ks == 0 ? KS - 1 : ks - 1, k_off);
            if (forced(c)) load_v_at(c, 0, v_off);
        }
        cp_async_commit();

        float S[MB][TR::kSNBlocks][4];
        qk_tile<TR>(S, qf, sm.q_lane, sm.k_lane + ks * TR::kKVTileBytes);
        if (qt.needs_mask(c)) {
            const Problem sp = lengths();
            mask_tile<TR, kCausal>(S, c, qt.q0 + warp * TR::kWarpRows + (lane >> 2), lane, sp.Nq, sp.Nk, sp.shift);
        }
        float tile_mx[MB][2];
        row_max<TR>(S, tile_mx);

        // The gate (GatePlan::vote, ORed over the CTA): uniform per CTA.
        const bool is_forced = forced(c);
        bool kept = true;
        if (!is_forced) {
            kept = cta_sync_or(plan.vote(tile_mx, args.softmax_scale));
        }
        if (keep_row != nullptr && tid == 0) keep_row[c] = kept ? 1 : 0;
        if (!kept) continue;

        // V of a gated tile is issued as soon as the tile is known to be
        // kept, so that its latency hides behind the exponentials below.
        if (!is_forced) {
            load_v_at(c, 0, v_off);
            cp_async_commit();
        }
        unsigned P[MB][TR::kKeySteps][4];
        softmax_update<TR>(S, tile_mx, m, l, O, P, scale_log2);
        // V c is in the most recent group; the K prefetch of this tile was
        // issued earlier (at the top), so little extra is waited.
        cp_async_wait<0>();
        cta_sync();
        pv_tile<TR>(O, P, sm.v_lane);
    }
}

}  // namespace bsfa
