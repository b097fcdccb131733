// The shared-memory map of the warp-specialised sm_90a forward as addresses
// (TraitsSm90Ws holds the offsets), shared by the producer, the consumers
// and the kernel that initialises the barriers.  Only the base stays live;
// each region is the base plus a constant, which folds into the addressing.
//
// Includes what it needs; TR is a TraitsSm90Ws.
#pragma once

namespace bsfa {

template <class TR>
struct SmemWs {
    unsigned base;

    __device__ __forceinline__ explicit SmemWs(unsigned base_) : base(base_) {}

    __device__ __forceinline__ unsigned q() const { return base + TR::kSmemQ; }
    __device__ __forceinline__ unsigned k() const { return base + TR::kSmemK; }
    __device__ __forceinline__ unsigned v() const { return base + TR::kSmemV; }
    __device__ __forceinline__ unsigned o() const { return base + TR::kSmemO; }
    __device__ __forceinline__ unsigned p() const { return base + TR::kSmemP; }  // TR::kPInSmem only
    __device__ __forceinline__ unsigned votes() const { return base + TR::kSmemVotes; }
    __device__ __forceinline__ unsigned maxes() const { return base + TR::kSmemMaxes; }
    __device__ __forceinline__ unsigned bar(int i) const { return base + TR::kSmemBars + 8 * i; }
};

}  // namespace bsfa
