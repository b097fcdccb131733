// Block-Sparse FlashAttention forward for Hopper (sm_90a): warpgroup MMA.
//
// Same contract, arguments and results as bsfa_fwd and bsfa_block_max in
// bsfa_fwd.cu (the launcher picks these on compute capability 9.0 for head
// dims 64 and 128); the gate, masking and tile bookkeeping are the shared ones of
// bsfa_tile.cuh, so both kernels keep and skip the same tiles.
//
// Specialisation macros: BSFA_DTYPE (0 float16, 1 bfloat16), BSFA_HEAD_DIM
// (64 or 128), BSFA_CAUSAL (0/1, bottom-right aligned).
//
// Layout.  One CTA = one warpgroup (128 threads) per (128-query tile, head,
// batch), two CTAs per SM.  The tile's rows are two wgmma M=64 halves; warp w
// owns rows 16w..16w+15 of each half, so a thread holds the same 32 rows'
// worth of fragments as a warp of the mma.sync kernel.  S = Q K^T is a
// wgmma m64n64k16 per half with Q and K read from shared memory; O += P V a
// wgmma m64nDk16 per half with P straight from registers (the S accumulator
// layout is the A-fragment layout) and V read "MN-major" (d contiguous), so no
// tile is ever transposed.  Tiles sit in 128-byte swizzled panels of 64
// columns (bsfa_wgmma.cuh), filled by cp.async.
//
// Schedule: that of bsfa_fwd's default (3-deep K ring, one V buffer, V of
// ungated tiles fetched at the top of their iteration, V of gated tiles right
// after the gate).  Each wgmma group is waited for where its result is
// needed; the two CTAs of an SM overlap each other's waits, barriers and
// softmax with their tensor-core work -- a single warpgroup per CTA keeps
// every barrier to 4 warps and lets the two CTAs drift freely.

#include "bsfa_ptx.cuh"
#include "bsfa_traits.cuh"
#include "bsfa_tile.cuh"
#include "bsfa_wgmma.cuh"

#if !defined(BSFA_DTYPE) || (BSFA_DTYPE != 0 && BSFA_DTYPE != 1)
#error "BSFA_DTYPE must be 0 (float16) or 1 (bfloat16)"
#endif
#if !defined(BSFA_HEAD_DIM) || (BSFA_HEAD_DIM != 64 && BSFA_HEAD_DIM != 128)
#error "BSFA_HEAD_DIM must be 64 or 128 for the sm_90a kernel"
#endif
#if !defined(BSFA_CAUSAL) || (BSFA_CAUSAL != 0 && BSFA_CAUSAL != 1)
#error "BSFA_CAUSAL must be 0 or 1"
#endif
namespace bsfa {

template <int kHeadDim_, bool kBf16_>
struct Sm90Traits {
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr bool kBf16 = kBf16_;
    static constexpr int kBlockM = 128;  // the BSFA tile, as in Traits
    static constexpr int kBlockN = 64;
    static constexpr int kNThreads = 128;  // one warpgroup
    static constexpr int kWgmmaM = 64;
    static constexpr int kHalves = kBlockM / kWgmmaM;

    // The fragment geometry the shared helpers (mask_tile, row_max) see: a
    // thread's rows form kWarpMBlocks blocks kMmaM rows apart (one per M=64
    // half), each 16 rows x 8 n8 blocks of S like an mma.sync m16n8 tile.
    static constexpr int kWarpMBlocks = kHalves;
    static constexpr int kMmaM = kWgmmaM;
    static constexpr int kMmaN = 8;
    static constexpr int kMmaK = 16;
    static constexpr int kWarpRows = 16;  // rows of one half owned by a warp
    static constexpr int kSNBlocks = kBlockN / kMmaN;
    static constexpr int kONBlocks = kHeadDim / kMmaN;
    static constexpr int kDSteps = kHeadDim / kMmaK;   // k-steps of S = Q K^T
    static constexpr int kKeySteps = kBlockN / kMmaK;  // k-steps of O += P V

