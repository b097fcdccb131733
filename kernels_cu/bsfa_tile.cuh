// The S = Q K^T machinery shared by bsfa_fwd and bsfa_block_max: which key
// tiles a query tile visits, which of them need masking, async tile loads,
// the tensor-core product and the per-row maxima.  Sharing it guarantees that
// the gate inside bsfa_fwd and the tile maxima of bsfa_block_max see
// bit-identical fp32 scores.
//
// Needs bsfa_ptx.cuh and bsfa_traits.cuh before it.
#pragma once

// BSFA_QK_PINGPONG (documented in bsfa_fwd.cu) is read here, so its default
// lives here too.
#ifndef BSFA_QK_PINGPONG
#define BSFA_QK_PINGPONG 1
#endif
// At hdim 128 only the default bsfa_fwd schedule (K_STAGES 3, forced-early V,
// not speculative) has the registers for the v4 loops: every other schedule
// keeps the previous ones (BSFA_QK_PINGPONG, BSFA_PV_PINGPONG and
// BSFA_FAST_LOADS are ignored there), which spill-free compiles require.
#if defined(BSFA_HEAD_DIM) && BSFA_HEAD_DIM == 128 &&                                   \
    ((defined(BSFA_K_STAGES) && BSFA_K_STAGES != 3) ||                                  \
     (defined(BSFA_V_FORCED_EARLY) && BSFA_V_FORCED_EARLY == 0) ||                      \
     (defined(BSFA_V_SPECULATIVE) && BSFA_V_SPECULATIVE != 0))
#define BSFA_V4_LOOPS_OK 0
#else
#define BSFA_V4_LOOPS_OK 1
#endif

namespace bsfa {

// Where a query tile sits relative to the keys.  Causal masking is aligned
// bottom-right: query row i may see key j iff j <= i + Nk - Nq.  Everything
// the key-tile loop needs is reduced to a few ints so that little besides
// the accumulators stays live across it.
template <class TR, bool kCausal>
struct QueryTile {
    int q0;         // first query row of the tile
    int diag_off;   // q0 + Nk - Nq: causal key limit of row q0
    int c_end;      // last key tile holding a valid entry, -1 if there is none
    int mask_from;  // key tiles c >= mask_from need masking (they are visited first)
    int diag_lo;    // key tiles [diag_lo, diag_hi] are "diagonal" (always kept)
    int diag_hi;

    __device__ __forceinline__ QueryTile(int a, int Nq, int Nk) {
        q0 = a * TR::kBlockM;
        diag_off = q0 + Nk - Nq;
        const int q_last = imin(q0 + TR::kBlockM, Nq) - 1;
        const int hi = q_last + Nk - Nq;  // causal key limit of the last valid row
        const int nK = ceil_div(Nk, TR::kBlockN);
        c_end = kCausal ? (hi < 0 ? -1 : imin(nK - 1, hi / TR::kBlockN)) : nK - 1;
        // Tiles entirely inside the valid region take the mask-free path: the
        // ragged key tile (first c with (c+1)*64 > Nk is Nk/64) and, causal,
        // tiles reaching past row q0's limit (c*64 + 63 > diag_off).  All
        // tiles of a ragged query tile are masked: rows past Nq are masked out
        // completely so that their (zero-Q) scores never reach a tile max.
        mask_from = Nk / TR::kBlockN;
        if (kCausal) {
            const int x = diag_off + 1;  // floor division, x may be negative
            const int first = x >= 0 ? x / TR::kBlockN : -((-x + TR::kBlockN - 1) / TR::kBlockN);
            mask_from = imin(mask_from, imax(first, 0));
        }
        if (q0 + TR::kBlockM > Nq) mask_from = 0;
        // Diagonal tiles are defined the same way in causal and non-causal mode.
        diag_lo = imin(imax(diag_off, 0), Nk - 1) / TR::kBlockN;
        diag_hi = imin(imax(hi, 0), Nk - 1) / TR::kBlockN;
    }

