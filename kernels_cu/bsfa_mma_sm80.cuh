// Tensor-core products of the mma.sync kernels: the lanes' ldmatrix
// addresses, the Q fragments, S = Q K^T of one key tile (shared by bsfa_fwd
// and bsfa_block_max, so the gate and the tile maxima see bit-identical fp32
// scores) and O += P V.
//
// Includes what it needs; TR is a TraitsSm80.
#pragma once

#include "bsfa_ptx.cuh"

namespace bsfa {

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

// S = Q K^T with the Q fragments in registers (TR::kQInRegs: hdim <= 64),
// fully unrolled.
template <class TR>
__device__ __forceinline__ void qk_tile_q_regs(float (&S)[TR::kWarpMBlocks][TR::kSNBlocks][4],
                                               const unsigned (&qf)[TR::kQFragRegs], unsigned k_lane_addr) {
    constexpr int MB = TR::kWarpMBlocks;
    constexpr int kKStepBytes = TR::kMmaK * TR::kElemBytes;
    constexpr int kKeyPairBytes = 2 * TR::kMmaN * TR::kRowBytes;  // 16 keys
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int nb = 0; nb < TR::kSNBlocks; ++nb)
#pragma unroll
            for (int j = 0; j < 4; ++j) S[mb][nb][j] = 0.f;
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
}

// S = Q K^T with Q read from shared memory (hdim 96 and 128).  The k-step
// loop is kept rolled: fully unrolled, ptxas hoists the ldmatrix of many
// k-steps ahead and, next to the 128 O and 64 S accumulator registers of hdim
// 128, spills.  It runs two k-steps per trip on two named fragment sets
// (A0/B0 for even steps, A1/B1 for odd ones), so fetching step kk+1's
// fragments during step kk needs no register moves and no clamped index;
// lane addresses advance by plain adds and every ldmatrix takes an immediate
// offset.  The first pair is peeled (its first step starts S from zero), and
// so is the last (no prefetch past D).
template <class TR>
__device__ __forceinline__ void qk_tile_q_smem(float (&S)[TR::kWarpMBlocks][TR::kSNBlocks][4], unsigned q_lane_addr,
                                               unsigned k_lane_addr) {
    constexpr int MB = TR::kWarpMBlocks;
    constexpr int kKStepBytes = TR::kMmaK * TR::kElemBytes;
    constexpr int kKeyPairBytes = 2 * TR::kMmaN * TR::kRowBytes;  // 16 keys
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
}

// S = Q K^T for the warp's rows and one key tile (unscaled fp32).
// S[mb][nb][0..1]: row lane>>2, keys nb*8 + 2*(lane&3) + {0,1};
// S[mb][nb][2..3]: the same keys, row lane>>2 + 8.
template <class TR>
__device__ __forceinline__ void qk_tile(float (&S)[TR::kWarpMBlocks][TR::kSNBlocks][4],
                                        const unsigned (&qf)[TR::kQFragRegs], unsigned q_lane_addr,
                                        unsigned k_lane_addr) {
    if constexpr (TR::kQInRegs) {
        qk_tile_q_regs<TR>(S, qf, k_lane_addr);
    } else {
        qk_tile_q_smem<TR>(S, q_lane_addr, k_lane_addr);
    }
}

// O += P V with P from the softmax (the A fragments of this product).  V
// (keys x d, row-major in smem) is the "col" B operand: ldmatrix.trans of an
// 8 keys x 8 d matrix gives each lane two consecutive keys of one d column,
// i.e. b0 / b1.
//
// The key-step loop is rolled: fully unrolled, ptxas hoists the V fragments
// of later steps and spills at hdim 128.  It runs two key steps per trip on
// two named V fragment sets (B0: even steps, B1: odd), P consumed from
// P[.][0..1] and shifted down by two per trip (the moves are free next to the
// tensor-core time); the first V fragment of the next step is fetched during
// the current one, with no B moves and no index clamp, the lane address
// advancing by a plain add.  The last trip's prefetch re-reads its own step
// (harmless, in bounds).
template <class TR>
__device__ __forceinline__ void pv_tile(float (&O)[TR::kWarpMBlocks][TR::kONBlocks][4],
                                        unsigned (&P)[TR::kWarpMBlocks][TR::kKeySteps][4], unsigned v_lane_addr) {
    constexpr int MB = TR::kWarpMBlocks;
    constexpr int kKStepBytes = TR::kMmaK * TR::kRowBytes;       // 16 keys
    constexpr int kDPairBytes = 2 * TR::kMmaN * TR::kElemBytes;  // 16 d columns
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
}

}  // namespace bsfa
