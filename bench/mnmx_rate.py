"""Issue rate of the float max (FMNMX, one value folded an instruction) against the 3-input integer max
(VIMNMX3 on sm_90, two values folded an instruction), the instructions a tile row's max tree is made of.

Usage: python bench/mnmx_rate.py

One CTA an SM of 8, 16 and 32 warps, each thread 8 independent chains; prints warp-instructions a cycle an SM,
reckoned at the card's maximum clock (so only the ratio of the two lines means much).
"""
import numpy as np

SRC = r"""
extern "C" __global__ void fmax_chain(float* out, float s, int iters) {
    float a[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) a[j] = s * (threadIdx.x + j);
    float b = s * 3.f, c = s * 5.f;
    for (int i = 0; i < iters; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            asm volatile("max.f32 %0, %0, %1;" : "+f"(a[j]) : "f"(b));
            asm volatile("max.f32 %0, %0, %1;" : "+f"(a[j]) : "f"(c));
        }
        b += 1.f;
        c -= 1.f;
    }
    float r = 0.f;
    for (int j = 0; j < 8; ++j) r += a[j];
    out[blockIdx.x * blockDim.x + threadIdx.x] = r;
}
extern "C" __global__ void imax3_chain(int* out, int s, int iters) {
    int a[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) a[j] = s * (threadIdx.x + j);
    int b = s * 3, c = s * 5;
    for (int i = 0; i < iters; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j)
            asm volatile("{\n.reg .s32 t;\nmax.s32 t, %0, %1;\nmax.s32 %0, t, %2;\n}" : "+r"(a[j]) : "r"(b), "r"(c));
        b += 1;
        c -= 1;
    }
    int r = 0;
    for (int j = 0; j < 8; ++j) r += a[j];
    out[blockIdx.x * blockDim.x + threadIdx.x] = r;
}
"""


def main():
    import cupy as cp

    mod = cp.RawModule(code=SRC, options=("-std=c++17",))
    dev = cp.cuda.Device()
    sms = dev.attributes["MultiProcessorCount"]
    clk = dev.attributes["ClockRate"] * 1e3
    iters = 4096
    for name, per_iter, dtype, s in (("fmax_chain", 16, cp.float32, np.float32(0.5)),
                                      ("imax3_chain", 8, cp.int32, np.int32(3))):
        kern = mod.get_function(name)
        for warps in (8, 16, 32):
            out = cp.empty(sms * warps * 32, dtype)
            args = (out, s, np.int32(iters))
            kern((sms,), (warps * 32,), args)
            dev.synchronize()
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record()
            kern((sms,), (warps * 32,), args)
            e1.record()
            e1.synchronize()
            ms = cp.cuda.get_elapsed_time(e0, e1)
            rate = sms * warps * iters * per_iter / (ms * 1e-3) / sms / clk
            print(f"{name}: {warps} warps an SM: {ms:.3f} ms, {rate:.3f} warp-instructions a cycle an SM "
                  f"(at {clk / 1e6:.0f} MHz)")


if __name__ == "__main__":
    main()
