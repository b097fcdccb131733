// Block-Sparse FlashAttention forward (bsfa_fwd) and the tile-max kernel
// (bsfa_block_max), FlashAttention-2 style on mma.sync tensor cores.
//
// Specialisation macros (the launcher's compile key):
//   BSFA_DTYPE          0 = float16, 1 = bfloat16
//   BSFA_HEAD_DIM       32, 64, 96 or 128
//   BSFA_CAUSAL         0/1, causal mask aligned bottom-right
//   BSFA_V_SPECULATIVE  0 (default): V tile c is fetched only once tile c is
//                       kept ("V-late": issued right after the gate, its
//                       latency hidden behind the softmax exponentials).
//                       1: V tile c is fetched together with K tile c, one
//                       tile ahead, before the keep/skip decision, and simply
//                       left unused when the tile is skipped.
// Tuning knobs (defaults: the fastest combination measured, bench/NOTES.md v3):
//   BSFA_HEAVY_FIRST    0 / 1 (default): causal only, CTA blockIdx.x takes
//                       query tile a = nQ-1-blockIdx.x, so the CTAs with the
//                       most key tiles are dispatched first (tail balance).
//                       blockIdx.x still indexes query tiles (a bijection).
//   BSFA_K_STAGES       2 / 3 (default): K ring depth of bsfa_fwd.  3 keeps
//                       K two tiles ahead, so runs of skipped tiles (wait K,
//                       QK^T, gate) do not expose K's L2 latency.  Needs
//                       BSFA_V_SPECULATIVE=0 and then uses ONE V buffer (V
//                       tile c is issued after tile c+1's P V is done by
//                       every warp), so shared memory stays Q + 4 tiles.
//   BSFA_V_FORCED_EARLY 0 / 1 (default), V-late only: tiles kept without a
//                       gate (diagonal tiles; every tile with thr_mode 0)
//                       fetch V without waiting for the gate: with two V
//                       buffers (K_STAGES=2) one tile ahead together with K,
//                       exactly as BSFA_V_SPECULATIVE=1 does; with one V
//                       buffer (K_STAGES=3) at the top of the tile's own
//                       iteration, behind its QK^T.  Dense (thr_mode 0) then
//                       runs the speculative schedule with no wasted loads.
//   BSFA_PV_UNROLL      0 (default) / 1: fully unrolled P V k-step loop (P
//                       indexed statically, no per-step register shifts).
//                       hdim <= 96 only; ignored at hdim 128, where it spills.
//   BSFA_QK_PINGPONG    0 / 1 (default), hdim 96/128 (Q from smem): the
//                       Q K^T d-step loop runs two steps per trip on two
//                       named fragment sets (no prefetch register moves, no
//                       index clamp, immediate ldmatrix offsets); the last
//                       pair is peeled.  (Default set in bsfa_tile.cuh.)
//   BSFA_PV_PINGPONG    0 / 1 (default): the rolled P V loop (BSFA_PV_UNROLL
//                       off, or hdim 128) runs two key steps per trip on two
//                       named V fragment sets: P shifts by two per trip (32
//                       moves per tile instead of 96), no V fragment moves,
//                       no index clamp.
//   BSFA_FAST_LOADS     0 / 1 (default): Q and the K/V tiles of the key loop
//                       that lie entirely inside the tensor are copied with
//                       unpredicated cp.async from a carried tile offset; only
//                       a ragged tile takes the per-row checked copy.
//                       No effect at hdim 96 (no fixed copy column).
//   At hdim 128 BSFA_FAST_LOADS / QK_PINGPONG / PV_PINGPONG only act with the
//   default schedule (K_STAGES=3, V_FORCED_EARLY=1, V_SPECULATIVE=0); other
//   schedules spill with them and keep the previous code (bsfa_tile.cuh,
//   BSFA_V4_LOOPS_OK).
//
// One CTA per (128-query tile a, head h, batch b); key tiles of 64 are walked
// from the last one that can hold a valid entry down to 0, so the masked
// (diagonal / ragged) tiles come first and the running max starts high.
//
// q, k, v and out must be 16-byte aligned with every batch/seq/head stride a
// multiple of 8 elements (cp.async and the 16-byte output stores rely on it);
// the launcher has to check this (or make an aligned copy).
// softmax_scale must be > 0 (max(s) * scale is used as the max of scaled s).