    __device__ __forceinline__ bool needs_mask(int c) const { return c >= mask_from; }
};

// The query tile of a CTA of bsfa_fwd.cu's kernels, whose grid is (nQ, Hq,
// B).  kHeavyFirst (causal): the last, i.e. longest, query tiles go to the
// first CTAs of each head.
template <class TR, bool kHeavyFirst>
__device__ __forceinline__ int query_tile_index(int Nq) {
    if constexpr (kHeavyFirst) {
        return ceil_div(Nq, TR::kBlockM) - 1 - (int)blockIdx.x;
    } else {
        return blockIdx.x;
    }
}

// The (query tile, head, batch) of a CTA of the sm_90a forward, whose grid
// is (w, nQ, B*Hq/w), dispatched x fastest: the (batch, head) pairs,
// flattened as b * Hq + h, are taken w at a time (w = 4, else 2, else 1: the
// largest that divides B * Hq), and within such a chunk the CTAs go rank by
// rank (blockIdx.y), all w heads per rank.  kHeavyFirst (causal): rank r is
// query tile nQ-1-r, so every chunk starts with its longest tiles and its
// short ones fill in behind them.  A whole head at a time (w = 1, the grid
// above) starts the last head's long tiles right before the end and
// stretches it; all heads at once would spread the CTAs in flight over every
// head's K and V and defeat L2 reuse.  (The mma.sync kernels keep the grid
// above: at hdim 128 some of their schedules have no registers to spare for
// the division.)
template <class TR, bool kHeavyFirst>
__device__ __forceinline__ int chunked_query_tile(int Nq) {
    return kHeavyFirst ? ceil_div(Nq, TR::kBlockM) - 1 - (int)blockIdx.y : (int)blockIdx.y;
}
struct CtaHead {
    int h;
    int b;
};
template <bool kFresh = false>
__device__ __forceinline__ CtaHead chunked_head(int Hq) {
    unsigned x = blockIdx.x, z = blockIdx.z;
    if constexpr (kFresh) {  // not merged with earlier calls: an epilogue recomputes b, h instead of keeping them live
        asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(x));
        asm volatile("mov.u32 %0, %%ctaid.z;" : "=r"(z));
    }
    const int bh = (int)(z * gridDim.x + x);
    return CtaHead{bh % Hq, bh / Hq};
}

// Threshold of query tile a (thr_mode 1: one scalar; 2: per head and query
// tile position p = floor((a*128 + Nk - Nq) / 128), clamped into [0, T)).
template <class TR>
__device__ __forceinline__ float tile_threshold(const float* __restrict__ thresholds, float thr_scalar, int thr_mode,
                                                int thr_T, int h, int diag_off) {
    if (thr_mode == 1) return thr_scalar;
    const int p = imax(imin(imax(diag_off, 0) / TR::kBlockM, thr_T - 1), 0);
    return thresholds[(long long)h * thr_T + p];
}

// The keep-mask row of (b, h, a), or nullptr when no mask was asked for.
// Entries past c_end (tiles without a valid entry) are cleared here; the key
// loop writes every visited tile.
template <class TR, bool kCausal>
__device__ __forceinline__ unsigned char* keep_row_for(unsigned char* keep, long long b, int h, int Hq, int a, int Nq,
                                                       int nK, const QueryTile<TR, kCausal>& qt, int tid) {
    unsigned char* row = keep == nullptr ? nullptr : keep + ((b * Hq + h) * ceil_div(Nq, TR::kBlockM) + a) * nK;
    if (row != nullptr) {
        for (int c = qt.c_end + 1 + tid; c < nK; c += TR::kNThreads) row[c] = 0;
    }
    return row;
}

// Online-softmax state before the first key tile: O = 0, row max -inf, row sum 0.
template <int MB, int NB>
__device__ __forceinline__ void init_softmax_state(float (&O)[MB][NB][4], float (&m)[MB][2], float (&l)[MB][2]) {
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
#pragma unroll
            for (int j = 0; j < 4; ++j) O[mb][nb][j] = 0.f;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            m[mb][hf] = neg_inf();
            l[mb][hf] = 0.f;
        }
    }
}

