// Block-Sparse FlashAttention forward for Hopper (sm_90a), warp-specialised
// the FlashAttention-3 way: a TMA producer warpgroup, two consumer
// warpgroups of 64 query rows, 128-key blocks whose two 64-key halves keep
// their own BSFA decision, a persistent grid.  Same contract, arguments and
// results as the other bsfa_fwd kernels; the gate, masking and tile
// bookkeeping are the shared headers'.  bsfa_block_max runs the same S path
// on the same machinery (bsfa_block_max_sm90ws.cuh).
//
// Specialisation macros: BSFA_DTYPE (0 float16, 1 bfloat16), BSFA_HEAD_DIM
// (64 or 128), BSFA_CAUSAL (0/1, bottom-right aligned).
//
// Launch: bsfa_fwd takes the Params and three tensor maps (q, k, v: 4-D
// (D, N, H, B), 64 x 128 boxes, 128-byte swizzle; bsfa_cupy/_tma.py),
// bsfa_block_max the Params and two (q, k); both on the grid
// (min(SMs, tiles), 1, 1) (BSFA_GRID 2).  bsfa_fwd_varlen, a packed batch
// (bsfa_problem.cuh), takes what bsfa_fwd takes, with B = num_seqs, the tiles
// of the longest sequence, and maps of the packed (total, H, D) tensors as
// one batch element ((D, total, H, 1)).  bsfa_fwd_split, split-KV for query
// tiles too few to fill the GPU (bsfa_cupy/_splitkv.py routes them), takes
// what bsfa_fwd takes plus Params.num_splits, o_part and lse_part, on the grid
// (min(SMs, tiles * num_splits), 1, 1), and leaves fp32 partials that
// bsfa_combine (bsfa_combine.cuh; grid ceil(B*Hq*Nq / BSFA_COMBINE_WARPS),
// 32 * BSFA_COMBINE_WARPS threads) merges into out and lse.
// bsfa_fwd_split_pack, the same for Nq <= 64 and an even GQA group: two
// query heads a tile (TraitsSm90WsPack), a q map of BSFA_FWD_SPLIT_PACK_Q_BOX
// rows a box, the work list over head pairs.  bsfa_fwd_dense,
// bsfa_fwd_split_dense and bsfa_fwd_split_pack_dense are bsfa_fwd,
// bsfa_fwd_split and bsfa_fwd_split_pack for dense calls (thr_mode 0),
// compiled without the gate: the same arguments and results.
// bsfa_fwd_mc, bsfa_fwd_dense_mc and bsfa_block_max_mc (head dim 128, an
// even GQA group; BSFA_FWD_MC = 2): the same as bsfa_fwd, bsfa_fwd_dense and
// bsfa_block_max, two CTAs a cluster sharing K and V loads, on a grid of
// 2 * min(SMs / 2, tiles / 2).  bsfa_fwd_dense_pair (head dim 128, any GQA
// group): bsfa_fwd_dense on clusters of two neighbouring query tiles of one
// head, on a grid of 2 * min(SMs / 2, ceil(nQ / 2) * B * Hq).
// bsfa_fwd_lag (BSFA_FWD_LAG = 1): bsfa_fwd with S a block ahead of the
// gate exchange, the same arguments and results, launched with
// BSFA_FWD_LAG_THREADS threads and BSFA_FWD_LAG_SMEM_BYTES of shared memory
// (P's tile besides, at head dim 128); the entry of unsplit calls with
// thresholds (bsfa_fwd stays for tests and A/B runs: it is slower).
// bsfa_fwd_split_lag: bsfa_fwd_split the same way, launched as bsfa_fwd_lag,
// for calls without keep.
// bsfa_fwd_dense_wide (head dim 64; BSFA_FWD_WIDE_THREADS != 0):
// bsfa_fwd_dense on 192-row query tiles, three consumer warpgroups
// (TraitsSm90WsWide), BSFA_FWD_WIDE_THREADS threads and
// BSFA_FWD_WIDE_SMEM_BYTES of shared memory, a q map of BSFA_FWD_WIDE_Q_BOX
// rows a box (k and v as bsfa_fwd's); for dense calls without keep only.

