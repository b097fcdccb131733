// The forward kernels' register copy of their Params fields (FwdArgs), read
// once at the top of bsfa_fwd.  Both architectures' mainloops and epilogues
// take it instead of the Params itself: p sits in the constant bank and is
// only ever read there, but a reference to it captured by the copy lambdas
// of the mainloop would take its address, and every later field read would
// then be a generic load, re-issued after each global store.
//
// Includes what it needs.
#pragma once

#include "bsfa_params.cuh"

namespace bsfa {

// One field of p, read on its own.  The empty asm after the read keeps the
// compiler from merging neighbouring 32-bit fields (Nq|Nk, Hq|Hkv, ...) into
// one 64-bit parameter load.  A merged load is never re-issued near a late use
// the way a single one is (the epilogue re-reads Hq rather than keeping it
// live), and without it the mma.sync bsfa_fwd, at 254-255 registers at head
// dim 128, spills (8 bytes, non-causal).  The asm only orders memory accesses,
// and none come before it.
template <class T>
__device__ __forceinline__ T param(const T& field) {
    const T v = field;
    asm volatile("" ::: "memory");
    return v;
}

template <bool kOneByOne, class T>
__device__ __forceinline__ T read_field(const T& field) {
    if constexpr (kOneByOne) {
        return param(field);
    } else {
        return field;
    }
}

// The fields of Params that bsfa_fwd and bsfa_fwd_varlen read (all but
// tile_max), in its order.
// The pointers keep the no-alias promise that the launcher makes for them.
struct FwdArgs {
    const unsigned short* __restrict__ q;
    const unsigned short* __restrict__ k;
    const unsigned short* __restrict__ v;
    unsigned short* __restrict__ out;
    float* __restrict__ lse;
    unsigned char* __restrict__ keep;
    const float* __restrict__ thresholds;
    const int* __restrict__ cu_seqlens_q;
    const int* __restrict__ cu_seqlens_k;
    long long q_sb, q_sn, q_sh;
    long long k_sb, k_sn, k_sh;
    long long v_sb, v_sn, v_sh;
    long long o_sb, o_sn, o_sh;
    int Nq, Nk, Hq, Hkv;
    int thr_mode;
    int thr_T;
    int k_start, qk_shift;
    int total_q;
    float thr_scalar;
    float softmax_scale;
};

// kOneByOne: every field through param() (the mma.sync bsfa_fwd, see above).
// Field by field, by name, in this order.
template <bool kOneByOne>
__device__ __forceinline__ FwdArgs fwd_args(const Params& p) {
    FwdArgs a;
    a.q = read_field<kOneByOne>(p.q);
    a.k = read_field<kOneByOne>(p.k);
    a.v = read_field<kOneByOne>(p.v);
    a.out = read_field<kOneByOne>(p.out);
    a.lse = read_field<kOneByOne>(p.lse);
    a.keep = read_field<kOneByOne>(p.keep);
    a.thresholds = read_field<kOneByOne>(p.thresholds);
    a.cu_seqlens_q = read_field<kOneByOne>(p.cu_seqlens_q);
    a.cu_seqlens_k = read_field<kOneByOne>(p.cu_seqlens_k);
    a.q_sb = read_field<kOneByOne>(p.q_sb);
    a.q_sn = read_field<kOneByOne>(p.q_sn);
    a.q_sh = read_field<kOneByOne>(p.q_sh);
    a.k_sb = read_field<kOneByOne>(p.k_sb);
    a.k_sn = read_field<kOneByOne>(p.k_sn);
    a.k_sh = read_field<kOneByOne>(p.k_sh);
    a.v_sb = read_field<kOneByOne>(p.v_sb);
    a.v_sn = read_field<kOneByOne>(p.v_sn);
    a.v_sh = read_field<kOneByOne>(p.v_sh);
    a.o_sb = read_field<kOneByOne>(p.o_sb);
    a.o_sn = read_field<kOneByOne>(p.o_sn);
    a.o_sh = read_field<kOneByOne>(p.o_sh);
    a.Nq = read_field<kOneByOne>(p.Nq);
    a.Nk = read_field<kOneByOne>(p.Nk);
    a.Hq = read_field<kOneByOne>(p.Hq);
    a.Hkv = read_field<kOneByOne>(p.Hkv);
    a.thr_mode = read_field<kOneByOne>(p.thr_mode);
    a.thr_T = read_field<kOneByOne>(p.thr_T);
    a.k_start = read_field<kOneByOne>(p.k_start);
    a.qk_shift = read_field<kOneByOne>(p.qk_shift);
    a.total_q = read_field<kOneByOne>(p.total_q);
    a.thr_scalar = read_field<kOneByOne>(p.thr_scalar);
    a.softmax_scale = read_field<kOneByOne>(p.softmax_scale);
    return a;
}

}  // namespace bsfa
