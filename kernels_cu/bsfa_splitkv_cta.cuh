// A split-KV CTA's set-up, shared by the two split kernels
// (bsfa_kernel_splitkv.cuh: 64 / 128 packed rows; bsfa_kernel_split16.cuh:
// 16 rows, the warps splitting each key tile).  The kernels are picked per
// call by row count behind one launch (bsfa_cupy/_splitkv.py: same grid,
// same Params), so the grid decode, the split boundaries, the packed-row
// layout, the keep-mask entries and the partial-out rows are one contract
// with the host and with the merge (bsfa_combine.cuh); one definition
// keeps the two kernels from drifting apart where no CPU test would notice.
//
//   SplitKvCta    built at the kernel top: who the CTA is (split, K/V head,
//                 head pack, query tile, batch element), its Problem and
//                 QueryTile, its key tiles; keep clearing and writing, the
//                 packed rows, the Q gather, thresholds, mask start.
//   SplitKvLoads  K / V tile loads into the cp.async ring and V buffers.
//   SplitKvOut    the fp32 partial-out / lse rows of this split.
//
// Three pieces, built where the kernels computed these values before
// (SplitKvLoads and SplitKvOut after the Q gather is issued), with the memory
// work (keep clearing, Q gather, K / V loads) as members called where the
// kernel wants it: bench/sass_diff.py then shows the same SASS as with the
// code written out in each kernel.  Building everything in the top object
// moves parameter loads and address arithmetic ahead of the split-0 keep
// clearing and changed the 64/128-row kernels' SASS; hi = end - 1 (and the
// kernels' hi >= lo) stay in the kernels for the same reason: as a member,
// hi changed the branch shape of the K prologue.
//
// Includes what it needs; TR is a TraitsSplitKv.
#pragma once

#include "bsfa_copy_sm80.cuh"
#include "bsfa_gate.cuh"
#include "bsfa_mask.cuh"
#include "bsfa_params.cuh"
#include "bsfa_problem.cuh"
#include "bsfa_ptx.cuh"
#include "bsfa_traits.cuh"

namespace bsfa {

// One accumulator row of this thread in the packed tile: which head slot and
// query row it is, and whether it is a real row at all (pack slots past the
// group, rows past Nq are zero-filled and never vote or get written).
struct PackedRow {
    int slot;  // head slot j in the pack
    int i;     // query row in the problem
    bool valid;
};

__device__ __forceinline__ PackedRow packed_row(int r, int R, int q0, int Nq, int n_slots) {
    PackedRow pr;
    pr.slot = r / R;
    pr.i = q0 + r % R;
    pr.valid = pr.slot < n_slots && pr.i < Nq;
    return pr;
}

// Built once, at the kernel top, from Params and the block index alone.
template <class TR, bool kCausal>
struct SplitKvCta {
    using Tile = QueryTile<TileShape, kCausal>;

    const Params& p;
    const int tid;

    // Grid (num_splits, nQ * Hkv * n_packs, B), n_packs = ceil(G / pack).
    const int Hq, Hkv;
    const int G;     // query heads per K/V head
    const int pack;  // heads per pack (pack_heads)
    const int n_packs;
    const int S;   // splits
    const int s;   // this split
    const int hc;  // head pack in the group
    const int hk;  // K/V head
    const int a;   // reference query tile
    const long long b;
    const int h0;       // query head of pack slot 0
    const int n_slots;  // heads in this pack (the group's last pack may be short)

    const Problem pr;
    const int Nq, Nk;
    const int R;  // rows per head slot, min(Nq, 128)
    const Tile qt;
    const int nK;  // entries of a keep row
    const int n_tiles;  // key tiles with a valid entry, [0, c_end]
    // This split's key tiles [lo, end) of them (the kernels loop from end - 1
    // down); empty when there are more splits than tiles.
    const int lo, end;

    __device__ __forceinline__ SplitKvCta(const Params& p_, int tid_)
        : p(p_),
          tid(tid_),
          Hq(p_.Hq),
          Hkv(p_.Hkv),
          G(Hq / Hkv),
          pack(p_.pack_heads),
          n_packs(ceil_div(G, pack)),
          S(p_.num_splits),
          s(blockIdx.x),
          hc((int)blockIdx.y % n_packs),
          hk(((int)blockIdx.y / n_packs) % Hkv),
          a((int)blockIdx.y / (n_packs * Hkv)),
          b(blockIdx.z),
          h0(hk * G + hc * pack),
          n_slots(imin(pack, G - hc * pack)),
          pr(cta_problem<false>(p_, b)),
          Nq(pr.Nq),
          Nk(pr.Nk),
          R(imin(Nq, TileShape::kBlockM)),
          qt(a, pr),
          nK(tile_row_len<TileShape>(p_)),
          n_tiles(qt.c_end + 1),
          lo((int)((long long)s * n_tiles / S)),
          end((int)((long long)(s + 1) * n_tiles / S)) {}

