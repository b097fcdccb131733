// Compile-time shape of the warp-specialised Hopper (sm_90a) forward: one
// producer warpgroup (TMA), two consumer warpgroups of 64 query rows each,
// 128-key blocks (two BSFA key tiles) in a two-stage K and V ring, and the
// shared-memory map, all derived from the head dim and the shared tile shape.
//
// The struct doubles as the traits the shared per-tile functions (mask_tile,
// row_max, GatePlan) see: one BSFA key tile (64 keys) of one consumer
// warpgroup's rows -- kWarpMBlocks = 1 block of 16 rows per warp, 8 n8
// blocks -- which is one half of a 128-key block's S accumulator.
//
// Includes what it needs.
#pragma once

#include "bsfa_traits.cuh"
#include "bsfa_wgmma_sm90.cuh"

namespace bsfa {

template <int kHeadDim_, bool kBf16_, int kConsumerWGs_ = 2>
struct TraitsSm90Ws : TileShape {
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr bool kBf16 = kBf16_;

    // Roles: warpgroup 0 produces, 1 .. kConsumerWGs consume (two; three in
    // TraitsSm90WsWide).
    static constexpr int kConsumerWGs = kConsumerWGs_;
    static constexpr int kNThreads = 128 * (1 + kConsumerWGs);
    static constexpr int kConsumerThreads = 128 * kConsumerWGs;
    static constexpr int kConsumerWarps = kConsumerThreads / 32;
    // setmaxnreg moves registers between the warpgroups of a CTA, within
    // what the CTA was given at launch: kNThreads times the per-thread count
    // of __launch_bounds__(kNThreads, 1), 168 for 384 threads (the compile
    // test checks ptxas gives each entry that many).  A consumer raise that
    // the producer's release does not cover waits forever.
    static constexpr int kLaunchRegs = 65536 / kNThreads / 8 * 8;
    static constexpr int kProducerRegs = 24;
    // 240 for two consumer warpgroups, 160 for three.
    static constexpr int kConsumerRegs = (kLaunchRegs * kNThreads - kProducerRegs * 128) / kConsumerThreads / 8 * 8;
    static_assert(kProducerRegs * 128 + kConsumerRegs * kConsumerThreads <= kLaunchRegs * kNThreads,
                  "setmaxnreg: the CTA's registers at launch");

    // Keys per kernel block: two BSFA key tiles, each with its own decision.
    static constexpr int kBlockKeys = 2 * kBlockN;
    static constexpr int kKeyHalves = kBlockKeys / kBlockN;

    // The per-tile view (one consumer warpgroup x one BSFA key tile).
    static constexpr int kWgmmaM = 64;
    static constexpr int kWarpMBlocks = 1;
    static constexpr int kMmaM = kWgmmaM;
    static constexpr int kMmaN = 8;
    static constexpr int kMmaK = 16;
    static constexpr int kWarpRows = 16;
    // Query rows of a CTA's work tile: the BSFA tile's 128 (TileShape) with
    // two consumer warpgroups.  Three (TraitsSm90WsWide) take 192-row tiles,
    // which only dense calls without a keep output may use: keep, the
    // thresholds and the tile maxima are per 128-row tile.
    static constexpr int kBlockM = kConsumerWGs * kWgmmaM;
    static constexpr bool kBsfaRows = kBlockM == TileShape::kBlockM;
    // Query rows of one consumer warpgroup: one m64 wgmma's
    // (TraitsSm90WsBlockMaxWide: a whole BSFA tile).
    static constexpr int kWgRows = kWgmmaM;
    static constexpr int kSNBlocks = kBlockN / kMmaN;           // n8 blocks of one key tile
    static constexpr int kBlockSNBlocks = kBlockKeys / kMmaN;   // ... of a 128-key block
    static constexpr int kONBlocks = kHeadDim / kMmaN;
    static constexpr int kDSteps = kHeadDim / kMmaK;             // k-steps of S = Q K^T
    static constexpr int kKeySteps = kBlockKeys / kMmaK;         // k-steps of O += P V
    static constexpr int kHalfKeySteps = kBlockN / kMmaK;