#if !defined(BSFA_DTYPE) || (BSFA_DTYPE != 0 && BSFA_DTYPE != 1)
#error "BSFA_DTYPE must be 0 (float16) or 1 (bfloat16)"
#endif
#if !defined(BSFA_HEAD_DIM) || (BSFA_HEAD_DIM != 64 && BSFA_HEAD_DIM != 128)
#error "BSFA_HEAD_DIM must be 64 or 128 for the sm_90a kernels"
#endif
#if !defined(BSFA_CAUSAL) || (BSFA_CAUSAL != 0 && BSFA_CAUSAL != 1)
#error "BSFA_CAUSAL must be 0 or 1"
#endif

#include "bsfa_combine.cuh"
#include "bsfa_kernel_sm90ws.cuh"
#include "bsfa_params.cuh"
#include "bsfa_pipeline_sm90.cuh"
#include "bsfa_scheduler.cuh"
#include "bsfa_traits_sm90ws.cuh"

using TR = bsfa::TraitsSm90Ws<BSFA_HEAD_DIM, BSFA_DTYPE == 1>;
using TRPack = bsfa::TraitsSm90WsPack<BSFA_HEAD_DIM, BSFA_DTYPE == 1>;
// The cluster entries need an even number of 64-column panels (D = 128).
constexpr bool kHasMc = BSFA_HEAD_DIM % 128 == 0;
static_assert(TR::kBlockM == TR::kBlockKeys, "one box height serves the Q tile and the key blocks");
constexpr bool kCausal = BSFA_CAUSAL != 0;

// Read by the launcher through the module's globals.
extern "C" __constant__ int BSFA_FWD_THREADS = TR::kNThreads;
extern "C" __constant__ int BSFA_FWD_SMEM_BYTES = TR::kSmemBytes;
// Rows of the tensor maps' boxes (Q tile and key block alike); non-zero: bsfa_fwd takes them.
extern "C" __constant__ int BSFA_FWD_TMA = TR::kBlockM;
// A packed-batch entry (bsfa_fwd_varlen), launched as bsfa_fwd (threads, smem, maps).
extern "C" __constant__ int BSFA_FWD_VARLEN = 1;
extern "C" __constant__ int BSFA_BLOCK_MAX_THREADS = TR::kNThreads;
extern "C" __constant__ int BSFA_BLOCK_MAX_SMEM_BYTES = TR::kSmemBytes;
extern "C" __constant__ int BSFA_BLOCK_MAX_TMA = TR::kBlockM;
extern "C" __constant__ int BSFA_BLOCK_M = bsfa::TileShape::kBlockM;
extern "C" __constant__ int BSFA_BLOCK_N = bsfa::TileShape::kBlockN;
extern "C" __constant__ int BSFA_GRID = bsfa::kGridPersistent;
extern "C" __constant__ int BSFA_COMBINE_WARPS = bsfa::kCombineWarps;
extern "C" __constant__ int BSFA_FWD_SPLIT_PACK_Q_BOX = TRPack::kWgmmaM;
// CTAs per cluster of the cluster entries (bsfa_fwd_mc, bsfa_fwd_dense_mc,
// bsfa_block_max_mc), 0 where the module has none; launched as bsfa_fwd and
// bsfa_block_max, on a grid of whole clusters.
extern "C" __constant__ int BSFA_FWD_MC = kHasMc ? 2 : 0;

// The 192-row dense entry (bsfa_fwd_dense_wide), head dim 64 only; zeros
// where the module has none.
#if BSFA_HEAD_DIM == 64
using TRWide = bsfa::TraitsSm90WsWide<BSFA_HEAD_DIM, BSFA_DTYPE == 1>;
static_assert(TRWide::kBlockKeys == TR::kBlockKeys, "the k and v maps are bsfa_fwd's");
extern "C" __constant__ int BSFA_FWD_WIDE_THREADS = TRWide::kNThreads;
extern "C" __constant__ int BSFA_FWD_WIDE_SMEM_BYTES = TRWide::kSmemBytes;
extern "C" __constant__ int BSFA_FWD_WIDE_Q_BOX = TRWide::kBlockM;

