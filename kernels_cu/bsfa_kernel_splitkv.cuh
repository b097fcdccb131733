// The split-KV forward (bsfa_fwd_splitkv.cu exports it): few query rows
// against a long K/V cache (decode, chunked prefill).  One CTA per (split,
// packed row tile, batch): the key tiles of a reference query tile (128
// rows) are cut into num_splits contiguous ranges, each CTA writes a partial
// out (normalised, fp32) and lse for its range, and bsfa_combine merges them
// (bsfa_combine.cuh).  The rows of a CTA are packed (query head, query row)
// pairs of one K/V head and one reference query tile: rows [j*R, (j+1)*R)
// hold head hc*pack_heads + j of the group, R = min(Nq, 128), so K and V are
// read once for every head of the pack.
//
// The gate stays per (head, reference query tile, key tile): a head's rows of
// the reference tile are all in one CTA (pack_heads * R <= kRows), so the
// CTA sees each head's exact tile max.  A head that skips a tile has its
// scores forced to -inf there before the online softmax (its m, l and O are
// then bit-identical to never seeing the tile); P V and the V load of a tile
// are skipped only when every head of the pack skips it.
//
// Grid (num_splits, nQ * Hkv * nPacks, B), nPacks = ceil(G / pack_heads).
//
// Includes what it needs; TR is a TraitsSplitKv.
#pragma once

#include "bsfa_copy_sm80.cuh"
#include "bsfa_gate.cuh"
#include "bsfa_mask.cuh"
#include "bsfa_mma_sm80.cuh"
#include "bsfa_params.cuh"
#include "bsfa_problem.cuh"
#include "bsfa_ptx.cuh"
#include "bsfa_softmax.cuh"
#include "bsfa_splitkv_cta.cuh"
#include "bsfa_splitkv_tile.cuh"
#include "bsfa_traits.cuh"

namespace bsfa {

// Whether this thread's share of a V tile in shared memory holds an inf or
// NaN (exponent bits all ones); the caller ORs it over the CTA.  Rows past Nk
// were zero-filled.
template <class TR>
__device__ __forceinline__ bool v_tile_non_finite(unsigned v_tile) {
    constexpr unsigned kExp = TR::kBf16 ? 0x7f807f80u : 0x7c007c00u;
    constexpr int kChunks = TR::kBlockN * TR::kChunksPerRow;
    bool bad = false;
    for (int idx = threadIdx.x; idx < kChunks; idx += TR::kNThreads) {
        unsigned w[4];
        lds128(w, v_tile + (idx / TR::kChunksPerRow) * TR::kRowBytes + (idx % TR::kChunksPerRow) * 16);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            bad |= (w[j] & (kExp & 0xffffu)) == (kExp & 0xffffu);
            bad |= (w[j] & (kExp & 0xffff0000u)) == (kExp & 0xffff0000u);
        }
    }
    return bad;
}

// Stores (save) or reloads the O values of this thread's rows whose head
// skips the tile (row_bit not in kept) to / from their partial-out rows
// (out0, out1; the thread's own columns, so no barrier is needed).
template <class TR>
__device__ __forceinline__ void park_o(float (&O)[1][TR::kONBlocks][4], const unsigned (&row_bit)[2], unsigned kept,
                                       float* out0, float* out1, int lane, bool save) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        if (row_bit[hf] == 0 || (kept & row_bit[hf])) continue;
        float* og = (hf == 0 ? out0 : out1) + 2 * (lane & 3);
#pragma unroll
        for (int nb = 0; nb < TR::kONBlocks; ++nb) {
            float2* at = reinterpret_cast<float2*>(og + nb * TR::kMmaN);
            if (save) {
                *at = make_float2(O[0][nb][2 * hf], O[0][nb][2 * hf + 1]);
            } else {
                const float2 v2 = *at;
                O[0][nb][2 * hf] = v2.x;
                O[0][nb][2 * hf + 1] = v2.y;
            }
        }
    }
}