    // The keep mask (nullptr when none was asked for), its entries of tiles
    // without a valid entry cleared: no split visits those, so split 0 alone
    // clears them.
    __device__ __forceinline__ unsigned char* clear_keep_tail() const {
        unsigned char* keep = p.keep;
        if (keep != nullptr && s == 0) {
            const int tail = nK - n_tiles;
            for (int t = tid; t < n_slots * tail; t += TR::kNThreads) {
                const int j = t / tail;
                keep[tile_row<TileShape>(p, b, h0 + j, a) + n_tiles + t % tail] = 0;
            }
        }
        return keep;
    }

    // Tile c's entry of every head slot of the pack in the keep mask `keep`.
    __device__ __forceinline__ void write_keep(unsigned char* keep, int c, unsigned kept) const {
        if (keep != nullptr && tid < n_slots) keep[tile_row<TileShape>(p, b, h0 + tid, a) + c] = (kept >> tid) & 1u;
    }

    // Packed row r of the CTA's tile (R rows per head slot).
    __device__ __forceinline__ PackedRow row(int r) const { return packed_row(r, R, qt.q0, Nq, n_slots); }

    // The gate thresholds of the thread's two rows (0 for pad rows and in
    // dense mode, where nothing reads them): per row because a pack mixes
    // heads, and the gate is per head.
    __device__ __forceinline__ void thresholds(bool gated, const PackedRow (&rows)[2], float (&thr)[2]) const {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            thr[hf] = gated && rows[hf].valid ? tile_threshold<TileShape>(p.thresholds, p.thr_scalar, p.thr_mode,
                                                                          p.thr_T, h0 + rows[hf].slot, qt.tile_pos)
                                              : 0.f;
        }
    }

    // The keep-mask bits of every head slot of the pack.
    __device__ __forceinline__ unsigned all_slots() const { return n_slots >= 32 ? ~0u : (1u << n_slots) - 1u; }

    // Key tiles from mask_from() on need the causal / ragged-key mask (rows
    // past Nq are never looked at, so unlike QueryTile a ragged query tile
    // does not mask everything).
    __device__ __forceinline__ int mask_from() const {
        int from = Nk / TR::kBlockN;
        if (kCausal) {
            const int x = qt.diag_off + 1;
            const int first = x >= 0 ? x / TR::kBlockN : -((-x + TR::kBlockN - 1) / TR::kBlockN);
            from = imin(from, imax(first, 0));
        }
        return from;
    }

    // Q: packed rows gathered chunk by chunk (a row's head and query row both
    // vary), zero-filled where the row is not real, as one cp.async group.
    __device__ __forceinline__ void load_q(unsigned sQ) const {
        constexpr int kCpr = TR::kChunksPerRow;
        const unsigned short* qb = p.q + pr.q_off;
        for (int t = tid; t < TR::kRows * kCpr; t += TR::kNThreads) {
            const int r = t / kCpr, cc = t % kCpr;
            const PackedRow qr = row(r);
            const unsigned short* src =
                qb + (long long)qr.i * p.q_sn + (long long)(h0 + qr.slot) * p.q_sh + cc * TR::kChunkElems;
            cp_async_16(sQ + r * TR::kRowBytes + cc * 16, qr.valid ? (const void*)src : (const void*)p.q,
                        qr.valid ? 16u : 0u);
        }
        cp_async_commit();
    }
};

// The wait counts of the cp.async groups SplitKvLoads commits, three per key
// tile c in the order top, next, gate.  At the top of tile c, K c (tile
// c+KS-1's next group) must have landed: its gate group and the groups of
// tiles c+1 .. c+KS-2 may pend.  The P V of tile c+1 runs in tile c, after
// its scores: once tile c has committed its top and next groups, V c+1 kept
// by a vote (tile c+1's gate group) lets those two pend; a forced V c+1
// (tile c+VS-1's top group) lets the groups since pend too, and is covered
// by the top wait already when VS >= KS.
template <class TR>
struct SplitKvPipe {
    static constexpr int kGroupsPerTile = 3;
    static constexpr int kTopPending = kGroupsPerTile * (TR::kKStages - 2) + 1;
    // After SplitKvLoads::commit_prologue: all but its groups, i.e. Q.
    static constexpr int kProloguePending = kGroupsPerTile * (TR::kKStages - 1);
    static constexpr int kGatedVPending = 2;
    static constexpr bool kForcedVWait = TR::kVStages < TR::kKStages;
    static constexpr int kForcedVPending = kGroupsPerTile * (TR::kVStages - 1) + 1;
    static_assert(TR::kKStages >= 2 && TR::kVStages >= 2, "K prefetched a tile ahead, V a tile behind the vote");

    // This thread's share of V c+1 landed; a barrier then makes it the CTA's.
    static __device__ __forceinline__ void wait_v_next(bool voted) {
        if (voted) {
            cp_async_wait<kGatedVPending>();
        } else if (kForcedVWait) {
            cp_async_wait<kForcedVPending>();
        }
    }
};

