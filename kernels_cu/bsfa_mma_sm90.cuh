// Tensor-core products of the sm_90a kernels: S = Q K^T as one wgmma group
// per M=64 half with its lane-local row maxima (shared by bsfa_fwd and
// bsfa_block_max, so the gate and the tile maxima see the same scores), and
// O += P V with P straight from registers.
//
// Includes what it needs; TR is a TraitsSm90.
#pragma once

#include "bsfa_mask.cuh"
#include "bsfa_softmax.cuh"
#include "bsfa_traits_sm90.cuh"
#include "bsfa_wgmma_sm90.cuh"

namespace bsfa {

// A fragment array as the flat register list a wgmma names.
template <int N>
__device__ __forceinline__ float (&flat(float (&x)[N][4]))[N * 4] {
    return *reinterpret_cast<float(*)[N * 4]>(&x);
}

// S = Q K_c^T, one wgmma group per M=64 half (half 0 first), so the first
// half's maxima can be taken while the second half is still computed.
// k-step kk reads panel kk / 4, 16 columns (32 bytes) further along its rows.
template <class TR>
__device__ __forceinline__ void issue_qk(float (&S)[TR::kHalves][TR::kSNBlocks][4], unsigned long long q_desc,
                                         unsigned long long k_desc) {
    wgmma_fence();
#pragma unroll
    for (int hm = 0; hm < TR::kHalves; ++hm) {
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

// S = Q K_c^T and its lane-local row maxima over the valid entries (masked
// to -inf), half 0's taken while half 1 is still computed.  lengths() gives
// the Problem whose Nq, Nk and shift the mask takes; it is called on masked
// tiles only (a kernel may re-read them there rather than keep them live).
template <class TR, bool kCausal, class Lengths>
__device__ __forceinline__ void qk_row_maxima(float (&S)[TR::kHalves][TR::kSNBlocks][4],
                                              float (&tile_mx)[TR::kHalves][2], unsigned long long q_desc,
                                              unsigned long long k_desc, const QueryTile<TR, kCausal>& qt, int c,
                                              int row_in_tile, int lane, Lengths&& lengths) {
    using HalfTR = HalfTraitsSm90<TR>;
    issue_qk<TR>(S, q_desc, k_desc);
    auto half_max = [&](int hm) {
        float(&Sh)[1][TR::kSNBlocks][4] = *reinterpret_cast<float(*)[1][TR::kSNBlocks][4]>(&S[hm]);
        float(&mh)[1][2] = *reinterpret_cast<float(*)[1][2]>(&tile_mx[hm]);
        if (qt.needs_mask(c)) {
            const Problem pr = lengths();
            mask_tile<HalfTR, kCausal>(Sh, c, qt.q0 + hm * TR::kWgmmaM + row_in_tile, lane, pr.Nq, pr.Nk, pr.shift);
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

// O += P V for each m64 row block of the warpgroup's rows, P from
// registers, committed as one wgmma group; key step kk = 16 keys = two 8-key
// swizzle atoms further into V.
template <class TR>
__device__ __forceinline__ void issue_pv(float (&O)[TR::kWarpMBlocks][TR::kONBlocks][4],
                                         const unsigned (&P)[TR::kWarpMBlocks][TR::kKeySteps][4],
                                         unsigned long long v_desc) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < TR::kKeySteps; ++kk) {
#pragma unroll
        for (int mb = 0; mb < TR::kWarpMBlocks; ++mb) {
            wgmma_rs<TR::kBf16, TR::kHeadDim>(flat(O[mb]), P[mb][kk], desc_add(v_desc, kk * TR::kMmaK * kSwizzleBytes),
                                              1);
        }
    }
    wgmma_commit();
}

}  // namespace bsfa
