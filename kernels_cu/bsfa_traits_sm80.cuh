// Compile-time shape of the mma.sync kernels (sm80: every GPU from sm_80 on,
// Hopper included): warps, pipeline stages and the shared-memory map, all
// derived from the head dim and the shared tile shape in one place.
//
// Includes what it needs.
#pragma once

#include "bsfa_traits.cuh"

namespace bsfa {

template <int kHeadDim_, bool kBf16_>
struct TraitsSm80 : TileShape {
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr bool kBf16 = kBf16_;

    // mma.sync.m16n8k16 geometry.
    static constexpr int kMmaM = 16;
    static constexpr int kMmaN = 8;
    static constexpr int kMmaK = 16;

    // Warp layout.  Up to hdim 128 a warp owns 32 query rows (two m16 row
    // blocks), as FlashAttention-2 does: every K/V fragment read from shared
    // memory feeds two MMAs, which halves the ldmatrix traffic per FLOP compared
    // with 16 rows per warp and keeps the kernel tensor-core bound rather than
    // shared-memory bound.  The fp32 O accumulator then costs 32*D/32 = D
    // registers per thread (128 at hdim 128) plus 64 for S: it fits in 255
    // registers with Q re-read from shared memory.  Above 128 the O
    // accumulator alone would be 256 registers, so a warp takes 16 rows and
    // the CTA has 8 warps.
    static constexpr int kWarpMBlocks = kHeadDim <= 128 ? 2 : 1;
    static constexpr int kWarpRows = kWarpMBlocks * kMmaM;
    static constexpr int kNWarps = kBlockM / kWarpRows;
    static constexpr int kNThreads = kNWarps * 32;

    // Up to hdim 64 the warp's Q fragments (32 rows x D) take at most 32
    // registers, so they are loaded once; above that they are re-read from
    // shared memory for every key tile (FA2 does the same at hdim 128).
    static constexpr bool kQInRegs = kHeadDim <= 64;

    // bsfa_fwd's K ring holds 3 tiles, so K stays two tiles ahead and runs of
    // skipped tiles (wait K, Q K^T, gate) do not expose its L2 latency.  One
    // V buffer is enough: V tile c is only issued once every warp is done
    // with tile c+1's P V (bsfa_mainloop_sm80.cuh), which keeps shared
    // memory at Q + 4 tiles.  bsfa_block_max double-buffers K.
    static constexpr int kKStages = 3;
    static constexpr int kVStages = 1;
    static constexpr int kBlockMaxStages = 2;

    // Shared-memory tiles are row-major with each row padded by 16 bytes.  A
    // row is then an odd number of 16-byte chunks for every supported head
    // dim, so the 8 row addresses of an ldmatrix 8x8 matrix (same column,
    // consecutive rows), a quarter-warp of 16-byte cp.async writes along a row
    // and the epilogue's 4-byte fragment stores all hit distinct banks.  An
    // XOR swizzle would save the padding but needs a power-of-two number of
    // chunks per row (hdim 96 has 12).
    static constexpr int kElemBytes = 2;
    static constexpr int kChunkElems = 16 / kElemBytes;  // one cp.async / ldmatrix row
    static constexpr int kChunksPerRow = kHeadDim / kChunkElems;
    static constexpr int kSmemPadElems = kChunkElems;
    static constexpr int kSmemStride = kHeadDim + kSmemPadElems;  // elements
    static constexpr int kRowBytes = kSmemStride * kElemBytes;
    static constexpr int kQTileBytes = kBlockM * kRowBytes;
    static constexpr int kKVTileBytes = kBlockN * kRowBytes;

    // MMA loop trip counts.
    static constexpr int kDSteps = kHeadDim / kMmaK;      // k-steps of S = Q K^T
    static constexpr int kKeySteps = kBlockN / kMmaK;     // k-steps of O += P V
    static constexpr int kSNBlocks = kBlockN / kMmaN;     // n8 blocks of S per row block
    static constexpr int kONBlocks = kHeadDim / kMmaN;    // n8 blocks of O per row block
    static constexpr int kQFragRegs = kQInRegs ? kWarpMBlocks * kDSteps * 4 : 1;

    // Shared-memory map (bytes from the dynamic smem base).
    static constexpr int kSmemQ = 0;
    static constexpr int kSmemK = kSmemQ + kQTileBytes;
    static constexpr int kSmemV = kSmemK + kKStages * kKVTileBytes;
    static constexpr int kFwdSmemBytes = kSmemV + kVStages * kKVTileBytes;
    // bsfa_block_max: no V; per-warp tile maxima, double-buffered by tile
    // parity so one barrier per tile suffices.
    static constexpr int kSmemRed = kSmemK + kBlockMaxStages * kKVTileBytes;
    static constexpr int kBlockMaxSmemBytes = kSmemRed + kBlockMaxStages * kNWarps * 4;

    static_assert(kHeadDim % kMmaK == 0, "head dim must be a multiple of 16");
    static_assert(kKVTileBytes % 16 == 0 && kQTileBytes % 16 == 0, "cp.async needs 16-byte aligned tiles");
    static_assert(kBlockM == kNWarps * kWarpRows, "warps must tile the query block");
    static_assert(kBlockN % (2 * kMmaN) == 0 && kHeadDim % (2 * kMmaN) == 0,
                  "ldmatrix.x4 loads B fragments for pairs of n8 blocks");
    static_assert((kWarpRows * kChunksPerRow) % 32 == 0, "epilogue copies whole warp rows");
    static_assert(kQInRegs || (kDSteps % 2 == 0 && kDSteps >= 4),
                  "Q from shared memory: the Q K^T loop runs k-steps in pairs and peels the first and last pair");
    static_assert(kKeySteps % 2 == 0, "the P V loop runs key steps in pairs");
};

}  // namespace bsfa