// K / V tile c of the CTA's K/V head, every thread its share: key tiles
// before n_full unchecked, the ragged last one zero-filled past Nk.
template <class TR>
struct SplitKvLoads {
    using Copy = TileCopy<TR>;

    const Params& p;
    const int tid, Nk;
    const unsigned smem;
    const unsigned short* const kg;  // this thread's first K / V chunk of key tile 0
    const unsigned short* const vg;
    const int n_full;

    __device__ __forceinline__ SplitKvLoads(const Params& p_, const Problem& pr, int hk, unsigned smem_, int tid_)
        : p(p_),
          tid(tid_),
          Nk(pr.Nk),
          smem(smem_),
          kg(p_.k + pr.k_off + (long long)hk * p_.k_sh + Copy::thread_offset(tid_, p_.k_sn)),
          vg(p_.v + pr.v_off + (long long)hk * p_.v_sh + Copy::thread_offset(tid_, p_.v_sn)),
          n_full(Nk / TR::kBlockN) {}

    // K tile c into ring slot `slot`; V tile c into V slot v_slot(c) (the
    // 64-row kernel's cp.async group comment says why the slots are free).
    __device__ __forceinline__ void load_k(int c, int slot) const {
        load_kv(kg, p.k_sn, p.k, smem + TR::kSmemK + slot * TR::kKVTileBytes, c);
    }
    __device__ __forceinline__ void load_v(int c) const { load_kv(vg, p.v_sn, p.v, v_tile(c), c); }
    static __device__ __forceinline__ int v_slot(int c) { return c % TR::kVStages; }
    __device__ __forceinline__ unsigned v_tile(int c) const {
        return smem + TR::kSmemV + v_slot(c) * TR::kKVTileBytes;
    }

    // The three cp.async groups of key tile c (bsfa_kernel_splitkv.cuh), each
    // committed even when empty so that every tile counts the same:
    //   top:  V of tile c - (kVStages - 2) when it is in [lo, hi] and kept
    //         without a vote (forced), prefetched;
    //   next: K of tile c - (kKStages - 1) into ring slot `slot`, issued
    //         before the vote so that the K stream never waits for one;
    //   gate: V of tile c when a vote kept it (issued after the vote).
    __device__ __forceinline__ void commit_top(int c, int lo, int hi, int forced_lo, int forced_hi) const {
        const int t = c - (TR::kVStages - 2);
        if (t >= lo && t <= hi && t >= forced_lo && t <= forced_hi) load_v(t);
        cp_async_commit();
    }
    __device__ __forceinline__ void commit_gate(int c, bool load) const {
        if (load) load_v(c);
        cp_async_commit();
    }
    __device__ __forceinline__ void commit_next(int c, int lo, int slot) const {
        const int t = c - (TR::kKStages - 1);
        if (t >= lo) load_k(t, slot);
        cp_async_commit();
    }
    // Before the first tile hi: the groups tiles hi + kKStages - 1 .. hi + 1
    // would have committed, as if the loop had started above hi.
    __device__ __forceinline__ void commit_prologue(int lo, int hi, int forced_lo, int forced_hi) const {
#pragma unroll
        for (int j = TR::kKStages - 1; j >= 1; --j) {
            commit_top(hi + j, lo, hi, forced_lo, forced_hi);
            commit_next(hi + j, lo, TR::kKStages - 1 - j);
            cp_async_commit();
        }
    }

  private:
    __device__ __forceinline__ void load_kv(const unsigned short* g, long long sn, const unsigned short* safe,
                                            unsigned dst, int c) const {
        const unsigned short* src = g + (long long)c * TR::kBlockN * sn;
        if (c < n_full) {
            Copy::template load_full<TR::kBlockN>(dst, src, sn, tid);
        } else {
            Copy::template load<TR::kBlockN>(dst, src, sn, Nk - c * TR::kBlockN, tid, safe);
        }
    }
};

// This split's partial-out rows, laid out as the merge reads them:
// (num_splits, B, Hq, Nq) rows of lse_part, and of o_part with head-dim
// columns.  Also the parking place of rows whose head skips a tile with a
// non-finite V (park_o): the split's own rows, written at the end anyway.
template <class TR>
struct SplitKvOut {
    const Params& p;
    const int s;
    const long long rows_per_split;
    const long long b;
    const int Hq, h0, Nq;

    __device__ __forceinline__ SplitKvOut(const Params& p_, int s_, long long b_, int Hq_, int h0_, int Nq_)
        : p(p_), s(s_), rows_per_split((long long)p_.B * Hq_ * Nq_), b(b_), Hq(Hq_), h0(h0_), Nq(Nq_) {}

    // A packed row's index in lse_part (and row in o_part).
    __device__ __forceinline__ long long prow(const PackedRow& r) const {
        return s * rows_per_split + (b * Hq + h0 + r.slot) * (long long)Nq + r.i;
    }
    __device__ __forceinline__ float* row_out(const PackedRow& r) const {
        const long long at = prow(r);
        return p.o_part + at * TR::kHeadDim;
    }
};

}  // namespace bsfa