    // Shared memory: 128-byte swizzled panels of 64 columns.
    static constexpr int kElemBytes = 2;
    static constexpr int kChunkElems = 16 / kElemBytes;
    static constexpr int kPanelCols = kSwizzleBytes / kElemBytes;  // 64
    static constexpr int kPanels = kHeadDim / kPanelCols;
    static constexpr int kChunksPerPanelRow = kSwizzleBytes / 16;  // 8
    static constexpr int kStepsPerPanel = kPanelCols / kMmaK;      // QK^T k-steps per panel
    static constexpr int kQPanelBytes = kBlockM * kSwizzleBytes;
    static constexpr int kKVPanelBytes = kBlockN * kSwizzleBytes;
    static constexpr int kQBytes = kPanels * kQPanelBytes;
    static constexpr int kKVBytes = kPanels * kKVPanelBytes;
    static constexpr int kKStages = 3;  // K ring: K tiles c-1, c-2 stream in while tile c is used
    static constexpr int kVStages = 1;
    static constexpr int kSmemQ = 0;
    static constexpr int kSmemK = kSmemQ + kQBytes;
    static constexpr int kSmemV = kSmemK + kKStages * kKVBytes;
    // + one atom of slack: the dynamic window is aligned up to 1024 bytes.
    static constexpr int kSmemBytes = kSmemV + kVStages * kKVBytes + kSwizzleAtomBytes;
    // bsfa_block_max: Q and the K ring, then two slots of per-warp maxima.
    static constexpr int kNWarps = kNThreads / 32;
    static constexpr int kSmemRed = kSmemV;
    static constexpr int kBlockMaxSmemBytes = kSmemRed + 2 * kNWarps * 4 + kSwizzleAtomBytes;

