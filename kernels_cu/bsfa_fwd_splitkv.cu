// Split-KV forward for few query rows against long K/V (decode, chunked
// prefill): bsfa_fwd_split64 / bsfa_fwd_split128 (64 or 128 packed rows per
// CTA, bsfa_kernel_splitkv.cuh) and bsfa_fwd_split16 (16 packed rows, the 4
// warps splitting each key tile, bsfa_kernel_split16.cuh) write per-split
// partials, merged into out and lse by bsfa_combine (64 / 128 rows) or by the
// last split16 CTA of each row group (bsfa_combine.cuh says why).  mma.sync,
// any GPU from sm_80 on: the kernel is memory bound, Hopper's wgmma would
// not help.
//
// Specialisation macros (the launcher's compile key, as bsfa_fwd_sm80.cu):
//   BSFA_DTYPE 0 = float16, 1 = bfloat16; BSFA_HEAD_DIM 64 or 128;
//   BSFA_CAUSAL 0/1 (bottom-right).
//
// Launch (bsfa_cupy/_splitkv.py): one bsfa::Params with o_part, lse_part,
// split_done (zeroed int32, one per grid (y, z)), num_splits and pack_heads
// set; grid (num_splits, nQ * Hkv * ceil(G / pack_heads), B) for the split
// kernels, then for 64 / 128 rows (ceil(B*Hq*Nq / BSFA_COMBINE_WARPS)) for
// bsfa_combine.  Alignment as bsfa_fwd_sm80.cu.

#if !defined(BSFA_DTYPE) || (BSFA_DTYPE != 0 && BSFA_DTYPE != 1)
#error "BSFA_DTYPE must be 0 (float16) or 1 (bfloat16)"
#endif
#if !defined(BSFA_HEAD_DIM) || (BSFA_HEAD_DIM != 64 && BSFA_HEAD_DIM != 128)
#error "BSFA_HEAD_DIM must be 64 or 128 for the split-KV kernel"
#endif
#if !defined(BSFA_CAUSAL) || (BSFA_CAUSAL != 0 && BSFA_CAUSAL != 1)
#error "BSFA_CAUSAL must be 0 or 1"
#endif

#include "bsfa_combine.cuh"
#include "bsfa_kernel_split16.cuh"
#include "bsfa_kernel_splitkv.cuh"
#include "bsfa_params.cuh"
#include "bsfa_traits_splitkv.cuh"

constexpr bool kBf16 = BSFA_DTYPE == 1;
constexpr bool kCausal = BSFA_CAUSAL != 0;
using TR16 = bsfa::TraitsSplitKv<BSFA_HEAD_DIM, kBf16, 16>;
using TR64 = bsfa::TraitsSplitKv<BSFA_HEAD_DIM, kBf16, 64>;
using TR128 = bsfa::TraitsSplitKv<BSFA_HEAD_DIM, kBf16, 128>;

// Read by the launcher through the module's globals.
extern "C" __constant__ int BSFA_SPLIT16_THREADS = TR16::kNThreads;
extern "C" __constant__ int BSFA_SPLIT16_SMEM_BYTES = TR16::kFwdSmemBytes;
extern "C" __constant__ int BSFA_SPLIT64_THREADS = TR64::kNThreads;
extern "C" __constant__ int BSFA_SPLIT64_SMEM_BYTES = TR64::kFwdSmemBytes;
extern "C" __constant__ int BSFA_SPLIT128_THREADS = TR128::kNThreads;
extern "C" __constant__ int BSFA_SPLIT128_SMEM_BYTES = TR128::kFwdSmemBytes;
extern "C" __constant__ int BSFA_COMBINE_WARPS = bsfa::kCombineWarps;
extern "C" __constant__ int BSFA_BLOCK_M = bsfa::TileShape::kBlockM;
extern "C" __constant__ int BSFA_BLOCK_N = bsfa::TileShape::kBlockN;

// Up to two 16-row or 64-row CTAs per SM, one 128-row CTA (how many a call fills: bsfa_cupy/_splitkv.py, CTAS_PER_SM).
extern "C" __global__ void __launch_bounds__(TR16::kNThreads, 2)
    bsfa_fwd_split16(const __grid_constant__ bsfa::Params p) {
    bsfa::fwd_split16_kernel<TR16, kCausal>(p);
}

extern "C" __global__ void __launch_bounds__(TR64::kNThreads, 2)
    bsfa_fwd_split64(const __grid_constant__ bsfa::Params p) {
    bsfa::fwd_splitkv_kernel<TR64, kCausal>(p);
}

extern "C" __global__ void __launch_bounds__(TR128::kNThreads, 1)
    bsfa_fwd_split128(const __grid_constant__ bsfa::Params p) {
    bsfa::fwd_splitkv_kernel<TR128, kCausal>(p);
}

extern "C" __global__ void __launch_bounds__(bsfa::kCombineWarps * 32)
    bsfa_combine(const __grid_constant__ bsfa::Params p) {
    bsfa::combine_kernel<BSFA_HEAD_DIM, kBf16>(p);
}
