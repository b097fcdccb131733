// One 128-key block of a consumer warpgroup in the warp-specialised sm_90a
// forward: S = Q K^T (a wgmma m64n128 group), the BSFA gate of its two
// 64-key halves -- each a key tile of the reference with its own decision --
// the online-softmax update over the kept halves, and O += P V over the kept
// halves only.  A skipped half costs no exponential and no tensor-core work.
//
// The tile maximum behind a decision spans all 128 query rows, i.e. both
// consumer warpgroups, so a decision takes two steps: gate_post, right
// after a block's S, ORs each warp's rows' votes, writes one byte per warp
// into a slot of a ring and arrives at the slot's mbarrier; gate_resolve
// takes the OR of the eight bytes -- waiting for the slot's mbarrier only in
// a warp whose own rows did not already keep every gated half.  The
// mainloop resolves right after posting (a later resolve needs the block's
// S kept meanwhile: bench/NOTES.md, v11).  Only blocks with a gated half
// exchange; dense mode and diagonal blocks never do.  Four slots would be
// enough here (the ring has more for bsfa_block_max): a warp posts exchange
// e+3 only for a block whose K slot every warp has released, i.e. once every
// warp has resolved exchange e.  With two heads a tile (TR::kPackHeads) each
// consumer warpgroup exchanges among its own four warps, on its own ring.
//
// Includes what it needs; TR is a TraitsSm90Ws.
#pragma once

#include "bsfa_gate.cuh"
#include "bsfa_mask.cuh"
#include "bsfa_mma_sm90.cuh"
#include "bsfa_params.cuh"
#include "bsfa_pipeline_sm90.cuh"
#include "bsfa_ptx.cuh"
#include "bsfa_smem_sm90ws.cuh"
#include "bsfa_softmax.cuh"
#include "bsfa_wgmma_sm90.cuh"

namespace bsfa {

// The vote slot of exchange vote_idx for consumer warp cw, and its mbarrier's
// parity: one ring for all consumer warps, or one per warpgroup.
template <class TR>
__device__ __forceinline__ unsigned vote_slot(unsigned vote_idx, int cw) {
    const unsigned in_ring = vote_idx % TR::kVoteRing;
    if constexpr (TR::kPackHeads) {
        return (unsigned)(cw / TR::kVoteWarps) * TR::kVoteRing + in_ring;  // the warpgroup's own ring
    } else {
        return in_ring;
    }
}

template <class TR>
__device__ __forceinline__ unsigned vote_parity(unsigned vote_idx) {
    return (vote_idx / TR::kVoteRing) & 1u;
}

// Half h (a 64-key tile) of a block's S, in the [1][n8 blocks][4] shape the
// shared per-tile functions take.
template <class TR>
__device__ __forceinline__ float (&key_half(float (&S)[TR::kBlockSNBlocks][4], int h))[1][TR::kSNBlocks][4] {
    return *reinterpret_cast<float(*)[1][TR::kSNBlocks][4]>(&S[h * TR::kSNBlocks]);
}

// S = Q K^T for this warpgroup's 64 rows; q_desc points at its rows of Q.
template <class TR>
__device__ __forceinline__ void qk_block(float (&S)[TR::kBlockSNBlocks][4], unsigned long long q_desc,
                                         unsigned long long k_desc) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < TR::kDSteps; ++kk) {
        const unsigned col = (kk % TR::kStepsPerPanel) * TR::kMmaK * TR::kElemBytes;
        const unsigned pn = kk / TR::kStepsPerPanel;
        wgmma_ss_n128<TR::kBf16>(flat(S), desc_add(q_desc, pn * TR::kQPanelBytes + col),
                                 desc_add(k_desc, pn * TR::kKVPanelBytes + col), kk > 0 ? 1 : 0);
    }
    wgmma_commit();
}

// The address this lane gives ldmatrix / stmatrix (x4) for k-step kk of
// warpgroup wg's rows in a map of Q's shape at base (64-column panels of
// the tile's rows, 128-byte swizzle): row lane % 8 of matrix lane / 8 of
// the warp's mma.sync m16n8k16 A fragment.
template <class TR>
__device__ __forceinline__ unsigned a_frag_addr(unsigned base, int wg, int kk) {
    const int lane = (int)threadIdx.x & 31;
    const int row = wg * TR::kWgmmaM + (((int)threadIdx.x & 127) >> 5) * TR::kWarpRows + (lane & 7) + ((lane >> 3) & 1) * 8;
    const int chunk = (kk % TR::kStepsPerPanel) * 2 + (lane >> 4);
    return base + (kk / TR::kStepsPerPanel) * TR::kQPanelBytes + swizzled(row, chunk);
}

