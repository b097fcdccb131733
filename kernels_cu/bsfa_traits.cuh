// The BSFA tile shape and the small constants and integer functions shared by
// every kernel.  The per-architecture traits (bsfa_traits_sm80.cuh,
// bsfa_traits_sm90.cuh) derive from TileShape; the .cu files export its two
// numbers (BSFA_BLOCK_M, BSFA_BLOCK_N) so that the host checks its own copy
// against them instead of trusting a second definition.
//
// Self-contained; included by both arch traits headers.
#pragma once

namespace bsfa {

// Query rows x keys of one tile.  Part of the BSFA semantics, not a tuning
// knob: keep, tile_max and the thresholds are all per tile.
struct TileShape {
    static constexpr int kBlockM = 128;
    static constexpr int kBlockN = 64;
};

constexpr float kLog2e = 1.4426950408889634f;  // exp(x) = 2^(x * log2 e)
constexpr float kLn2 = 0.6931471805599453f;    // ln(x) = log2(x) * ln 2

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace bsfa