extern "C" __global__ void __launch_bounds__(TRWide::kNThreads, 1)
    bsfa_fwd_dense_wide(const __grid_constant__ bsfa::Params p, const __grid_constant__ bsfa::TmaDesc tq,
                        const __grid_constant__ bsfa::TmaDesc tk, const __grid_constant__ bsfa::TmaDesc tv) {
    bsfa::kernel_sm90ws<TRWide, kCausal, true, false, false, false>(p, tq, tk, tv);
}
#else
extern "C" __constant__ int BSFA_FWD_WIDE_THREADS = 0;
extern "C" __constant__ int BSFA_FWD_WIDE_SMEM_BYTES = 0;
extern "C" __constant__ int BSFA_FWD_WIDE_Q_BOX = 0;
#endif

extern "C" __global__ void __launch_bounds__(TR::kNThreads, 1)
    bsfa_fwd(const __grid_constant__ bsfa::Params p, const __grid_constant__ bsfa::TmaDesc tq,
             const __grid_constant__ bsfa::TmaDesc tk, const __grid_constant__ bsfa::TmaDesc tv) {
    bsfa::kernel_sm90ws<TR, kCausal, true>(p, tq, tk, tv);
}

// bsfa_fwd for dense calls (thr_mode 0), without the gate's code: same arguments.
extern "C" __global__ void __launch_bounds__(TR::kNThreads, 1)
    bsfa_fwd_dense(const __grid_constant__ bsfa::Params p, const __grid_constant__ bsfa::TmaDesc tq,
                   const __grid_constant__ bsfa::TmaDesc tk, const __grid_constant__ bsfa::TmaDesc tv) {
    bsfa::kernel_sm90ws<TR, kCausal, true, false, false, false>(p, tq, tk, tv);
}

extern "C" __global__ void __launch_bounds__(TR::kNThreads, 1)
    bsfa_fwd_varlen(const __grid_constant__ bsfa::Params p, const __grid_constant__ bsfa::TmaDesc tq,
                    const __grid_constant__ bsfa::TmaDesc tk, const __grid_constant__ bsfa::TmaDesc tv) {
    bsfa::kernel_sm90ws<TR, kCausal, true, true>(p, tq, tk, tv);
}

extern "C" __global__ void __launch_bounds__(TR::kNThreads, 1)
    bsfa_fwd_split(const __grid_constant__ bsfa::Params p, const __grid_constant__ bsfa::TmaDesc tq,
                   const __grid_constant__ bsfa::TmaDesc tk, const __grid_constant__ bsfa::TmaDesc tv) {
    bsfa::kernel_sm90ws<TR, kCausal, true, false, true>(p, tq, tk, tv);
}

extern "C" __global__ void __launch_bounds__(TR::kNThreads, 1)
    bsfa_fwd_split_pack(const __grid_constant__ bsfa::Params p, const __grid_constant__ bsfa::TmaDesc tq,
                        const __grid_constant__ bsfa::TmaDesc tk, const __grid_constant__ bsfa::TmaDesc tv) {
    bsfa::kernel_sm90ws<TRPack, kCausal, true, false, true>(p, tq, tk, tv);
}

// The split entries for dense calls (thr_mode 0), without the gate's code: same arguments.
extern "C" __global__ void __launch_bounds__(TR::kNThreads, 1)
    bsfa_fwd_split_dense(const __grid_constant__ bsfa::Params p, const __grid_constant__ bsfa::TmaDesc tq,
                         const __grid_constant__ bsfa::TmaDesc tk, const __grid_constant__ bsfa::TmaDesc tv) {
    bsfa::kernel_sm90ws<TR, kCausal, true, false, true, false>(p, tq, tk, tv);
}

extern "C" __global__ void __launch_bounds__(TR::kNThreads, 1)
    bsfa_fwd_split_pack_dense(const __grid_constant__ bsfa::Params p, const __grid_constant__ bsfa::TmaDesc tq,
                              const __grid_constant__ bsfa::TmaDesc tk, const __grid_constant__ bsfa::TmaDesc tv) {
    bsfa::kernel_sm90ws<TRPack, kCausal, true, false, true, false>(p, tq, tk, tv);
}

extern "C" __global__ void __launch_bounds__(32 * bsfa::kCombineWarps)
    bsfa_combine(const __grid_constant__ bsfa::Params p) {
    bsfa::combine_kernel<BSFA_HEAD_DIM, BSFA_DTYPE == 1>(p);
}

// Each consumer warpgroup's rows of Q in registers (TraitsSm90WsQRegs).
using TRQRegs = bsfa::TraitsSm90WsQRegs<BSFA_HEAD_DIM, BSFA_DTYPE == 1>;