template <class TR, bool kCausal>
__device__ __forceinline__ void fwd_splitkv_kernel(const Params& p) {
    constexpr int KS = TR::kKStages;
    using Pipe = SplitKvPipe<TR>;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;

    // Who the CTA is and its key tiles [lo, hi]: bsfa_splitkv_cta.cuh, shared
    // by the split kernels (one grid, keep and partial-out contract).
    SplitKvCta<TR, kCausal> cta(p, tid);
    const int lo = cta.lo, hi = cta.end - 1;
    unsigned char* const keep = cta.clear_keep_tail();

    const unsigned smem = dyn_smem_base();
    const unsigned sQ = smem + TR::kSmemQ;
    const unsigned sVote = smem + TR::kSmemVote;
    const unsigned q_lane = sQ + warp * TR::kWarpRows * TR::kRowBytes + lane_off_a<TR>(lane);
    const unsigned k_lane = smem + TR::kSmemK + lane_off_k<TR>(lane);
    const unsigned v_lane = smem + TR::kSmemV + lane_off_a<TR>(lane);

    // The thread's two accumulator rows (c0c1 and c2c3 of the m16 block).
    const int rbase = warp * TR::kWarpRows + (lane >> 2);
    const PackedRow row[2] = {cta.row(rbase), cta.row(rbase + 8)};
    unsigned row_bit[2];
    row_bits(row, row_bit);

    cta.load_q(sQ);

    const SplitKvLoads<TR> kv(p, cta.pr, cta.hk, smem, tid);

    // Tiles kept without a vote: the diagonal ones, every one in dense mode (thr_mode 0).
    const bool gated = p.thr_mode != 0;
    const int forced_lo = gated ? cta.qt.diag_lo : 0;
    const int forced_hi = gated ? cta.qt.diag_hi : cta.qt.c_end;
    float thr[2];
    cta.thresholds(gated, row, thr);
    const unsigned all_slots = cta.all_slots();
    const int mask_from = cta.mask_from();
    const SplitKvOut<TR> out(p, cta.s, cta.b, cta.Hq, cta.h0, cta.Nq);

    float O[1][TR::kONBlocks][4];
    float m[1][2];
    float l[1][2];
    init_softmax_state(O, m, l);
    const float scale = p.softmax_scale;
    const float scale_log2 = scale * kLog2e;

    // P of the kept tile whose P V is pending (PendingPv, bsfa_splitkv_tile.cuh).
    unsigned P[1][TR::kKeySteps][4];
    // O += P V of tile t, kept by the head slots `kept`.  A head that skips
    // the tile has P = 0 there, but 0 * (NaN or inf) in V would still reach
    // its O through the shared P V product, where the reference (the tile
    // does not exist for that head) gives no NaN.  So when some head skips a
    // tile that others keep, the CTA checks V for non-finite values, and in
    // that (rare) case the skipping rows' O is parked in this split's own
    // partial-out rows (written at the end anyway) across the product.
    auto pv = [&](int t, unsigned kept) {
        bool park = false;
        if ((kept & all_slots) != all_slots) {
            park = cta_sync_or(v_tile_non_finite<TR>(kv.v_tile(t)));
            park = park && row_bit[0] + row_bit[1] != 0;  // this thread has a real row
        }
        if (park) park_o<TR>(O, row_bit, kept, out.row_out(row[0]), out.row_out(row[1]), lane, true);
        pv_tile<TR>(O, P, v_lane + SplitKvLoads<TR>::v_slot(t) * TR::kKVTileBytes);
        if (park) park_o<TR>(O, row_bit, kept, out.row_out(row[0]), out.row_out(row[1]), lane, false);
    };

    if (hi >= lo) {
        kv.commit_prologue(lo, hi, forced_lo, forced_hi);
        cp_async_wait<Pipe::kProloguePending>();  // Q
        cta_sync();
        unsigned qf[TR::kQFragRegs];
        load_q_frags<TR>(qf, q_lane);

        PendingPv pend;
        int ks = 0;
#pragma unroll 1
        for (int c = hi; c >= lo; --c, ks = ks + 1 == KS ? 0 : ks + 1) {
            // cp.async groups: [Q], then three per key tile c, committed by
            // tile c (SplitKvLoads): top [V c-(VS-2) if forced], next [K
            // c-(KS-1)], gate [V c if a vote keeps it].  K is thus KS-1 tiles
            // ahead and never waits for a vote, as decode is memory bound and
            // loads issued a tile late expose the whole memory latency; V
            // waits for the vote and is multiplied a tile later, after the
            // scores and vote of tile c-1, so its latency hides behind them;
            // a forced V is issued VS-2 tiles earlier still (SplitKvPipe has
            // the wait counts).  The slots this tile refills are free after
            // this barrier: K slot ks-1 (read by tile c+1's scores), the V
            // slot of c-(VS-2) = that of c+2 and the V slot of c = that of
            // c+VS (multiplied in tile c+1 or earlier).
            cp_async_wait<Pipe::kTopPending>();
            cta_sync();
            const bool is_forced = c >= forced_lo && c <= forced_hi;
            kv.commit_top(c, lo, hi, forced_lo, forced_hi);
            kv.commit_next(c, lo, ks == 0 ? KS - 1 : ks - 1);

            float Sc[1][TR::kSNBlocks][4];
            qk_tile_q_regs<TR>(Sc, qf, k_lane + ks * TR::kKVTileBytes);
            if (c >= mask_from) {
                mask_keys<TR, kCausal>(Sc, row, c * TR::kBlockN + 2 * (lane & 3), cta.Nk, cta.pr.shift);
            }
            float tile_mx[1][2];
            row_max<TR>(Sc, tile_mx);

            // The gate (vote or forced), the pending P V of tile c+1, then
            // tile c's softmax: gate_step.  A vote keeps the head slots whose
            // real rows have (row max * scale >= thr).
            gate_step<TR>(
                pend, cta, kv, keep, c, is_forced, all_slots,
                [&] { return vote_slots<TR>(tile_mx, thr, row_bit, scale, sVote, c, lane, warp); }, pv,
                [&](unsigned kept) {
                    kept_tile_update<TR>(Sc, tile_mx, kept, row_bit, is_forced, m, l, O, P, scale_log2);
                });
        }
        drain_pv(pend, lo, pv);
    }

    cp_async_wait<0>();  // an empty range never waited for its Q copy

    // The partial of this split: out normalised in fp32, lse; an empty range
    // (more splits than tiles) or a row without a kept key gives 0 and -inf,
    // which the merge weighs 0.
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const float lt = quad_sum(l[0][hf]);
        if (!row[hf].valid) continue;
        const float inv = lt > 0.f ? 1.f / lt : 0.f;
        const long long prow = out.prow(row[hf]);
        float* og = out.row_out(row[hf]) + 2 * (lane & 3);
#pragma unroll
        for (int nb = 0; nb < TR::kONBlocks; ++nb) {
            float2 v2;
            v2.x = O[0][nb][2 * hf] * inv;
            v2.y = O[0][nb][2 * hf + 1] * inv;
            *reinterpret_cast<float2*>(og + nb * TR::kMmaN) = v2;
        }
        if ((lane & 3) == 0) p.lse_part[prow] = row_lse(lt, m[0][hf], scale);
    }
}

}  // namespace bsfa
