// Global -> shared tile copies of the sm_90a kernels: cp.async into the
// 128-byte swizzled panels that the wgmma descriptors read, and the prologue
// copies both kernels start with.
//
// Includes what it needs; TR is a TraitsSm90.
#pragma once

#include "bsfa_ptx.cuh"
#include "bsfa_wgmma_sm90.cuh"

namespace bsfa {

// The 1024-byte-aligned start of the dynamic shared memory (the swizzle atom).
__device__ __forceinline__ unsigned aligned_smem_base() {
    return (dyn_smem_base() + kSwizzleAtomBytes - 1) & ~(unsigned)(kSwizzleAtomBytes - 1);
}

// Async copy of a ROWS x D tile into swizzled panels at dst.  src = the
// tile's row 0 in global memory; rows >= rows_valid are zero-filled.  A
// thread keeps one 16-byte chunk column and steps down the rows by a
// multiple of 8, so its swizzled chunk position never changes.
template <class TR, int ROWS>
__device__ __forceinline__ void load_tile(unsigned dst, const unsigned short* src, long long row_stride,
                                          int rows_valid, int tid, const void* safe) {
    constexpr int kCpr = TR::kHeadDim / TR::kChunkElems;
    constexpr int kRowStep = TR::kNThreads / kCpr;
    static_assert(kRowStep % kSwizzleRows == 0 && ROWS % kRowStep == 0, "copy rows must keep the swizzle phase");
    const int r0 = tid / kCpr;
    const int cc = tid % kCpr;
    const unsigned d = dst + (cc / TR::kChunksPerPanelRow) * (ROWS * kSwizzleBytes) +
                       swizzled(r0, cc % TR::kChunksPerPanelRow);
    const unsigned short* s = src + r0 * row_stride + cc * TR::kChunkElems;
#pragma unroll
    for (int i = 0; i < ROWS / kRowStep; ++i) {
        const bool ok = r0 + i * kRowStep < rows_valid;
        cp_async_16(d + i * kRowStep * kSwizzleBytes,
                    ok ? (const void*)(s + (long long)i * kRowStep * row_stride) : safe, ok ? 16u : 0u);
    }
}

// The first cp.async groups of both kernels: [Q + K c_end], [K c_end-1]
// (empty when c_end = 0); load_k(c, slot) copies key tile c into ring slot.
template <class TR, class LoadK>
__device__ __forceinline__ void load_q_and_first_keys(unsigned sQ, const unsigned short* q_tile, long long q_sn,
                                                      int q_rows, int tid, const void* q_safe, int c_end,
                                                      LoadK&& load_k) {
    load_tile<TR, TR::kBlockM>(sQ, q_tile, q_sn, q_rows, tid, q_safe);
    load_k(c_end, c_end % TR::kKStages);
    cp_async_commit();
    if (c_end > 0) load_k(c_end - 1, (c_end - 1) % TR::kKStages);
    cp_async_commit();
}

}  // namespace bsfa
