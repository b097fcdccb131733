// The S = Q K^T machinery shared by bsfa_fwd and bsfa_block_max: which key
// tiles a query tile visits, which of them need masking, async tile loads,
// the tensor-core product and the per-row maxima.  Sharing it guarantees that
// the gate inside bsfa_fwd and the tile maxima of bsfa_block_max see
// bit-identical fp32 scores.
//
// Needs bsfa_ptx.cuh and bsfa_traits.cuh before it.
#pragma once

namespace bsfa {

// Where a query tile sits relative to the keys.  Causal masking is aligned
// bottom-right: query row i may see key j iff j <= i + Nk - Nq.
template <class TR, bool kCausal>
struct QueryTile {
    int q0;        // first query row of the tile
    int diag_off;  // q0 + Nk - Nq: causal key limit of row q0
    int c_end;     // last key tile holding a valid entry, -1 if there is none
    int diag_lo;   // key tiles [diag_lo, diag_hi] are "diagonal" (always kept)
    int diag_hi;
    bool q_ragged;  // the tile runs past Nq

    __device__ __forceinline__ QueryTile(int a, int Nq, int Nk) {
        q0 = a * TR::kBlockM;
        diag_off = q0 + Nk - Nq;
        const int q_last = imin(q0 + TR::kBlockM, Nq) - 1;
        const int hi = q_last + Nk - Nq;  // causal key limit of the last valid row
        const int nK = ceil_div(Nk, TR::kBlockN);
        if (kCausal) {
            c_end = hi < 0 ? -1 : imin(nK - 1, hi / TR::kBlockN);
        } else {
            c_end = nK - 1;
        }
        // Diagonal tiles are defined the same way in causal and non-causal mode.
        diag_lo = imin(imax(diag_off, 0), Nk - 1) / TR::kBlockN;
        diag_hi = imin(imax(hi, 0), Nk - 1) / TR::kBlockN;
        q_ragged = q0 + TR::kBlockM > Nq;
    }

    __device__ __forceinline__ bool is_diagonal(int c) const { return c >= diag_lo && c <= diag_hi; }

    // Tiles entirely inside the valid region take the mask-free path.  The
    // tiles of a ragged query tile are all masked: rows past Nq are masked
    // out completely so that their (zero-Q) scores never reach a tile max.
    __device__ __forceinline__ bool needs_mask(int c, int Nk) const {
        const int k_last = c * TR::kBlockN + TR::kBlockN - 1;
        return q_ragged || k_last >= Nk || (kCausal && k_last > diag_off);
    }
};

// Per-thread limit of each of its accumulator rows: key j is valid iff
// j <= lim.  Row r of mma row block mb: lane>>2 (+8 for the c2/c3 half).
template <class TR, bool kCausal>
__device__ __forceinline__ void row_limits(int (&lim)[TR::kWarpMBlocks][2], int q0, int warp, int lane, int Nq,
                                           int Nk) {
#pragma unroll
    for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int i = q0 + warp * TR::kWarpRows + mb * TR::kMmaM + hf * 8 + (lane >> 2);
            lim[mb][hf] = i >= Nq ? -1 : (kCausal ? imin(Nk - 1, i + Nk - Nq) : Nk - 1);
        }
    }
}

// Asynchronously copies a ROWS x D tile (row r at src + r * row_stride) to
// shared memory at dst; rows >= rows_valid are zero-filled.  Consecutive
// threads take consecutive 16-byte chunks of a row, so global reads coalesce.
template <class TR, int ROWS>
__device__ __forceinline__ void load_tile_async(unsigned dst, const unsigned short* src, long long row_stride,
                                                int rows_valid, int tid) {
    constexpr int kCpr = TR::kChunksPerRow;
    constexpr int kNT = TR::kNThreads;
    if constexpr (kNT % kCpr == 0) {
        // Each thread keeps one chunk column; rows advance by a fixed step, so
        // the 64-bit address is bumped instead of recomputed.
        constexpr int kRowStep = kNT / kCpr;
        static_assert(ROWS % kRowStep == 0, "tile rows must be a multiple of the rows covered per pass");
        const int r0 = tid / kCpr;
        const int cc = tid % kCpr;
        const unsigned short* p = src + r0 * row_stride + cc * TR::kChunkElems;
        const long long step = kRowStep * row_stride;
        const unsigned d = dst + r0 * TR::kRowBytes + cc * 16;
#pragma unroll
        for (int i = 0; i < ROWS / kRowStep; ++i) {
            const bool ok = r0 + i * kRowStep < rows_valid;
            cp_async_16(d + i * kRowStep * TR::kRowBytes, ok ? (const void*)p : (const void*)src, ok ? 16u : 0u);
            p += step;
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
                cp_async_16(dst + r * TR::kRowBytes + cc * 16, ok ? (const void*)p : (const void*)src,
                            ok ? 16u : 0u);
            }
        }
    }
}

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
#pragma unroll
    for (int mb = 0; mb < TR::kWarpMBlocks; ++mb)
#pragma unroll
        for (int nb = 0; nb < TR::kSNBlocks; ++nb)
#pragma unroll
            for (int j = 0; j < 4; ++j) S[mb][nb][j] = 0.f;

#pragma unroll
    for (int kk = 0; kk < TR::kDSteps; ++kk) {
        unsigned A[TR::kWarpMBlocks][4];
#pragma unroll
        for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) {
            if constexpr (TR::kQInRegs) {
#pragma unroll
                for (int j = 0; j < 4; ++j) A[mb][j] = qf[(kk * TR::kWarpMBlocks + mb) * 4 + j];
            } else {
                ldsm_x4(A[mb], q_lane_addr + mb * TR::kMmaM * TR::kRowBytes + kk * TR::kMmaK * TR::kElemBytes);
            }
        }
#pragma unroll
        for (int np = 0; np < TR::kSNBlocks / 2; ++np) {
            unsigned B[4];
            ldsm_x4(B, k_lane_addr + np * 2 * TR::kMmaN * TR::kRowBytes + kk * TR::kMmaK * TR::kElemBytes);
#pragma unroll
            for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) {
                mma_16816<TR::kBf16>(S[mb][2 * np], A[mb], B[0], B[1]);
                mma_16816<TR::kBf16>(S[mb][2 * np + 1], A[mb], B[2], B[3]);
            }
        }
    }
}

// Sets invalid scores of key tile c to -inf (only called on tiles that need it).
template <class TR>
__device__ __forceinline__ void mask_tile(float (&S)[TR::kWarpMBlocks][TR::kSNBlocks][4],
                                          const int (&lim)[TR::kWarpMBlocks][2], int c, int lane) {
    const int col0 = c * TR::kBlockN + 2 * (lane & 3);
    const float ninf = neg_inf();
#pragma unroll
    for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int rel = lim[mb][hf] - col0;  // last valid column offset of this thread
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
// reduction: every lane of the quad holds the same value.
template <class TR>
__device__ __forceinline__ void row_max(const float (&S)[TR::kWarpMBlocks][TR::kSNBlocks][4],
                                        float (&mx)[TR::kWarpMBlocks][2]) {
#pragma unroll
    for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float m = fmax2(S[mb][0][2 * hf], S[mb][0][2 * hf + 1]);
#pragma unroll
            for (int nb = 1; nb < TR::kSNBlocks; ++nb) {
                m = fmax2(m, fmax2(S[mb][nb][2 * hf], S[mb][nb][2 * hf + 1]));
            }
            m = fmax2(m, shfl_xor(m, 1));
            m = fmax2(m, shfl_xor(m, 2));
            mx[mb][hf] = m;
        }
    }
}

}  // namespace bsfa
