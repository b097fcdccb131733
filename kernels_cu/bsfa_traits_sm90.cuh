// Compile-time shape of the Hopper (sm_90a) wgmma kernels: one warpgroup per
// CTA, the K ring and the shared-memory map of 128-byte swizzled panels, all
// derived from the head dim and the shared tile shape.
//
// Includes what it needs.
#pragma once

#include "bsfa_traits.cuh"
#include "bsfa_wgmma_sm90.cuh"

namespace bsfa {

template <int kHeadDim_, bool kBf16_>
struct TraitsSm90 : TileShape {
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr bool kBf16 = kBf16_;
    static constexpr int kNThreads = 128;  // one warpgroup
    static constexpr int kWgmmaM = 64;
    static constexpr int kHalves = kBlockM / kWgmmaM;

    // The fragment geometry the shared functions (mask_tile, row_max) see: a
    // thread's rows form kWarpMBlocks blocks kMmaM rows apart (one per M=64
    // half), each 16 rows x 8 n8 blocks of S like an mma.sync m16n8 tile.
    static constexpr int kWarpMBlocks = kHalves;
    static constexpr int kMmaM = kWgmmaM;
    static constexpr int kMmaN = 8;
    static constexpr int kMmaK = 16;
    static constexpr int kWarpRows = 16;  // rows of one half owned by a warp
    static constexpr int kSNBlocks = kBlockN / kMmaN;
    static constexpr int kONBlocks = kHeadDim / kMmaN;
    static constexpr int kDSteps = kHeadDim / kMmaK;   // k-steps of S = Q K^T
    static constexpr int kKeySteps = kBlockN / kMmaK;  // k-steps of O += P V

    // Shared memory: 128-byte swizzled panels of 64 columns.
    static constexpr int kElemBytes = 2;
    static constexpr int kChunkElems = 16 / kElemBytes;
    static constexpr int kPanelCols = kSwizzleBytes / kElemBytes;  // 64
    static constexpr int kPanels = kHeadDim / kPanelCols;
    static constexpr int kChunksPerPanelRow = kSwizzleBytes / 16;  // 8
    static constexpr int kStepsPerPanel = kPanelCols / kMmaK;      // QK^T k-steps per panel
    static constexpr int kQPanelBytes = kBlockM * kSwizzleBytes;
    static constexpr int kKVPanelBytes = kBlockN * kSwizzleBytes;
    static constexpr int kQBytes = kPanels * kQPanelBytes;
    static constexpr int kKVBytes = kPanels * kKVPanelBytes;
    static constexpr int kKStages = 3;  // K ring: K tiles c-1, c-2 stream in while tile c is used
    static constexpr int kVStages = 1;
    static constexpr int kSmemQ = 0;
    static constexpr int kSmemK = kSmemQ + kQBytes;
    static constexpr int kSmemV = kSmemK + kKStages * kKVBytes;
    // + one atom of slack: the dynamic window is aligned up to 1024 bytes.
    static constexpr int kSmemBytes = kSmemV + kVStages * kKVBytes + kSwizzleAtomBytes;
    // bsfa_block_max: Q and the K ring, then two slots of per-warp maxima.
    static constexpr int kNWarps = kNThreads / 32;
    static constexpr int kSmemRed = kSmemV;
    static constexpr int kBlockMaxSmemBytes = kSmemRed + 2 * kNWarps * 4 + kSwizzleAtomBytes;

    static_assert(kHeadDim % kPanelCols == 0, "head dim must be a whole number of 64-column panels");
    static_assert(kKVPanelBytes % kSwizzleAtomBytes == 0, "panels must keep the 1024-byte atom alignment");
};

// One M=64 half of a TraitsSm90 tile, as the shared functions (mask_tile,
// row_max) see it.
template <class TR>
struct HalfTraitsSm90 : TR {
    static constexpr int kWarpMBlocks = 1;
};

}  // namespace bsfa
