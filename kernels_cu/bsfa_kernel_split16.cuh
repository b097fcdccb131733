// The key-split variant of the split-KV forward (bsfa_fwd_splitkv.cu exports
// it as bsfa_fwd_split16): for R * pack <= 16 packed rows, e.g. a decode step
// (Nq = 1) of a GQA group of up to 16 heads.  The 64-row kernel
// (bsfa_kernel_splitkv.cuh) would give each of its 4 warps a whole m16 row
// block against every key tile, 15/16 of it padding at Nq = 1 with 4 heads;
// here the 4 warps hold the SAME 16 packed rows and split each 64-key tile
// into 16-key slices (warp w: keys 16w..16w+15).
//
// Per tile, as the 64-row kernel: K and V are loaded once per CTA by all
// threads into the same cp.async ring and buffers, V behind the vote and
// multiplied a tile late; each warp computes S of its 16 x 16 slice, masks
// it (causal / ragged keys at the slice's offset) and votes with its
// per-head slice maxima; the cross-warp OR of the votes is
// exactly the reference's per-(head, 64-key tile) decision (some slice max
// passes the threshold iff the tile max does; max.f32 skips NaN in both).  A
// head that skips the tile gets -inf scores there in every warp.  Each warp
// keeps its own online softmax (m, l, O) over its own keys (disjoint slices,
// their union all keys) and multiplies its P slice by V rows 16w..16w+15.
// At the end of the split the warps' states of each row are merged through
// shared memory by the rule of merge_partials (m = max, each part scaled by
// exp(m_w - m), l and O summed), then written as the 64-row kernel writes its
// partial (normalised out in fp32, lse).
//
// Non-finite values follow the 64-row kernel: a NaN score makes the warp's l
// and O of that row NaN (and thus the merged row), a non-finite V element
// reaches the O column of every row whose warp multiplies it (0 * inf = NaN
// included), and the merge carries it (sc * NaN = NaN even for sc = 0).  The
// rows of heads that skip a tile whose V holds a non-finite value are parked
// across P V as in the 64-row kernel, in the split's own partial-out rows;
// the 4 warps hold the same rows, so they take turns (rare path).
//
// Includes what it needs; TR is a TraitsSplitKv with kKeySplit.
#pragma once

#include "bsfa_combine.cuh"
#include "bsfa_copy_sm80.cuh"
#include "bsfa_gate.cuh"
#include "bsfa_kernel_splitkv.cuh"
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

