// kx portability layer, Metal side: passed as metal_kernel(header=...). MLX prepends its own utils.h.
#include <metal_simdgroup>
#define KX_METAL 1
#define KX_FN inline
#define KX_SHARED_ARRAY(T, name, n) threadgroup T name[n]
#define KX_SYNC() threadgroup_barrier(mem_flags::mem_threadgroup)
#define KX_F32(x) static_cast<float>(x)
#define KX_CAST(T, x) static_cast<T>(x)
#define KX_COUNT_TILE() ((void)0)  // instrumentation: counts only in the CPU emulation
#define KX_EXP(x) metal::exp(x)
KX_FN float kx_warp_sum(float v) { return simd_sum(v); }