    static_assert(kHeadDim % kPanelCols == 0, "head dim must be a whole number of 64-column panels");
    static_assert(kKVPanelBytes % kSwizzleAtomBytes == 0, "panels must keep the 1024-byte atom alignment");
};

using TR = Sm90Traits<BSFA_HEAD_DIM, BSFA_DTYPE == 1>;
// One M=64 half seen by the shared helpers.
struct HalfTR : TR {
    static constexpr int kWarpMBlocks = 1;
};
constexpr bool kCausal = BSFA_CAUSAL != 0;
constexpr int MB = TR::kHalves;

// Async copy of a ROWS x D tile into swizzled panels at dst.  src = the
// tile's row 0 in global memory; rows >= rows_valid are zero-filled.  A
// thread keeps one 16-byte chunk column and steps down the rows by a
// multiple of 8, so its swizzled chunk position never changes.
template <int ROWS>
__device__ __forceinline__ void load_tile(unsigned dst, const unsigned short* src, long long row_stride,
                                          int rows_valid, int tid, const void* safe) {
    constexpr int kCpr = TR::kHeadDim / TR::kChunkElems;
    constexpr int kRowStep = TR::kNThreads / kCpr;
    static_assert(kRowStep % kSwizzleRows == 0 && ROWS % kRowStep == 0, "copy rows must keep the swizzle phase");
    const int r0 = tid / kCpr;
    const int cc = tid % kCpr;
    const unsigned d = dst + (cc / TR::kChunksPerPanelRow) * (ROWS * kSwizzleBytes) +
                       swizzled(r0, cc % TR::kChunksPerPanelRow);
    const unsigned short* s = src + r0 * row_stride + cc * TR::kChunkElems;
#pragma unroll
    for (int i = 0; i < ROWS / kRowStep; ++i) {
        const bool ok = r0 + i * kRowStep < rows_valid;
        cp_async_16(d + i * kRowStep * kSwizzleBytes,
                    ok ? (const void*)(s + (long long)i * kRowStep * row_stride) : safe, ok ? 16u : 0u);
    }
}

__device__ __forceinline__ float (&flat(float (&x)[TR::kSNBlocks][4]))[TR::kSNBlocks * 4] {
    return *reinterpret_cast<float(*)[TR::kSNBlocks * 4]>(&x);
}
__device__ __forceinline__ float (&flat_o(float (&x)[TR::kONBlocks][4]))[TR::kONBlocks * 4] {
    return *reinterpret_cast<float(*)[TR::kONBlocks * 4]>(&x);
}

// S = Q K_c^T, one wgmma group per M=64 half (half 0 first), so the first
// half's maxima can be taken while the second half is still computed.
// k-step kk reads panel kk / 4, 16 columns (32 bytes) further along its rows.
__device__ __forceinline__ void issue_qk(float (&S)[MB][TR::kSNBlocks][4], unsigned long long q_desc,
                                         unsigned long long k_desc) {
    wgmma_fence();
#pragma unroll
    for (int hm = 0; hm < MB; ++hm) {
#pragma unroll
        for (int kk = 0; kk < TR::kDSteps; ++kk) {
            const unsigned col = (kk % TR::kStepsPerPanel) * TR::kMmaK * TR::kElemBytes;
            const unsigned koff = (kk / TR::kStepsPerPanel) * TR::kKVPanelBytes + col;
            const unsigned qoff = (kk / TR::kStepsPerPanel) * TR::kQPanelBytes + hm * TR::kWgmmaM * kSwizzleBytes + col;
            wgmma_ss_n64<TR::kBf16>(flat(S[hm]), desc_add(q_desc, qoff), desc_add(k_desc, koff), kk > 0 ? 1 : 0);
        }
        wgmma_commit();
    }
}

// The 1024-byte-aligned start of the dynamic shared memory (the swizzle atom).
__device__ __forceinline__ unsigned aligned_smem_base() {
    return (dyn_smem_base() + kSwizzleAtomBytes - 1) & ~(unsigned)(kSwizzleAtomBytes - 1);
}

// The first cp.async groups of both kernels: [Q + K c_end], [K c_end-1]
// (empty when c_end = 0); load_k(c, slot) copies key tile c into ring slot.
template <class LoadK>
__device__ __forceinline__ void load_q_and_first_keys(unsigned sQ, const unsigned short* q_tile, long long q_sn,
                                                      int q_rows, int tid, const void* q_safe, int c_end,
                                                      LoadK&& load_k) {
    load_tile<TR::kBlockM>(sQ, q_tile, q_sn, q_rows, tid, q_safe);
    load_k(c_end, c_end % TR::kKStages);
    cp_async_commit();
    if (c_end > 0) load_k(c_end - 1, (c_end - 1) % TR::kKStages);
    cp_async_commit();
}

// S = Q K_c^T and its lane-local row maxima over the valid entries (masked
// to -inf), half 0's taken while half 1 is still computed.  Shared by both
// kernels, so the gate of bsfa_fwd and bsfa_block_max see the same maxima.
template <class QT>
__device__ __forceinline__ void qk_row_maxima(float (&S)[MB][TR::kSNBlocks][4], float (&tile_mx)[MB][2],
                                              unsigned long long q_desc, unsigned long long k_desc, const QT& qt,
                                              int c, int row_in_tile, int lane, int Nq, int Nk) {
    issue_qk(S, q_desc, k_desc);
    auto half_max = [&](int hm) {
        float(&Sh)[1][TR::kSNBlocks][4] = *reinterpret_cast<float(*)[1][TR::kSNBlocks][4]>(&S[hm]);
        float(&mh)[1][2] = *reinterpret_cast<float(*)[1][2]>(&tile_mx[hm]);
        if (qt.needs_mask(c)) {
            mask_tile<HalfTR, kCausal>(Sh, c, qt.q0 + hm * TR::kWgmmaM + row_in_tile, lane, Nq, Nk);
        }
        row_max<HalfTR, false>(Sh, mh);  // lane-local: the gate needs no more
    };
    wgmma_wait<1>();
    fence_regs(flat(S[0]));
    half_max(0);
    wgmma_wait<0>();
    fence_regs(flat(S[1]));
    half_max(1);
}

// O += P V for both halves, committed as one wgmma group; key step kk = 16
// keys = two 8-key swizzle atoms further into V.
__device__ __forceinline__ void issue_pv(float (&O)[MB][TR::kONBlocks][4], const unsigned (&P)[MB][TR::kKeySteps][4],
                                         unsigned long long v_desc) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < TR::kKeySteps; ++kk) {
#pragma unroll
        for (int hm = 0; hm < MB; ++hm) {
            wgmma_rs<TR::kBf16, TR::kHeadDim>(flat_o(O[hm]), P[hm][kk], desc_add(v_desc, kk * TR::kMmaK * kSwizzleBytes),
                                              1);
        }
    }
    wgmma_commit();
}

