// wgmma throughput of the S = Q K^T shapes of the forward's skip path, on
// one CTA per SM with its operands already in shared memory (no TMA, no
// gate unless a mode adds one).  Per mode and number of consumer
// warpgroups (each 128 query rows of a 64-key block, 1M multiply-adds an
// iteration): the time, the dense-equivalent TFLOP/s and the SM cycles an
// iteration takes (clock64 of thread 0), after checking that the result is
// the sum the iterations should give (a K block of four, changing every
// iteration; the accumulators are never reset, because a product chain
// that restarts its accumulator every iteration ran faster than the tensor
// cores' peak here: its results were right, its timing was not).
// bench/NOTES.md v28 reads the numbers: shared memory feeds wgmma at most
// 128 bytes a cycle, which m64n64 products with both operands there use up
// at the tensor peak.  Mode 8 runs today's S beside a warp that lands 32 KB
// of bulk copies an iteration, as the head-pair entry's TMA lands K and V:
// whether those writes take from the same 128 bytes (the time per iteration
// is thread 0's; the kernel's time includes the copies).
// Build and run (no Python):
//   nvcc -std=c++17 -gencode arch=compute_90a,code=sm_90a -O3 -I kernels_cu -o wgmma_rate bench/wgmma_rate.cu
//   ./wgmma_rate                                  (every mode, timed)
//   ./wgmma_rate sustain MODE WGS SECONDS         (one mode back to back: bench/wgmma_energy.py)
#include <cstdio>
#include <cstdlib>
#include <string>
#include <cuda_fp16.h>
#include "bsfa_wgmma_sm90.cuh"
#include "bsfa_ptx.cuh"
#include "bsfa_pipeline_sm90.cuh"
using namespace bsfa;

constexpr int kQRows = 384;          // up to three warpgroups x 128 rows
constexpr int kQPanel = kQRows * 128; // bytes of one 64-column panel
constexpr int kKRows = 64;
constexpr int kKPanel = kKRows * 128;
constexpr int kKBlocks = 4;  // a different K block each iteration
constexpr int kData = 2 * kQPanel + kKBlocks * 2 * kKPanel;
constexpr int kCopyBytes = 16384;  // mode 8: one bulk copy, a K or V block of 64 keys
constexpr int kSmem = kData + 2 * kCopyBytes + 64 + 1024;

__device__ __forceinline__ unsigned long long qdesc(unsigned q, int wg, int mb) {
    return make_desc(q + (wg * 128 + mb * 64) * 128, 16, 1024);
}

// Today's S for a warpgroup: its two 64-row halves against the 64 keys of
// the K block at kd, two m64n64 chains with both operands in shared memory,
// accumulated (never reset, see above), one group.
__device__ __forceinline__ void issue_s64(float (&X)[2][32], unsigned q, int wg, unsigned long long kd) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
        const unsigned col = (kk % 4) * 32, pn = kk / 4;
#pragma unroll
        for (int mb = 0; mb < 2; ++mb)
            wgmma_ss_n64<false>(X[mb], desc_add(qdesc(q, wg, mb), pn * kQPanel + col), desc_add(kd, pn * kKPanel + col),
                                1);
    }
    wgmma_commit();
}

// S^T = K Q^T for a warpgroup: the 64 keys of the K block at kd against its
// 128 query rows, one m64n128 chain with both operands in shared memory,
// accumulated, one group.
__device__ __forceinline__ void issue_st(float (&X)[64], unsigned q, int wg, unsigned long long kd) {
    const unsigned long long qb = make_desc(q + wg * 128 * 128, 16, 1024);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
        const unsigned col = (kk % 4) * 32, pn = kk / 4;
        wgmma_ss_n128<false>(X, desc_add(kd, pn * kKPanel + col), desc_add(qb, pn * kQPanel + col), 1);
    }
    wgmma_commit();
}

