// CPU emulation of the small subset of CUDA C++ that remax-kernels' kernels use, so that the SAME kernel source
// (csrc/*.cuh) compiles with g++ (-std=c++20 -DREMAX_KERNELS_EMU) and runs on a machine without a GPU.
//
// Execution model: a launch runs its blocks one after another; the threads of a block are std::threads that run
// concurrently (created once per launch and reused for every block). __syncthreads() is a real barrier over the
// block's threads; warp shuffles/ballots exchange values through a per-warp buffer between two barriers over the warp's 32 threads (so every lane must reach them, as the
// *_sync intrinsics require with a full mask); shared-memory atomics are real atomics. `__shared__` variables
// become function-local statics: one instance per kernel instantiation, shared by the threads of the (single)
// running block, as in CUDA.
//
// What this CANNOT show (see csrc/README.md): the GPU memory model and races a schedule here happens not to expose
// (run compute-sanitizer racecheck on a GPU), real warp scheduling/divergence, bank conflicts, occupancy, register
// pressure and spills (see `nvcc -Xptxas -v`), and differences of the fast GPU math (__expf, ex2.approx) from the
// libm functions used here. Pointers are host pointers: there is no device/host distinction.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------------------------------------------------------------
// Qualifiers and runtime types
// ---------------------------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;

namespace emu {

// Warp exchanges use two slot buffers in turn, so one barrier per exchange suffices: a lane can only overwrite a
// buffer two exchanges later, after the barrier of the exchange in between, which every lane passes only once it
// has finished reading.
struct Warp {
  std::barrier<> bar{32};
  uint64_t slot[2][32];
};

struct Block {
  explicit Block(unsigned n) : bar(n), warps(n / 32) {
    for (auto& w : warps) w = std::make_unique<Warp>();
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Block* tls_block = nullptr;
inline thread_local unsigned tls_exchange_parity = 0;
inline thread_local cudaError_t last_error = cudaSuccess;

// Path-coverage counters (RK_COVER in the kernels; read and reset through the test ABI), so tests can show that
// the inputs they craft really take the code path they are meant for.
inline std::atomic<long long> coverage[16];
inline void cover(int id) { coverage[id].fetch_add(1, std::memory_order_relaxed); }

inline unsigned lane() { return threadIdx.x & 31u; }
inline Warp& warp() { return *tls_block->warps[threadIdx.x >> 5]; }

// Runs kernel(args...) over grid x block threads (1-D grids and blocks: all our kernels use only .x). The block's
// threads are created once per launch and run the blocks in order, meeting at a barrier between blocks (so a block
// starts only when the previous one has finished with the shared memory they both use).
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, Args... args) {
  if (block.x == 0 || block.x % 32 != 0 || block.x > 1024 || block.y != 1 || block.z != 1 || grid.y != 1 ||
      grid.z != 1) {
    last_error = cudaErrorInvalidConfiguration;
    return last_error;
  }
  Block blk(block.x);
  std::barrier<> between_blocks(block.x);
  std::vector<std::thread> threads;
  threads.reserve(block.x);
  for (unsigned t = 0; t < block.x; ++t) {
    threads.emplace_back([&, t] {
      threadIdx = dim3(t);
      tls_block = &blk;
      for (unsigned b = 0; b < grid.x; ++b) {
        blockIdx = dim3(b);
        kernel(args...);
        between_blocks.arrive_and_wait();
      }
    });
  }
  for (auto& th : threads) th.join();
  last_error = cudaSuccess;
  return cudaSuccess;
}

template <typename T>
inline T exchange(T v, unsigned src_of_lane_fn(unsigned, int, int), int arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move values of at most 8 bytes");
  Warp& w = warp();
  const unsigned l = lane();
  uint64_t* slot = w.slot[tls_exchange_parity ^= 1u];
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  slot[l] = raw;
  w.bar.arrive_and_wait();
  T out;
  std::memcpy(&out, &slot[src_of_lane_fn(l, arg, width)], sizeof(T));
  return out;
}

inline unsigned src_xor(unsigned l, int mask, int width) {
  const unsigned base = l & ~unsigned(width - 1);
  const unsigned s = l ^ unsigned(mask);
  return (s >= base + unsigned(width)) ? l : (s & 31u);
}
inline unsigned src_idx(unsigned l, int src, int width) { return (l & ~unsigned(width - 1)) + (unsigned(src) % width); }
inline unsigned src_up(unsigned l, int delta, int width) {
  const unsigned base = l & ~unsigned(width - 1);
  return (l - base >= unsigned(delta)) ? l - unsigned(delta) : l;
}

inline void require_full_mask(unsigned mask) {
  if (mask != 0xffffffffu) throw std::logic_error("emu: only full-warp masks are emulated");
}

}  // namespace emu

inline cudaError_t cudaGetLastError() {
  cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}

// Kernel launch: RK_LAUNCH(kernel, grid, block, stream, args...) is `kernel<<<grid, block, 0, stream>>>(args...)`.
#define RK_LAUNCH(kernel, grid, block, stream, ...) ::emu::launch(kernel, grid, block, __VA_ARGS__)

// ---------------------------------------------------------------------------------------------------------------------
// Synchronization, warp intrinsics, atomics
// ---------------------------------------------------------------------------------------------------------------------
inline void __syncthreads() { emu::tls_block->bar.arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  emu::require_full_mask(mask);
  return emu::exchange(v, emu::src_xor, lane_mask, width);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  emu::require_full_mask(mask);
  return emu::exchange(v, emu::src_idx, src_lane, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  emu::require_full_mask(mask);
  return emu::exchange(v, emu::src_up, int(delta), width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  emu::require_full_mask(mask);
  emu::Warp& w = emu::warp();
  uint64_t* slot = w.slot[emu::tls_exchange_parity ^= 1u];
  slot[emu::lane()] = pred ? 1u : 0u;
  w.bar.arrive_and_wait();
  unsigned bits = 0;
  for (unsigned l = 0; l < 32; ++l) bits |= unsigned(slot[l] != 0) << l;
  return bits;
}

inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }

template <typename T>
inline T atomicAdd(T* address, T val) {
  static_assert(std::is_integral_v<T>, "emu: only integer atomics are emulated");
  return __atomic_fetch_add(address, val, __ATOMIC_RELAXED);
}

// ---------------------------------------------------------------------------------------------------------------------
// Math and bit intrinsics (libm stands in for the GPU's approximate versions; see the header comment)
// ---------------------------------------------------------------------------------------------------------------------
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * uint64_t(b)) >> 32); }
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline unsigned __float_as_uint(float f) { return unsigned(__float_as_int(f)); }
inline float __uint_as_float(unsigned u) { return __int_as_float(int(u)); }
// expf, logf, fmaxf, fminf: the global libm functions from <cmath>.

