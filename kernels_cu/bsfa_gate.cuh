// The gate: which key tiles of a query tile are kept without comparing their
// maximum to a threshold (the diagonal ones; all of them in dense mode), the
// threshold the others are compared with, and the keep-mask row a CTA
// reports its decisions in.  Shared by both forward kernels.
//
// Includes what it needs.
#pragma once

#include "bsfa_mask.cuh"
#include "bsfa_problem.cuh"
#include "bsfa_ptx.cuh"
#include "bsfa_traits.cuh"

namespace bsfa {

// Threshold of a query tile (thr_mode 1: one scalar; 2: per head and query
// tile position p = floor(tile_pos / 128), clamped into [0, T), where
// tile_pos = q_pos + a*128 is the absolute position of its first row;
// bottom-right by default, q_pos = Nk - Nq).
template <class TR>
__device__ __forceinline__ float tile_threshold(const float* __restrict__ thresholds, float thr_scalar, int thr_mode,
                                                int thr_T, int h, int tile_pos) {
    if (thr_mode == 1) return thr_scalar;
    const int p = imax(imin(imax(tile_pos, 0) / TileShape::kBlockM, thr_T - 1), 0);
    return ldg_nc_f32(thresholds + (long long)h * thr_T + p);
}

// The keep-mask row of (b, h, a), or nullptr when no mask was asked for.
// Entries past c_end (tiles without a valid entry, and those past a packed
// sequence's own key tiles) are cleared here by the CTA's n_threads threads;
// the key loop writes every visited tile.  c_end = -1 clears the whole row
// (a query tile with no valid entry, or past its sequence's end).
template <class TR, class A>
__device__ __forceinline__ unsigned char* keep_row_for(const A& p, long long b, int h, int a, int c_end, int tid,
                                                       int n_threads) {
    unsigned char* row = p.keep == nullptr ? nullptr : p.keep + tile_row<TR>(p, b, h, a);
    if (row != nullptr) {
        const int len = tile_row_len<TR>(p);
        for (int c = c_end + 1 + tid; c < len; c += n_threads) row[c] = 0;
    }
    return row;
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
        thr = gated ? tile_threshold<TR>(thresholds, thr_scalar, thr_mode, thr_T, h, qt.tile_pos) : 0.f;
    }
    __device__ __forceinline__ bool forced(int c) const { return c >= forced_lo && c <= forced_hi; }

    // This thread's vote for keeping a gated tile: the tile max over valid
    // entries is >= thr iff some row (or lane) max is, since invalid entries
    // were masked to -inf.  The caller ORs the votes over the CTA.
    template <int MB>
    __device__ __forceinline__ bool vote(const float (&tile_mx)[MB][2], float softmax_scale) const {
        bool pred = false;
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) pred |= tile_mx[mb][hf] * softmax_scale >= thr;
        return pred;
    }
};

}  // namespace bsfa
