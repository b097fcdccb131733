// Global -> shared tile copies of the mma.sync kernels (cp.async into the
// padded row-major tiles of TraitsSm80).
//
// Includes what it needs.
#pragma once

#include "bsfa_ptx.cuh"

namespace bsfa {

// Consecutive threads take consecutive 16-byte chunks of a row, so global
// reads coalesce.  When the thread count is a multiple of the chunks per row
// (kFixedColumn: every head dim but 96, whose 12 chunks do not divide 128
// threads), every thread keeps one chunk column and steps down the rows by a
// fixed count; its first chunk's offset (thread_offset) is folded once into
// the caller's base pointer, so the key-tile loop carries a single 64-bit
// pointer per tensor instead of hoisted per-chunk offsets.  Only then is
// there a load_full: at hdim 96 the hoisted per-chunk offsets of unchecked
// copies would make bsfa_fwd spill, so it takes load() for every tile.
template <class TR>
struct TileCopy {
    static constexpr int kCpr = TR::kChunksPerRow;
    static constexpr int kNT = TR::kNThreads;
    static constexpr bool kFixedColumn = kNT % kCpr == 0;
    static constexpr int kRowStep = kNT / kCpr;

    // Element offset of this thread's first chunk inside any tile.
    __device__ __forceinline__ static long long thread_offset(int tid, long long row_stride) {
        if constexpr (kFixedColumn) {
            return (tid / kCpr) * row_stride + (tid % kCpr) * TR::kChunkElems;
        } else {
            return 0;
        }
    }

    // Copies a ROWS x D tile to shared memory at dst.  src = tile's row 0 +
    // thread_offset(); rows >= rows_valid are zero-filled (src-size 0, with
    // `safe`, any valid global address, as the unread source).
    template <int ROWS>
    __device__ __forceinline__ static void load(unsigned dst, const unsigned short* src, long long row_stride,
                                                int rows_valid, int tid, const void* safe) {
        if constexpr (kFixedColumn) {
            static_assert(ROWS % kRowStep == 0, "tile rows must be a multiple of the rows covered per pass");
            const int r0 = tid / kCpr;
            const unsigned d = dst + r0 * TR::kRowBytes + (tid % kCpr) * 16;
#pragma unroll
            for (int i = 0; i < ROWS / kRowStep; ++i) {
                const bool ok = r0 + i * kRowStep < rows_valid;
                const unsigned short* p = src + (long long)(i * kRowStep) * row_stride;
                cp_async_16(d + i * kRowStep * TR::kRowBytes, ok ? (const void*)p : safe, ok ? 16u : 0u);
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
                    cp_async_16(dst + r * TR::kRowBytes + cc * 16, ok ? (const void*)p : safe, ok ? 16u : 0u);
                }
            }
        }
    }
    // load() for a tile known to lie entirely inside the tensor (every row
    // valid): no per-row predicate, select or src-size, the row pointer just
    // steps by kRowStep rows (the ragged last tile takes load()).
    template <int ROWS>
    __device__ __forceinline__ static void load_full(unsigned dst, const unsigned short* src, long long row_stride,
                                                     int tid) {
        static_assert(kFixedColumn, "unchecked copies need a fixed chunk column per thread");
        static_assert(ROWS % kRowStep == 0, "tile rows must be a multiple of the rows covered per pass");
        const unsigned d = dst + (tid / kCpr) * TR::kRowBytes + (tid % kCpr) * 16;
        const long long step = (long long)kRowStep * row_stride;
#pragma unroll
        for (int i = 0; i < ROWS / kRowStep; ++i) {
            cp_async_16_full(d + i * kRowStep * TR::kRowBytes, src);
            src += step;
        }
    }
};

}  // namespace bsfa
