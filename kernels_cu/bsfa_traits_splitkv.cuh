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
    // Packed rows per CTA (16, 64 or 128); a head's rows of one reference
    // query tile never straddle two CTAs, so each CTA sees a head's whole
    // tile max.
    static constexpr int kRows = kRows_;
    // 16 rows: the key-split variant (bsfa_kernel_split16.cuh).  Its 4 warps
    // hold the same 16 packed rows and split each 64-key tile into 16-key
    // slices (warp w: keys 16w..16w+15), so at Nq = 1 no warp multiplies a
    // padding-only m16 block against a whole tile.  The per-warp S, P and
    // key-step counts below are then those of a 16-key slice.
    static constexpr bool kKeySplit = kRows_ == 16;

    static constexpr int kMmaM = 16;
    static constexpr int kMmaN = 8;
    static constexpr int kMmaK = 16;

    // 16 rows per warp: the O accumulator is D/2 registers, so Q stays in
    // registers at every head dim and nothing is re-read from shared memory
    // but K and V.
    static constexpr int kWarpMBlocks = 1;
    static constexpr int kWarpRows = kMmaM;
    static constexpr int kNWarps = kKeySplit ? kBlockN / kMmaK : kRows / kWarpRows;
    // Keys of a tile one warp multiplies: the whole tile, or its slice.
    static constexpr int kWarpKeys = kBlockN / (kKeySplit ? kNWarps : 1);
    static constexpr int kNThreads = kNWarps * 32;
    static constexpr bool kQInRegs = true;

    // The loads run kKStages - 1 tiles ahead for K.  V goes behind the vote:
    // the V of tile c is issued once the vote has kept it and multiplied a
    // tile later, after the scores and vote of tile c - 1, so that neither a
    // skipped tile's V is loaded nor a kept tile waits for its V (the cp.async
    // groups of bsfa_kernel_splitkv.cuh).  The V of a tile kept without a vote
    // is prefetched kVStages - 2 tiles ahead of that: one V buffer is being
    // multiplied, one is filling behind the vote.  Decode is memory bound: the
    // bytes in flight per SM set the bandwidth.  16 rows: 3 V buffers still
    // fit two CTAs per SM (109 KB each at head dim 128); 64 rows would fall to
    // one CTA.
    static constexpr int kKStages = 3;
    static constexpr int kVStages = kKeySplit ? 3 : 2;

    static constexpr int kElemBytes = 2;
    static constexpr int kChunkElems = 16 / kElemBytes;
    static constexpr int kChunksPerRow = kHeadDim / kChunkElems;
    static constexpr int kSmemStride = kHeadDim + kChunkElems;  // +16 bytes per row: see TraitsSm80
    static constexpr int kRowBytes = kSmemStride * kElemBytes;
    static constexpr int kQTileBytes = kRows * kRowBytes;
    static constexpr int kKVTileBytes = kBlockN * kRowBytes;

    static constexpr int kDSteps = kHeadDim / kMmaK;
    static constexpr int kKeySteps = kWarpKeys / kMmaK;  // per warp
    static constexpr int kSNBlocks = kWarpKeys / kMmaN;  // per warp
    static constexpr int kONBlocks = kHeadDim / kMmaN;
    static constexpr int kQFragRegs = kWarpMBlocks * kDSteps * 4;

    // Q, the K ring, the V ring (bsfa_kernel_splitkv.cuh), and the per-warp head votes of the
    // gate (two slots, by key-tile parity, so one barrier per gated tile).
    static constexpr int kSmemQ = 0;
    static constexpr int kSmemK = kSmemQ + kQTileBytes;
    static constexpr int kSmemV = kSmemK + kKStages * kKVTileBytes;
    static constexpr int kSmemVote = kSmemV + kVStages * kKVTileBytes;
    static constexpr int kFwdSmemBytes = kSmemVote + 2 * kNWarps * 4;

    // Key-split variant: after the last tile the warps merge their (m, l,
    // O) of the same rows through shared memory, in the K ring and V buffers
    // (idle by then): O as fp32 rows of kMergeStride floats (+4: 16-byte
    // aligned rows that do not all start on one bank), then m and l.
    static constexpr int kMergeStride = kHeadDim + 4;
    static constexpr int kSmemMergeO = kSmemK;
    static constexpr int kSmemMergeM = kSmemMergeO + kNWarps * kWarpRows * kMergeStride * 4;
    static constexpr int kSmemMergeL = kSmemMergeM + kNWarps * kWarpRows * 4;
    static constexpr int kSmemMergeEnd = kSmemMergeL + kNWarps * kWarpRows * 4;

    static_assert(kRows % kWarpRows == 0, "warps must tile the packed rows");
    static_assert(!kKeySplit || (kRows == kWarpRows && kWarpKeys == kMmaK && kNWarps == 4),
                  "key-split: one m16 row block, one 16-key slice per warp");
    static_assert(!kKeySplit || kSmemMergeEnd <= kSmemVote, "key-split merge must fit the K / V buffers");
    static_assert(kSmemK % 16 == 0 && (kMergeStride * 4) % 16 == 0, "16-byte aligned merge rows");
    static_assert(kVStages >= 2 && kVStages <= kKStages + 1, "V: one buffer multiplied, one filling, prefetch "
                  "no further ahead than K");
    static_assert(kHeadDim % kMmaK == 0, "head dim must be a multiple of 16");
    static_assert(kKeySplit || kKeySteps % 2 == 0, "the P V loop runs key steps in pairs");
    static_assert(kNThreads % kChunksPerRow == 0, "fixed copy column per thread (TileCopy::load_full)");
};

}  // namespace bsfa