#include "bsfa_ptx.cuh"
#include "bsfa_traits.cuh"
#include "bsfa_tile.cuh"

#if !defined(BSFA_DTYPE) || (BSFA_DTYPE != 0 && BSFA_DTYPE != 1)
#error "BSFA_DTYPE must be 0 (float16) or 1 (bfloat16)"
#endif
#if !defined(BSFA_HEAD_DIM) || \
    (BSFA_HEAD_DIM != 32 && BSFA_HEAD_DIM != 64 && BSFA_HEAD_DIM != 96 && BSFA_HEAD_DIM != 128)
#error "BSFA_HEAD_DIM must be 32, 64, 96 or 128"
#endif
#if !defined(BSFA_CAUSAL) || (BSFA_CAUSAL != 0 && BSFA_CAUSAL != 1)
#error "BSFA_CAUSAL must be 0 or 1"
#endif
#ifndef BSFA_V_SPECULATIVE
#define BSFA_V_SPECULATIVE 0
#endif
#ifndef BSFA_HEAVY_FIRST
#define BSFA_HEAVY_FIRST 1
#endif
#ifndef BSFA_K_STAGES
#define BSFA_K_STAGES 3
#endif
#ifndef BSFA_V_FORCED_EARLY
#define BSFA_V_FORCED_EARLY 1
#endif
#ifndef BSFA_PV_UNROLL
#define BSFA_PV_UNROLL 0
#endif
#ifndef BSFA_PV_PINGPONG
#define BSFA_PV_PINGPONG 1
#endif
#ifndef BSFA_FAST_LOADS
#define BSFA_FAST_LOADS 1
#endif
#if BSFA_V_SPECULATIVE != 0 && BSFA_V_SPECULATIVE != 1
#error "BSFA_V_SPECULATIVE must be 0 or 1"
#endif
#if BSFA_HEAVY_FIRST != 0 && BSFA_HEAVY_FIRST != 1
#error "BSFA_HEAVY_FIRST must be 0 or 1"
#endif
#if BSFA_K_STAGES != 2 && BSFA_K_STAGES != 3
#error "BSFA_K_STAGES must be 2 or 3"
#endif
#if BSFA_K_STAGES == 3 && BSFA_V_SPECULATIVE != 0
#error "BSFA_K_STAGES=3 needs BSFA_V_SPECULATIVE=0 (speculative V would need 3 V buffers)"
#endif
#if BSFA_V_FORCED_EARLY != 0 && BSFA_V_FORCED_EARLY != 1
#error "BSFA_V_FORCED_EARLY must be 0 or 1"
#endif
#if BSFA_PV_UNROLL != 0 && BSFA_PV_UNROLL != 1
#error "BSFA_PV_UNROLL must be 0 or 1"
#endif
#if BSFA_PV_PINGPONG != 0 && BSFA_PV_PINGPONG != 1
#error "BSFA_PV_PINGPONG must be 0 or 1"
#endif
#if BSFA_FAST_LOADS != 0 && BSFA_FAST_LOADS != 1
#error "BSFA_FAST_LOADS must be 0 or 1"
#endif
#if BSFA_QK_PINGPONG != 0 && BSFA_QK_PINGPONG != 1
#error "BSFA_QK_PINGPONG must be 0 or 1"
#endif