template <class TR, bool kCausal>
__device__ __forceinline__ void fwd_split16_kernel(const Params& p) {
    static_assert(TR::kKeySplit, "fwd_split16_kernel takes the key-split traits");
    constexpr int KS = TR::kKStages;
    using Pipe = SplitKvPipe<TR>;
    constexpr int kWR = TR::kWarpRows;  // 16 packed rows, the same in every warp
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
    // Every warp reads the same Q rows; K and V at its own 16-key slice.
    const unsigned slice_off = warp * TR::kWarpKeys * TR::kRowBytes;
    const unsigned q_lane = sQ + lane_off_a<TR>(lane);
    const unsigned k_lane = smem + TR::kSmemK + slice_off + lane_off_k<TR>(lane);
    const unsigned v_lane = smem + TR::kSmemV + slice_off + lane_off_a<TR>(lane);

    // The thread's two accumulator rows (c0c1 and c2c3 of the m16 block).
    const int rbase = lane >> 2;
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
    // O += P V of tile t over the warp's 16 keys (one k16 step, V rows
    // 16w..16w+15), kept by the head slots `kept`.
    auto pv_slice = [&](int t) {
        const unsigned va = v_lane + SplitKvLoads<TR>::v_slot(t) * TR::kKVTileBytes;
#pragma unroll
        for (int dp = 0; dp < TR::kONBlocks / 2; ++dp) {
            unsigned B[4];
            ldsm_x4_trans(B, va + dp * (2 * TR::kMmaN * TR::kElemBytes));
            mma_16816<TR::kBf16>(O[0][2 * dp], P[0][0], B[0], B[1]);
            mma_16816<TR::kBf16>(O[0][2 * dp + 1], P[0][0], B[2], B[3]);
        }
    };
    // Heads that skip a tile others keep, with a non-finite V in it: their O
    // is parked in the split's partial-out rows across P V
    // (bsfa_kernel_splitkv.cuh).  All 4 warps hold those rows, so they take
    // turns on the one parking place, a barrier apart.
    auto pv = [&](int t, unsigned kept) {
        bool park = false;
        if ((kept & all_slots) != all_slots) park = cta_sync_or(v_tile_non_finite<TR>(kv.v_tile(t)));
        if (park) {
            const bool mine = row_bit[0] + row_bit[1] != 0;  // this thread has a real row
#pragma unroll 1
            for (int w = 0; w < TR::kNWarps; ++w) {
                if (warp == w) {
                    if (mine) park_o<TR>(O, row_bit, kept, out.row_out(row[0]), out.row_out(row[1]), lane, true);
                    pv_slice(t);
                    if (mine) park_o<TR>(O, row_bit, kept, out.row_out(row[0]), out.row_out(row[1]), lane, false);
                }
                cta_sync();
            }
        } else {
            pv_slice(t);
        }
    };

    if (hi >= lo) {
        // The cp.async groups and the late P V of bsfa_kernel_splitkv.cuh:
        // the prologue, then top / next / gate per tile.
        kv.commit_prologue(lo, hi, forced_lo, forced_hi);
        cp_async_wait<Pipe::kProloguePending>();  // Q
        cta_sync();
        unsigned qf[TR::kQFragRegs];
        load_q_frags<TR>(qf, q_lane);

        PendingPv pend;
        int ks = 0;
#pragma unroll 1
        for (int c = hi; c >= lo; --c, ks = ks + 1 == KS ? 0 : ks + 1) {
            cp_async_wait<Pipe::kTopPending>();
            cta_sync();
            const bool is_forced = c >= forced_lo && c <= forced_hi;
            kv.commit_top(c, lo, hi, forced_lo, forced_hi);
            kv.commit_next(c, lo, ks == 0 ? KS - 1 : ks - 1);

            // S of this warp's 16-key slice: Sc[0][nb][.] = keys 16 * warp + 8 * nb + 2 * (lane & 3) + {0, 1}.
            float Sc[1][TR::kSNBlocks][4];
            qk_tile_q_regs<TR>(Sc, qf, k_lane + ks * TR::kKVTileBytes);
            if (c >= mask_from) {
                mask_keys<TR, kCausal>(Sc, row, c * TR::kBlockN + warp * TR::kWarpKeys + 2 * (lane & 3), cta.Nk,
                                       cta.pr.shift);
            }
            // Row maxima over the slice (max.f32: NaN skipped unless all NaN), quad-complete.
            float tile_mx[1][2];
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                float v = fmax2(Sc[0][0][2 * hf], Sc[0][0][2 * hf + 1]);
#pragma unroll
                for (int nb = 1; nb < TR::kSNBlocks; ++nb)
                    v = fmax2(v, fmax2(Sc[0][nb][2 * hf], Sc[0][nb][2 * hf + 1]));
                v = fmax2(v, shfl_xor(v, 1));
                tile_mx[0][hf] = fmax2(v, shfl_xor(v, 2));
            }

            // The gate, the pending P V and tile c's softmax as in
            // bsfa_kernel_splitkv.cuh; a vote ORs over each slot's real rows
            // and the 4 slices (slice max * scale >= thr).
            gate_step<TR>(
                pend, cta, kv, keep, c, is_forced, all_slots,
                [&] { return vote_slots<TR>(tile_mx, thr, row_bit, scale, sVote, c, lane, warp); }, pv,
                [&](unsigned kept) {
                    kept_tile_update<TR>(Sc, tile_mx, kept, row_bit, is_forced, m, l, O, P, scale_log2);
                });
        }
        drain_pv(pend, lo, pv);
    }

    // Merge of the 4 warps' states of the same rows, through the K / V
    // buffers: every cp.async has landed (an empty range never waited for its
    // Q copy) and every warp is past its last read of K and V.
    cp_async_wait<0>();
    cta_sync();
    constexpr int kMS = TR::kMergeStride;
    const unsigned sO = smem + TR::kSmemMergeO;
    const unsigned sM = smem + TR::kSmemMergeM;
    const unsigned sL = smem + TR::kSmemMergeL;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int r = rbase + 8 * hf;
        const float lt = quad_sum(l[0][hf]);  // m is the same in the 4 lanes of a row
        if ((lane & 3) == 0) {
            sts_f32(sM + (warp * kWR + r) * 4, m[0][hf]);
            sts_f32(sL + (warp * kWR + r) * 4, lt);
        }
        const unsigned orow = sO + ((warp * kWR + r) * kMS + 2 * (lane & 3)) * 4;