// One row (half hf of row block mb) of the online-softmax update of a kept
// tile, for both forward kernels: m takes the tile's row max, the row's
// P = exp2(S * scale_log2 - m_new * scale_log2) is packed into the 16-bit A
// fragments of P V (n8 block nb -> k-step nb/2, register hf, +2 for the odd
// block: the C fragment of S is the A fragment of P), and l, a per-thread
// partial row sum of the fp32 P, is rescaled and extended.  Returns the
// rescale factor exp2(m_old - m_new); rescaling O is the caller's.
template <class TR, int MB>
__device__ __forceinline__ float softmax_row(const float (&S)[MB][TR::kSNBlocks][4], int mb, int hf, float tile_mx,
                                             float& m, float& l, unsigned (&P)[MB][TR::kKeySteps][4],
                                             float scale_log2) {
    const float m_new = fmax2(m, tile_mx);
    // A row with no valid score yet (m_new = -inf) takes 0 as its reference
    // so that exp2(-inf - ref) = 0 rather than NaN.
    const float ref = m_new == neg_inf() ? 0.f : m_new;
    const float alpha = ex2((m - ref) * scale_log2);
    const float ref_scaled = ref * scale_log2;
    m = m_new;
    float rs = 0.f;
#pragma unroll
    for (int nb = 0; nb < TR::kSNBlocks; ++nb) {
        const float p0 = ex2(ffma(S[mb][nb][2 * hf], scale_log2, -ref_scaled));
        const float p1 = ex2(ffma(S[mb][nb][2 * hf + 1], scale_log2, -ref_scaled));
        rs += p0 + p1;
        P[mb][nb / 2][(nb % 2) * 2 + hf] = pack2<TR::kBf16>(p0, p1);
    }
    l = l * alpha + rs;
    return alpha;
}

// Which key tiles a query tile keeps without a gate, and the gate's
// threshold: tiles in [forced_lo, forced_hi] are the diagonal ones, or every
// tile with a valid entry when thr_mode 0 keeps them all.
template <class TR>
struct GatePlan {
    int forced_lo;
    int forced_hi;
    float thr;

    template <bool kCausal>
    __device__ __forceinline__ GatePlan(const QueryTile<TR, kCausal>& qt, const float* __restrict__ thresholds,
                                        float thr_scalar, int thr_mode, int thr_T, int h) {
        const bool gated = thr_mode != 0;
        forced_lo = gated ? qt.diag_lo : 0;
        forced_hi = gated ? qt.diag_hi : qt.c_end;
        thr = gated ? tile_threshold<TR>(thresholds, thr_scalar, thr_mode, thr_T, h, qt.diag_off) : 0.f;
    }
    __device__ __forceinline__ bool forced(int c) const { return c >= forced_lo && c <= forced_hi; }
};

// A row's softmax sum from the per-lane partial sums of its quad.
__device__ __forceinline__ float quad_sum(float x) {
    x += shfl_xor(x, 1);
    return x + shfl_xor(x, 2);
}

// log-sum-exp of a row (natural log) from its raw-score max m and its sum l
// of exp2((s - m) * scale * log2 e); -inf for a row without a valid key.
__device__ __forceinline__ float row_lse(float l, float m, float softmax_scale) {
    return l > 0.f ? m * softmax_scale + lg2(l) * kLn2 : neg_inf();
}

// Tile copies: consecutive threads take consecutive 16-byte chunks of a row,
// so global reads coalesce.  When the thread count is a multiple of the
// chunks per row, every thread keeps one chunk column and steps down the rows
// by a fixed count; its first chunk's offset (thread_offset) is folded
// once into the caller's base pointer, so the key-tile loop carries a single
// 64-bit pointer per tensor instead of hoisted per-chunk offsets.
template <class TR>
struct TileCopy {
    static constexpr int kCpr = TR::kChunksPerRow;
    static constexpr int kNT = TR::kNThreads;
    static constexpr bool kFixedColumn = kNT % kCpr == 0;
    static constexpr int kRowStep = kNT / kCpr;

