// Block-Sparse FlashAttention forward (bsfa_fwd; bsfa_fwd_varlen for packed
// variable-length batches) and the tile-max kernel
// (bsfa_block_max) for Hopper (sm_90a): warpgroup MMA.  Same contract,
// arguments and results as the mma.sync kernels of bsfa_fwd_sm80.cu (the
// launcher picks these on compute capability 9.0 for head dims 64 and 128);
// the gate, masking and tile bookkeeping are the shared headers', so both
// paths keep and skip the same tiles.  The kernel bodies are in
// bsfa_kernel_sm90.cuh.
//
// Specialisation macros: BSFA_DTYPE (0 float16, 1 bfloat16), BSFA_HEAD_DIM
// (64 or 128), BSFA_CAUSAL (0/1, bottom-right aligned).
//
// Launch: grid (w, nQ, B*Hq/w) (bsfa_scheduler.cuh, BSFA_GRID 1), one
// argument, a bsfa::Params; alignment as for the mma.sync kernels.
// bsfa_fwd_varlen takes B = num_seqs and nQ of the longest sequence.

#if !defined(BSFA_DTYPE) || (BSFA_DTYPE != 0 && BSFA_DTYPE != 1)
#error "BSFA_DTYPE must be 0 (float16) or 1 (bfloat16)"
#endif
#if !defined(BSFA_HEAD_DIM) || (BSFA_HEAD_DIM != 64 && BSFA_HEAD_DIM != 128)
#error "BSFA_HEAD_DIM must be 64 or 128 for the sm_90a kernels"
#endif
#if !defined(BSFA_CAUSAL) || (BSFA_CAUSAL != 0 && BSFA_CAUSAL != 1)
#error "BSFA_CAUSAL must be 0 or 1"
#endif

#include "bsfa_args.cuh"
#include "bsfa_kernel_sm90.cuh"
#include "bsfa_params.cuh"
#include "bsfa_scheduler.cuh"
#include "bsfa_traits_sm90.cuh"

using TR = bsfa::TraitsSm90<BSFA_HEAD_DIM, BSFA_DTYPE == 1>;
constexpr bool kCausal = BSFA_CAUSAL != 0;

// Read by the launcher through the module's globals.
extern "C" __constant__ int BSFA_FWD_THREADS = TR::kNThreads;
extern "C" __constant__ int BSFA_FWD_SMEM_BYTES = TR::kSmemBytes;
extern "C" __constant__ int BSFA_BLOCK_MAX_THREADS = TR::kNThreads;
extern "C" __constant__ int BSFA_BLOCK_MAX_SMEM_BYTES = TR::kBlockMaxSmemBytes;
extern "C" __constant__ int BSFA_BLOCK_M = bsfa::TileShape::kBlockM;
extern "C" __constant__ int BSFA_BLOCK_N = bsfa::TileShape::kBlockN;
extern "C" __constant__ int BSFA_GRID = bsfa::kGridChunked;
// No tensor maps (the TMA kernel's launch takes them after the Params); a packed-batch entry.
extern "C" __constant__ int BSFA_FWD_TMA = 0;
extern "C" __constant__ int BSFA_BLOCK_MAX_TMA = 0;
extern "C" __constant__ int BSFA_FWD_VARLEN = 1;

extern "C" __global__ void __launch_bounds__(TR::kNThreads, 2) bsfa_fwd(const __grid_constant__ bsfa::Params p) {
    bsfa::fwd_kernel_sm90<TR, kCausal, false>(p, bsfa::fwd_args<false>(p));
}

// A packed batch (bsfa_problem.cuh): grid (w, max nQ, num_seqs*Hq/w).
extern "C" __global__ void __launch_bounds__(TR::kNThreads, 2)
    bsfa_fwd_varlen(const __grid_constant__ bsfa::Params p) {
    bsfa::fwd_kernel_sm90<TR, kCausal, true>(p, bsfa::fwd_args<false>(p));
}

extern "C" __global__ void __launch_bounds__(TR::kNThreads, 2)
    bsfa_block_max(const __grid_constant__ bsfa::Params p) {
    bsfa::block_max_kernel_sm90<TR, kCausal>(p);
}