#pragma unroll
        for (int nb = 0; nb < TR::kONBlocks; ++nb) {
            sts_f32(orow + nb * TR::kMmaN * 4, O[0][nb][2 * hf]);
            sts_f32(orow + nb * TR::kMmaN * 4 + 4, O[0][nb][2 * hf + 1]);
        }
    }
    cta_sync();

    // 8 threads per row, 4 columns (16 bytes) each per 32-column step.  The
    // partial of this split: out normalised in fp32, lse; an empty range or a
    // row without a kept key gives 0 and -inf, which the merge weighs 0.
    static_assert(TR::kNThreads == 8 * kWR, "8 threads per merged row");
    static_assert(TR::kHeadDim % 32 == 0, "32-column merge steps");
    {
        const int r = tid >> 3;
        const int sub = tid & 7;
        const PackedRow mr = cta.row(r);
        if (mr.valid) {
            float mw[TR::kNWarps];
            float M = neg_inf();
#pragma unroll
            for (int w = 0; w < TR::kNWarps; ++w) {
                mw[w] = lds_f32(sM + (w * kWR + r) * 4);
                M = fmax2(M, mw[w]);
            }
            // A row without a valid score in any warp takes 0 as its reference
            // (exp2(-inf - ref) = 0 rather than NaN), as softmax_row does.
            const float ref = M == neg_inf() ? 0.f : M;
            float sc[TR::kNWarps];
            float L = 0.f;
#pragma unroll
            for (int w = 0; w < TR::kNWarps; ++w) {
                sc[w] = ex2((mw[w] - ref) * scale_log2);
                L += lds_f32(sL + (w * kWR + r) * 4) * sc[w];
            }
            const float inv = L > 0.f ? 1.f / L : 0.f;
            const long long prow = out.prow(mr);
            float* og = out.row_out(mr);
#pragma unroll
            for (int j = 0; j < TR::kHeadDim / 32; ++j) {
                const int col = j * 32 + sub * 4;
                float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int w = 0; w < TR::kNWarps; ++w) {
                    unsigned x[4];
                    lds128(x, sO + ((w * kWR + r) * kMS + col) * 4);
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[e] += sc[w] * __uint_as_float(x[e]);
                }
                *reinterpret_cast<float4*>(og + col) =
                    make_float4(acc[0] * inv, acc[1] * inv, acc[2] * inv, acc[3] * inv);
            }
            if (sub == 0) p.lse_part[prow] = row_lse(L, M, scale);
        }
    }

    // The last split of this row group to get here merges the group (bsfa_combine.cuh); the vote
    // slots are idle by now.
    merge_if_last<TR::kHeadDim, TR::kBf16, TR::kNThreads>(p, sVote, cta.b, cta.h0, cta.n_slots, cta.qt.q0, cta.R);
}

}  // namespace bsfa
