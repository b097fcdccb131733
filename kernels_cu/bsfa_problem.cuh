// This CTA's attention problem, described in one place: where the batch
// element (bsfa_fwd, bsfa_block_max) or packed sequence (bsfa_fwd_varlen)
// that it works on lies in q, k, v, out and lse, its lengths, and where its
// first query and first key sit in the absolute sequence.  Every kernel
// builds one at its top (cta_problem) and takes lengths and positions from
// it: the key range and diagonal tiles of a query tile (QueryTile,
// bsfa_mask.cuh), the masking (mask_tile), the gate's threshold position
// (bsfa_gate.cuh) and the epilogues' output rows.
//
// Contract, for every kernel whatever its thread count or grid decode:
//   * b is the CTA's batch element, or its sequence in a packed batch
//     (kVarlen); offsets are those of head 0, heads are the caller's.
//   * Positions: query row i of the problem sits at q_pos + i, key j at
//     k_pos + j, and causal (i, j) is valid iff k_pos + j <= q_pos + i.  A
//     fixed-length launch takes them from Params (resolved
//     by the host, as k_start and qk_shift = q_start - k_start; q_start < 0
//     is bottom-right alignment with Nq > Nk).  A
//     packed sequence is bottom-right at 0 (q_pos = Nk - Nq, k_pos = 0), as
//     in bsfa_reference.attention_varlen.
//   * Query tile a of a packed sequence exists iff a * kBlockM < Nq: the grid
//     covers the longest sequence, and a CTA whose tile does not exist clears
//     its keep row (all of it) and exits.  Nq = 0 and Nk = 0 are possible.
//   * keep and tile_max rows are laid out by the launch's Nq, Nk (max_seqlen_q
//     / max_seqlen_k for a packed batch): tile_row, tile_row_len.
//   * cta_problem<kVarlen, true> re-reads the offsets with volatile loads,
//     for an epilogue that rebuilds the problem instead of keeping it live
//     across the key loop (the offsets then are not merged with the first
//     read).  A fixed-length problem is parameters and b only.
//
// A is Params or FwdArgs (the same field names).  Includes what it needs.
#pragma once

#include "bsfa_params.cuh"
#include "bsfa_traits.cuh"

namespace bsfa {

struct Problem {
    long long q_off;    // element offset of query row 0 in q (head 0)
    long long k_off;    // ... of key 0 in k
    long long v_off;    // ... of key 0 in v
    long long o_off;    // ... of query row 0 in out
    long long lse_off;  // lse index of (head 0, row 0); heads lse_sh apart
    int lse_sh;
    int Nq, Nk;
    int k_pos;  // absolute position of key 0
    // q_pos - k_pos, q_pos the absolute position of query row 0: causal, key
    // j is valid for row i iff j <= i + shift.  One Params field of its own
    // (not q_start - k_start) for a fixed-length launch: the masks take it
    // as one constant-bank operand, and the hdim-128 sm_90a kernel has no
    // register for a difference.
    int shift;
    // First row of the problem in the packed (total, H, D) tensors (kVarlen):
    // the row coordinate of the warp-specialised kernel's tensor-map boxes,
    // which address rows, not elements.  0 for a batch element, whose boxes
    // take b as their batch coordinate instead.
    int q_row, k_row;

    __device__ __forceinline__ int q_pos() const { return k_pos + shift; }
};

template <bool kFresh>
__device__ __forceinline__ int load_seq_offset(const int* at) {
    int v;
    if constexpr (kFresh) {
        asm volatile("ld.global.nc.b32 %0, [%1];\n" : "=r"(v) : "l"(at));
    } else {
        asm("ld.global.nc.b32 %0, [%1];\n" : "=r"(v) : "l"(at));
    }
    return v;
}

template <bool kVarlen, bool kFresh = false, class A>
__device__ __forceinline__ Problem cta_problem(const A& p, long long b) {
    Problem pr;
    if constexpr (kVarlen) {
        const int q_begin = load_seq_offset<kFresh>(p.cu_seqlens_q + b);
        const int q_end = load_seq_offset<kFresh>(p.cu_seqlens_q + b + 1);
        const int k_begin = load_seq_offset<kFresh>(p.cu_seqlens_k + b);
        const int k_end = load_seq_offset<kFresh>(p.cu_seqlens_k + b + 1);
        pr.q_off = (long long)q_begin * p.q_sn;
        pr.k_off = (long long)k_begin * p.k_sn;
        pr.v_off = (long long)k_begin * p.v_sn;
        pr.o_off = (long long)q_begin * p.o_sn;
        pr.lse_off = q_begin;  // lse is (Hq, total_q)
        pr.lse_sh = p.total_q;
        pr.Nq = q_end - q_begin;
        pr.Nk = k_end - k_begin;
        pr.k_pos = 0;
        pr.shift = pr.Nk - pr.Nq;
        pr.q_row = q_begin;
        pr.k_row = k_begin;
    } else {
        pr.q_off = b * p.q_sb;
        pr.k_off = b * p.k_sb;
        pr.v_off = b * p.v_sb;
        pr.o_off = b * p.o_sb;
        pr.lse_off = b * p.Hq * p.Nq;  // lse is (B, Hq, Nq)
        pr.lse_sh = p.Nq;
        pr.Nq = p.Nq;
        pr.Nk = p.Nk;
        pr.k_pos = p.k_start;
        pr.shift = p.qk_shift;
        pr.q_row = 0;
        pr.k_row = 0;
    }
    return pr;
}

// Entries of a keep / tile_max row: the launch's key tiles.
template <class TR, class A>
__device__ __forceinline__ int tile_row_len(const A& p) {
    return ceil_div(p.Nk, TR::kBlockN);
}

// Index of the (b, h, a) row of keep / tile_max, (B, Hq, nQ, nK) for the
// launch's Nq, Nk.
template <class TR, class A>
__device__ __forceinline__ long long tile_row(const A& p, long long b, int h, int a) {
    return ((b * p.Hq + h) * ceil_div(p.Nq, TileShape::kBlockM) + a) * tile_row_len<TR>(p);
}

}  // namespace bsfa