extern "C" __global__ void __launch_bounds__(TR::kNThreads, 1)
    bsfa_block_max(const __grid_constant__ bsfa::Params p, const __grid_constant__ bsfa::TmaDesc tq,
                   const __grid_constant__ bsfa::TmaDesc tk) {
    bsfa::kernel_sm90ws<TRQRegs, kCausal, false>(p, tq, tk, tk);
}

// bsfa_block_max on 256-row query tiles (TraitsSm90WsBlockMaxWide): the same
// arguments and results, BSFA_BLOCK_MAX_WIDE_SMEM_BYTES of shared memory, a q
// map of BSFA_BLOCK_MAX_WIDE_Q_BOX rows a box; the entry block_max_scores
// takes (bsfa_block_max stays for tests and A/B runs: it is slower).
using TRBmWide = bsfa::TraitsSm90WsBlockMaxWide<BSFA_HEAD_DIM, BSFA_DTYPE == 1>;
extern "C" __constant__ int BSFA_BLOCK_MAX_WIDE_THREADS = TRBmWide::kNThreads;
extern "C" __constant__ int BSFA_BLOCK_MAX_WIDE_SMEM_BYTES = TRBmWide::kSmemBytes;
extern "C" __constant__ int BSFA_BLOCK_MAX_WIDE_Q_BOX = TRBmWide::kBlockM;

extern "C" __global__ void __launch_bounds__(TR::kNThreads, 1)
    bsfa_block_max_wide(const __grid_constant__ bsfa::Params p, const __grid_constant__ bsfa::TmaDesc tq,
                        const __grid_constant__ bsfa::TmaDesc tk) {
    bsfa::kernel_sm90ws<TRBmWide, kCausal, false>(p, tq, tk, tk);
}

// bsfa_fwd with S a block ahead of the gate exchange (TraitsSm90WsLag): the
// same arguments and results.
extern "C" __constant__ int BSFA_FWD_LAG = 1;
using TRLag = bsfa::TraitsSm90WsLag<BSFA_HEAD_DIM, BSFA_DTYPE == 1>;
extern "C" __constant__ int BSFA_FWD_LAG_THREADS = TRLag::kNThreads;
extern "C" __constant__ int BSFA_FWD_LAG_SMEM_BYTES = TRLag::kSmemBytes;

extern "C" __global__ void __launch_bounds__(TR::kNThreads, 1)
    bsfa_fwd_lag(const __grid_constant__ bsfa::Params p, const __grid_constant__ bsfa::TmaDesc tq,
                 const __grid_constant__ bsfa::TmaDesc tk, const __grid_constant__ bsfa::TmaDesc tv) {
    bsfa::kernel_sm90ws<TRLag, kCausal, true>(p, tq, tk, tv);
}

// bsfa_fwd_split with S a block ahead of the gate exchange: the same
// arguments and partials, but Params.keep is not written; the split entry of
// gated calls without keep that take one head a 128-row tile
// (bsfa_fwd_split_pack keeps the unlagged loop: its warpgroups decide alone).
extern "C" __global__ void __launch_bounds__(TR::kNThreads, 1)
    bsfa_fwd_split_lag(const __grid_constant__ bsfa::Params p, const __grid_constant__ bsfa::TmaDesc tq,
                       const __grid_constant__ bsfa::TmaDesc tk, const __grid_constant__ bsfa::TmaDesc tv) {
    bsfa::kernel_sm90ws<TRLag, kCausal, true, false, true>(p, tq, tk, tv);
}

// Two query heads of one GQA group a CTA at the same query tile, each
// consumer warpgroup a whole 128-row BSFA tile of its own head, deciding its
// gates alone (TraitsSm90WsHeadPair): the same arguments and results as
// bsfa_fwd (out, lse and keep), Hq / Hkv even; BSFA_FWD_HEADPAIR_THREADS
// threads, BSFA_FWD_HEADPAIR_SMEM_BYTES of shared memory, a q map of
// BSFA_FWD_HEADPAIR_Q_BOX rows a box and k and v maps of
// BSFA_FWD_HEADPAIR_KV_BOX, the grid (min(SMs, B * Hq / 2 * nQ), 1, 1).
using TRHeadPair = bsfa::TraitsSm90WsHeadPair<BSFA_HEAD_DIM, BSFA_DTYPE == 1>;
extern "C" __constant__ int BSFA_FWD_HEADPAIR_THREADS = TRHeadPair::kNThreads;
extern "C" __constant__ int BSFA_FWD_HEADPAIR_SMEM_BYTES = TRHeadPair::kSmemBytes;
extern "C" __constant__ int BSFA_FWD_HEADPAIR_Q_BOX = TRHeadPair::kWgRows;
extern "C" __constant__ int BSFA_FWD_HEADPAIR_KV_BOX = TRHeadPair::kBlockKeys;

