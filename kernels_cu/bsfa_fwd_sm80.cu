// Block-Sparse FlashAttention forward (bsfa_fwd; bsfa_fwd_varlen for packed
// variable-length batches) and the tile-max kernel
// (bsfa_block_max), FlashAttention-2 style on mma.sync tensor cores: any GPU
// from sm_80 on, Hopper included (the launcher's fallback there for head dims
// 32 and 96).  The kernel bodies are in bsfa_kernel_sm80.cuh.
//
// Specialisation macros (the launcher's compile key):
//   BSFA_DTYPE      0 = float16, 1 = bfloat16
//   BSFA_HEAD_DIM   32, 64, 96 or 128
//   BSFA_CAUSAL     0/1, causal mask aligned bottom-right
// The schedule is fixed: the fastest measured (bench/NOTES.md, v3-v4; the
// git history has the variants it was measured against).
//
// Launch: grid (nQ, Hq, B) (bsfa_scheduler.cuh, BSFA_GRID 0), one argument,
// a bsfa::Params; bsfa_fwd_varlen (a packed batch) takes B = num_seqs and nQ
// of the longest sequence (bsfa_problem.cuh).  q, k, v and out must be 16-byte aligned with every
// batch/seq/head stride a multiple of 8 elements (cp.async and the 16-byte
// output stores rely on it); softmax_scale must be > 0 (max(s) * scale is
// used as the max of scaled s).

#if !defined(BSFA_DTYPE) || (BSFA_DTYPE != 0 && BSFA_DTYPE != 1)
#error "BSFA_DTYPE must be 0 (float16) or 1 (bfloat16)"
#endif
#if !defined(BSFA_HEAD_DIM) || \
    (BSFA_HEAD_DIM != 32 && BSFA_HEAD_DIM != 64 && BSFA_HEAD_DIM != 96 && BSFA_HEAD_DIM != 128)
#error "BSFA_HEAD_DIM must be 32, 64, 96 or 128 for the mma.sync kernels"
#endif
#if !defined(BSFA_CAUSAL) || (BSFA_CAUSAL != 0 && BSFA_CAUSAL != 1)
#error "BSFA_CAUSAL must be 0 or 1"
#endif

#include "bsfa_kernel_sm80.cuh"
#include "bsfa_params.cuh"
#include "bsfa_scheduler.cuh"
#include "bsfa_traits_sm80.cuh"

using TR = bsfa::TraitsSm80<BSFA_HEAD_DIM, BSFA_DTYPE == 1>;
constexpr bool kCausal = BSFA_CAUSAL != 0;

// Read by the launcher through the module's globals.
extern "C" __constant__ int BSFA_FWD_THREADS = TR::kNThreads;
extern "C" __constant__ int BSFA_FWD_SMEM_BYTES = TR::kFwdSmemBytes;
extern "C" __constant__ int BSFA_BLOCK_MAX_THREADS = TR::kNThreads;
extern "C" __constant__ int BSFA_BLOCK_MAX_SMEM_BYTES = TR::kBlockMaxSmemBytes;
extern "C" __constant__ int BSFA_BLOCK_M = bsfa::TileShape::kBlockM;
extern "C" __constant__ int BSFA_BLOCK_N = bsfa::TileShape::kBlockN;
extern "C" __constant__ int BSFA_GRID = bsfa::kGridPerHead;
// No tensor maps (the TMA kernel's launch takes them after the Params); a packed-batch entry.
extern "C" __constant__ int BSFA_FWD_TMA = 0;
extern "C" __constant__ int BSFA_BLOCK_MAX_TMA = 0;
extern "C" __constant__ int BSFA_FWD_VARLEN = 1;

extern "C" __global__ void __launch_bounds__(TR::kNThreads, 1) bsfa_fwd(const __grid_constant__ bsfa::Params p) {
    bsfa::fwd_kernel_sm80<TR, kCausal, false>(bsfa::fwd_args<true>(p));
}

// A packed batch (bsfa_problem.cuh): grid (max nQ, Hq, num_seqs).
extern "C" __global__ void __launch_bounds__(TR::kNThreads, 1)
    bsfa_fwd_varlen(const __grid_constant__ bsfa::Params p) {
    bsfa::fwd_kernel_sm80<TR, kCausal, true>(bsfa::fwd_args<true>(p));
}

extern "C" __global__ void __launch_bounds__(TR::kNThreads, 1)
    bsfa_block_max(const __grid_constant__ bsfa::Params p) {
    bsfa::block_max_kernel_sm80<TR, kCausal>(p);
}
