// kx portability layer, CPU emulation (g++ -std=c++20 -pthread), used only by the verification tests.
// Each threadgroup runs as TG real std::threads: KX_SYNC is a std::barrier over the group and a warp
// collective is a barrier over its 32 lanes, so the bodies' barrier and reduction logic really executes
// concurrently (and can be run under ThreadSanitizer). Threadgroup memory is a 32 KB arena, Apple's limit,
// refilled with NaN bytes before every group so a read of memory no thread wrote shows up in the results.
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#define KX_CPU 1
#define KX_FN inline
#define KX_SHARED_ARRAY(T, name, n) T* name = kx_ctx->template shared<T>(n)
#define KX_SYNC() kx_ctx->group->block_bar.arrive_and_wait()
#define KX_F32(x) static_cast<float>(x)
#define KX_CAST(T, x) static_cast<T>(x)
#define KX_EXP(x) std::exp(x)
// K/V tiles a launch actually loaded (thread 0 of each group counts), to check that tiles no query can see
// are skipped.
#define KX_COUNT_TILE() do { if (kx_ctx->tid == 0) kx_tiles_loaded++; } while (0)

struct kx_bf16 {  // storage-compatible with MLX bfloat16; float -> bf16 rounds to nearest even
  uint16_t bits;
  kx_bf16() = default;
  kx_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    bits = uint16_t(u >> 16);
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
typedef _Float16 kx_f16;

constexpr size_t KX_ARENA_BYTES = 32768;
std::atomic<int> kx_error{0};  // 1: a group asked for more threadgroup memory than Apple GPUs have
std::atomic<long> kx_tiles_loaded{0};
extern "C" long kx_tiles_loaded_last() { return kx_tiles_loaded.load(); }

struct KxGroup {
  explicit KxGroup(int tg) : block_bar(tg), scratch(tg) {
    for (int w = 0; w < tg / 32; ++w) warp_bar.emplace_back(new std::barrier<>(32));
    std::memset(arena, 0xFF, sizeof(arena));
  }
  std::barrier<> block_bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<float> scratch;  // one slot per thread, for warp collectives
  alignas(64) unsigned char arena[KX_ARENA_BYTES];
  alignas(64) unsigned char spill[1 << 20];  // where an over-limit request lands after kx_error is set
};

struct KxCtx {
  KxGroup* group;
  uint32_t tid, warp, lane;
  size_t arena_off;
  template <class T>
  T* shared(size_t n) {  // every thread makes the same requests in the same order, so gets the same address
    size_t off = (arena_off + alignof(T) - 1) / alignof(T) * alignof(T);
    arena_off = off + n * sizeof(T);
    if (arena_off > KX_ARENA_BYTES) {
      kx_error = 1;
      return reinterpret_cast<T*>(group->spill);
    }
    return reinterpret_cast<T*>(group->arena + off);
  }
};
thread_local KxCtx* kx_ctx = nullptr;

// The same xor butterfly as the CUDA layer, evaluated by each lane from all 32 values: two barrier phases
// instead of ten, bit-identical results.
inline float kx_warp_sum(float v) {
  KxCtx& c = *kx_ctx;
  float* lanes = c.group->scratch.data() + 32 * c.warp;
  lanes[c.lane] = v;
  c.group->warp_bar[c.warp]->arrive_and_wait();
  float x[32];
  for (int i = 0; i < 32; ++i) x[i] = lanes[i];
  for (int o = 16; o > 0; o >>= 1) {
    float y[32];
    for (int i = 0; i < 32; ++i) y[i] = x[i] + x[i ^ o];
    for (int i = 0; i < 32; ++i) x[i] = y[i];
  }
  c.group->warp_bar[c.warp]->arrive_and_wait();  // lanes[] may be rewritten by the next collective
  return x[c.lane];
}

// Run n_groups threadgroups of tg threads, one group at a time (groups write disjoint outputs).
template <class F>
int kx_launch(int tg, int n_groups, F&& body) {
  kx_error = 0;
  kx_tiles_loaded = 0;
  if (tg % 32 != 0) return 2;
  auto group = std::make_unique<KxGroup>(tg);
  std::vector<std::thread> threads;
  for (int t = 0; t < tg; ++t)
    threads.emplace_back([&, t] {
      KxCtx ctx{group.get(), uint32_t(t), uint32_t(t / 32), uint32_t(t % 32), 0};
      kx_ctx = &ctx;
      for (int b = 0; b < n_groups; ++b) {
        ctx.arena_off = 0;
        body(uint32_t(b), ctx);
        group->block_bar.arrive_and_wait();
        if (t == 0) std::memset(group->arena, 0xFF, sizeof(group->arena));
        group->block_bar.arrive_and_wait();
      }
    });
  for (auto& th : threads) th.join();
  return kx_error.load();
}