// One group a warpgroup per iteration, waited for: products(kd, kk, col, pn)
// issues k-step kk's products against iteration it's K block (kd), fence()
// passes the accumulators through fence_regs after the wait.
template <class Products, class Fence>
__device__ __forceinline__ void each_iteration(int iters, unsigned long long kd0, Products products, Fence fence) {
    for (int it = 0; it < iters; ++it) {
        const unsigned long long kd = desc_add(kd0, (it % kKBlocks) * 2 * kKPanel);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) products(kd, kk, (unsigned)(kk % 4) * 32, (unsigned)(kk / 4));
        wgmma_commit();
        wgmma_wait<0>();
        fence();
    }
}

// A bulk copy of `bytes` from global memory into shared memory, completing on
// the mbarrier at bar (the TMA's non-tensor form).
__device__ __forceinline__ void bulk_copy(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}

// Mode 8's extra warp: 2 * iters bulk copies of kCopyBytes into two slots in
// turn (32 KB an iteration, the K and V a head-pair CTA lands per 64-key
// block), as fast as they come, while the warpgroups run today's S.
__device__ __forceinline__ void stream_copies(const uint4* src, int iters, unsigned slots, unsigned bars) {
    if ((threadIdx.x & 31) != 0) return;
    for (int c = 0; c < 2 * iters; ++c) {
        const int s = c & 1;
        if (c >= 2) mbar_wait(bars + 8 * s, ((c >> 1) - 1) & 1);
        mbar_arrive_expect_tx(bars + 8 * s, kCopyBytes);
        bulk_copy(slots + s * kCopyBytes, (const char*)src + (c % 8) * kCopyBytes, kCopyBytes, bars + 8 * s);
    }
    for (int c = 2 * iters - 2; c < 2 * iters; ++c) mbar_wait(bars + 8 * (c & 1), (c >> 1) & 1);
}

__device__ __forceinline__ void wgmma_ss_n32(float (&d)[16], unsigned long long a, unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(a), "l"(b), "r"(1));
}

