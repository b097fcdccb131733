// What warp specialisation on Hopper (sm_90a) is built from: the tensor
// memory accelerator (TMA) copy of a tile into shared memory, the mbarriers
// its completion and the consumers' release are counted on, the pipeline
// state both sides step through, named barriers between warpgroups, and the
// register hand-over between them (setmaxnreg).
//
// Self-contained.
#pragma once

namespace bsfa {

// ------------------------------------------------------------- tensor maps
//
// A CUtensorMap as the kernel receives it: 128 opaque bytes, encoded on the
// host by the driver (cuTensorMapEncodeTiled, bsfa_cupy/_tma.py) and passed
// by value as a __grid_constant__ parameter, so that its address is a
// parameter-space address the TMA unit reads directly.
struct alignas(64) TmaDesc {
    unsigned long long opaque[16];
};

// Starts the copy of the box at coordinates (c0 innermost .. c3) of a 4-D
// tensor map into shared memory at dst; its bytes are counted on mbarrier
// bar (complete_tx).  Rows outside the tensor arrive as zeros.
__device__ __forceinline__ void tma_load_4d(unsigned dst, const TmaDesc& desc, unsigned bar, int c0, int c1, int c2,
                                            int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
        "[%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<unsigned long long>(&desc)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}

// tma_load_4d into the same shared-memory offset of every CTA of the cluster
// in cta_mask (bit i: the CTA of rank i), the bytes counted on the mbarrier at
// bar's offset in each of them.
__device__ __forceinline__ void tma_load_4d_multicast(unsigned dst, const TmaDesc& desc, unsigned bar, int c0, int c1,
                                                      int c2, int c3, unsigned short cta_mask) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], "
        "[%1, {%2, %3, %4, %5}], [%6], %7;\n" ::"r"(dst),
        "l"(reinterpret_cast<unsigned long long>(&desc)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar), "h"(cta_mask)
        : "memory");
}

__device__ __forceinline__ void tma_prefetch_desc(const TmaDesc& desc) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<unsigned long long>(&desc)) : "memory");
}

// --------------------------------------------------------------- mbarriers
//
// Addresses are 32-bit shared-window addresses of 8-byte barrier words.

__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Makes the initialised barriers visible to the async proxy (the TMA unit)
// before any copy signals them; a CTA barrier after it publishes them to the
// other threads.
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// The producer's arrival, announcing `bytes` more to come from the TMA.
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// ---------------------------------------------------------------- clusters

__device__ __forceinline__ unsigned cluster_ctarank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}

// Every thread of every CTA of the cluster: the barrier-initialisation and
// exit handshake between CTAs that write into each other's shared memory.
// Not .aligned: threads of a warp may reach it apart.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}

// An arrival at the mbarrier at offset `bar` of the cluster's CTA of rank `cta`,
// with the default semantics (release at CTA scope), as CUTLASS's cluster
// pipelines release a slot: what it orders are this warp's completed wgmma
// reads of the slot, and an explicit .release.cluster costs a MEMBAR.GPU on
// every release.
__device__ __forceinline__ void mbar_arrive_remote(unsigned bar, unsigned cta) {
    asm volatile(
        "{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
        "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar),
        "r"(cta)
        : "memory");
}

// A consumer's release of a ring slot that kCtas CTAs fill together (TMA
// multicast): an arrival at the slot's barrier in each of them, since each
// producer writes into every CTA's copy of the slot.  kCtas 1: the CTA's own.
template <int kCtas>
__device__ __forceinline__ void mbar_arrive_cluster(unsigned bar) {
    mbar_arrive(bar);
    if constexpr (kCtas > 1) {
        const unsigned me = cluster_ctarank();
#pragma unroll
        for (unsigned c = 1; c < (unsigned)kCtas; ++c) mbar_arrive_remote(bar, (me + c) % kCtas);
    }
}

// Blocks until the phase of parity `parity` has completed.  A fresh barrier
// is in phase 0, and its "previous" phase (parity 1) counts as completed:
// that is how a producer's first wait on an empty slot returns at once.
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}

// Stage and phase of a ring of kStages slots that a producer fills and the
// consumers drain in the same order: both sides step one of these through
// the same sequence of tiles, so no index is ever communicated.
template <int kStages>
struct PipeState {
    int stage = 0;
    unsigned phase = 0;  // parity of the current pass over the ring

    __device__ __forceinline__ void advance() {
        if (++stage == kStages) {
            stage = 0;
            phase ^= 1u;
        }
    }

    // The state one step back (recomputed rather than kept live).
    __device__ __forceinline__ PipeState previous() const {
        PipeState s;
        s.stage = stage == 0 ? kStages - 1 : stage - 1;
        s.phase = stage == 0 ? phase ^ 1u : phase;
        return s;
    }
};

// ------------------------------------------------------ warpgroup barriers

// Barrier `id` (1..15; 0 is __syncthreads) over `threads` threads, a
// multiple of 32: warpgroups synchronise among themselves without the
// producer.
__device__ __forceinline__ void named_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Arrival at barrier `id` without waiting: the other side of a named_sync.
// Memory accesses before it are visible to the threads that wait there.
__device__ __forceinline__ void named_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// OR of one predicate per thread over the `threads` threads of barrier `id`,
// which all wait there (bar.red: a named barrier that reduces).
__device__ __forceinline__ bool named_or(int id, int threads, bool pred) {
    unsigned r;
    asm volatile(
        "{ .reg .pred p, q;\n"
        "  setp.ne.u32 p, %1, 0;\n"
        "  bar.red.or.pred q, %2, %3, p;\n"
        "  selp.u32 %0, 1, 0, q; }\n"
        : "=r"(r)
        : "r"((unsigned)pred), "r"(id), "r"(threads)
        : "memory");
    return r != 0;
}

// Register hand-over between warpgroups: the producer gives registers back,
// the consumers take them.  Both need a register cap at kernel entry
// (__launch_bounds__(threads, 1)) and one role per branch.
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// OR of a 32-bit value over the warp (redux.sync, sm_80+).
__device__ __forceinline__ unsigned warp_or(unsigned v) {
    unsigned r;
    asm volatile("redux.sync.or.b32 %0, %1, 0xffffffff;\n" : "=r"(r) : "r"(v));
    return r;
}

__device__ __forceinline__ void sts8(unsigned addr, unsigned v) {
    asm volatile("st.shared.u8 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

__device__ __forceinline__ void sts128_zero(unsigned addr) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0) : "memory");
}

__device__ __forceinline__ void lds64(unsigned& lo, unsigned& hi, unsigned addr) {
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(lo), "=r"(hi) : "r"(addr) : "memory");
}

}  // namespace bsfa
