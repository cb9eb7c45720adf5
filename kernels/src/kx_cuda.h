// kx portability layer, CUDA side: passed as cuda_kernel(header=...). MLX's JIT compiles with
// --device-as-default-execution-space, so plain inline functions are device functions.
#define KX_CUDA 1
#define KX_FN inline
#define KX_SHARED_ARRAY(T, name, n) __shared__ T name[n]
#define KX_SYNC() __syncthreads()
#define KX_F32(x) static_cast<float>(x)
#define KX_CAST(T, x) static_cast<T>(x)
#define KX_COUNT_TILE() ((void)0)  // instrumentation: counts only in the CPU emulation
#define KX_EXP(x) expf(x)
// Fixed xor-butterfly order; every lane ends with the same value (each step adds a pair that is equal on both
// partners), which the bodies rely on for warp-uniform branches.
KX_FN float kx_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