template <int MODE>
__global__ void __launch_bounds__(384, 1) rate(const uint4* src, int iters, float* out) {
    extern __shared__ __align__(1024) unsigned char smraw[];
    unsigned char* sm = (unsigned char*)(((size_t)smraw + 1023) & ~(size_t)1023);
    for (int i = threadIdx.x; i < kData / 16; i += blockDim.x) ((uint4*)sm)[i] = src[i];
    fence_proxy_async();
    __syncthreads();
    const unsigned q = (unsigned)__cvta_generic_to_shared(sm);
    const unsigned k = q + 2 * kQPanel;
    const int wg = threadIdx.x / 128;
    const unsigned long long kd0 = make_desc(k, 16, 1024);
    float acc = 0.f;
    const long long t0 = clock64();
    if constexpr (MODE == 8) {  // as mode 0, beside an extra warp streaming bulk copies into shared memory
        const unsigned slots = q + kData, bars = slots + 2 * kCopyBytes;
        if (threadIdx.x == 0) {
            mbar_init(bars, 1);
            mbar_init(bars + 8, 1);
            mbar_init_fence();
        }
        __syncthreads();
        if (wg == 2) {
            stream_copies(src, iters, slots, bars);
        } else {
            float S[2][32];
            for (int i = 0; i < 32; ++i) S[0][i] = S[1][i] = 0.f;
            for (int it = 0; it < iters; ++it) {
                issue_s64(S, q, wg, desc_add(kd0, (it % kKBlocks) * 2 * kKPanel));
                wgmma_wait<0>();
                fence_regs(S[0]); fence_regs(S[1]);
            }
            for (int i = 0; i < 32; ++i) acc += S[0][i] + S[1][i];
        }
    } else if constexpr (MODE == 0 || MODE == 3) {  // two m64n64 chains (row halves), SS; MODE 3: two S, wait<1>
        float S[2][32], S2[2][32];
        auto issue = [&](float (&X)[2][32], int it) {
            issue_s64(X, q, wg, desc_add(kd0, (it % kKBlocks) * 2 * kKPanel));
        };
        for (int i = 0; i < 32; ++i) S2[0][i] = S2[1][i] = S[0][i] = S[1][i] = 0.f;
        for (int it = 0; it < iters; it += 2) {
            issue(S, it);
            if constexpr (MODE == 3) { wgmma_wait<1>(); } else { wgmma_wait<0>(); }
            fence_regs(S[0]); fence_regs(S[1]); fence_regs(S2[0]); fence_regs(S2[1]);
            issue(S2, it + 1);
            if constexpr (MODE == 3) { wgmma_wait<1>(); } else { wgmma_wait<0>(); }
            fence_regs(S[0]); fence_regs(S[1]); fence_regs(S2[0]); fence_regs(S2[1]);
        }
        wgmma_wait<0>();
        fence_regs(S[0]); fence_regs(S[1]); fence_regs(S2[0]); fence_regs(S2[1]);
        for (int i = 0; i < 32; ++i) acc += S[0][i] + S[1][i] + S2[0][i] + S2[1][i];
    } else if constexpr (MODE == 1 || MODE == 4) {  // transposed: S^T = K Q^T, one m64n128 a k-step
        float S[64], S2[64];
        auto issue = [&](float (&X)[64], int it) {
            issue_st(X, q, wg, desc_add(kd0, (it % kKBlocks) * 2 * kKPanel));
        };
        for (int i = 0; i < 64; ++i) S2[i] = S[i] = 0.f;
        for (int it = 0; it < iters; it += 2) {
            issue(S, it);
            if constexpr (MODE == 4) { wgmma_wait<1>(); } else { wgmma_wait<0>(); }
            fence_regs(S); fence_regs(S2);
            issue(S2, it + 1);
            if constexpr (MODE == 4) { wgmma_wait<1>(); } else { wgmma_wait<0>(); }
            fence_regs(S); fence_regs(S2);
        }
        wgmma_wait<0>();
        fence_regs(S); fence_regs(S2);
        for (int i = 0; i < 64; ++i) acc += S[i] + S2[i];
    } else if constexpr (MODE == 9) {  // S^T, then the same gate: a tile's max is the max of all 64 accumulators
        float S[64];
        for (int i = 0; i < 64; ++i) S[i] = 0.f;
        const float thr = 1e30f;
        int kept_count = 0;
        for (int it = 0; it < iters; ++it) {
            issue_st(S, q, wg, desc_add(kd0, (it % kKBlocks) * 2 * kKPanel));
            wgmma_wait<0>();
            fence_regs(S);
            float m[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) m[j] = S[j];
#pragma unroll
            for (int i = 1; i < 16; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) m[j] = fmax2(m[j], S[4 * i + j]);
            const bool vote = fmax2(fmax2(m[0], m[1]), fmax2(m[2], m[3])) * 0.088f >= thr;
            const bool any = named_or(1 + wg, 128, vote);
            kept_count += __shfl_sync(0xffffffffu, any ? 1 : 0, 0);
        }
        for (int i = 0; i < 64; ++i) acc += S[i];
        acc += kept_count;
    } else if constexpr (MODE == 5 || MODE == 6) {  // today's S, then a gate: max of 64, a vote; 6: turns
        float S[2][32];
        for (int i = 0; i < 32; ++i) S[0][i] = S[1][i] = 0.f;
        const float thr = 1e30f;
        int kept_count = 0;
        if (MODE == 6 && wg == 1) named_arrive(3, 256);
        for (int it = 0; it < iters; ++it) {
            if (MODE == 6) named_sync(3 + wg, 256);
            issue_s64(S, q, wg, desc_add(kd0, (it % kKBlocks) * 2 * kKPanel));
            if (MODE == 6 && !(wg == 1 && it == iters - 1)) named_arrive(3 + (wg ^ 1), 256);
            wgmma_wait<0>();
            fence_regs(S[0]); fence_regs(S[1]);
            float m[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) m[j] = S[j / 2][j % 2];
#pragma unroll
            for (int i = 1; i < 16; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) m[j] = fmax2(m[j], S[j / 2][(j % 2) + 2 * i]);
            const bool vote = fmax2(fmax2(m[0], m[1]), fmax2(m[2], m[3])) * 0.088f >= thr;
            const bool any = named_or(1 + wg, 128, vote);
            kept_count += __shfl_sync(0xffffffffu, any ? 1 : 0, 0);
        }
        for (int i = 0; i < 32; ++i) acc += S[0][i] + S[1][i];
        acc += kept_count;
    } else if constexpr (MODE == 7) {  // m64n32 products: 3 KB of operands a 16-cycle product at the peak
        float S[2][2][16];
        for (int i = 0; i < 16; ++i) S[0][0][i] = S[0][1][i] = S[1][0][i] = S[1][1][i] = 0.f;
        each_iteration(iters, kd0, [&](unsigned long long kd, int kk, unsigned col, unsigned pn) {
#pragma unroll
            for (int nb = 0; nb < 2; ++nb)
#pragma unroll
                for (int mb = 0; mb < 2; ++mb)
                    wgmma_ss_n32(S[mb][nb], desc_add(qdesc(q, wg, mb), pn * kQPanel + col),
                                 desc_add(kd, pn * kKPanel + col + nb * 32 * 128));
        }, [&] { fence_regs(S[0][0]); fence_regs(S[0][1]); fence_regs(S[1][0]); fence_regs(S[1][1]); });
        for (int i = 0; i < 16; ++i) acc += S[0][0][i] + S[0][1][i] + S[1][0][i] + S[1][1][i];
    } else if constexpr (MODE == 2) {  // Q in registers, K from shared memory
        unsigned A[2][8][4];
        const int lane = threadIdx.x & 31, warp = (threadIdx.x / 32) & 3;
#pragma unroll
        for (int mb = 0; mb < 2; ++mb)
#pragma unroll
            for (int kk = 0; kk < 8; ++kk) {
                const int row = wg * 128 + mb * 64 + warp * 16 + (lane & 15);
                const int chunk = (kk % 4) * 2 + (lane >> 4);
                ldsm_x4(A[mb][kk], q + (kk / 4) * kQPanel + swizzled(row, chunk));
            }
        float S[2][32];
        for (int i = 0; i < 32; ++i) S[0][i] = S[1][i] = 0.f;
        each_iteration(iters, kd0, [&](unsigned long long kd, int kk, unsigned col, unsigned pn) {
#pragma unroll
            for (int mb = 0; mb < 2; ++mb)
                wgmma_rs<false, 64, true>(S[mb], A[mb][kk], desc_add(kd, pn * kKPanel + col), 1);
        }, [&] { fence_regs(S[0]); fence_regs(S[1]); });
        for (int i = 0; i < 32; ++i) acc += S[0][i] + S[1][i];
    }
    const long long t1 = clock64();
    if (out != nullptr) {
        atomicAdd(out, acc);
        if (threadIdx.x == 0) atomicAdd((unsigned long long*)(out + 2), (unsigned long long)(t1 - t0));
    }
}

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1); } } while (0)