// Online-softmax update for a kept tile (softmax_row in bsfa_tile.cuh, per
// row, as in bsfa_fwd.cu).  Once the running maxima settle, most tiles raise
// no row max of the warp: O's rescale by exp2(m_old - m_new) (2 D multiplies
// per thread) is then skipped, exactly (alpha == 1).
__device__ __forceinline__ void softmax_update(const float (&S)[MB][TR::kSNBlocks][4], const float (&tile_mx)[MB][2],
                                               float (&m)[MB][2], float (&l)[MB][2],
                                               float (&O)[MB][TR::kONBlocks][4], unsigned (&P)[MB][TR::kKeySteps][4],
                                               float scale_log2) {
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

}  // namespace bsfa

// Launch geometry, read by the launcher through the module's globals.
extern "C" __constant__ int BSFA_FWD_THREADS = bsfa::TR::kNThreads;
extern "C" __constant__ int BSFA_FWD_SMEM_BYTES = bsfa::TR::kSmemBytes;
extern "C" __constant__ int BSFA_BLOCK_MAX_THREADS = bsfa::TR::kNThreads;
extern "C" __constant__ int BSFA_BLOCK_MAX_SMEM_BYTES = bsfa::TR::kBlockMaxSmemBytes;

extern "C" __global__ void __launch_bounds__(bsfa::TR::kNThreads, 2)
    bsfa_fwd(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
             const unsigned short* __restrict__ v, unsigned short* __restrict__ out, float* __restrict__ lse,
             unsigned char* __restrict__ keep, const float* __restrict__ thresholds, float thr_scalar, int thr_mode,
             int thr_T, int Nq, int Nk, int Hq, int Hkv, long long q_sb, long long q_sn, long long q_sh,
             long long k_sb, long long k_sn, long long k_sh, long long v_sb, long long v_sn, long long v_sh,
             long long o_sb, long long o_sn, long long o_sh, float softmax_scale) {
    using namespace bsfa;
    constexpr int KS = TR::kKStages;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const CtaHead ch = chunked_head(Hq);
    const int h = ch.h;
    const long long b = ch.b;
    const int a = chunked_query_tile<TR, kCausal>(Nq);
    const QueryTile<TR, kCausal> qt(a, Nq, Nk);
    const int nK = ceil_div(Nk, TR::kBlockN);
    // Tile row of this thread's accumulator elements 0..1 of half 0 (2..3: +8;
    // half hm: + 64 hm).
    const int row_in_tile = warp * TR::kWarpRows + (lane >> 2);

    unsigned char* keep_row = keep_row_for(keep, b, h, Hq, a, Nq, nK, qt, tid);

    const unsigned smem = aligned_smem_base();
    const unsigned sQ = smem + TR::kSmemQ;
    const unsigned sK = smem + TR::kSmemK;
    const unsigned sV = smem + TR::kSmemV;

    float O[MB][TR::kONBlocks][4];
    float m[MB][2];
    float l[MB][2];
    init_softmax_state(O, m, l);

    if (qt.c_end >= 0) {
        const int hkv = h / (Hq / Hkv);
        const unsigned short* kg = k + b * k_sb + hkv * k_sh;
        const unsigned short* vg = v + b * v_sb + hkv * v_sh;
        const float scale_log2 = softmax_scale * kLog2e;
        const GatePlan<TR> plan(qt, thresholds, thr_scalar, thr_mode, thr_T, h);
        const float thr = plan.thr;
        auto forced = [&](int c) { return plan.forced(c); };

        auto load_k = [&](int c, int slot) {
            load_tile<TR::kBlockN>(sK + slot * TR::kKVBytes, kg + (long long)c * TR::kBlockN * k_sn, k_sn,
                                   Nk - c * TR::kBlockN, tid, k);
        };
        auto load_v = [&](int c) {
            load_tile<TR::kBlockN>(sV, vg + (long long)c * TR::kBlockN * v_sn, v_sn,
                                   Nk - c * TR::kBlockN, tid, v);
        };

        // cp.async groups: prologue [Q + K c_end], [K c_end-1]; each visited
        // tile c commits at its top [V c if ungated] and [K c-2] (either may
        // be empty) and a kept tile waits for everything before its P V, so
        // the group holding K c-1 is complete once at most one (tile c's K)
        // is pending.
        load_q_and_first_keys(sQ, q + b * q_sb + h * q_sh + (long long)qt.q0 * q_sn, q_sn, Nq - qt.q0, tid, q, qt.c_end,
                              load_k);

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
            qk_row_maxima(S, tile_mx, q_desc, make_desc(sK + ks * TR::kKVBytes, 16, kSwizzleAtomBytes), qt, c,
                          row_in_tile, lane, Nq, Nk);

            // The gate (uniform per CTA): the tile max over valid entries is
            // >= thr iff some lane's max is; rows past Nq were masked to -inf.
            bool kept = true;
            if (!is_forced) {
                bool pred = false;
#pragma unroll
                for (int mb = 0; mb < MB; ++mb)
#pragma unroll
                    for (int hf = 0; hf < 2; ++hf) pred |= tile_mx[mb][hf] * softmax_scale >= thr;
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
            softmax_update(S, tile_mx, m, l, O, P, scale_log2);
            cp_async_wait<0>();
            fence_proxy_async();
            cta_sync();
            issue_pv(O, P, v_desc);
            wgmma_wait<0>();
#pragma unroll
            for (int hm = 0; hm < MB; ++hm) fence_regs(flat_o(O[hm]));
            fence_regs(P);
            if (c > 0 && forced(c - 1)) cta_sync();
        }
    }

    // Epilogue.  Every warp's wgmma reads of Q are over once all warps are
    // here; each warp then stages its own normalised rows in those rows of
    // the Q tile (swizzled: conflict-free fragment stores) and writes them out
    // as 16-byte chunks.
    cta_sync();
    const int t = lane & 3;
    const CtaHead ce = chunked_head<true>(Hq);
    float* lse_row = lse + ((long long)ce.b * Hq + ce.h) * Nq;
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const float lt = quad_sum(l[mb][hf]);
            const bool has_keys = lt > 0.f;
            const float inv = has_keys ? 1.f / lt : 0.f;
            const int r = mb * TR::kWgmmaM + row_in_tile + hf * 8;
#pragma unroll
            for (int nb = 0; nb < TR::kONBlocks; ++nb) {
                const unsigned addr = sQ + (nb / TR::kChunksPerPanelRow) * TR::kQPanelBytes +
                                      swizzled(r, nb % TR::kChunksPerPanelRow) + 4 * t;
                sts32(addr, pack2<TR::kBf16>(O[mb][nb][2 * hf] * inv, O[mb][nb][2 * hf + 1] * inv));
            }
            if (t == 0 && qt.q0 + r < Nq) {
                lse_row[qt.q0 + r] = row_lse(lt, m[mb][hf], softmax_scale);
            }
        }
    }
    warp_sync();
    unsigned short* og = out + ce.b * o_sb + ce.h * o_sh;
    constexpr int kCpr = TR::kHeadDim / TR::kChunkElems;
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
        for (int i = 0; i < TR::kWarpRows * kCpr / 32; ++i) {
            const int idx = lane + i * 32;
            const int r = mb * TR::kWgmmaM + warp * TR::kWarpRows + idx / kCpr;
            const int cc = idx % kCpr;
            if (qt.q0 + r < Nq) {
                unsigned vals[4];
                lds128(vals, sQ + (cc / TR::kChunksPerPanelRow) * TR::kQPanelBytes +
                                 swizzled(r, cc % TR::kChunksPerPanelRow));
                stg128(og + (long long)(qt.q0 + r) * o_sn + cc * TR::kChunkElems, vals);
            }
        }
    }
}

