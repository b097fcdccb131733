// The bodies of the sm_90a kernels (bsfa_fwd_sm90.cu exports them):
// bsfa_fwd and bsfa_fwd_varlen (CTA setup, then the mainloop and the
// epilogue) and bsfa_block_max (the S path of bsfa_fwd alone).
//
// Layout.  One CTA = one warpgroup (128 threads) per (128-query tile, head,
// batch), two CTAs per SM.  The tile's rows are two wgmma M=64 halves; warp w
// owns rows 16w..16w+15 of each half, so a thread holds the same 32 rows'
// worth of fragments as a warp of the mma.sync kernel.  S = Q K^T is a
// wgmma m64n64k16 per half with Q and K read from shared memory; O += P V a
// wgmma m64nDk16 per half with P straight from registers (the S accumulator
// layout is the A-fragment layout) and V read "MN-major" (d contiguous), so no
// tile is ever transposed.  Tiles sit in 128-byte swizzled panels of 64
// columns (bsfa_wgmma_sm90.cuh), filled by cp.async.
//
// Includes what it needs; TR is a TraitsSm90.
#pragma once

#include "bsfa_args.cuh"
#include "bsfa_copy_sm90.cuh"
#include "bsfa_epilogue_sm90.cuh"
#include "bsfa_gate.cuh"
#include "bsfa_mainloop_sm90.cuh"
#include "bsfa_mask.cuh"
#include "bsfa_mma_sm90.cuh"
#include "bsfa_params.cuh"
#include "bsfa_problem.cuh"
#include "bsfa_ptx.cuh"
#include "bsfa_scheduler.cuh"
#include "bsfa_softmax.cuh"
#include "bsfa_wgmma_sm90.cuh"

namespace bsfa {

// kVarlen: bsfa_fwd_varlen, b is a packed sequence (bsfa_problem.cuh).
template <class TR, bool kCausal, bool kVarlen>
__device__ __forceinline__ void fwd_kernel_sm90(const Params& p, const FwdArgs& args) {
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const CtaHead ch = chunked_head(args.Hq);
    const int h = ch.h;
    const long long b = ch.b;
    const int a = chunked_query_tile<TR, kCausal>(args.Nq);
    const Problem pr = cta_problem<kVarlen>(p, b);
    if constexpr (kVarlen) {
        if (a * TR::kBlockM >= pr.Nq) {  // past this sequence's end
            keep_row_for<TR>(args, b, h, a, -1, tid, TR::kNThreads);
            return;
        }
    }
    const QueryTile<TR, kCausal> qt(a, pr);
    // Tile row of this thread's accumulator elements 0..1 of half 0 (2..3: +8;
    // half hm: + 64 hm).
    const int row_in_tile = warp * TR::kWarpRows + (lane >> 2);

    unsigned char* keep_row = keep_row_for<TR>(args, b, h, a, qt.c_end, tid, TR::kNThreads);

    const unsigned smem = aligned_smem_base();
    const unsigned sQ = smem + TR::kSmemQ;
    const unsigned sK = smem + TR::kSmemK;
    const unsigned sV = smem + TR::kSmemV;

    float O[TR::kHalves][TR::kONBlocks][4];
    float m[TR::kHalves][2];
    float l[TR::kHalves][2];
    init_softmax_state(O, m, l);

    if (qt.c_end >= 0) {
        fwd_mainloop<TR, kCausal, kVarlen>(p, args, pr, qt, h, tid, row_in_tile, keep_row, sQ, sK, sV, O, m, l);
    }
    fwd_epilogue<TR, kVarlen>(args, qt.q0, tid, row_in_tile, sQ, O, m, l);
}

// Tile maxima only (the contract of the mma.sync bsfa_block_max): the S path
// of bsfa_fwd (same K ring, the same wgmma S, masks and row maxima, so its
// maxima are bit-identical to what bsfa_fwd's gate compares), one barrier per
// tile, which also publishes the per-warp maxima to thread 0.
template <class TR, bool kCausal>
__device__ __forceinline__ void block_max_kernel_sm90(const Params& p) {
    constexpr int MB = TR::kHalves;
    constexpr int KS = TR::kKStages;
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
    const CtaHead ch = chunked_head(Hq);
    const int h = ch.h;
    const long long b = ch.b;
    const int a = chunked_query_tile<TR, kCausal>(p.Nq);
    const Problem pr = cta_problem<false>(p, b);
    const int Nq = pr.Nq, Nk = pr.Nk;
    const QueryTile<TR, kCausal> qt(a, pr);
    const int nK = tile_row_len<TR>(p);
    const int row_in_tile = warp * TR::kWarpRows + (lane >> 2);

    float* tm_row = tile_max + tile_row<TR>(p, b, h, a);
    for (int c = qt.c_end + 1 + tid; c < nK; c += TR::kNThreads) tm_row[c] = neg_inf();
    if (qt.c_end < 0) return;

    const unsigned smem = aligned_smem_base();
    const unsigned sQ = smem + TR::kSmemQ;
    const unsigned sK = smem + TR::kSmemK;
    const unsigned sRed = smem + TR::kSmemRed;
    const unsigned short* kg = k + pr.k_off + (long long)(h / (Hq / Hkv)) * k_sh;
    auto load_k = [&](int c, int slot) {
        load_tile<TR, TR::kBlockN>(sK + slot * TR::kKVBytes, kg + (long long)c * TR::kBlockN * k_sn, k_sn,
                                   Nk - c * TR::kBlockN, tid, k);
    };

    // cp.async groups as in bsfa_fwd: [Q + K c_end], [K c_end-1], then one
    // [K c-2] per tile; the end-of-tile wait leaves only the newest pending.
    load_q_and_first_keys<TR>(sQ, q + pr.q_off + h * q_sh + (long long)qt.q0 * q_sn, q_sn, Nq - qt.q0, tid, q,
                              qt.c_end, load_k);
    const unsigned long long q_desc = make_desc(sQ, 16, kSwizzleAtomBytes);
    cp_async_wait<KS - 2>();
    fence_proxy_async();
    cta_sync();

    int ks = qt.c_end % KS;
#pragma unroll 1
    for (int c = qt.c_end; c >= 0; --c, ks = ks == 0 ? KS - 1 : ks - 1) {
        if (c >= KS - 1) load_k(c - (KS - 1), ks + 1 == KS ? 0 : ks + 1);
        cp_async_commit();
        float S[MB][TR::kSNBlocks][4];
        float tile_mx[MB][2];
        qk_row_maxima<TR>(S, tile_mx, q_desc, make_desc(sK + ks * TR::kKVBytes, 16, kSwizzleAtomBytes), qt, c,
                          row_in_tile, lane, [&]() { return cta_problem<false>(p, 0); });
        float mx = fmax2(fmax2(tile_mx[0][0], tile_mx[0][1]), fmax2(tile_mx[1][0], tile_mx[1][1]));
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) mx = fmax2(mx, shfl_xor(mx, off));
        const unsigned slot = sRed + (c & 1) * TR::kNWarps * 4;
        if (lane == 0) sts_f32(slot + warp * 4, mx);
        cp_async_wait<KS - 2>();
        fence_proxy_async();
        cta_sync();
        // Slot c&1 is rewritten two tiles on, after the next barrier.
        if (tid == 0) {
            float mv = lds_f32(slot);
#pragma unroll
            for (int w = 1; w < TR::kNWarps; ++w) mv = fmax2(mv, lds_f32(slot + w * 4));
            tm_row[c] = mv * softmax_scale;
        }
    }
}

}  // namespace bsfa
