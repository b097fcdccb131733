// The key-tile loop of the sm_90a bsfa_fwd.  Schedule: that of the mma.sync
// bsfa_fwd (3-deep K ring, one V buffer, V of ungated tiles fetched at the
// top of their iteration, V of gated tiles right after the gate).  Each wgmma
// group is waited for where its result is needed; the two CTAs of an SM
// overlap each other's waits, barriers and softmax with their tensor-core
// work -- a single warpgroup per CTA keeps every barrier to 4 warps and lets
// the two CTAs drift freely.
//
// Includes what it needs; TR is a TraitsSm90.
#pragma once

#include "bsfa_args.cuh"
#include "bsfa_copy_sm90.cuh"
#include "bsfa_gate.cuh"
#include "bsfa_mask.cuh"
#include "bsfa_mma_sm90.cuh"
#include "bsfa_params.cuh"
#include "bsfa_problem.cuh"
#include "bsfa_ptx.cuh"
#include "bsfa_scheduler.cuh"
#include "bsfa_softmax.cuh"
#include "bsfa_wgmma_sm90.cuh"

namespace bsfa {

// Online-softmax update for a kept tile (softmax_row, per row).  Once the
// running maxima settle, most tiles raise no row max of the warp: O's rescale
// by exp2(m_old - m_new) (2 D multiplies per thread) is then skipped, exactly
// (alpha == 1).
template <class TR>
__device__ __forceinline__ void softmax_update(const float (&S)[TR::kHalves][TR::kSNBlocks][4],
                                               const float (&tile_mx)[TR::kHalves][2], float (&m)[TR::kHalves][2],
                                               float (&l)[TR::kHalves][2], float (&O)[TR::kHalves][TR::kONBlocks][4],
                                               unsigned (&P)[TR::kHalves][TR::kKeySteps][4], float scale_log2) {
    constexpr int MB = TR::kHalves;
    float alpha[MB][2];
    bool rescale = false;
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const float m_old = m[mb][hf];
            alpha[mb][hf] = softmax_row<TR>(S, mb, hf, tile_mx[mb][hf], m[mb][hf], l[mb][hf], P, scale_log2);
            rescale |= m[mb][hf] != m_old;
        }
    }
    if (warp_any(rescale)) {
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
            for (int nb = 0; nb < TR::kONBlocks; ++nb)
#pragma unroll
                for (int j = 0; j < 4; ++j) O[mb][nb][j] *= alpha[mb][j / 2];
    }
}