    // Element offset of this thread's first chunk inside any tile.
    __device__ __forceinline__ static long long thread_offset(int tid, long long row_stride) {
        if constexpr (kFixedColumn) {
            return (tid / kCpr) * row_stride + (tid % kCpr) * TR::kChunkElems;
        } else {
            return 0;
        }
    }

    // Copies a ROWS x D tile to shared memory at dst.  src = tile's row 0 +
    // thread_offset(); rows >= rows_valid are zero-filled (src-size 0, with
    // `safe`, any valid global address, as the unread source).
    template <int ROWS>
    __device__ __forceinline__ static void load(unsigned dst, const unsigned short* src, long long row_stride,
                                                int rows_valid, int tid, const void* safe) {
        if constexpr (kFixedColumn) {
            static_assert(ROWS % kRowStep == 0, "tile rows must be a multiple of the rows covered per pass");
            const int r0 = tid / kCpr;
            const unsigned d = dst + r0 * TR::kRowBytes + (tid % kCpr) * 16;
#pragma unroll
            for (int i = 0; i < ROWS / kRowStep; ++i) {
                const bool ok = r0 + i * kRowStep < rows_valid;
                const unsigned short* p = src + (long long)(i * kRowStep) * row_stride;
                cp_async_16(d + i * kRowStep * TR::kRowBytes, ok ? (const void*)p : safe, ok ? 16u : 0u);
            }
        } else {
            constexpr int kTotal = ROWS * kCpr;
#pragma unroll
            for (int i = 0; i < (kTotal + kNT - 1) / kNT; ++i) {
                const int idx = tid + i * kNT;
                if (kTotal % kNT == 0 || idx < kTotal) {
                    const int r = idx / kCpr;
                    const int cc = idx % kCpr;
                    const bool ok = r < rows_valid;
                    const unsigned short* p = src + r * row_stride + cc * TR::kChunkElems;
                    cp_async_16(dst + r * TR::kRowBytes + cc * 16, ok ? (const void*)p : safe, ok ? 16u : 0u);
                }
            }
        }
    }
    // load() for a tile known to lie entirely inside the tensor (every row
    // valid): no per-row predicate, select or src-size, the row pointer just
    // steps by kRowStep rows (the ragged last tile takes load()).
    template <int ROWS>
    __device__ __forceinline__ static void load_full(unsigned dst, const unsigned short* src, long long row_stride,
                                                     int tid) {
        if constexpr (kFixedColumn) {
            static_assert(ROWS % kRowStep == 0, "tile rows must be a multiple of the rows covered per pass");
            const unsigned d = dst + (tid / kCpr) * TR::kRowBytes + (tid % kCpr) * 16;
            const long long step = (long long)kRowStep * row_stride;
#pragma unroll
            for (int i = 0; i < ROWS / kRowStep; ++i) {
                cp_async_16_full(d + i * kRowStep * TR::kRowBytes, src);
                src += step;
            }
        } else {
            constexpr int kTotal = ROWS * kCpr;
#pragma unroll
            for (int i = 0; i < (kTotal + kNT - 1) / kNT; ++i) {
                const int idx = tid + i * kNT;
                if (kTotal % kNT == 0 || idx < kTotal) {
                    const int r = idx / kCpr;
                    const int cc = idx % kCpr;
                    cp_async_16_full(dst + r * TR::kRowBytes + cc * 16, src + r * row_stride + cc * TR::kChunkElems);
                }
            }
        }
    }
};


// Byte offsets of this lane's ldmatrix row address inside a tile.
//
// "A-style" (Q as the A operand, and V through ldmatrix.trans as the B operand
// of P V): matrices 0..3 = (rows 0-7, cols 0-7), (rows 8-15, cols 0-7),
// (rows 0-7, cols 8-15), (rows 8-15, cols 8-15).  For Q these are a0..a3 of
// the m16n8k16 A fragment; for V (rows = keys, cols = d) transposed they are
// b0,b1 of the n8 block d 0-7 and b0,b1 of the n8 block d 8-15.
template <class TR>
__device__ __forceinline__ unsigned lane_off_a(int lane) {
    return (lane & 15) * TR::kRowBytes + (lane >> 4) * 16;
}