// This warpgroup's 64 rows of Q (wg: the consumer warpgroup) as the A
// fragments of S = Q K^T, k-step kk in Qf[kk], read with ldmatrix from the
// swizzled panels the TMA wrote.
template <class TR>
__device__ __forceinline__ void load_q_frags(unsigned q_smem, int wg, unsigned (&Qf)[TR::kDSteps][4]) {
#pragma unroll
    for (int kk = 0; kk < TR::kDSteps; ++kk) ldsm_x4(Qf[kk], a_frag_addr<TR>(q_smem, wg, kk));
}

// qk_block with Q in registers (load_q_frags): only K is read from shared
// memory.
template <class TR>
__device__ __forceinline__ void qk_block_rs(float (&S)[TR::kBlockSNBlocks][4], const unsigned (&Qf)[TR::kDSteps][4],
                                            unsigned long long k_desc) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < TR::kDSteps; ++kk) {
        const unsigned col = (kk % TR::kStepsPerPanel) * TR::kMmaK * TR::kElemBytes;
        const unsigned pn = kk / TR::kStepsPerPanel;
        wgmma_rs<TR::kBf16, TR::kBlockKeys, true>(flat(S), Qf[kk], desc_add(k_desc, pn * TR::kKVPanelBytes + col),
                                                  kk > 0 ? 1 : 0);
    }
    wgmma_commit();
}

// S of a block: Q from shared memory (q_desc), or from registers
// (TR::kQInRegs: Qf, loaded by load_q_frags; q_desc unused).
template <class TR>
__device__ __forceinline__ void qk_block_from(float (&S)[TR::kBlockSNBlocks][4], unsigned long long q_desc,
                                              const unsigned (&Qf)[TR::kDSteps][4], unsigned long long k_desc) {
    if constexpr (TR::kQInRegs) {
        qk_block_rs<TR>(S, Qf, k_desc);
    } else {
        qk_block<TR>(S, q_desc, k_desc);
    }
}

// Masks the invalid scores of half h of block n; returns bit h set iff the
// half has a valid entry (c <= c_end).  Nq, Nk, shift: the problem's
// (bsfa_problem.cuh).
template <class TR, bool kCausal>
__device__ __forceinline__ unsigned mask_half(float (&S)[TR::kBlockSNBlocks][4], const QueryTile<TR, kCausal>& qt,
                                              int n, int h, int row0, int lane, int Nq, int Nk, int shift) {
    const int c = n * TR::kKeyHalves + h;
    if (qt.needs_mask(c)) mask_tile<TR, kCausal>(key_half<TR>(S, h), c, row0, lane, Nq, Nk, shift);
    return (c <= qt.c_end ? 1u : 0u) << h;
}

// mask_half over both halves: block n's halves with a valid entry.
template <class TR, bool kCausal>
__device__ __forceinline__ unsigned mask_block(float (&S)[TR::kBlockSNBlocks][4], const QueryTile<TR, kCausal>& qt,
                                               int n, int row0, int lane, int Nq, int Nk, int shift) {
    unsigned valid = 0;
#pragma unroll
    for (int h = 0; h < TR::kKeyHalves; ++h) valid |= mask_half<TR, kCausal>(S, qt, n, h, row0, lane, Nq, Nk, shift);
    return valid;
}

// What gate_post leaves for gate_resolve, one register: bits 0-1 the halves
// with a valid entry (c <= c_end), bits 2-3 those kept without a vote
// (diagonal, or dense mode), bits 4-5 this warp's votes for the gated ones.
struct PostedGate {
    unsigned bits;
    __device__ __forceinline__ unsigned valid() const { return bits & 3u; }
    __device__ __forceinline__ unsigned forced() const { return (bits >> 2) & 3u; }
    __device__ __forceinline__ unsigned votes() const { return (bits >> 4) & 3u; }
    __device__ __forceinline__ unsigned gated() const { return valid() & ~forced(); }
};

