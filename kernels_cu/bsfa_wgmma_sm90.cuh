// Hopper (sm_90a) warpgroup MMA: wgmma wrappers, shared-memory matrix
// descriptors, the swizzle they assume and the fences that order them.  Only
// the sm90 headers include this file; it needs an sm_90a compile.
// Self-contained.
//
// A wgmma is issued by a whole warpgroup (4 consecutive warps) and runs
// asynchronously: the accumulator registers named by the asm belong to the
// tensor cores until wgmma_wait<> retires the group.  The compiler does not
// know that, so after every wait the accumulators pass through
// fence_regs(), an empty volatile asm that "redefines" them; volatile asm
// statements keep their order, so no read of a result can be hoisted above
// the wait that makes it valid.
#pragma once

namespace bsfa {

// ------------------------------------------------------ matrix descriptors
//
// Operand tiles live in shared memory as "panels" of 64 16-bit columns: each
// panel row is 128 bytes and 8 consecutive rows form one 1024-byte swizzle
// atom in which the 16-byte chunk j of row r is stored at chunk j ^ (r % 8)
// (the hardware's 128-byte swizzle, keyed on address bits [7,10) -> [4,7), so
// every panel starts 1024-byte aligned).  A descriptor holds the start
// address, the leading and stride byte offsets (all >> 4) and the layout.
constexpr int kSwizzleBytes = 128;       // one panel row
constexpr int kSwizzleRows = 8;          // rows per swizzle atom
constexpr int kSwizzleAtomBytes = 1024;  // kSwizzleRows * kSwizzleBytes
constexpr unsigned long long kDescSwizzle128 = 1ull << 62;

__device__ __forceinline__ unsigned long long make_desc(unsigned smem_addr, unsigned lead_bytes,
                                                        unsigned stride_bytes) {
    return (unsigned long long)((smem_addr & 0x3FFFF) >> 4) |
           ((unsigned long long)((lead_bytes >> 4) & 0x3FFF) << 16) |
           ((unsigned long long)((stride_bytes >> 4) & 0x3FFF) << 32) | kDescSwizzle128;
}

// A descriptor advanced by `bytes` (a multiple of 16, inside the same
// 256 KB shared window: the 14-bit address field cannot carry over).
__device__ __forceinline__ unsigned long long desc_add(unsigned long long desc, unsigned bytes) {
    return desc + (bytes >> 4);
}

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` inside a panel.
__device__ __forceinline__ unsigned swizzled(int row, int chunk) {
    return row * kSwizzleBytes + ((chunk ^ (row % kSwizzleRows)) << 4);
}

// ----------------------------------------------------------------- fences

// Makes this thread's completed generic-proxy shared-memory writes (cp.async
// included, once waited for) visible to the async proxy that wgmma reads
// through; a barrier after it publishes them to the other threads.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// stmatrix: four 8 x 8 b16 matrices from the warp's registers (r[j]: this
// thread's mma-fragment element pair of matrix j) into shared memory, row
// (lane % 8) of matrix (lane / 8) at this thread's addr -- ldmatrix's inverse.
__device__ __forceinline__ void stsm_x4(unsigned addr, const unsigned (&r)[4]) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r[0]),
                 "r"(r[1]), "r"(r[2]), "r"(r[3])
                 : "memory");
}

// Orders this warp's register writes before the next wgmma reads them.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Wait until at most N of the warpgroup's committed wgmma groups are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// Register A operands: the tensor cores read them until the group retires,
// so they must stay live (and unchanged) up to the wait.
template <int L, int M, int N>
__device__ __forceinline__ void fence_regs(unsigned (&r)[L][M][N]) {
#pragma unroll
    for (int i = 0; i < L; ++i)
#pragma unroll
        for (int j = 0; j < M; ++j)
#pragma unroll
            for (int k = 0; k < N; ++k) asm volatile("" : "+r"(r[i][j][k])::"memory");
}

// The same for the P fragments of one 128-key block ([k-step][register]).
template <int M, int N>
__device__ __forceinline__ void fence_regs(unsigned (&r)[M][N]) {
#pragma unroll
    for (int j = 0; j < M; ++j)
#pragma unroll
        for (int k = 0; k < N; ++k) asm volatile("" : "+r"(r[j][k])::"memory");
}

// dst = src through an opaque move, so that dst (the next P V's A operands)
// is defined here, after the wait that retired the last reader of dst.  A
// plain copy that always runs may be folded away, leaving the softmax to
// write the operands of the P V in flight, and ptxas then serialises every
// wgmma (C7513).
template <int M, int N>
__device__ __forceinline__ void copy_regs(unsigned (&dst)[M][N], const unsigned (&src)[M][N]) {
#pragma unroll
    for (int i = 0; i < M; ++i)
#pragma unroll
        for (int j = 0; j < N; ++j) asm volatile("mov.b32 %0, %1;" : "=r"(dst[i][j]) : "r"(src[i][j]));
}

// ------------------------------------------------------------------ wgmma
//
// Accumulator layout (m64nN, fp32): warp w of the warpgroup owns rows
// 16w..16w+15; d[4j + 0..1] = row lane/4, columns 8j + 2(lane%4) + {0,1};
// d[4j + 2..3] = the same columns, row lane/4 + 8 -- the mma.sync m16n8 C
// fragment repeated along N.  A register A operand (m64k16) is the mma.sync
// m16n8k16 A fragment of the warp's 16 rows.  scale_d = 0 ignores the old
// accumulator (D = A B), 1 accumulates.

#define BSFA_WGMMA_SS_N64(TY, TB)                                                             \
    asm volatile(                                                                                \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                       \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "                                 \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "  \
        "%32, %33, p, 1, 1, 0, " TB ";\n}\n"                                            \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
        : "l"(desc_a), "l"(desc_b), "r"(scale_d))

#define BSFA_WGMMA_RS_N64(TY, TB)                                                                 \
    asm volatile(                                                                                \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                       \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "                                 \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "  \
        "{%32, %33, %34, %35}, %36, p, 1, 1, " TB ";\n}\n"                                          \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d))

#define BSFA_WGMMA_RS_N128(TY, TB)                                                                 \
    asm volatile(                                                                                \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                       \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "                                 \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "  \
        "{%64, %65, %66, %67}, %68, p, 1, 1, " TB ";\n}\n"                                          \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d))

#define BSFA_WGMMA_SS_N128(TY, TB)                                                               \
    asm volatile(                                                                                \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                       \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "                                 \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "  \
        "%64, %65, p, 1, 1, 0, " TB ";\n}\n"                                                  \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
        : "l"(desc_a), "l"(desc_b), "r"(scale_d))


// D(64 x 64) (+)= A(64 x 16, smem, K-major) * B(16 x 64, smem): B K-major,
// or MN-major (kKMajorB false: V in P V with P in shared memory, head dim 64).
template <bool kBf16, bool kKMajorB = true>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], unsigned long long desc_a, unsigned long long desc_b,
                                             int scale_d) {
    if constexpr (kBf16) {
        if constexpr (kKMajorB) {
            BSFA_WGMMA_SS_N64("bf16", "0");
        } else {
            BSFA_WGMMA_SS_N64("bf16", "1");
        }
    } else {
        if constexpr (kKMajorB) {
            BSFA_WGMMA_SS_N64("f16", "0");
        } else {
            BSFA_WGMMA_SS_N64("f16", "1");
        }
    }
}

// D(64 x 128) (+)= A(64 x 16, smem, K-major) * B(16 x 128, smem): B K-major
// (S of a 128-key block in the warp-specialised kernel) or MN-major
// (kKMajorB false: V in P V with P in shared memory, head dim 128).
template <bool kBf16, bool kKMajorB = true>
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], unsigned long long desc_a, unsigned long long desc_b,
                                              int scale_d) {
    if constexpr (kBf16) {
        if constexpr (kKMajorB) {
            BSFA_WGMMA_SS_N128("bf16", "0");
        } else {
            BSFA_WGMMA_SS_N128("bf16", "1");
        }
    } else {
        if constexpr (kKMajorB) {
            BSFA_WGMMA_SS_N128("f16", "0");
        } else {
            BSFA_WGMMA_SS_N128("f16", "1");
        }
    }
}

// D(64 x N) (+)= A(64 x 16, registers) * B(16 x N, smem), N = 64 or 128: B
// MN-major (kKMajorB false: V in P V) or K-major (K in S = Q K^T with Q in
// registers).
template <bool kBf16, int N, bool kKMajorB = false>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const unsigned (&a)[4], unsigned long long desc_b,
                                         int scale_d) {
    static_assert(N == 64 || N == 128, "wgmma_rs: N must be 64 or 128");
    if constexpr (N == 64) {
        if constexpr (kBf16) {
            if constexpr (kKMajorB) {
                BSFA_WGMMA_RS_N64("bf16", "0");
            } else {
                BSFA_WGMMA_RS_N64("bf16", "1");
            }
        } else {
            if constexpr (kKMajorB) {
                BSFA_WGMMA_RS_N64("f16", "0");
            } else {
                BSFA_WGMMA_RS_N64("f16", "1");
            }
        }
    } else {
        if constexpr (kBf16) {
            if constexpr (kKMajorB) {
                BSFA_WGMMA_RS_N128("bf16", "0");
            } else {
                BSFA_WGMMA_RS_N128("bf16", "1");
            }
        } else {
            if constexpr (kKMajorB) {
                BSFA_WGMMA_RS_N128("f16", "0");
            } else {
                BSFA_WGMMA_RS_N128("f16", "1");
            }
        }
    }
}

#undef BSFA_WGMMA_SS_N64
#undef BSFA_WGMMA_SS_N128
#undef BSFA_WGMMA_RS_N64
#undef BSFA_WGMMA_RS_N128

}  // namespace bsfa