// K as the B operand of S = Q K^T (K row-major = keys x d, i.e. B "col"):
// matrices = (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7),
// (keys 8-15, d 8-15) = b0,b1 of key block 0-7 and b0,b1 of key block 8-15.
template <class TR>
__device__ __forceinline__ unsigned lane_off_k(int lane) {
    return ((lane & 7) + ((lane >> 4) << 3)) * TR::kRowBytes + ((lane >> 3) & 1) * 16;
}

// The warp's Q fragments for every k-step, for the kQInRegs case.
template <class TR>
__device__ __forceinline__ void load_q_frags(unsigned (&qf)[TR::kQFragRegs], unsigned q_lane_addr) {
    if constexpr (TR::kQInRegs) {
#pragma unroll
        for (int kk = 0; kk < TR::kDSteps; ++kk) {
#pragma unroll
            for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) {
                unsigned r[4];
                ldsm_x4(r, q_lane_addr + mb * TR::kMmaM * TR::kRowBytes + kk * TR::kMmaK * TR::kElemBytes);
#pragma unroll
                for (int j = 0; j < 4; ++j) qf[(kk * TR::kWarpMBlocks + mb) * 4 + j] = r[j];
            }
        }
    }
}

// S = Q K^T for the warp's rows and one key tile (unscaled fp32).
// S[mb][nb][0..1]: row lane>>2, keys nb*8 + 2*(lane&3) + {0,1};
// S[mb][nb][2..3]: the same keys, row lane>>2 + 8.
template <class TR>
__device__ __forceinline__ void qk_tile(float (&S)[TR::kWarpMBlocks][TR::kSNBlocks][4],
                                        const unsigned (&qf)[TR::kQFragRegs], unsigned q_lane_addr,
                                        unsigned k_lane_addr) {
    constexpr int MB = TR::kWarpMBlocks;
    constexpr int kKStepBytes = TR::kMmaK * TR::kElemBytes;
    constexpr int kKeyPairBytes = 2 * TR::kMmaN * TR::kRowBytes;  // 16 keys
    if (!(BSFA_QK_PINGPONG && BSFA_V4_LOOPS_OK && !TR::kQInRegs && TR::kDSteps % 2 == 0 && TR::kDSteps >= 4)) {
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
            for (int nb = 0; nb < TR::kSNBlocks; ++nb)
#pragma unroll
                for (int j = 0; j < 4; ++j) S[mb][nb][j] = 0.f;
    }

    if constexpr (TR::kQInRegs) {
#pragma unroll
        for (int kk = 0; kk < TR::kDSteps; ++kk) {
#pragma unroll
            for (int np = 0; np < TR::kSNBlocks / 2; ++np) {
                unsigned B[4];
                ldsm_x4(B, k_lane_addr + np * kKeyPairBytes + kk * kKStepBytes);
#pragma unroll
                for (int mb = 0; mb < MB; ++mb) {
                    unsigned A[4];
#pragma unroll
                    for (int j = 0; j < 4; ++j) A[j] = qf[(kk * MB + mb) * 4 + j];
                    mma_16816<TR::kBf16>(S[mb][2 * np], A, B[0], B[1]);
                    mma_16816<TR::kBf16>(S[mb][2 * np + 1], A, B[2], B[3]);
                }
            }
        }
    } else {
        // Q from shared memory: the k-step loop is kept rolled.  Fully
        // unrolled, ptxas hoists the ldmatrix of many k-steps ahead and, next
        // to the 128 O and 64 S accumulator registers of hdim 128, spills.
        // The A fragments and first K fragment of step kk+1 are fetched during
        // step kk, so no step starts by waiting on shared memory.
#if BSFA_QK_PINGPONG && BSFA_V4_LOOPS_OK
        if constexpr (TR::kDSteps % 2 == 0 && TR::kDSteps >= 4) {
            // BSFA_QK_PINGPONG: two k-steps per trip with two named fragment
            // sets (A0/B0 for even steps, A1/B1 for odd ones), so the
            // one-step prefetch needs no register moves and no clamped index;
            // lane addresses advance by plain adds, every ldmatrix takes an
            // immediate offset.  The last pair is peeled (no prefetch past D).
            auto load_a = [&](unsigned (&A)[MB][4], unsigned qa) {
#pragma unroll
                for (int mb = 0; mb < MB; ++mb) ldsm_x4(A[mb], qa + mb * TR::kMmaM * TR::kRowBytes);
            };
            // kZero: the first k-step writes S (zero accumulator input).
            auto step = [&](bool kZero, const unsigned (&A)[MB][4], const unsigned (&Bf)[4], unsigned ka) {
#pragma unroll
                for (int np = 0; np < TR::kSNBlocks / 2; ++np) {
                    unsigned B[4];
                    if (np == 0) {
#pragma unroll
                        for (int j = 0; j < 4; ++j) B[j] = Bf[j];
                    } else {
                        ldsm_x4(B, ka + np * kKeyPairBytes);
                    }
#pragma unroll
                    for (int mb = 0; mb < MB; ++mb) {
                        if (kZero) {  // a constant at every (inlined) call
                            mma_16816_zc<TR::kBf16>(S[mb][2 * np], A[mb], B[0], B[1]);
                            mma_16816_zc<TR::kBf16>(S[mb][2 * np + 1], A[mb], B[2], B[3]);
                        } else {
                            mma_16816<TR::kBf16>(S[mb][2 * np], A[mb], B[0], B[1]);
                            mma_16816<TR::kBf16>(S[mb][2 * np + 1], A[mb], B[2], B[3]);
                        }
                    }
                }
            };
            unsigned A0[MB][4], A1[MB][4], B0[4], B1[4];
            unsigned qa = q_lane_addr;
            unsigned ka = k_lane_addr;
            load_a(A0, qa);
            ldsm_x4(B0, ka);
            // Pair 0 peeled: its first step starts S from zero.
            load_a(A1, qa + kKStepBytes);
            ldsm_x4(B1, ka + kKStepBytes);
            step(true, A0, B0, ka);
            load_a(A0, qa + 2 * kKStepBytes);
            ldsm_x4(B0, ka + 2 * kKStepBytes);
            step(false, A1, B1, ka + kKStepBytes);
            qa += 2 * kKStepBytes;
            ka += 2 * kKStepBytes;
#pragma unroll 1
            for (int it = 1; it < TR::kDSteps / 2 - 1; ++it) {
                load_a(A1, qa + kKStepBytes);
                ldsm_x4(B1, ka + kKStepBytes);
                step(false, A0, B0, ka);
                load_a(A0, qa + 2 * kKStepBytes);
                ldsm_x4(B0, ka + 2 * kKStepBytes);
                step(false, A1, B1, ka + kKStepBytes);
                qa += 2 * kKStepBytes;
                ka += 2 * kKStepBytes;
            }
            load_a(A1, qa + kKStepBytes);
            ldsm_x4(B1, ka + kKStepBytes);
            step(false, A0, B0, ka);
            step(false, A1, B1, ka + kKStepBytes);
            return;
        }
#endif
        auto load_a = [&](unsigned (&A)[MB][4], int kk) {
#pragma unroll
            for (int mb = 0; mb < MB; ++mb)
                ldsm_x4(A[mb], q_lane_addr + mb * TR::kMmaM * TR::kRowBytes + kk * kKStepBytes);
        };
        unsigned A[MB][4];
        unsigned B0[4];
        load_a(A, 0);
        ldsm_x4(B0, k_lane_addr);
#pragma unroll 1
        for (int kk = 0; kk < TR::kDSteps; ++kk) {
            const int kn = kk + 1 < TR::kDSteps ? kk + 1 : kk;  // last step re-reads its own data
            unsigned An[MB][4];
            unsigned Bn[4];
            load_a(An, kn);
            ldsm_x4(Bn, k_lane_addr + kn * kKStepBytes);
#pragma unroll
            for (int np = 0; np < TR::kSNBlocks / 2; ++np) {
                unsigned B[4];
                if (np == 0) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) B[j] = B0[j];
                } else {
                    ldsm_x4(B, k_lane_addr + np * kKeyPairBytes + kk * kKStepBytes);
                }
#pragma unroll
                for (int mb = 0; mb < MB; ++mb) {
                    mma_16816<TR::kBf16>(S[mb][2 * np], A[mb], B[0], B[1]);
                    mma_16816<TR::kBf16>(S[mb][2 * np + 1], A[mb], B[2], B[3]);
                }
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                B0[j] = Bn[j];
#pragma unroll
                for (int mb = 0; mb < MB; ++mb) A[mb][j] = An[mb][j];
            }
        }
    }
}