// Masks the block's invalid scores and posts this warp's votes for its gated
// halves.  Halves past the query tile's last valid key tile (c > c_end) are
// neither kept nor reported.  Nq, Nk, shift: the problem's (bsfa_problem.cuh).
// The gated halves' lane-local row maxima are left in vmx for the softmax,
// which would otherwise take them a second time (bench/NOTES.md, v12).
template <class TR, bool kCausal>
__device__ __forceinline__ PostedGate gate_post(float (&S)[TR::kBlockSNBlocks][4], const QueryTile<TR, kCausal>& qt,
                                                const GatePlan<TR>& plan, int n, int row0, int lane,
                                                int consumer_warp, const Params& p, const SmemWs<TR>& sm,
                                                unsigned vote_idx, int Nq, int Nk, int shift,
                                                float (&vmx)[TR::kKeyHalves][2]) {
    unsigned valid = 0, forced = 0, votes = 0;
#pragma unroll
    for (int h = 0; h < TR::kKeyHalves; ++h) {
        valid |= mask_half<TR, kCausal>(S, qt, n, h, row0, lane, Nq, Nk, shift);
        forced |= (plan.forced(n * TR::kKeyHalves + h) ? 1u : 0u) << h;
    }
    const unsigned gated = valid & ~forced;
    if (gated != 0) {  // uniform over both consumer warpgroups
#pragma unroll
        for (int h = 0; h < TR::kKeyHalves; ++h) {
            if ((gated >> h) & 1u) {
                float(&mx)[1][2] = *reinterpret_cast<float(*)[1][2]>(&vmx[h]);
                row_max<TR, false>(key_half<TR>(S, h), mx);  // lane-local: the vote needs no more
                if (plan.vote(mx, p.softmax_scale)) votes |= 1u << h;
            }
        }
        votes = warp_or(votes);
        const unsigned slot = vote_slot<TR>(vote_idx, consumer_warp);
        if (lane == 0) {
            sts8(sm.votes() + slot * TR::kVoteSlotBytes + consumer_warp, votes);
            mbar_arrive(sm.bar(TR::kBarVote + slot));  // release: the byte is visible to its waiters
        }
    }
    return PostedGate{valid | (forced << 2) | (votes << 4)};
}

// Block n's decisions into its valid entries of keep_row (nullptr: none
// asked for, or not the writer thread).
template <class TR>
__device__ __forceinline__ void write_keep(unsigned char* keep_row, int n, unsigned valid, unsigned kept) {
    if (keep_row != nullptr) {
#pragma unroll
        for (int h = 0; h < TR::kKeyHalves; ++h) {
            if ((valid >> h) & 1u) keep_row[n * TR::kKeyHalves + h] = (kept >> h) & 1u;
        }
    }
}

// The decisions of a posted block (bit h: half h kept), written to keep_row
// (one writer thread) as well.  vote_idx counts exchanges; the same count
// posts and resolves, since a block is resolved before the next is posted.
template <class TR>
__device__ __forceinline__ unsigned gate_resolve(PostedGate g, int n, const SmemWs<TR>& sm, unsigned& vote_idx,
                                                 unsigned char* keep_row) {
    const unsigned gated = g.gated();
    unsigned kept = g.valid() & g.forced();
    if (gated != 0) {
        if (g.votes() == gated) {
            kept |= gated;  // the decision is an OR: this warp's rows settle it
        } else {
            // The consumer warp (warpgroup 0 produces), broadcast from lane 0 so
            // that ptxas sees it, and the decision read with it, as warp-uniform:
            // a P V under a decision it cannot prove uniform serialises every wgmma.
            const int cw = __shfl_sync(0xffffffffu, ((int)threadIdx.x >> 5) - 4, 0);
            const unsigned slot = vote_slot<TR>(vote_idx, cw);
            mbar_wait(sm.bar(TR::kBarVote + slot), vote_parity<TR>(vote_idx));
            unsigned all;
            if constexpr (TR::kPackHeads) {  // this warpgroup's four bytes
                all = __float_as_uint(lds_f32(sm.votes() + slot * TR::kVoteSlotBytes + cw / TR::kVoteWarps * 4));
            } else {
                unsigned lo, hi;
                lds64(lo, hi, sm.votes() + slot * TR::kVoteSlotBytes);
                all = lo | hi;
            }
            all |= all >> 16;
            all |= all >> 8;
            kept |= all & gated;
        }
        ++vote_idx;
    }
    write_keep<TR>(keep_row, n, g.valid(), kept);
    return kept;
}