    // Shared memory: 128-byte swizzled panels of 64 columns, as the TMA
    // writes them with CU_TENSOR_MAP_SWIZZLE_128B and a 64-column box.
    static constexpr int kElemBytes = 2;
    static constexpr int kChunkElems = 16 / kElemBytes;
    static constexpr int kPanelCols = kSwizzleBytes / kElemBytes;  // 64
    static constexpr int kPanels = kHeadDim / kPanelCols;
    static constexpr int kChunksPerPanelRow = kSwizzleBytes / 16;  // 8
    static constexpr int kStepsPerPanel = kPanelCols / kMmaK;
    static constexpr int kQPanelBytes = kBlockM * kSwizzleBytes;
    static constexpr int kKVPanelBytes = kBlockKeys * kSwizzleBytes;
    static constexpr int kQBytes = kPanels * kQPanelBytes;
    static constexpr int kKVBytes = kPanels * kKVPanelBytes;
    static constexpr int kStages = 2;
    // bsfa_block_max loads no V: its K ring runs on the V ring's slots too
    // (they follow the K ring's), 5-9 % faster than two stages (bench/NOTES.md, v14).
    static constexpr int kBlockMaxStages = 2 * kStages;
    static constexpr int kSmemQ = 0;
    static constexpr int kSmemK = kSmemQ + kQBytes;
    static constexpr int kSmemV = kSmemK + kStages * kKVBytes;
    static constexpr int kSmemO = kSmemV + kStages * kKVBytes;  // output staging, same map as Q
    static constexpr int kSmemBars = kSmemO + kQBytes;
    // The gate exchange: a ring of slots of one vote byte per consumer warp,
    // each slot with an mbarrier counting the warps' postings
    // (bsfa_block_sm90ws.cuh says why 4 slots suffice).
    // bsfa_block_max posts the maxima of every block through the same ring,
    // and its writer reads a slot a block late: a warp may meanwhile post up
    // to kBlockMaxStages blocks ahead (bsfa_block_max_sm90ws.cuh), hence more
    // slots than K stages.
    static constexpr int kVoteSlots = 8;
    // Barrier words: Q full/empty, then K full and K empty per K stage (of
    // bsfa_block_max's longer ring), V full and V empty per stage, then one
    // per vote slot.
    static constexpr int kBarQFull = 0;
    static constexpr int kBarQEmpty = 1;
    static constexpr int kBarKFull = 2;
    static constexpr int kBarKEmpty = kBarKFull + kBlockMaxStages;
    static constexpr int kBarVFull = kBarKEmpty + kBlockMaxStages;
    static constexpr int kBarVEmpty = kBarVFull + kStages;
    static constexpr int kBarVote = kBarVEmpty + kStages;
    static constexpr int kNumBars = kBarVote + kVoteSlots;
    static constexpr int kSmemVotes = kSmemBars + 8 * kNumBars;
    static constexpr int kVoteSlotBytes = kConsumerWarps;
    // bsfa_block_max's exchange: per slot, each consumer warp's maximum of
    // each key half (float), behind the same ring of mbarriers.
    static constexpr int kSmemMaxes = kSmemVotes + kVoteSlots * kVoteSlotBytes;
    static constexpr int kMaxSlotBytes = kConsumerWarps * 2 * 4;
    // + one atom of slack: the dynamic window is aligned up to 1024 bytes.
    static constexpr int kSmemBytes = kSmemMaxes + kVoteSlots * kMaxSlotBytes + kSwizzleAtomBytes;

    // Named barriers (0 is __syncthreads): the two turns of the ping-pong
    // between the consumer warpgroups, then the one that publishes the
    // consumers' zeroing of a packed sequence's ragged V block.
    // A turn barrier counts the warpgroup that takes the turn and the one
    // that hands it over (warpgroup w passes it to w + 1, the last to 0).
    static constexpr int kBarTurn = 1;
    static constexpr int kBarVZero = kBarTurn + kConsumerWGs;
    static constexpr int kTurnThreads = 2 * 128;
    // Three consumer warpgroups hold O, S and one P each (registers): the
    // softmax leaves its exponentials in S, packed into P only once the P V
    // that reads the old P has retired.  Two hold the next P as well, packed
    // as the exponentials are taken.
    static constexpr bool kLatePack = kConsumerWGs > 2;