// V-late with a 3-deep K ring keeps a single V buffer (see BSFA_K_STAGES).
using TR = bsfa::Traits<BSFA_HEAD_DIM, BSFA_DTYPE == 1, BSFA_K_STAGES, BSFA_K_STAGES == 3 ? 1 : 2>;
constexpr bool kCausal = BSFA_CAUSAL != 0;
constexpr bool kVSpeculative = BSFA_V_SPECULATIVE != 0;
constexpr bool kHeavyFirst = BSFA_HEAVY_FIRST != 0;
constexpr bool kVForcedEarly = BSFA_V_FORCED_EARLY != 0 && !kVSpeculative;
// At hdim 128 the unrolled loop spills (255 registers): it falls back to the rolled one.
constexpr bool kPvUnroll = BSFA_PV_UNROLL != 0 && BSFA_HEAD_DIM < 128;
// Only with a fixed chunk column per thread (not hdim 96: 12 chunks per row,
// whose per-chunk offsets, hoisted out of the key loop, make it spill).
constexpr bool kFastLoads = BSFA_FAST_LOADS != 0 && BSFA_V4_LOOPS_OK && bsfa::TileCopy<TR>::kFixedColumn;
constexpr bool kPvPingPong = BSFA_PV_PINGPONG != 0 && BSFA_V4_LOOPS_OK && !kPvUnroll;

// Launch geometry, read by the launcher through RawModule.get_global.
extern "C" __constant__ int BSFA_FWD_THREADS = TR::kNThreads;
extern "C" __constant__ int BSFA_FWD_SMEM_BYTES = TR::kFwdSmemBytes;
extern "C" __constant__ int BSFA_BLOCK_MAX_THREADS = TR::kNThreads;
extern "C" __constant__ int BSFA_BLOCK_MAX_SMEM_BYTES = TR::kBlockMaxSmemBytes;

namespace bsfa {

constexpr int MB = TR::kWarpMBlocks;

// Online-softmax update for a kept tile (softmax_row in bsfa_tile.cuh, per
// row): P is packed straight away into the 16-bit A fragments of the P V
// product (half the live registers of fp32 P); O is rescaled by
// exp2(m_old - m_new); l stays a per-thread partial row sum (the quad is
// reduced once, in the epilogue).
__device__ __forceinline__ void softmax_update(const float (&S)[MB][TR::kSNBlocks][4], const float (&tile_mx)[MB][2],
                                               float (&m)[MB][2], float (&l)[MB][2],
                                               float (&O)[MB][TR::kONBlocks][4],
                                               unsigned (&P)[MB][TR::kKeySteps][4], float scale_log2) {
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
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

// O += P V with P from softmax_update.  V (keys x d, row-major in smem) is
// the "col" B operand: ldmatrix.trans of an 8 keys x 8 d matrix gives each
// lane two consecutive keys of one d column, i.e. b0 / b1.
//
// The key-step loop is rolled (P is consumed from P[.][0] and shifted down
// after each step; the moves are free next to the tensor-core time): fully
// unrolled, ptxas hoists the V fragments of later steps and spills at hdim
// 128.  The first V fragment of step kk+1 is fetched during step kk.
__device__ __forceinline__ void pv_tile(float (&O)[MB][TR::kONBlocks][4], unsigned (&P)[MB][TR::kKeySteps][4],
                                        unsigned v_lane_addr) {
    constexpr int kKStepBytes = TR::kMmaK * TR::kRowBytes;         // 16 keys
    constexpr int kDPairBytes = 2 * TR::kMmaN * TR::kElemBytes;    // 16 d columns
    if constexpr (kPvUnroll) {
        // BSFA_PV_UNROLL (hdim <= 96): the k-step loop unrolled, P indexed
        // statically (no per-step shifts); same one-fragment prefetch.
        unsigned B0[4];
        ldsm_x4_trans(B0, v_lane_addr);
#pragma unroll
        for (int kk = 0; kk < TR::kKeySteps; ++kk) {
            unsigned Bn[4];
#pragma unroll
            for (int dp = 0; dp < TR::kONBlocks / 2; ++dp) {
                unsigned B[4];
                if (dp == 0) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) B[j] = B0[j];
                } else {
                    ldsm_x4_trans(B, v_lane_addr + kk * kKStepBytes + dp * kDPairBytes);
                }
#pragma unroll
                for (int mb = 0; mb < MB; ++mb) {
                    mma_16816<TR::kBf16>(O[mb][2 * dp], P[mb][kk], B[0], B[1]);
                    mma_16816<TR::kBf16>(O[mb][2 * dp + 1], P[mb][kk], B[2], B[3]);
                }
                if (dp == 0 && kk + 1 < TR::kKeySteps) {
                    ldsm_x4_trans(Bn, v_lane_addr + (kk + 1) * kKStepBytes);
                }
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) B0[j] = Bn[j];
        }
        return;
    }
    if constexpr (kPvPingPong) {
        // BSFA_PV_PINGPONG: two key steps per trip on two named V fragment
        // sets (B0: even steps, B1: odd), P consumed from P[.][0..1] and
        // shifted down by two per trip; no B moves, no index clamp, the lane
        // address advances by a plain add.  The last trip's prefetch re-reads
        // its own step (harmless, in bounds).
        unsigned B0[4], B1[4];
        unsigned va = v_lane_addr;
        ldsm_x4_trans(B0, va);
        auto step = [&](int s, const unsigned (&Bf)[4], unsigned vk) {
#pragma unroll
            for (int dp = 0; dp < TR::kONBlocks / 2; ++dp) {
                unsigned B[4];
                if (dp == 0) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) B[j] = Bf[j];
                } else {
                    ldsm_x4_trans(B, vk + dp * kDPairBytes);
                }
#pragma unroll
                for (int mb = 0; mb < MB; ++mb) {
                    mma_16816<TR::kBf16>(O[mb][2 * dp], P[mb][s], B[0], B[1]);
                    mma_16816<TR::kBf16>(O[mb][2 * dp + 1], P[mb][s], B[2], B[3]);
                }
            }
        };
