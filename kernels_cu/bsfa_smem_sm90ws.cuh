// The shared-memory map of the warp-specialised sm_90a forward as addresses
// (TraitsSm90Ws holds the offsets), shared by the producer, the consumers
// and the kernel that initialises the barriers.
//
// Includes what it needs; TR is a TraitsSm90Ws.
#pragma once

namespace bsfa {

template <class TR>
struct SmemWs {
    unsigned q, k, v, o, bars, votes;

    __device__ __forceinline__ explicit SmemWs(unsigned base)
        : q(base + TR::kSmemQ),
          k(base + TR::kSmemK),
          v(base + TR::kSmemV),
          o(base + TR::kSmemO),
          bars(base + TR::kSmemBars),
          votes(base + TR::kSmemVotes) {}

    __device__ __forceinline__ unsigned bar(int i) const { return bars + 8 * i; }
};

}  // namespace bsfa
