// The per-block building blocks that every consumer loop of the
// warp-specialised sm_90a forward shares: where a consumer thread sits, the
// turn order of the ping-pong, what a warpgroup carries through the key
// blocks of a work tile (TileLoop), and the end of a block's S -- its K
// slot handed back, masked, and gated (finish_qk) or all its valid halves
// kept (finish_qk_dense).  The loops are in bsfa_consumer_sm90ws.cuh
// (consumer_tile), bsfa_dense_block_sm90ws.cuh (the dense steps) and
// bsfa_consumer_lag_sm90ws.cuh (the gate with S a block ahead).
//
// Includes what it needs; TR is a TraitsSm90Ws.
#pragma once

#include "bsfa_block_sm90ws.cuh"
#include "bsfa_gate.cuh"
#include "bsfa_mask.cuh"
#include "bsfa_params.cuh"
#include "bsfa_pipeline_sm90.cuh"
#include "bsfa_smem_sm90ws.cuh"
#include "bsfa_wgmma_sm90.cuh"

namespace bsfa {

// Where one consumer thread sits.
struct ConsumerThread {
    int wg;    // consumer warpgroup, 0 or 1: query rows 64 wg ..
    int tid;   // thread within the warpgroup
    int lane;
    int warp;  // warp within the warpgroup
    __device__ __forceinline__ ConsumerThread(int wg_, int tid_)
        : wg(wg_), tid(tid_), lane(tid_ & 31), warp(tid_ >> 5) {}
    // Row of the tile that this thread's accumulator elements 0..1 hold (2..3: +8).
    __device__ __forceinline__ int row() const { return wg * 64 + warp * 16 + (lane >> 2); }
    __device__ __forceinline__ int consumer_warp() const { return wg * 4 + warp; }
};

// The turn barrier that warpgroup wg hands its turn to: the next warpgroup's,
// warpgroup 0's after the last.
template <class TR>
__device__ __forceinline__ int next_turn(int wg) {
    if constexpr (TR::kConsumerWGs == 2) {
        return TR::kBarTurn + 1 - wg;
    } else {
        return TR::kBarTurn + (wg + 1 == TR::kConsumerWGs ? 0 : wg + 1);
    }
}

// A problem's extent as the masks take it (bsfa_problem.cuh).
struct MaskBounds {
    int Nq, Nk, shift;
};

// What one consumer warpgroup carries through the key blocks of a work tile
// besides the accumulators.  Thread coordinates are re-derived from
// threadIdx where used, so that they do not take registers across the loop.
template <class TR, bool kCausal, bool kVarlen>
struct TileLoop {
    const Params& p;
    const SmemWs<TR>& sm;
    const QueryTile<TR, kCausal>& qt;
    const GatePlan<TR>& plan;
    float scale_log2;
    unsigned char* keep_row;
    MaskBounds seq;  // kVarlen: the packed sequence's; unused otherwise

    // A fixed-length launch reads them from the Params (constant-bank operands, no registers).
    __device__ __forceinline__ MaskBounds bounds() const {
        if constexpr (kVarlen) {
            return seq;
        } else {
            return MaskBounds{p.Nq, p.Nk, p.qk_shift};
        }
    }

    __device__ __forceinline__ static int tid() { return (int)threadIdx.x; }
    __device__ __forceinline__ static int lane() { return tid() & 31; }
    __device__ __forceinline__ static int wg() { return (tid() >> 7) - 1; }
    __device__ __forceinline__ static int consumer_warp() { return (tid() >> 5) - 4; }
    // Row of the tile (of its head's rows, TR::kPackHeads) that this thread's
    // accumulator elements 0..1 hold (2..3: +8).
    __device__ __forceinline__ static int row() {
        if constexpr (TR::kPackHeads) {
            return ((tid() & 127) >> 5) * 16 + ((tid() & 31) >> 2);
        } else {
            return (tid() - 128) / 32 * 16 + ((tid() & 31) >> 2);
        }
    }
    __device__ __forceinline__ static int my_turn() { return TR::kBarTurn + wg(); }
    __device__ __forceinline__ static int their_turn() { return next_turn<TR>(wg()); }
    __device__ __forceinline__ unsigned long long k_desc(int stage) const {
        return make_desc(sm.k() + stage * TR::kKVBytes, 16, kSwizzleAtomBytes);
    }
    __device__ __forceinline__ unsigned long long v_desc(int stage) const {
        return make_desc(sm.v() + stage * TR::kKVBytes, TR::kKVPanelBytes, kSwizzleAtomBytes);
    }
    __device__ __forceinline__ unsigned long long q_desc() const {
        // This warpgroup's 64 rows of Q: 64 rows x 128 bytes further into each panel.
        return make_desc(sm.q() + wg() * TR::kWgmmaM * kSwizzleBytes, 16, kSwizzleAtomBytes);
    }
    // TR::kPInSmem: this warpgroup's rows of P, the same way.
    __device__ __forceinline__ unsigned long long p_desc() const {
        return make_desc(sm.p() + wg() * TR::kWgmmaM * kSwizzleBytes, 16, kSwizzleAtomBytes);
    }
};

// Hands the K slot of block n (and, after the tile's last block, first, the
// Q tile) back once S of block n is in.
template <class TR, bool kCausal, bool kVarlen>
__device__ __forceinline__ void release_k(const TileLoop<TR, kCausal, kVarlen>& t,
                                          float (&S)[TR::kBlockSNBlocks][4], int n, int first,
                                          const PipeState<TR::kStages>& kv) {
    fence_regs(flat(S));
    if (t.lane() == 0) {
        mbar_arrive_cluster<TR::kClusterCtas>(t.sm.bar(TR::kBarKEmpty + kv.stage));
        if (n == first) mbar_arrive(t.sm.bar(TR::kBarQEmpty));
    }
}

// release_k, then masks block n's S and posts its votes.
template <class TR, bool kCausal, bool kVarlen>
__device__ __forceinline__ PostedGate finish_qk(const TileLoop<TR, kCausal, kVarlen>& t,
                                                float (&S)[TR::kBlockSNBlocks][4], int n, int first,
                                                const PipeState<TR::kStages>& kv, unsigned vote_idx,
                                                float (&vmx)[TR::kKeyHalves][2]) {
    release_k(t, S, n, first, kv);
    const MaskBounds mb = t.bounds();
    return gate_post<TR, kCausal>(S, t.qt, t.plan, n, t.qt.q0 + t.row(), t.lane(), t.consumer_warp(), t.p, t.sm,
                                  vote_idx, mb.Nq, mb.Nk, mb.shift, vmx);
}

// finish_qk of a dense launch: release_k, block n's S masked, every valid
// half kept (returned, and reported in keep_row).
template <class TR, bool kCausal, bool kVarlen>
__device__ __forceinline__ unsigned finish_qk_dense(const TileLoop<TR, kCausal, kVarlen>& t,
                                                    float (&S)[TR::kBlockSNBlocks][4], int n, int first,
                                                    const PipeState<TR::kStages>& kv) {
    release_k(t, S, n, first, kv);
    const MaskBounds mb = t.bounds();
    const unsigned valid = mask_block<TR, kCausal>(S, t.qt, n, t.qt.q0 + t.row(), t.lane(), mb.Nq, mb.Nk, mb.shift);
    write_keep<TR>(t.keep_row, n, valid, valid);
    return valid;
}

}  // namespace bsfa