extern "C" __global__ void __launch_bounds__(TRHeadPair::kNThreads, 1)
    bsfa_fwd_headpair(const __grid_constant__ bsfa::Params p, const __grid_constant__ bsfa::TmaDesc tq,
                      const __grid_constant__ bsfa::TmaDesc tk, const __grid_constant__ bsfa::TmaDesc tv) {
    bsfa::kernel_sm90ws<TRHeadPair, kCausal, true>(p, tq, tk, tv);
}

// bsfa_fwd_headpair on key splits: the arguments and partials of
// bsfa_fwd_split, the launch of bsfa_fwd_headpair, the grid (min(SMs,
// B * Hq / 2 * nQ * num_splits), 1, 1); for chunks of more than 64 rows.
extern "C" __global__ void __launch_bounds__(TRHeadPair::kNThreads, 1)
    bsfa_fwd_split_headpair(const __grid_constant__ bsfa::Params p, const __grid_constant__ bsfa::TmaDesc tq,
                            const __grid_constant__ bsfa::TmaDesc tk, const __grid_constant__ bsfa::TmaDesc tv) {
    bsfa::kernel_sm90ws<TRHeadPair, kCausal, true, false, true>(p, tq, tk, tv);
}

#if BSFA_HEAD_DIM % 128 == 0
// Two query heads of a GQA group at the same query tile per cluster of two
// CTAs, which share every K and V load (TraitsSm90WsMc); same arguments as
// bsfa_fwd / bsfa_block_max.  Hq / Hkv must be even.
using TRMc = bsfa::TraitsSm90WsMc<BSFA_HEAD_DIM, BSFA_DTYPE == 1>;

extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(TR::kNThreads, 1)
    bsfa_fwd_mc(const __grid_constant__ bsfa::Params p, const __grid_constant__ bsfa::TmaDesc tq,
                const __grid_constant__ bsfa::TmaDesc tk, const __grid_constant__ bsfa::TmaDesc tv) {
    bsfa::kernel_sm90ws<TRMc, kCausal, true>(p, tq, tk, tv);
}

extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(TR::kNThreads, 1)
    bsfa_fwd_dense_mc(const __grid_constant__ bsfa::Params p, const __grid_constant__ bsfa::TmaDesc tq,
                      const __grid_constant__ bsfa::TmaDesc tk, const __grid_constant__ bsfa::TmaDesc tv) {
    bsfa::kernel_sm90ws<TRMc, kCausal, true, false, false, false>(p, tq, tk, tv);
}

// bsfa_fwd_dense over clusters of two CTAs that take two neighbouring query
// tiles of one head (TraitsSm90WsPair), sharing K and V loads, any GQA group;
// the list is over pairs of tiles (a grid of 2 * min(SMs / 2, ceil(nQ / 2) *
// B * Hq)).  Same arguments as bsfa_fwd.
using TRPair = bsfa::TraitsSm90WsPair<BSFA_HEAD_DIM, BSFA_DTYPE == 1>;

extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(TR::kNThreads, 1)
    bsfa_fwd_dense_pair(const __grid_constant__ bsfa::Params p, const __grid_constant__ bsfa::TmaDesc tq,
                        const __grid_constant__ bsfa::TmaDesc tk, const __grid_constant__ bsfa::TmaDesc tv) {
    bsfa::kernel_sm90ws<TRPair, kCausal, true, false, false, false>(p, tq, tk, tv);
}

extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(TR::kNThreads, 1)
    bsfa_block_max_mc(const __grid_constant__ bsfa::Params p, const __grid_constant__ bsfa::TmaDesc tq,
                      const __grid_constant__ bsfa::TmaDesc tk) {
    bsfa::kernel_sm90ws<TRMc, kCausal, false>(p, tq, tk, tk);
}
#endif
