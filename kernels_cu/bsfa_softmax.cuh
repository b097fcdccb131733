// The online softmax, per accumulator row: its initial state, the row
// maxima of a score tile, the update of a kept tile (softmax_row) and the
// final row sum and log-sum-exp.  Shared by every kernel: the fragment layout
// is the mma.sync C layout, which the wgmma accumulator repeats along N.
//
// Includes what it needs.
#pragma once

#include "bsfa_ptx.cuh"
#include "bsfa_traits.cuh"

namespace bsfa {

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
// kMargin > 0 (log2 units): a row that already has a max keeps it while the
// tile's is at most kMargin above (P then reaches up to 2^kMargin, alpha is
// 1 and O needs no rescale), as FlashAttention-4 does; out and lse are the
// same sums taken against another reference, rounded differently.
template <class TR, int MB, int kMargin = 0>
__device__ __forceinline__ float softmax_row(const float (&S)[MB][TR::kSNBlocks][4], int mb, int hf, float tile_mx,
                                             float& m, float& l, unsigned (&P)[MB][TR::kKeySteps][4],
                                             float scale_log2) {
    float m_new = fmax2(m, tile_mx);
    if constexpr (kMargin > 0) {
        if (m != neg_inf() && (m_new - m) * scale_log2 <= (float)kMargin) m_new = m;
    }
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

// Row maxima of the tile, complete after the quad (4 lanes sharing a row)
// reduction: every lane of the quad holds the same value.  Each thread's
// 2 * kSNBlocks values of a row are folded as a tree (depth log2, not a
// chain), so the few warps of an SM are not left waiting on one long chain
// of dependent max instructions.
//
// fmax2 is max.f32: a NaN score is skipped unless every value is NaN, so a
// tile max (and the gate) only sees NaN for an all-NaN row.
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

// A row's softmax sum from the per-lane partial sums of its quad.
__device__ __forceinline__ float quad_sum(float x) {
    x += shfl_xor(x, 1);
    return x + shfl_xor(x, 2);
}

// log-sum-exp of a row (natural log) from its raw-score max m and its sum l
// of exp2((s - m) * scale * log2 e); -inf for a row without a valid key
// (l == 0).  A NaN l (a non-finite input reached one of the row's valid
// scores: row_max skips NaN, the exponentials do not) gives NaN, as the
// row's outputs are NaN too: the rows a non-finite input touches, and only
// those, read NaN everywhere.
__device__ __forceinline__ float row_lse(float l, float m, float softmax_scale) {
    return l == 0.f ? neg_inf() : m * softmax_scale + lg2(l) * kLn2;
}

}  // namespace bsfa
