// Compile-time shape of the split-KV kernel (bsfa_fwd_splitkv.cu): the
// mma.sync geometry of TraitsSm80 with one m16 row block per warp, and
// kRows packed rows per CTA.  A packed row is a (query head of the GQA group,
// query row) pair, so a decode step with one query row and a group of 4 heads
// fills 4 rows instead of wasting a 128-row tile: the kernel stays memory
// bound at Nq = 1 where a 128-row tile would be tensor-core bound.
//
// Includes what it needs.
#pragma once

#include "bsfa_traits.cuh"

namespace bsfa {

template <int kHeadDim_, bool kBf16_, int kRows_>
struct TraitsSplitKv : TileShape {
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr bool kBf16 = kBf16_;
    // Packed rows per CTA (64 or 128); a head's rows of one reference query
    // tile never straddle two CTAs, so each CTA sees a head's whole tile max.
    static constexpr int kRows = kRows_;

    static constexpr int kMmaM = 16;
    static constexpr int kMmaN = 8;
    static constexpr int kMmaK = 16;

    // 16 rows per warp: the O accumulator is D/2 registers, so Q stays in
    // registers at every head dim and nothing is re-read from shared memory
    // but K and V.
    static constexpr int kWarpMBlocks = 1;
    static constexpr int kWarpRows = kMmaM;
    static constexpr int kNWarps = kRows / kWarpRows;
    static constexpr int kNThreads = kNWarps * 32;
    static constexpr bool kQInRegs = true;

    static constexpr int kKStages = 3;
    static constexpr int kVStages = 2;

    static constexpr int kElemBytes = 2;
    static constexpr int kChunkElems = 16 / kElemBytes;
    static constexpr int kChunksPerRow = kHeadDim / kChunkElems;
    static constexpr int kSmemStride = kHeadDim + kChunkElems;  // +16 bytes per row: see TraitsSm80
    static constexpr int kRowBytes = kSmemStride * kElemBytes;
    static constexpr int kQTileBytes = kRows * kRowBytes;
    static constexpr int kKVTileBytes = kBlockN * kRowBytes;

    static constexpr int kDSteps = kHeadDim / kMmaK;
    static constexpr int kKeySteps = kBlockN / kMmaK;
    static constexpr int kSNBlocks = kBlockN / kMmaN;
    static constexpr int kONBlocks = kHeadDim / kMmaN;
    static constexpr int kQFragRegs = kWarpMBlocks * kDSteps * 4;

    // Q, the K ring, two V buffers (V of forced tiles is prefetched one tile
    // ahead: bsfa_kernel_splitkv.cuh), and the per-warp head votes of the
    // gate (two slots, by key-tile parity, so one barrier per gated tile).
    static constexpr int kSmemQ = 0;
    static constexpr int kSmemK = kSmemQ + kQTileBytes;
    static constexpr int kSmemV = kSmemK + kKStages * kKVTileBytes;
    static constexpr int kSmemVote = kSmemV + kVStages * kKVTileBytes;
    static constexpr int kFwdSmemBytes = kSmemVote + 2 * kNWarps * 4;

    static_assert(kRows % kWarpRows == 0, "warps must tile the packed rows");
    static_assert(kHeadDim % kMmaK == 0, "head dim must be a multiple of 16");
    static_assert(kKeySteps % 2 == 0, "the P V loop runs key steps in pairs");
    static_assert(kNThreads % kChunksPerRow == 0, "fixed copy column per thread (TileCopy::load_full)");
};

}  // namespace bsfa