// Online-softmax update over the kept halves (kept != 0): the row max over
// both, P = exp2(S * scale_log2 - m_new * scale_log2) packed as the A
// fragments of P V (k-step kk covers keys 16kk..16kk+15), the row sums
// rescaled and extended.  alpha = exp2(m_old - m_new) per row; returns
// whether any row of the warp changed its max (O then needs the rescale).
// kInPlace: the exponentials stay in S, in fp32, and P is not written
// (pack_p packs them later: TR::kLatePack).
template <class TR, bool kInPlace = false>
__device__ __forceinline__ bool softmax_block(float (&S)[TR::kBlockSNBlocks][4], unsigned kept, float (&m)[2],
                                              float (&l)[2], unsigned (&P)[TR::kKeySteps][4], float (&alpha)[2],
                                              float scale_log2, unsigned have_vmx,
                                              const float (&vmx)[TR::kKeyHalves][2]) {
    // Row maxima of the kept halves: the gate's where it took them (bit h of
    // have_vmx), else taken here rather than kept live from a block earlier.
    float mx[TR::kKeyHalves][2];
#pragma unroll
    for (int h = 0; h < TR::kKeyHalves; ++h) {
        if (((kept & have_vmx) >> h) & 1u) {
            mx[h][0] = vmx[h][0];
            mx[h][1] = vmx[h][1];
        } else if ((kept >> h) & 1u) {
            row_max<TR, false>(key_half<TR>(S, h), *reinterpret_cast<float(*)[1][2]>(&mx[h]));
        } else {
            mx[h][0] = mx[h][1] = neg_inf();
        }
    }
    quad_max(mx);
    bool changed = false;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        float tm = neg_inf();
#pragma unroll
        for (int h = 0; h < TR::kKeyHalves; ++h) {
            if ((kept >> h) & 1u) tm = fmax2(tm, mx[h][hf]);
        }
        const float m_new = fmax2(m[hf], tm);
        // A row with no valid score yet takes 0 as its reference, so that
        // exp2(-inf - ref) = 0 rather than NaN.
        const float ref = m_new == neg_inf() ? 0.f : m_new;
        alpha[hf] = ex2((m[hf] - ref) * scale_log2);
        changed |= m_new != m[hf];
        m[hf] = m_new;
        const float ref_scaled = ref * scale_log2;
        float rs = 0.f;
#pragma unroll
        for (int h = 0; h < TR::kKeyHalves; ++h) {
            if ((kept >> h) & 1u) {
#pragma unroll
                for (int i = 0; i < TR::kSNBlocks; ++i) {
                    const int nb = h * TR::kSNBlocks + i;
                    const float p0 = ex2(ffma(S[nb][2 * hf], scale_log2, -ref_scaled));
                    const float p1 = ex2(ffma(S[nb][2 * hf + 1], scale_log2, -ref_scaled));
                    rs += p0 + p1;
                    if constexpr (kInPlace) {
                        S[nb][2 * hf] = p0;
                        S[nb][2 * hf + 1] = p1;
                    } else {
                        P[nb / 2][(nb % 2) * 2 + hf] = pack2<TR::kBf16>(p0, p1);
                    }
                }
            }
        }
        l[hf] = l[hf] * alpha[hf] + rs;
    }
    return warp_any(changed);
}

// The exponentials that softmax_block<TR, true> left in S for P V's k-step
// kk (keys 16kk..16kk+15), packed as its A fragment.
template <class TR>
__device__ __forceinline__ void pack_step(const float (&S)[TR::kBlockSNBlocks][4], int kk, unsigned (&r)[4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) r[j] = pack2<TR::kBf16>(S[2 * kk + j / 2][2 * (j % 2)], S[2 * kk + j / 2][2 * (j % 2) + 1]);
}

// ... for every k-step (both halves).
template <class TR>
__device__ __forceinline__ void pack_p(const float (&S)[TR::kBlockSNBlocks][4], unsigned (&P)[TR::kKeySteps][4]) {
#pragma unroll
    for (int kk = 0; kk < TR::kKeySteps; ++kk) pack_step<TR>(S, kk, P[kk]);
}