#pragma unroll 1
        for (int it = 0; it < TR::kKeySteps / 2; ++it) {
            ldsm_x4_trans(B1, va + kKStepBytes);
            step(0, B0, va);
            ldsm_x4_trans(B0, va + (it + 1 < TR::kKeySteps / 2 ? 2 * kKStepBytes : 0));
            step(1, B1, va + kKStepBytes);
            va += 2 * kKStepBytes;
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int mb = 0; mb < MB; ++mb)
#pragma unroll
                    for (int s2 = 0; s2 + 2 < TR::kKeySteps; ++s2) P[mb][s2][j] = P[mb][s2 + 2][j];
        }
        return;
    }
    unsigned B0[4];
    ldsm_x4_trans(B0, v_lane_addr);
#pragma unroll 1
    for (int kk = 0; kk < TR::kKeySteps; ++kk) {
        const int kn = kk + 1 < TR::kKeySteps ? kk + 1 : kk;  // last step re-reads its own data
        unsigned Bn[4];
        ldsm_x4_trans(Bn, v_lane_addr + kn * kKStepBytes);
#pragma unroll
        for (int dp = 0; dp < TR::kONBlocks / 2; ++dp) {
            unsigned B[4];
            if (dp == 0) {
#pragma unroll
                for (int j = 0; j < 4; ++j) B[j] = B0[j];
            } else {
                ldsm_x4_trans(B, v_lane_addr + kk * kKStepBytes + dp * kDPairBytes);
            }
#pragma unroll
            for (int mb = 0; mb < MB; ++mb) {
                mma_16816<TR::kBf16>(O[mb][2 * dp], P[mb][0], B[0], B[1]);
                mma_16816<TR::kBf16>(O[mb][2 * dp + 1], P[mb][0], B[2], B[3]);
            }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            B0[j] = Bn[j];
#pragma unroll
            for (int mb = 0; mb < MB; ++mb)
#pragma unroll
                for (int s = 0; s + 1 < TR::kKeySteps; ++s) P[mb][s][j] = P[mb][s + 1][j];
        }
    }
}

}  // namespace bsfa