// ---------------------------------------------------------------------------------------------------------------------
// fp16 / bf16 storage types with round-to-nearest-even conversions (only what the kernels use: load, store)
// ---------------------------------------------------------------------------------------------------------------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1Fu;
  uint32_t man = h.bits & 0x3FFu;
  uint32_t out;
  if (exp == 0x1Fu) {
    out = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    out = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    out = sign;
  } else {  // subnormal half: normalize
    exp = 113;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    out = sign | (exp << 23) | ((man & 0x3FFu) << 13);
  }
  return __uint_as_float(out);
}

inline __half __float2half_rn(float f) {
  const uint32_t x = __float_as_uint(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return __half{uint16_t(sign | 0x7E00u)};  // NaN
  if (ax >= 0x477FF000u) return __half{uint16_t(sign | 0x7C00u)};  // rounds to >= 65520: inf
  if (ax < 0x38800000u) {  // below the smallest normal half: subnormal or zero, rounded to nearest even
    const float mag = std::fabs(f) * 16777216.0f;  // units of 2^-24, exact scaling
    const float r = std::nearbyint(mag);            // default rounding mode: nearest even
    return __half{uint16_t(sign | uint16_t(r))};
  }
  const uint32_t exp = (ax >> 23) - 112u;
  uint32_t man = ax & 0x7FFFFFu;
  uint32_t h = (exp << 10) | (man >> 13);
  const uint32_t rest = man & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // carries into the exponent correctly
  return __half{uint16_t(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(uint32_t(b.bits) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = __float_as_uint(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return __nv_bfloat16{uint16_t((x >> 16) | 0x40u)};  // quiet NaN
  const uint32_t rounded = x + 0x7FFFu + ((x >> 16) & 1u);
  return __nv_bfloat16{uint16_t(rounded >> 16)};
}
