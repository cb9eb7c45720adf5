// Stand-in for MLX's Metal preamble (metal::utils(): <metal_stdlib> + bfloat16 + helpers) so that the MSL
// MLX generates can be parsed by libclang as C++17. It does not compile Metal: it checks that every name a body
// uses exists in Metal, that types line up, and, because the address spaces are real clang address spaces, that
// a constant/threadgroup pointer is never passed where a device pointer is expected.
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread
typedef unsigned int uint;
typedef unsigned short ushort;
struct uint2 { uint x, y; };
struct uint3 { uint x, y, z; };
typedef __SIZE_TYPE__ size_t;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef long int64_t;
typedef unsigned long uint64_t;
typedef unsigned short uint16_t;
typedef unsigned char uint8_t;
typedef __bf16 bfloat16_t;
typedef __bf16 bfloat;
typedef _Float16 float16_t;
typedef _Float16 half;
namespace metal {
enum class mem_flags { mem_none, mem_device, mem_threadgroup, mem_texture };
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);
template <class T> T simd_sum(T);
template <class T> T simd_max(T);
template <class T> T simd_min(T);
template <class T> T simd_shuffle_xor(T, ushort);
template <class T> T simd_broadcast(T, ushort);
float exp(float);
float rsqrt(float);
float sqrt(float);
namespace precise { float exp(float); }
namespace fast { float exp(float); }
}  // namespace metal
using namespace metal;