extern "C" __global__ void __launch_bounds__(TR::kNThreads, 1)
    bsfa_fwd(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
             const unsigned short* __restrict__ v, unsigned short* __restrict__ out, float* __restrict__ lse,
             unsigned char* __restrict__ keep, const float* __restrict__ thresholds, float thr_scalar, int thr_mode,
             int thr_T, int Nq, int Nk, int Hq, int Hkv, long long q_sb, long long q_sn, long long q_sh,
             long long k_sb, long long k_sn, long long k_sh, long long v_sb, long long v_sn, long long v_sh,
             long long o_sb, long long o_sn, long long o_sh, float softmax_scale) {
    using namespace bsfa;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int h = blockIdx.y;
    const long long b = blockIdx.z;
    const int a = query_tile_index<TR, kCausal && kHeavyFirst>(Nq);
    const QueryTile<TR, kCausal> qt(a, Nq, Nk);
    const int nK = ceil_div(Nk, TR::kBlockN);

    unsigned char* keep_row = keep_row_for(keep, b, h, Hq, a, Nq, nK, qt, tid);

    const unsigned smem = dyn_smem_base();
    const unsigned sQ = smem + TR::kSmemQ;
    const unsigned q_lane = sQ + warp * TR::kWarpRows * TR::kRowBytes + lane_off_a<TR>(lane);
    const unsigned k_lane = smem + TR::kSmemK + lane_off_k<TR>(lane);
    const unsigned v_lane = smem + TR::kSmemV + lane_off_a<TR>(lane);

    float O[MB][TR::kONBlocks][4];
    float m[MB][2];
    float l[MB][2];
    init_softmax_state(O, m, l);

    if (qt.c_end >= 0) {
        const int hkv = h / (Hq / Hkv);
        using Copy = TileCopy<TR>;
        // This thread's first chunk of key tile 0 (see TileCopy).
        const unsigned short* kg = k + b * k_sb + hkv * k_sh + Copy::thread_offset(tid, k_sn);
        const unsigned short* vg = v + b * v_sb + hkv * v_sh + Copy::thread_offset(tid, v_sn);
        const float scale_log2 = softmax_scale * kLog2e;
        const GatePlan<TR> plan(qt, thresholds, thr_scalar, thr_mode, thr_T, h);
        const float thr = plan.thr;

        auto load_k = [&](int c, int slot) {
            Copy::load<TR::kBlockN>(smem + TR::kSmemK + slot * TR::kKVTileBytes,
                                    kg + (long long)c * TR::kBlockN * k_sn, k_sn, Nk - c * TR::kBlockN, tid, k);
        };
        auto load_v = [&](int c, int slot) {
            Copy::load<TR::kBlockN>(smem + TR::kSmemV + slot * TR::kKVTileBytes,
                                    vg + (long long)c * TR::kBlockN * v_sn, v_sn, Nk - c * TR::kBlockN, tid, v);
        };
        // BSFA_FAST_LOADS: inside the key loop, tile c's element offset is
        // carried (k_off: K tile c-KS+1, v_off: V tile c, both stepped down
        // by 64 rows per tile) and tiles c < n_full (every row < Nk) are
        // copied without per-row checks.
        const int n_full = Nk / TR::kBlockN;
        const long long k_tile_step = (long long)TR::kBlockN * k_sn;
        const long long v_tile_step = (long long)TR::kBlockN * v_sn;
        long long k_off = (long long)(qt.c_end - (TR::kKStages - 1)) * k_tile_step;
        long long v_off = (long long)qt.c_end * v_tile_step;
        auto load_k_at = [&](int c, int slot, long long off) {
            if (kFastLoads && c < n_full) {
                Copy::template load_full<TR::kBlockN>(smem + TR::kSmemK + slot * TR::kKVTileBytes, kg + off, k_sn, tid);
            } else {
                load_k(c, slot);
            }
        };
        auto load_v_at = [&](int c, int slot, long long off) {
            if (kFastLoads && c < n_full) {
                Copy::template load_full<TR::kBlockN>(smem + TR::kSmemV + slot * TR::kKVTileBytes, vg + off, v_sn, tid);
            } else {
                load_v(c, slot);
            }
        };

        constexpr int KS = TR::kKStages;
        constexpr int VS = TR::kVStages;
        auto forced = [&](int c) { return plan.forced(c); };

        // cp.async groups.  Prologue: [Q] then KS-1 groups [K c_end (+V c_end)],
        // [K c_end-1] (KS=3).  Each visited tile c then commits at its top one
        // group G_c = [K c-KS+1 (+V c-1 speculative, or V c-1 / V c forced
        // early)], committed even when empty so that counting stays uniform;
        // a kept tile whose V is not in flight yet adds [V c] after the gate
        // and waits for everything (wait_group 0) before its P V.  Hence at
        // the top of tile c the only group that may still be pending besides
        // the one holding K c is G_{c+1} when KS=3 (K c was in G_{c+2}, or
        // the prologue): wait_group KS-2.
        {
            const unsigned short* qg = q + b * q_sb + h * q_sh + qt.q0 * q_sn + Copy::thread_offset(tid, q_sn);
            if (kFastLoads && qt.q0 + TR::kBlockM <= Nq) {
                Copy::template load_full<TR::kBlockM>(sQ, qg, q_sn, tid);
            } else {
                Copy::load<TR::kBlockM>(sQ, qg, q_sn, Nq - qt.q0, tid, q);
            }
        }
        cp_async_commit();
        load_k(qt.c_end, 0);
        if (kVSpeculative || (kVForcedEarly && VS == 2 && forced(qt.c_end))) load_v(qt.c_end, 0);
        cp_async_commit();
        if constexpr (KS == 3) {
            if (qt.c_end > 0) load_k(qt.c_end - 1, 1);
            cp_async_commit();
        }

        unsigned qf[TR::kQFragRegs];
        if constexpr (TR::kQInRegs) {
            cp_async_wait<KS - 1>();
            cta_sync();
            load_q_frags<TR>(qf, q_lane);
        }

        // ks: K slot of tile c = (c_end - c) % KS; vs: V slot (tile parity
        // with two V buffers, else 0).
        int ks = 0;
        int vs = 0;
#pragma unroll 1
        for (int c = qt.c_end; c >= 0;
             --c, ks = ks + 1 == KS ? 0 : ks + 1, vs = VS == 2 ? vs ^ 1 : 0, k_off -= k_tile_step, v_off -= v_tile_step) {
            // Tile c's K (and V if prefetched) landed; every warp is done
            // with tile c+1, so its K slot (the slot of tile c-KS+1) and its
            // V buffer may be refilled.  A speculative V of a skipped tile is
            // waited on here too, so no async copy is ever in flight into a
            // buffer being refilled.
            cp_async_wait<KS - 2>();
            cta_sync();
            {
                const int cn = c - (KS - 1);
                if (cn >= 0) load_k_at(cn, ks == 0 ? KS - 1 : ks - 1, k_off);
                if constexpr (kVSpeculative) {
                    if (c > 0) load_v_at(c - 1, vs ^ 1, v_off - v_tile_step);
                } else if constexpr (kVForcedEarly && VS == 2) {
                    if (c > 0 && forced(c - 1)) load_v_at(c - 1, vs ^ 1, v_off - v_tile_step);
                } else if constexpr (kVForcedEarly) {
                    if (forced(c)) load_v_at(c, vs, v_off);
                }
            }
            cp_async_commit();

            float S[MB][TR::kSNBlocks][4];
            qk_tile<TR>(S, qf, q_lane, k_lane + ks * TR::kKVTileBytes);
            if (qt.needs_mask(c)) {
                mask_tile<TR, kCausal>(S, c, qt.q0 + warp * TR::kWarpRows + (lane >> 2), lane, Nq, Nk);
            }
            float tile_mx[MB][2];
            row_max<TR>(S, tile_mx);

            // The gate: the tile max over valid entries is >= thr iff some row
            // max is; rows past Nq were masked to -inf.  Uniform per CTA.
            const bool is_forced = forced(c);
            bool kept = true;
            if (!is_forced) {
                bool pred = false;
#pragma unroll
                for (int mb = 0; mb < MB; ++mb)
#pragma unroll
                    for (int hf = 0; hf < 2; ++hf) pred |= tile_mx[mb][hf] * softmax_scale >= thr;
                kept = cta_sync_or(pred);
            }
            if (keep_row != nullptr && tid == 0) keep_row[c] = kept ? 1 : 0;
            if (!kept) continue;

            // V-late: issue V c as soon as the tile is known to be kept, so
            // that its latency hides behind the exponentials below.  (Forced
            // tiles with BSFA_V_FORCED_EARLY issued it at a tile top: one tile
            // ahead with it already waited for, or this tile's, still to wait.)
            bool v_wait = false;
            if constexpr (!kVSpeculative) {
                if (!kVForcedEarly || !is_forced) {
                    load_v_at(c, vs, v_off);
                    cp_async_commit();
                    v_wait = true;
                } else {
                    v_wait = VS == 1;
                }
            }
            unsigned P[MB][TR::kKeySteps][4];
            softmax_update(S, tile_mx, m, l, O, P, scale_log2);
            if (v_wait) {
                // V c is in the most recent group; the K prefetch of this tile
                // was issued earlier (at the top), so little extra is waited.
                cp_async_wait<0>();
                cta_sync();
            }
            pv_tile(O, P, v_lane + vs * TR::kKVTileBytes);
        }
    }

    // Epilogue.  Each warp stages its normalised rows in its own rows of the Q
    // tile (only this warp ever read them), then writes 16-byte chunks.
    warp_sync();
    const int g = lane >> 2;
    const int t = lane & 3;
    float* lse_row = lse + (b * Hq + h) * Nq;
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const float lt = quad_sum(l[mb][hf]);
            const bool has_keys = lt > 0.f;
            const float inv = has_keys ? 1.f / lt : 0.f;
            const int r = warp * TR::kWarpRows + mb * TR::kMmaM + hf * 8 + g;
#pragma unroll
            for (int nb = 0; nb < TR::kONBlocks; ++nb) {
                sts32(sQ + r * TR::kRowBytes + (nb * TR::kMmaN + 2 * t) * TR::kElemBytes,
                      pack2<TR::kBf16>(O[mb][nb][2 * hf] * inv, O[mb][nb][2 * hf + 1] * inv));
            }
            if (t == 0 && qt.q0 + r < Nq) {
                lse_row[qt.q0 + r] = row_lse(lt, m[mb][hf], softmax_scale);
            }
        }
    }
    warp_sync();
    unsigned short* og = out + b * o_sb + h * o_sh;
    constexpr int kCpr = TR::kChunksPerRow;
