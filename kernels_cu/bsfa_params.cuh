// The launch ABI of every BSFA kernel: one struct, passed by value as the
// kernel's only parameter (__grid_constant__, so it stays in the constant
// bank).  bsfa_cupy/_params.py packs the same layout with a NumPy structured
// dtype; tests/kernels/test_params.py compiles this header on the host and
// checks every offset against it.  A new argument is added here and there.
//
// Plain C++ on purpose (no CUDA qualifiers): the host compiler must read it.
#pragma once

namespace bsfa {

struct Params {
    // 8-byte members first, so the layout has no padding to get wrong.
    const unsigned short* q;    // (B, Nq, Hq, D) float16/bfloat16 bits
    const unsigned short* k;    // (B, Nk, Hkv, D)
    const unsigned short* v;    // (B, Nk, Hkv, D); bsfa_fwd only
    unsigned short* out;        // (B, Nq, Hq, D); bsfa_fwd only
    float* lse;                 // (B, Hq, Nq) contiguous; bsfa_fwd only
    unsigned char* keep;        // (B, Hq, nQ, nK) contiguous bool, or null; bsfa_fwd only
    const float* thresholds;    // (Hq, thr_T) contiguous, thr_mode 2 only
    float* tile_max;            // (B, Hq, nQ, nK) contiguous; bsfa_block_max only
    // bsfa_fwd_varlen only (a packed batch, bsfa_problem.cuh): num_seqs + 1
    // int32 row offsets of each sequence in q / out / lse and in k / v.
    const int* cu_seqlens_q;
    const int* cu_seqlens_k;
    // bsfa_fwd_splitkv only: per-split partials, out (S, B, Hq, Nq, D) and
    // lse (S, B, Hq, Nq), fp32, merged by the last split CTA of each row
    // group (bsfa_combine.cuh), which split_done counts: one int32 per
    // (grid y, grid z) of the split grid, zero at launch and left zero.
    float* o_part;
    float* lse_part;
    int* split_done;
    // Element strides of the batch, sequence and head dimensions (the last
    // dimension is contiguous); the batch strides are unused by
    // bsfa_fwd_varlen, whose q, k, v, out are (total, H, D).
    long long q_sb, q_sn, q_sh;
    long long k_sb, k_sn, k_sh;
    long long v_sb, v_sn, v_sh;
    long long o_sb, o_sn, o_sh;
    // bsfa_fwd_varlen: Nq, Nk are max_seqlen_q, max_seqlen_k (they size the
    // grid and the keep rows, (num_seqs, Hq, nQ, nK)).
    int Nq, Nk, Hq, Hkv;
    int thr_mode;  // 0: dense (every tile kept), 1: thr_scalar, 2: thresholds[h, p]
    int thr_T;     // threshold positions per head (thr_mode 2)
    // Absolute positions (bsfa_problem.cuh): key 0 sits at k_start, query
    // row 0 at k_start + qk_shift (negative when bottom-right with Nq > Nk).
    // Unused by bsfa_fwd_varlen, where every sequence is bottom-right at 0.
    int k_start, qk_shift;
    int total_q;  // bsfa_fwd_varlen: rows of the packed q (lse is (Hq, total_q))
    int B;         // batch size (the persistent kernel derives its tile list from it)
    // bsfa_fwd_splitkv: key-tile splits per query tile, and query heads of a
    // GQA group packed into one CTA.
    int num_splits;
    int pack_heads;
    float thr_scalar;
    float softmax_scale;  // > 0: max(scale * s) is taken as scale * max(s)
};

}  // namespace bsfa