// Sets invalid scores of key tile c to -inf (only called on tiles that need
// it).  Row limits are recomputed here rather than kept live across the loop:
// key j is valid for query row i iff j <= lim(i), lim = -1 for rows >= Nq.
// row0 = q0 + warp * kWarpRows + lane / 4, the thread's first accumulator row.
template <class TR, bool kCausal>
__device__ __forceinline__ void mask_tile(float (&S)[TR::kWarpMBlocks][TR::kSNBlocks][4], int c, int row0,
                                          int lane, int Nq, int Nk) {
    const int col0 = c * TR::kBlockN + 2 * (lane & 3);
    const float ninf = neg_inf();
#pragma unroll
    for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int i = row0 + mb * TR::kMmaM + hf * 8;  // rows of c0c1 / c2c3
            const int lim = i >= Nq ? -1 : (kCausal ? imin(Nk - 1, i + Nk - Nq) : Nk - 1);
            const int rel = lim - col0;  // last valid column offset of this thread
#pragma unroll
            for (int nb = 0; nb < TR::kSNBlocks; ++nb) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    if (nb * TR::kMmaN + e > rel) S[mb][nb][2 * hf + e] = ninf;
                }
            }
        }
    }
}

// Row maxima of the tile, complete after the quad (4 lanes sharing a row)
// reduction: every lane of the quad holds the same value.  Each thread's
// 2 * kSNBlocks values of a row are folded as a tree (depth log2, not a
// chain), so the few warps of an SM are not left waiting on one long chain
// of dependent max instructions.
//
// kQuad = false stops before the quad reduction: each lane then holds the max
// of its own values only, which is all a tile-wide gate needs (quad_max
// finishes the job for tiles that are kept).
template <class TR, bool kQuad = true>
__device__ __forceinline__ void row_max(const float (&S)[TR::kWarpMBlocks][TR::kSNBlocks][4],
                                        float (&mx)[TR::kWarpMBlocks][2]) {
    constexpr int kVals = 2 * TR::kSNBlocks;
    static_assert(kVals == 16, "row_max folds the 16 values of a 64-key tile row");
#pragma unroll
    for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float v[kVals];
#pragma unroll
            for (int nb = 0; nb < TR::kSNBlocks; ++nb) {
                v[2 * nb] = S[mb][nb][2 * hf];
                v[2 * nb + 1] = S[mb][nb][2 * hf + 1];
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = fmax2(v[i], v[i + 8]);
#pragma unroll
            for (int i = 0; i < 4; ++i) v[i] = fmax2(v[i], v[i + 4]);
            float m = fmax2(fmax2(v[0], v[2]), fmax2(v[1], v[3]));
            if (kQuad) {
                m = fmax2(m, shfl_xor(m, 1));
                m = fmax2(m, shfl_xor(m, 2));
            }
            mx[mb][hf] = m;
        }
    }
}

// Completes row_max<TR, false>: the max over the 4 lanes sharing each row.
template <int MB>
__device__ __forceinline__ void quad_max(float (&mx)[MB][2]) {
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const float m = fmax2(mx[mb][hf], shfl_xor(mx[mb][hf], 1));
            mx[mb][hf] = fmax2(m, shfl_xor(m, 2));
        }
}

}  // namespace bsfa