template <int MODE>
void run(const char* name, int wgs, const uint4* src, float* out) {
    CK(cudaFuncSetAttribute(rate<MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    const int iters = 4000, ctas = 132;
    rate<MODE><<<ctas, 128 * wgs + (MODE == 8 ? 32 : 0), kSmem>>>(src, 10, out);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
    float best = 1e30f;
    for (int r = 0; r < 5; ++r) {
        CK(cudaEventRecord(a));
        rate<MODE><<<ctas, 128 * wgs + (MODE == 8 ? 32 : 0), kSmem>>>(src, iters, out);
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        CK(cudaGetLastError());
        float ms; CK(cudaEventElapsedTime(&ms, a, b));
        if (ms < best) best = ms;
    }
    // the sum of the four K blocks' products, then the big run's against (ctas * iters / 4) times it
    CK(cudaMemset(out, 0, 16));
    rate<MODE><<<1, 128 * wgs + (MODE == 8 ? 32 : 0), kSmem>>>(src, 4, out);
    CK(cudaDeviceSynchronize());
    float sum; CK(cudaMemcpy(&sum, out, 4, cudaMemcpyDeviceToHost));
    CK(cudaMemset(out, 0, 16));
    rate<MODE><<<ctas, 128 * wgs + (MODE == 8 ? 32 : 0), kSmem>>>(src, iters, out);
    CK(cudaDeviceSynchronize());
    unsigned long long cyc; CK(cudaMemcpy(&cyc, out + 2, 8, cudaMemcpyDeviceToHost));
    float big; CK(cudaMemcpy(&big, out, 4, cudaMemcpyDeviceToHost));
    printf("  four-block sum %.4f; big run / expected %.5f; cycles per iteration per CTA %.1f\n", sum,
           big / (sum * ctas * (iters / 4)), (double)cyc / ctas / iters);
    const double macs = (double)ctas * wgs * iters * 128.0 * 64 * 128;
    printf("%-28s wgs=%d  %.3f ms  %.0f TFLOP/s\n", name, wgs, best, 2 * macs / best / 1e9);
}

// `wgmma_rate sustain MODE WGS SECONDS`: MODE (0, 1, 2, 5, 7 or 9) on WGS warpgroups launched back to back for about
// SECONDS, one line per launch ("launch MS"), then the multiply-adds of one launch; bench/wgmma_energy.py reads
// it beside nvidia-smi's power samples for the joules of each product shape.
template <int MODE>
void sustain(int wgs, double seconds, const uint4* src, float* out) {
    CK(cudaFuncSetAttribute(rate<MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    const int iters = 4000, ctas = 132;
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
    double total = 0;
    while (total < seconds * 1e3) {
        CK(cudaEventRecord(a));
        rate<MODE><<<ctas, 128 * wgs, kSmem>>>(src, iters, out);
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        CK(cudaGetLastError());
        float ms; CK(cudaEventElapsedTime(&ms, a, b));
        printf("launch %.4f\n", ms);
        total += ms;
    }
    printf("macs %.0f\n", (double)ctas * wgs * iters * 128.0 * 64 * 128);
}

int main(int argc, char** argv) {
    const size_t n = kData / 2;
    __half* h = (__half*)malloc(n * 2);
    srand(1);
    for (size_t i = 0; i < n; ++i) h[i] = __float2half((rand() / (float)RAND_MAX - 0.5f) * 0.25f);
    uint4* src; float* out;
    CK(cudaMalloc(&src, n * 2)); CK(cudaMalloc(&out, 16));
    CK(cudaMemcpy(src, h, n * 2, cudaMemcpyHostToDevice));
    if (argc == 5 && std::string(argv[1]) == "sustain") {
        const int mode = atoi(argv[2]), wgs = atoi(argv[3]);
        const double seconds = atof(argv[4]);
        if (wgs < 1 || wgs > 3 || seconds <= 0) {
            printf("sustain: expected WGS in 1..3 and SECONDS > 0, got %s %s\n", argv[3], argv[4]);
            return 2;
        }
        switch (mode) {
            case 0: sustain<0>(wgs, seconds, src, out); break;
            case 1: sustain<1>(wgs, seconds, src, out); break;
            case 2: sustain<2>(wgs, seconds, src, out); break;
            case 5: sustain<5>(wgs, seconds, src, out); break;
            case 7: sustain<7>(wgs, seconds, src, out); break;
            case 9: sustain<9>(wgs, seconds, src, out); break;
            default: printf("sustain: expected MODE 0, 1, 2, 5, 7 or 9, got %d\n", mode); return 2;
        }
        return 0;
    }
    for (int wgs = 1; wgs <= 3; ++wgs) {
        run<0>("ss m64n64 x2 (today's S)", wgs, src, out);
        run<3>("ss m64n64 x2, two S", wgs, src, out);
        run<1>("ss m64n128 transposed", wgs, src, out);
        run<4>("ss m64n128 transposed, two S", wgs, src, out);
        run<2>("rs m64n64 x2 (Q in regs)", wgs, src, out);
        run<7>("ss m64n32 x4", wgs, src, out);
    }
    run<8>("ss m64n64 x2 + 32 KB of bulk copies an iteration", 2, src, out);
    run<5>("ss m64n64 x2 + gate, free", 2, src, out);
    run<6>("ss m64n64 x2 + gate, turns", 2, src, out);
    run<5>("ss m64n64 x2 + gate, free", 3, src, out);
    run<9>("ss m64n128 transposed + gate, free", 2, src, out);
    run<9>("ss m64n128 transposed + gate, free", 3, src, out);
    return 0;
}