// O += P V over the halves in KEPT (a compile-time set), one wgmma group.
template <class TR, unsigned KEPT>
__device__ __forceinline__ void pv_halves(float (&O)[TR::kONBlocks][4], const unsigned (&P)[TR::kKeySteps][4],
                                          unsigned long long v_desc) {
    wgmma_fence();
#pragma unroll
    for (int h = 0; h < TR::kKeyHalves; ++h) {
        if (((KEPT >> h) & 1u) != 0) {  // h is unrolled: a constant
#pragma unroll
            for (int i = 0; i < TR::kHalfKeySteps; ++i) {
                const int kk = h * TR::kHalfKeySteps + i;
                wgmma_rs<TR::kBf16, TR::kHeadDim>(flat(O), P[kk], desc_add(v_desc, kk * TR::kMmaK * kSwizzleBytes),
                                                  1);
            }
        }
    }
    wgmma_commit();
}

// O += P V over the kept halves (kept != 0).  Each case is one straight
// wgmma group: a branch between the fence and the commit makes ptxas
// serialise every wgmma of the kernel (C7515).
template <class TR>
__device__ __forceinline__ void pv_block(float (&O)[TR::kONBlocks][4], const unsigned (&P)[TR::kKeySteps][4],
                                         unsigned long long v_desc, unsigned kept) {
    static_assert(TR::kKeyHalves == 2, "pv_block spells out the cases of two halves");
    if (kept == 3u) {
        pv_halves<TR, 3u>(O, P, v_desc);
    } else if (kept == 1u) {
        pv_halves<TR, 1u>(O, P, v_desc);
    } else {
        pv_halves<TR, 2u>(O, P, v_desc);
    }
}

// The exponentials that softmax_block<TR, true> left in S, packed as
// pack_p packs them and stored as this warpgroup's rows of P in shared
// memory (TR::kPInSmem, the map of Q with keys for columns) with stmatrix,
// the inverse of load_q_frags's ldmatrix.  Each k-step is packed just
// before its store, so that S's registers die as P is written.  The fence
// makes the stores visible to the wgmma that read them after the next turn
// barrier, which every warp of the warpgroup passes.
template <class TR>
__device__ __forceinline__ void store_p(const float (&S)[TR::kBlockSNBlocks][4], unsigned p_smem, int wg) {
#pragma unroll
    for (int kk = 0; kk < TR::kKeySteps; ++kk) {
        unsigned r[4];
        pack_step<TR>(S, kk, r);
        stsm_x4(a_frag_addr<TR>(p_smem, wg, kk), r);
    }
    fence_proxy_async();
}

// pv_halves with P from shared memory (store_p; p_desc: this warpgroup's
// rows, as q_desc points at Q's).
template <class TR, unsigned KEPT>
__device__ __forceinline__ void pv_halves_smem(float (&O)[TR::kONBlocks][4], unsigned long long p_desc,
                                               unsigned long long v_desc) {
    wgmma_fence();
#pragma unroll
    for (int h = 0; h < TR::kKeyHalves; ++h) {
        if (((KEPT >> h) & 1u) != 0) {
#pragma unroll
            for (int i = 0; i < TR::kHalfKeySteps; ++i) {
                const int kk = h * TR::kHalfKeySteps + i;
                const unsigned col = (kk % TR::kStepsPerPanel) * TR::kMmaK * TR::kElemBytes;
                wgmma_ss_n128<TR::kBf16, false>(flat(O), desc_add(p_desc, (kk / TR::kStepsPerPanel) * TR::kQPanelBytes + col),
                                                desc_add(v_desc, kk * TR::kMmaK * kSwizzleBytes), 1);
            }
        }
    }
    wgmma_commit();
}

// pv_block with P from shared memory.
template <class TR>
__device__ __forceinline__ void pv_block_smem(float (&O)[TR::kONBlocks][4], unsigned long long p_desc,
                                              unsigned long long v_desc, unsigned kept) {
    static_assert(TR::kKeyHalves == 2 && TR::kHeadDim == 128, "two halves; an m64n128 P V");
    if (kept == 3u) {
        pv_halves_smem<TR, 3u>(O, p_desc, v_desc);
    } else if (kept == 1u) {
        pv_halves_smem<TR, 1u>(O, p_desc, v_desc);
    } else {
        pv_halves_smem<TR, 2u>(O, p_desc, v_desc);
    }
}

template <int NB>
__device__ __forceinline__ void rescale_rows(float (&O)[NB][4], const float (&alpha)[2]) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int j = 0; j < 4; ++j) O[nb][j] *= alpha[j / 2];
}

}  // namespace bsfa
