// Inline-PTX wrappers used by the BSFA kernels.
//
// The kernels are compiled by NVRTC without any system or CUDA header, so every
// intrinsic the kernels need (tensor-core mma, ldmatrix, cp.async, barriers,
// shuffles, packed conversions, ex2/lg2) is spelled out here as PTX.  Keeping
// them all in one file also gives a single seam to swap for a host-side
// emulation when checking fragment index math without a GPU.
//
// Shared-memory operands are 32-bit shared-window addresses (what ldmatrix and
// cp.async take natively); the kernels never touch shared memory through C++
// pointers, so there is no aliasing between asm and compiler-visible accesses.
//
// Self-contained.
#pragma once

namespace bsfa {

// ---------------------------------------------------------------- addresses

// Dynamic shared memory of the CTA as a 32-bit shared-window address.  The
// array is declared here so that the kernels only ever see the address.
__device__ __forceinline__ unsigned dyn_smem_base() {
    extern __shared__ __align__(16) unsigned char bsfa_dyn_smem[];
    unsigned addr;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }"
        : "=r"(addr)
        : "l"(bsfa_dyn_smem));
    return addr;
}

// ---------------------------------------------------------------- cp.async

// 16-byte global->shared copy that bypasses L1 (.cg).  src_bytes is 16 or 0;
// 0 zero-fills the destination, which is how ragged tails (rows past Nq / Nk)
// become zeros in shared memory without any padding copy of the inputs.
__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src, unsigned src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
                 : "memory");
}

// The same copy for a source known to be in range (no src-size operand).
__device__ __forceinline__ void cp_async_16_full(unsigned dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Wait until at most N of this thread's most recent groups are still pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---------------------------------------------------------------- ldmatrix

// volatile: ldmatrix must stay ordered after the barriers that publish the
// cp.async data it reads (the barriers are volatile asm as well).
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// ---------------------------------------------------------------- tensor cores

// D = A * B + D, m16n8k16, fp32 accumulate.  A: 4 regs (row-major 16x16),
// B: 2 regs (16x8, "col" = each thread holds two consecutive k of one n).
template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    if constexpr (kBf16) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// D = A * B (accumulator input zero; ptxas feeds RZ as C, so S needs no
// zeroing instructions).
template <bool kBf16>
__device__ __forceinline__ void mma_16816_zc(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    const float z = 0.f;
    if constexpr (kBf16) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};\n"
            : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(z));
    } else {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};\n"
            : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(z));
    }
}

// Two fp32 -> one register of two 16-bit values, lo in bits 0..15.
// cvt.rn.{f16,bf16}x2.f32 d, a, b puts a in the HIGH half, hence (hi, lo).
template <bool kBf16>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    if constexpr (kBf16) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

// ---------------------------------------------------------------- fp32 math

// 2^x; ex2.approx(-inf) = +0, which the online softmax relies on.
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float lg2(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float fmax2(float a, float b) {
    float y;
    asm("max.f32 %0, %1, %2;\n" : "=f"(y) : "f"(a), "f"(b));
    return y;
}

__device__ __forceinline__ float ffma(float a, float b, float c) {
    float y;
    asm("fma.rn.f32 %0, %1, %2, %3;\n" : "=f"(y) : "f"(a), "f"(b), "f"(c));
    return y;
}

__device__ __forceinline__ float neg_inf() {
    float y;
    asm("mov.b32 %0, 0xff800000;\n" : "=f"(y));
    return y;
}

// ---------------------------------------------------------------- warp / CTA sync

__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
    float r;
    asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;\n" : "=f"(r) : "f"(v), "r"(lane_mask));
    return r;
}

// True on every lane iff pred holds on some lane of the (full) warp.
__device__ __forceinline__ bool warp_any(bool pred) {
    unsigned r;
    asm volatile(
        "{ .reg .pred p, q;\n"
        "  setp.ne.u32 p, %1, 0;\n"
        "  vote.sync.any.pred q, p, 0xffffffff;\n"
        "  selp.u32 %0, 1, 0, q; }\n"
        : "=r"(r)
        : "r"((unsigned)pred));
    return r != 0;
}

__device__ __forceinline__ void warp_sync() { asm volatile("bar.warp.sync 0xffffffff;\n" ::: "memory"); }

__device__ __forceinline__ void cta_sync() { asm volatile("bar.sync 0;\n" ::: "memory"); }

// CTA-wide OR of one predicate per thread (== __syncthreads_or); also a full barrier.
__device__ __forceinline__ bool cta_sync_or(bool pred) {
    unsigned r;
    asm volatile(
        "{ .reg .pred p, q;\n"
        "  setp.ne.u32 p, %1, 0;\n"
        "  bar.red.or.pred q, 0, p;\n"
        "  selp.u32 %0, 1, 0, q; }\n"
        : "=r"(r)
        : "r"((unsigned)pred)
        : "memory");
    return r != 0;
}

// ---------------------------------------------------------------- plain memory

// Global load through the read-only (non-coherent) path, for data the kernel
// never writes (the gate thresholds).  The pointer comes out of the Params
// struct, not a __restrict__ kernel argument, so the compiler cannot prove
// that itself.
__device__ __forceinline__ float ldg_nc_f32(const float* p) {
    float v;
    asm("ld.global.nc.f32 %0, [%1];\n" : "=f"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ void sts32(unsigned addr, unsigned v) {
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

__device__ __forceinline__ void sts_f32(unsigned addr, float v) {
    asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory");
}

__device__ __forceinline__ float lds_f32(unsigned addr) {
    float v;
    asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
    return v;
}

__device__ __forceinline__ void lds128(unsigned (&v)[4], unsigned addr) {
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3])
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ void stg128(void* p, const unsigned (&v)[4]) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3])
                 : "memory");
}

}  // namespace bsfa