#pragma unroll
    for (int i = 0; i < TR::kWarpRows * kCpr / 32; ++i) {
        const int idx = lane + i * 32;
        const int r = warp * TR::kWarpRows + idx / kCpr;
        const int cc = idx % kCpr;
        if (qt.q0 + r < Nq) {
            unsigned vals[4];
            lds128(vals, sQ + r * TR::kRowBytes + cc * 16);
            stg128(og + (long long)(qt.q0 + r) * o_sn + cc * TR::kChunkElems, vals);
        }
    }
}

// tile_max[b, h, a, c] = softmax_scale * max of the valid scores of tile
// (a, c), -inf for tiles without a valid entry.  Same S machinery as bsfa_fwd;
// one smem exchange of per-warp maxima per tile.
extern "C" __global__ void __launch_bounds__(TR::kNThreads, 1)
    bsfa_block_max(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                   float* __restrict__ tile_max, int Nq, int Nk, int Hq, int Hkv, long long q_sb, long long q_sn,
                   long long q_sh, long long k_sb, long long k_sn, long long k_sh, float softmax_scale) {
    using namespace bsfa;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int h = blockIdx.y;
    const long long b = blockIdx.z;
    const int a = query_tile_index<TR, kCausal && kHeavyFirst>(Nq);
    const QueryTile<TR, kCausal> qt(a, Nq, Nk);
    const int nK = ceil_div(Nk, TR::kBlockN);

    float* tm_row = tile_max + ((b * Hq + h) * ceil_div(Nq, TR::kBlockM) + a) * nK;
    for (int c = qt.c_end + 1 + tid; c < nK; c += TR::kNThreads) tm_row[c] = neg_inf();
    if (qt.c_end < 0) return;

    const unsigned smem = dyn_smem_base();
    const unsigned sQ = smem + TR::kSmemQ;
    const unsigned sRed = smem + TR::kSmemRed;
    const unsigned q_lane = sQ + warp * TR::kWarpRows * TR::kRowBytes + lane_off_a<TR>(lane);
    const unsigned k_lane = smem + TR::kSmemK + lane_off_k<TR>(lane);
    using Copy = TileCopy<TR>;
    const unsigned short* kg = k + b * k_sb + (long long)(h / (Hq / Hkv)) * k_sh + Copy::thread_offset(tid, k_sn);
    const int row0 = qt.q0 + warp * TR::kWarpRows + (lane >> 2);

    auto load_k = [&](int c, int slot) {
        Copy::load<TR::kBlockN>(smem + TR::kSmemK + slot * TR::kKVTileBytes, kg + (long long)c * TR::kBlockN * k_sn,
                                k_sn, Nk - c * TR::kBlockN, tid, k);
    };
    // Thread 0 folds the per-warp maxima of the tile whose exchange slot is
    // `slot`; callers guarantee a barrier since the warps wrote it.
    auto write_tile = [&](int c, int slot) {
        if (tid == 0) {
            float mx = lds_f32(sRed + slot * TR::kNWarps * 4);
            for (int w = 1; w < TR::kNWarps; ++w) mx = fmax2(mx, lds_f32(sRed + (slot * TR::kNWarps + w) * 4));
            tm_row[c] = mx * softmax_scale;
        }
    };

    Copy::load<TR::kBlockM>(sQ, q + b * q_sb + h * q_sh + qt.q0 * q_sn + Copy::thread_offset(tid, q_sn), q_sn,
                            Nq - qt.q0, tid, q);
    cp_async_commit();
    load_k(qt.c_end, 0);
    cp_async_commit();

    unsigned qf[TR::kQFragRegs];
    if constexpr (TR::kQInRegs) {
        cp_async_wait<1>();
        cta_sync();
        load_q_frags<TR>(qf, q_lane);
    }

    int slot = 0;
    for (int c = qt.c_end; c >= 0; --c, slot ^= 1) {
        cp_async_wait<0>();
        cta_sync();
        // The exchange slot of tile c+1 was written before this barrier and is
        // rewritten only after the next one.
        if (c < qt.c_end) write_tile(c + 1, slot ^ 1);
        if (c > 0) load_k(c - 1, slot ^ 1);
        cp_async_commit();

        float S[MB][TR::kSNBlocks][4];
        qk_tile<TR>(S, qf, q_lane, k_lane + slot * TR::kKVTileBytes);
        if (qt.needs_mask(c)) mask_tile<TR, kCausal>(S, c, row0, lane, Nq, Nk);
        float row_mx[MB][2];
        row_max<TR>(S, row_mx);
        float mx = row_mx[0][0];
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) mx = fmax2(mx, row_mx[mb][hf]);
        // Rows are already reduced within each quad; fold the 8 quads.
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) mx = fmax2(mx, shfl_xor(mx, off));
        if (lane == 0) sts_f32(sRed + (slot * TR::kNWarps + warp) * 4, mx);
    }
    cta_sync();
    write_tile(0, slot ^ 1);
}