// Tile maxima only (same contract as bsfa_block_max in bsfa_fwd.cu): the S
// path of bsfa_fwd above (same K ring, the same wgmma S, masks and row maxima,
// so its maxima are bit-identical to what this kernel's gate compares), one
// barrier per tile, which also publishes the per-warp maxima to thread 0.
extern "C" __global__ void __launch_bounds__(bsfa::TR::kNThreads, 2)
    bsfa_block_max(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                   float* __restrict__ tile_max, int Nq, int Nk, int Hq, int Hkv, long long q_sb, long long q_sn,
                   long long q_sh, long long k_sb, long long k_sn, long long k_sh, float softmax_scale) {
    using namespace bsfa;
    constexpr int KS = TR::kKStages;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const CtaHead ch = chunked_head(Hq);
    const int h = ch.h;
    const long long b = ch.b;
    const int a = chunked_query_tile<TR, kCausal>(Nq);
    const QueryTile<TR, kCausal> qt(a, Nq, Nk);
    const int nK = ceil_div(Nk, TR::kBlockN);
    const int row_in_tile = warp * TR::kWarpRows + (lane >> 2);

    float* tm_row = tile_max + ((b * Hq + h) * ceil_div(Nq, TR::kBlockM) + a) * nK;
    for (int c = qt.c_end + 1 + tid; c < nK; c += TR::kNThreads) tm_row[c] = neg_inf();
    if (qt.c_end < 0) return;

    const unsigned smem = aligned_smem_base();
    const unsigned sQ = smem + TR::kSmemQ;
    const unsigned sK = smem + TR::kSmemK;
    const unsigned sRed = smem + TR::kSmemRed;
    const unsigned short* kg = k + b * k_sb + (long long)(h / (Hq / Hkv)) * k_sh;
    auto load_k = [&](int c, int slot) {
        load_tile<TR::kBlockN>(sK + slot * TR::kKVBytes, kg + (long long)c * TR::kBlockN * k_sn, k_sn,
                               Nk - c * TR::kBlockN, tid, k);
    };

    // cp.async groups as in bsfa_fwd: [Q + K c_end], [K c_end-1], then one
    // [K c-2] per tile; the end-of-tile wait leaves only the newest pending.
    load_q_and_first_keys(sQ, q + b * q_sb + h * q_sh + (long long)qt.q0 * q_sn, q_sn, Nq - qt.q0, tid, q, qt.c_end,
                          load_k);
    const unsigned long long q_desc = make_desc(sQ, 16, kSwizzleAtomBytes);
    cp_async_wait<KS - 2>();
    fence_proxy_async();
    cta_sync();

    int ks = qt.c_end % KS;
#pragma unroll 1
    for (int c = qt.c_end; c >= 0; --c, ks = ks == 0 ? KS - 1 : ks - 1) {
        if (c >= KS - 1) load_k(c - (KS - 1), ks + 1 == KS ? 0 : ks + 1);
        cp_async_commit();
        float S[MB][TR::kSNBlocks][4];
        float tile_mx[MB][2];
        qk_row_maxima(S, tile_mx, q_desc, make_desc(sK + ks * TR::kKVBytes, 16, kSwizzleAtomBytes), qt, c,
                      row_in_tile, lane, Nq, Nk);
        float mx = fmax2(fmax2(tile_mx[0][0], tile_mx[0][1]), fmax2(tile_mx[1][0], tile_mx[1][1]));
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) mx = fmax2(mx, shfl_xor(mx, off));
        const unsigned slot = sRed + (c & 1) * TR::kNWarps * 4;
        if (lane == 0) sts_f32(slot + warp * 4, mx);
        cp_async_wait<KS - 2>();
        fence_proxy_async();
        cta_sync();
        // Slot c&1 is rewritten two tiles on, after the next barrier.
        if (tid == 0) {
            float m = lds_f32(slot);
#pragma unroll
            for (int w = 1; w < TR::kNWarps; ++w) m = fmax2(m, lds_f32(slot + w * 4));
            tm_row[c] = m * softmax_scale;
        }
    }
}
