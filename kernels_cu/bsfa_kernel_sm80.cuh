// The bodies of the mma.sync kernels (bsfa_fwd_sm80.cu exports them):
// bsfa_fwd and bsfa_fwd_varlen (CTA setup, then the mainloop and the
// epilogue) and bsfa_block_max (the S path of bsfa_fwd alone).
//
// Includes what it needs; TR is a TraitsSm80.
#pragma once

#include "bsfa_args.cuh"
#include "bsfa_copy_sm80.cuh"
#include "bsfa_epilogue_sm80.cuh"
#include "bsfa_gate.cuh"
#include "bsfa_mainloop_sm80.cuh"
#include "bsfa_mask.cuh"
#include "bsfa_mma_sm80.cuh"
#include "bsfa_params.cuh"
#include "bsfa_problem.cuh"
#include "bsfa_ptx.cuh"
#include "bsfa_scheduler.cuh"
#include "bsfa_softmax.cuh"

namespace bsfa {

// kVarlen: bsfa_fwd_varlen, b is a packed sequence (bsfa_problem.cuh).
template <class TR, bool kCausal, bool kVarlen>
__device__ __forceinline__ void fwd_kernel_sm80(const FwdArgs& args) {
    const int tid = threadIdx.x;
    const int h = blockIdx.y;
    const long long b = blockIdx.z;
    const int a = query_tile_index<TR, kCausal>(args.Nq);
    const Problem pr = cta_problem<kVarlen>(args, b);
    if constexpr (kVarlen) {
        if (a * TR::kBlockM >= pr.Nq) {  // past this sequence's end
            keep_row_for<TR>(args, b, h, a, -1, tid, TR::kNThreads);
            return;
        }
    }
    const QueryTile<TR, kCausal> qt(a, pr);

    unsigned char* keep_row = keep_row_for<TR>(args, b, h, a, qt.c_end, tid, TR::kNThreads);

    const FwdSmemSm80<TR> sm;

    float O[TR::kWarpMBlocks][TR::kONBlocks][4];
    float m[TR::kWarpMBlocks][2];
    float l[TR::kWarpMBlocks][2];
    init_softmax_state(O, m, l);

    if (qt.c_end >= 0) fwd_mainloop<TR, kCausal, kVarlen>(args, pr, qt, h, b, keep_row, sm, O, m, l);
    fwd_epilogue<TR, kVarlen>(args, qt.q0, h, b, sm.sQ, O, m, l);
}

// tile_max[b, h, a, c] = softmax_scale * max of the valid scores of tile
// (a, c), -inf for tiles without a valid entry.  The same S machinery as
// bsfa_fwd (double-buffered K, no V); one shared-memory exchange of per-warp
// maxima per tile.
template <class TR, bool kCausal>
__device__ __forceinline__ void block_max_kernel_sm80(const Params& p) {
    constexpr int MB = TR::kWarpMBlocks;
    const unsigned short* __restrict__ q = p.q;
    const unsigned short* __restrict__ k = p.k;
    float* __restrict__ tile_max = p.tile_max;
    const long long q_sn = p.q_sn, q_sh = p.q_sh;
    const long long k_sn = p.k_sn, k_sh = p.k_sh;
    const int Hq = p.Hq, Hkv = p.Hkv;
    const float softmax_scale = p.softmax_scale;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int h = blockIdx.y;
    const long long b = blockIdx.z;
    const int a = query_tile_index<TR, kCausal>(p.Nq);
    const Problem pr = cta_problem<false>(p, b);
    const int Nq = pr.Nq, Nk = pr.Nk;
    const QueryTile<TR, kCausal> qt(a, pr);
    const int nK = tile_row_len<TR>(p);

    float* tm_row = tile_max + tile_row<TR>(p, b, h, a);
    for (int c = qt.c_end + 1 + tid; c < nK; c += TR::kNThreads) tm_row[c] = neg_inf();
    if (qt.c_end < 0) return;

    const unsigned smem = dyn_smem_base();
    const unsigned sQ = smem + TR::kSmemQ;
    const unsigned sRed = smem + TR::kSmemRed;
    const unsigned q_lane = sQ + warp * TR::kWarpRows * TR::kRowBytes + lane_off_a<TR>(lane);
    const unsigned k_lane = smem + TR::kSmemK + lane_off_k<TR>(lane);
    using Copy = TileCopy<TR>;
    const unsigned short* kg = k + pr.k_off + (long long)(h / (Hq / Hkv)) * k_sh + Copy::thread_offset(tid, k_sn);
    const int row0 = qt.q0 + warp * TR::kWarpRows + (lane >> 2);

    auto load_k = [&](int c, int slot) {
        Copy::template load<TR::kBlockN>(smem + TR::kSmemK + slot * TR::kKVTileBytes,
                                         kg + (long long)c * TR::kBlockN * k_sn, k_sn, Nk - c * TR::kBlockN, tid, k);
    };
    // Thread 0 folds the per-warp maxima of the tile whose exchange slot is
    // `slot`; callers guarantee a barrier since the warps wrote it.
    auto write_tile = [&](int c, int slot) {
        if (tid == 0) {
            float mx = lds_f32(sRed + slot * TR::kNWarps * 4);
            for (int w = 1; w < TR::kNWarps; ++w) mx = fmax2(mx, lds_f32(sRed + (slot * TR::kNWarps + w) * 4));
            tm_row[c] = mx * softmax_scale;
        }
    };

    Copy::template load<TR::kBlockM>(sQ, q + pr.q_off + h * q_sh + qt.q0 * q_sn + Copy::thread_offset(tid, q_sn),
                                     q_sn, Nq - qt.q0, tid, q);
    cp_async_commit();
    load_k(qt.c_end, 0);
    cp_async_commit();

    unsigned qf[TR::kQFragRegs];
    if constexpr (TR::kQInRegs) {
        cp_async_wait<1>();
        cta_sync();
        load_q_frags<TR>(qf, q_lane);
    }

    int slot = 0;
    for (int c = qt.c_end; c >= 0; --c, slot ^= 1) {
        cp_async_wait<0>();
        cta_sync();
        // The exchange slot of tile c+1 was written before this barrier and is
        // rewritten only after the next one.
        if (c < qt.c_end) write_tile(c + 1, slot ^ 1);
        if (c > 0) load_k(c - 1, slot ^ 1);
        cp_async_commit();

        float S[MB][TR::kSNBlocks][4];
        qk_tile<TR>(S, qf, q_lane, k_lane + slot * TR::kKVTileBytes);
        if (qt.needs_mask(c)) mask_tile<TR, kCausal>(S, c, row0, lane, Nq, Nk, pr.shift);
        float row_mx[MB][2];
        row_max<TR>(S, row_mx);
        float mx = row_mx[0][0];
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) mx = fmax2(mx, row_mx[mb][hf]);
        // Rows are already reduced within each quad; fold the 8 quads.
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) mx = fmax2(mx, shfl_xor(mx, off));
        if (lane == 0) sts_f32(sRed + (slot * TR::kNWarps + warp) * 4, mx);
    }
    cta_sync();
    write_tile(0, slot ^ 1);
}

}  // namespace bsfa