    static_assert(kHeadDim % kPanelCols == 0, "head dim must be a whole number of 64-column panels");
    static_assert(kVoteSlots > kBlockMaxStages, "bsfa_block_max: a slot must outlive a warp's lead");
    static_assert(kSmemV == kSmemK + kStages * kKVBytes && kBlockMaxStages <= 2 * kStages,
                  "bsfa_block_max's K slots past the forward's are the V ring's");
    static_assert(kVoteSlotBytes == 8 || !kBsfaRows, "the gate reads one slot as a single 8-byte load");
    static_assert(kSmemBytes <= 227 * 1024, "shared memory per CTA");

    // One query head per 128-row tile: both consumer warpgroups hold its
    // rows, and every gate decision is the CTA's (an exchange over all
    // consumer warps through the whole ring).
    static constexpr bool kPackHeads = false;
    static constexpr int kVoteRing = kVoteSlots;         // slots of one exchange ring
    static constexpr int kVoteWarps = kConsumerWarps;    // warps posting to one ring
    // CTAs of a cluster that share every K and V load (TMA multicast); one.
    static constexpr int kClusterCtas = 1;
    // A cluster's CTAs take two query tiles of one head (TraitsSm90WsPair),
    // not two heads of one GQA group.
    static constexpr bool kPairTiles = false;
    // bsfa_block_max's S = Q K^T with Q in registers (TraitsSm90WsQRegs;
    // the cluster entry bsfa_block_max_mc reads Q from shared memory).
    static constexpr bool kQInRegs = false;
    // The gated loop with S a block ahead (TraitsSm90WsLag), and P V with P
    // from shared memory (its head dim 128).
    static constexpr bool kLagGate = false;
    static constexpr bool kPInSmem = false;
    // The producer loads each block's K before the previous block's V
    // (TraitsSm90WsLag), not after.
    static constexpr bool kKAhead = false;
    // The producer, not the consumers, makes sure a V slot's last copy
    // landed (TraitsSm90WsHeadPair), so that a skipped block's V slot goes
    // back without a wait on the consumers' path.
    static constexpr bool kProducerChecksV = false;
    // Each consumer warpgroup owns a whole 128-row BSFA tile of a query
    // head of its own (TraitsSm90WsHeadPair).
    static constexpr bool kOwnTiles = false;
};

// The cluster entries (bsfa_fwd_mc, bsfa_fwd_dense_mc, bsfa_block_max_mc):
// two CTAs of a cluster take two query heads of one GQA group at the same
// query tile, so that they visit the same key blocks of the same K/V head
// in the same order, and each loads half of every K and V block (its own
// 64-column panels) into both CTAs' slots by TMA multicast: half the
// L2-to-SM traffic of K and V.  Dense, sparse and block_max launches alike
// moved ~4 TB/s from L2 to the SMs in the v16 profile, a ceiling these
// entries are to test (bench/NOTES.md, v18).  A slot is refilled only once
// the consumer warps of both CTAs released it (its empty barrier counts 16).
template <int kHeadDim_, bool kBf16_>
struct TraitsSm90WsMc : TraitsSm90Ws<kHeadDim_, kBf16_> {
    using Base = TraitsSm90Ws<kHeadDim_, kBf16_>;
    static constexpr int kClusterCtas = 2;
    // The producer's schedule and multicast bookkeeping spill at 24
    // registers; at 32 the consumers get 232 (no spill), since the CTA's
    // registers at launch (kLaunchRegs) must cover both.
    static constexpr int kProducerRegs = 32;
    static constexpr int kConsumerRegs = 232;
    static_assert(kProducerRegs * 128 + kConsumerRegs * Base::kConsumerThreads <= Base::kLaunchRegs * Base::kNThreads,
                  "setmaxnreg: the CTA's registers at launch");
    static_assert(Base::kPanels % kClusterCtas == 0, "each CTA of a cluster loads whole 64-column panels");
};

// bsfa_fwd_dense_pair (dense calls, any GQA group, MHA included): the two
// CTAs of a cluster take two neighbouring query tiles of one head, and share
// K and V as TraitsSm90WsMc's do.  Their key ranges differ where causal: the
// pair visits the longer tile's blocks, and the CTA of the shorter tile (or
// of none, the last pair of an odd tile count) hands the blocks past its own
// range back unread (bsfa_consumer_sm90ws.cuh, drain_blocks).
template <int kHeadDim_, bool kBf16_>
struct TraitsSm90WsPair : TraitsSm90WsMc<kHeadDim_, kBf16_> {
    static constexpr bool kPairTiles = true;
};

// bsfa_fwd_dense_wide (head dim 64, dense calls without a keep output):
// three consumer warpgroups on 192-row query tiles, as FlashAttention-3 runs
// head dim 64.  There the softmax of a 128-key block takes several times its
// GEMMs, and a third warpgroup's softmax is what keeps the tensor cores busy
// (bench/NOTES.md, v20).  512 threads leave each consumer 160 registers.
template <int kHeadDim_, bool kBf16_>
struct TraitsSm90WsWide : TraitsSm90Ws<kHeadDim_, kBf16_, 3> {
    static_assert(kHeadDim_ == 64, "three consumer warpgroups fit the registers at head dim 64 only");
    // The BSFA tile (128 rows) that a consumer warpgroup's 64 rows lie in:
    // its key tiles are the ones the warpgroup multiplies (bsfa_dense_block_sm90ws.cuh).
    using BsfaTile = TraitsSm90Ws<kHeadDim_, kBf16_>;
};

// bsfa_block_max: each consumer warpgroup's 64 rows of Q loaded into
// registers once per work tile (the A operand of a register-sourced wgmma),
// so that the tensor cores read only K from shared memory for S: per
// m64n128k16 step 4 KB instead of 6.  3-6 % faster on an H200; the same
// for the dense forward gained nothing and was dropped (bench/NOTES.md, v22).
template <int kHeadDim_, bool kBf16_>
struct TraitsSm90WsQRegs : TraitsSm90Ws<kHeadDim_, kBf16_> {
    static constexpr bool kQInRegs = true;
};

// bsfa_fwd_lag: bsfa_fwd whose consumers issue S of the next block before
// the gate exchange of the current one (bsfa_consumer_lag_sm90ws.cuh,
// consumer_tile_lag), so that the tensor cores have work while the two
// warpgroups settle a decision.  The second S buffer's registers come from
// P, packed late; at head dim 128 that is not enough (two S, O and P in
// registers spilled 428 bytes), and P goes to shared memory instead
// (kPInSmem: P V reads it from there, a region of its own after the base
// map's output staging, 224 of the 227 KB).
template <int kHeadDim_, bool kBf16_>
struct TraitsSm90WsLag : TraitsSm90Ws<kHeadDim_, kBf16_> {
    using Base = TraitsSm90Ws<kHeadDim_, kBf16_>;
    static constexpr bool kLagGate = true;
    static constexpr bool kLatePack = true;
    // S of the next block is issued before the current block's gate, so its
    // K must not wait behind the current block's V in the producer's order.
    static constexpr bool kKAhead = true;
    static constexpr bool kPInSmem = kHeadDim_ > 64;
    // P in the map of Q (64-column panels of the tile's rows), keys for
    // columns: kPanelsP panels of kQPanelBytes; the barriers, votes and
    // maxima follow it.
    static constexpr int kPanelsP = Base::kBlockKeys / Base::kPanelCols;
    static constexpr int kSmemP = Base::kSmemBars;
    static constexpr int kSmemBars = kSmemP + (kPInSmem ? kPanelsP * Base::kQPanelBytes : 0);
    static constexpr int kSmemVotes = kSmemBars + 8 * Base::kNumBars;
    static constexpr int kSmemMaxes = kSmemVotes + Base::kVoteSlots * Base::kVoteSlotBytes;
    static constexpr int kSmemBytes = kSmemMaxes + Base::kVoteSlots * Base::kMaxSlotBytes + kSwizzleAtomBytes;
    static_assert(kSmemBytes <= 227 * 1024, "shared memory per CTA");
    static_assert(!kPInSmem || kHeadDim_ == 128, "P V from shared memory: an m64n128 wgmma, head dim 128");
};

// bsfa_block_max_wide: bsfa_block_max on 256-row query tiles, each consumer
// warpgroup a whole 128-row BSFA tile (two m64 row halves), so that a K
// block serves twice the rows (bsfa_block_max_wide_sm90ws.cuh).  The shared
// memory map is the base's with Q twice as tall and the K ring (over the V
// slots too) right after it; each warpgroup posts its warps' maxima to a
// ring of its own.
template <int kHeadDim_, bool kBf16_>
struct TraitsSm90WsBlockMaxWide : TraitsSm90Ws<kHeadDim_, kBf16_> {
    using Base = TraitsSm90Ws<kHeadDim_, kBf16_>;
    using BsfaTile = Base;
    static constexpr int kWgRows = TileShape::kBlockM;
    static constexpr int kRowHalves = kWgRows / Base::kWgmmaM;
    static constexpr int kBlockM = Base::kConsumerWGs * kWgRows;
    static constexpr bool kBsfaRows = false;
    static constexpr int kQPanelBytes = kBlockM * kSwizzleBytes;
    static constexpr int kQBytes = Base::kPanels * kQPanelBytes;
    static constexpr int kSmemQ = 0;
    static constexpr int kSmemK = kQBytes;
    static constexpr int kSmemV = kSmemK + Base::kStages * Base::kKVBytes;
    static constexpr int kSmemO = kSmemV + Base::kStages * Base::kKVBytes;  // not used: no output staging
    static constexpr int kSmemBars = kSmemK + Base::kBlockMaxStages * Base::kKVBytes;
    // A warp may post kBlockMaxStages blocks ahead of its warpgroup's
    // writer, which reads a posting a block late: kBlockMaxStages + 2 live.
    static constexpr int kVoteRing = 8;
    static constexpr int kVoteWarps = 4;
    static constexpr int kVoteSlots = Base::kConsumerWGs * kVoteRing;
    static_assert(kVoteRing >= Base::kBlockMaxStages + 2, "a ring slot outlives a warp's lead");
    static constexpr int kBarVote = Base::kBarVote;
    static constexpr int kNumBars = kBarVote + kVoteSlots;
    static constexpr int kSmemVotes = kSmemBars + 8 * kNumBars;
    static constexpr int kSmemMaxes = kSmemVotes + kVoteSlots * Base::kVoteSlotBytes;
    static constexpr int kSmemBytes = kSmemMaxes + kVoteSlots * Base::kMaxSlotBytes + kSwizzleAtomBytes;
    static_assert(kSmemBytes <= 227 * 1024, "shared memory per CTA");
};

// The two-head tile of the split entry's short chunks (bsfa_fwd_split_pack):
// consumer warpgroup w holds the (at most 64) query rows of query head
// 2 * pair + w, both heads of one GQA group, so that one K/V load serves
// both.  A head's reference tile lies within one warpgroup: each warpgroup
// decides its own gates, on a ring of its own (half of the slots, each
// barrier counting its four warps), and never waits for the other.
template <int kHeadDim_, bool kBf16_>
struct TraitsSm90WsPack : TraitsSm90Ws<kHeadDim_, kBf16_> {
    using Base = TraitsSm90Ws<kHeadDim_, kBf16_>;
    static constexpr bool kPackHeads = true;
    static constexpr int kVoteRing = Base::kVoteSlots / Base::kConsumerWGs;
    static constexpr int kVoteWarps = Base::kConsumerWarps / Base::kConsumerWGs;
    static_assert(kVoteRing >= 4, "a warp posts exchange e+3 only once every warp resolved e (bsfa_block_sm90ws.cuh)");
};

// bsfa_fwd_headpair: two query heads of one GQA group a CTA, at the same
// query tile, and each consumer warpgroup a whole 128-row BSFA tile of its
// own head (two m64 row halves, kWarpMBlocks = 2), so that no gate decision
// needs the other warpgroup: the tile maximum is the warpgroup's own, one
// barrier reduction over its 128 threads (bsfa_consumer_headpair_sm90ws.cuh).
// Both heads read the same K and V blocks of their K/V head.  O of 128 rows
// at head dim 128 takes 128 registers a thread, so a block is one 64-key
// BSFA key tile (S 64 registers) and P goes through shared memory; the
// output is staged as the base's, in a 256-row map over the P buffers.  Per block and CTA the
// tensor work is the base's (256 rows x 64 keys against 128 x 128).
template <int kHeadDim_, bool kBf16_>
struct TraitsSm90WsHeadPair : TraitsSm90Ws<kHeadDim_, kBf16_> {
    using Base = TraitsSm90Ws<kHeadDim_, kBf16_>;
    static constexpr bool kOwnTiles = true;
    static constexpr bool kPackHeads = true;  // wg_head, the schedule over head pairs, Q boxes per head
    static constexpr int kWgRows = TileShape::kBlockM;
    static constexpr int kWarpMBlocks = kWgRows / Base::kWgmmaM;
    static constexpr int kBlockM = TileShape::kBlockM;  // rows of one head's query tile
    static constexpr int kBlockKeys = TileShape::kBlockN;
    static constexpr int kKeyHalves = 1;
    static constexpr int kBlockSNBlocks = kBlockKeys / Base::kMmaN;
    static constexpr int kKeySteps = kBlockKeys / Base::kMmaK;
    static constexpr int kHalfKeySteps = kKeySteps;
    // The consumers' schedule (bsfa_consumer_headpair_sm90ws.cuh): at head
    // dim 64 (O 64 registers a thread) P fits in registers beside O and S,
    // and a block as one sequential step ran 7-16 % faster sparse than the
    // overlapped schedule with P in shared memory; at head dim 128 (O 128)
    // the sequential step was level up to 32K and 4-7 % slower at 64K,
    // where the CTAs sharing a K/V head drift apart (bench/NOTES.md, v27).
    static constexpr bool kPInRegs = kHeadDim_ == 64;
    // The overlapped schedule hands a skipped block's V slot back unwaited
    // (bsfa_consumer_headpair_sm90ws.cuh); the producer checks that the
    // slot's previous copy landed before it loads the K of the block that
    // reuses the slot, since a consumer that skipped that copy would
    // otherwise wait for the slot's next one on the same barrier parity.
    static constexpr bool kProducerChecksV = true;
    // Shared memory: Q of both heads (256 rows), K and V rings of three
    // stages of 64-key blocks (a block takes half the time of the base's, so
    // the producer runs a stage further ahead), then P of both warpgroups in
    // two buffers (one 64-column panel of 256 rows each), one for blocks of
    // even index and one for odd.  The P buffers are the output staging too
    // (in Q's map, a buffer a 64-column panel): a warpgroup stages its own
    // rows only, once its last P V retired.
    static constexpr int kStages = 3;
    static constexpr int kBlockMaxStages = kStages;  // the K ring's barriers
    static constexpr int kPBuffers = 2;
    static constexpr int kQRows = Base::kConsumerWGs * kWgRows;
    static constexpr int kQPanelBytes = kQRows * kSwizzleBytes;
    static constexpr int kKVPanelBytes = kBlockKeys * kSwizzleBytes;
    static constexpr int kQBytes = Base::kPanels * kQPanelBytes;
    static constexpr int kKVBytes = Base::kPanels * kKVPanelBytes;
    static constexpr int kPBytes = kQRows * kSwizzleBytes;
    static constexpr int kSmemQ = 0;
    static constexpr int kSmemK = kSmemQ + kQBytes;
    static constexpr int kSmemV = kSmemK + kStages * kKVBytes;
    static constexpr int kSmemP = kSmemV + kStages * kKVBytes;
    static constexpr int kSmemO = kSmemP;
    static_assert(kPBuffers * kPBytes >= kQBytes, "the P buffers hold the output staging");
    static constexpr int kSmemBars = kSmemP + kPBuffers * kPBytes;
    // Barrier words as the base's, for three stages.
    static constexpr int kBarKEmpty = Base::kBarKFull + kStages;
    static constexpr int kBarVFull = kBarKEmpty + kStages;
    static constexpr int kBarVEmpty = kBarVFull + kStages;
    static constexpr int kBarVote = kBarVEmpty + kStages;
    static constexpr int kNumBars = kBarVote + Base::kVoteSlots;
    static constexpr int kSmemVotes = kSmemBars + 8 * kNumBars;
    static constexpr int kSmemMaxes = kSmemVotes + Base::kVoteSlots * Base::kVoteSlotBytes;
    static constexpr int kSmemBytes = kSmemMaxes + Base::kVoteSlots * Base::kMaxSlotBytes + kSwizzleAtomBytes;
    static_assert(kSmemBytes <= 227 * 1024, "shared memory per CTA");
    static_assert(kBlockKeys == Base::kPanelCols, "P of a block is one 64-column panel");
    // The named barriers of the warpgroups' gate reductions, after the turns
    // and the base's zeroing barrier.
    static constexpr int kBarGate = Base::kBarVZero + 1;
    static_assert(kBarGate + Base::kConsumerWGs <= 16, "named barriers 1..15");
};

}  // namespace bsfa