// Everything the sm_90a bsfa_fwd does for a query tile with at least one key
// tile to visit (qt.c_end >= 0): O, m, l come in initialised and leave holding
// the unnormalised output, row max and per-lane partial row sums.  The mask
// re-reads the problem's lengths and positions where it needs them rather
// than keeping them live across the loop: a fixed-length launch from p
// itself, where they are constant-bank operands (taken from args or pr,
// registers, the hdim-128 kernels take more registers or spill), a packed
// sequence (kVarlen) from its offsets (cta_problem<true, true>).
//
// About 100 lines on purpose: the copy lambdas are shared by the prologue
// and the loop, and the loop body needs most of this function's locals.
template <class TR, bool kCausal, bool kVarlen>
__device__ __forceinline__ void fwd_mainloop(const Params& p, const FwdArgs& args, const Problem& pr,
                                             const QueryTile<TR, kCausal>& qt, int h, int tid, int row_in_tile,
                                             unsigned char* keep_row,
                                             unsigned sQ, unsigned sK, unsigned sV,
                                             float (&O)[TR::kHalves][TR::kONBlocks][4], float (&m)[TR::kHalves][2],
                                             float (&l)[TR::kHalves][2]) {
    constexpr int MB = TR::kHalves;
    constexpr int KS = TR::kKStages;
    const int lane = tid & 31;
    const int hkv = h / (args.Hq / args.Hkv);
    const unsigned short* kg = args.k + pr.k_off + hkv * args.k_sh;
    const unsigned short* vg = args.v + pr.v_off + hkv * args.v_sh;
    const float scale_log2 = args.softmax_scale * kLog2e;
    const GatePlan<TR> plan(qt, args.thresholds, args.thr_scalar, args.thr_mode, args.thr_T, h);
    auto forced = [&](int c) { return plan.forced(c); };
    auto lengths = [&]() {
        if constexpr (kVarlen) {
            return cta_problem<true, true>(args, chunked_head<true>(args.Hq).b);
        } else {
            return cta_problem<false>(p, 0);  // lengths and positions only: b is not read
        }
    };

    auto load_k = [&](int c, int slot) {
        load_tile<TR, TR::kBlockN>(sK + slot * TR::kKVBytes, kg + (long long)c * TR::kBlockN * args.k_sn, args.k_sn,
                                   pr.Nk - c * TR::kBlockN, tid, args.k);
    };
    auto load_v = [&](int c) {
        load_tile<TR, TR::kBlockN>(sV, vg + (long long)c * TR::kBlockN * args.v_sn, args.v_sn,
                                   pr.Nk - c * TR::kBlockN, tid, args.v);
    };

    // cp.async groups: prologue [Q + K c_end], [K c_end-1]; each visited
    // tile c commits at its top [V c if ungated] and [K c-2] (either may
    // be empty) and a kept tile waits for everything before its P V, so
    // the group holding K c-1 is complete once at most one (tile c's K)
    // is pending.
    load_q_and_first_keys<TR>(sQ, args.q + pr.q_off + h * args.q_sh + (long long)qt.q0 * args.q_sn, args.q_sn,
                              pr.Nq - qt.q0, tid, args.q, qt.c_end, load_k);

    const unsigned long long q_desc = make_desc(sQ, 16, kSwizzleAtomBytes);
    // V is the MN-major B operand: the leading offset steps between
    // 64-column panels, the stride offset between 8-key groups.
    const unsigned long long v_desc = make_desc(sV, TR::kKVPanelBytes, kSwizzleAtomBytes);

    // Barriers.  Every visited tile ends with a CTA barrier: the gate for a
    // gated tile, the one before P V for a kept tile (plus one after it
    // when the next tile fetches its V at its top, into the buffer this
    // P V reads).  Before it each thread has waited for the group holding
    // K c-1 and fenced; so after it K c-1 is visible to the tensor cores,
    // every warp is done with S c (K c's slot is free) and, ahead of a
    // gate, with the last P V.  Skipped tiles thus cost one barrier.
    cp_async_wait<KS - 2>();
    fence_proxy_async();
    cta_sync();
    unsigned P[MB][TR::kKeySteps][4];
    int ks = qt.c_end % KS;  // K ring slot of tile c
#pragma unroll 1
    for (int c = qt.c_end; c >= 0; --c, ks = ks == 0 ? KS - 1 : ks - 1) {
        const bool is_forced = forced(c);
        // V in its own group ahead of K's: the gate's wait (all but the
        // newest group) needs K c-1, not this V.  Both go before S: K
        // after S measured 1-4% slower dense and slower sparse except at
        // rho 0.1 (bench/NOTES.md, v8).
        if (is_forced) load_v(c);
        cp_async_commit();
        if (c >= KS - 1) load_k(c - (KS - 1), ks + 1 == KS ? 0 : ks + 1);  // slot (c-KS+1) mod KS
        cp_async_commit();

        float S[MB][TR::kSNBlocks][4];
        float tile_mx[MB][2];
        qk_row_maxima<TR>(S, tile_mx, q_desc, make_desc(sK + ks * TR::kKVBytes, 16, kSwizzleAtomBytes), qt, c,
                          row_in_tile, lane, lengths);

        // The gate (GatePlan::vote on lane-local maxima, ORed over the CTA):
        // uniform per CTA.
        bool kept = true;
        if (!is_forced) {
            const bool pred = plan.vote(tile_mx, args.softmax_scale);
            cp_async_wait<KS - 2>();
            fence_proxy_async();
            kept = cta_sync_or(pred);
        }
        if (keep_row != nullptr && tid == 0) keep_row[c] = kept ? 1 : 0;
        if (!kept) continue;
        if (!is_forced) {
            load_v(c);  // V-late: its latency hides behind the row maxima and the exponentials
            cp_async_commit();
        }
        quad_max(tile_mx);  // row maxima for the softmax
        softmax_update<TR>(S, tile_mx, m, l, O, P, scale_log2);
        cp_async_wait<0>();
        fence_proxy_async();
        cta_sync();
        issue_pv<TR>(O, P, v_desc);
        wgmma_wait<0>();
#pragma unroll
        for (int hm = 0; hm < MB; ++hm) fence_regs(flat(O[hm]));
        fence_regs(P);
        if (c > 0 && forced(c - 1)) cta_sync();
    }
}

}  // namespace bsfa
