// Shared helpers of remax-kernels' CUDA kernels: element conversions, the 16-byte-vector row walk, warp reductions,
// Philox4x32-10 and the Gumbel transform of the package's random stream; on the host, the DType -> element type map
// and the kernel launch.
//
// Includes only CUDA's own headers. Built with -DREMAX_KERNELS_EMU, the same source compiles with a host C++20
// compiler against csrc/emu/cuda_emu.h and runs on the CPU (see csrc/README.md).
#pragma once

#if defined(REMAX_KERNELS_EMU)
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// kernel<<<grid, block, 0, stream>>>(args...), spelled so the emulation can replace it.
#define RK_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

#include <cstdint>

#include "launch.h"

#define RK_DEVICE __device__ __forceinline__

// RK_COVER(id): counts, in the CPU emulation only, that a code path ran (tests check their inputs reach it).
#if defined(REMAX_KERNELS_EMU)
#define RK_COVER(id) ::emu::cover(int(id))
#else
#define RK_COVER(id) ((void)0)
#endif

namespace remax {

constexpr unsigned kFullMask = 0xffffffffu;

// Coverage points (see RK_COVER).
enum Cover : int {
  kCoverScalarHead = 0,        // for_each_chunk: elements before the first 16-byte boundary
  kCoverScalarTail = 1,        // for_each_chunk: elements after the last full vector
  kCoverGradScalar = 2,        // row backward: logits and gradient rows aligned differently
  kCoverRaceInPass1 = 3,       // sampler: untruncated sampled row
  kCoverThresholdAll = 4,      // sampler: every candidate gathered, race over the list
  kCoverThresholdBoundary = 5, // sampler: threshold bins gathered, final pass
  kCoverThresholdFallback = 6, // sampler: key-histogram search
  kCoverFinalPass = 7,         // sampler: race over the row with the kept-set predicate
};

RK_DEVICE float neg_inf() { return __int_as_float(int(0xff800000u)); }
RK_DEVICE float pos_inf() { return __int_as_float(0x7f800000); }
RK_DEVICE float quiet_nan() { return __int_as_float(0x7fc00000); }

// ---------------------------------------------------------------------------------------------------------------------
// Element types: fp32, fp16, bf16 logits are read as fp32; gradients are written back rounded to nearest even.
// ---------------------------------------------------------------------------------------------------------------------
RK_DEVICE float to_float(float x) { return x; }
RK_DEVICE float to_float(__half x) { return __half2float(x); }
RK_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
RK_DEVICE T from_float(float x);
template <>
RK_DEVICE float from_float<float>(float x) {
  return x;
}
template <>
RK_DEVICE __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
RK_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Calls f(ElementType<T>{}) with T the element type `dtype` names (float, __half, __nv_bfloat16) and returns its
// cudaError_t; cudaErrorInvalidValue for an unknown dtype.
template <typename T>
struct ElementType {
  using type = T;
};
template <typename F>
cudaError_t with_element_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(ElementType<float>{});
    case DType::kFloat16:
      return f(ElementType<__half>{});
    case DType::kBFloat16:
      return f(ElementType<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// kernel<<<n_blocks, threads, 0, stream>>>(p) and its launch error; nothing is launched for an empty grid (no rows).
template <typename Params>
cudaError_t launch_kernel(void (*kernel)(Params), int64_t n_blocks, int threads, const Params& p,
                          cudaStream_t stream) {
  if (n_blocks == 0) return cudaSuccess;
  RK_LAUNCH(kernel, dim3(unsigned(n_blocks)), dim3(threads), stream, p);
  return cudaGetLastError();
}

// N elements of T in one 16-byte load/store.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int N = 16 / int(sizeof(T));
  T v[N];
};

// Elements before the first 16-byte boundary of `row` (0 when aligned; rows of a view may each start anywhere).
template <typename T>
RK_DEVICE int64_t head_to_alignment(const T* row, int64_t V) {
  constexpr int N = Vec16<T>::N;
  const int64_t mis = int64_t((reinterpret_cast<uintptr_t>(row) / sizeof(T)) % N);
  const int64_t head = mis == 0 ? 0 : N - mis;
  return head < V ? head : V;
}

// Logit soft-capping x -> cap * tanh(x / cap) (Gemma-2/3's final_logit_softcapping), applied to each value as it is
// loaded (for_each_chunk's `load`); ON = false is the identity, so the no-cap kernels compile as without it.
// tanh(u) = 1 - 2 / (exp(2u) + 1): one fast exp and one fast division (MUFU ex2 + rcp), exact limits +-1 where the exp
// overflows to inf or underflows to 0; the absolute error, a few ulps of 1 times cap, is what the logits need
// (softmax is shift-invariant). -inf stays -inf (masked tokens stay masked), NaN stays NaN. The same formula as the
// Triton kernels' `soft_cap_logits`.
RK_DEVICE float tanh_fast(float u) { return 1.0f - __fdividef(2.0f, __expf(2.0f * u) + 1.0f); }

template <bool ON>
struct SoftCap {
  float cap, inv_cap;
  RK_DEVICE float operator()(float x) const {
    if constexpr (!ON) {
      return x;
    } else {
      return x == neg_inf() ? x : cap * tanh_fast(x * inv_cap);
    }
  }
};
using NoCap = SoftCap<false>;

// Walks the part of a row of V elements owned by thread `tid` of `nthreads`, in increasing index order, calling
// f(xs, count, first) with fp32 values xs[0..count) = load(element) of elements first..first+count-1: a scalar head up
// to the first 16-byte boundary, then N-element vectors (one 16-byte load each; UNROLL of them issued before any is
// used, to keep several loads in flight), then a scalar tail. Vector j of the row goes to thread j % nthreads, so each
// warp's loads are contiguous 512-byte segments. `load` maps each upcast value (the soft-cap, or the identity).
template <typename T, int UNROLL, typename F, typename Load = NoCap>
RK_DEVICE void for_each_chunk(const T* __restrict__ row, int64_t V, int tid, int nthreads, F&& f,
                              const Load load = Load{}) {
  constexpr int N = Vec16<T>::N;
  using V16 = Vec16<T>;
  float xs[N];
  const int64_t head = head_to_alignment(row, V);
  for (int64_t i = tid; i < head; i += nthreads) {
    RK_COVER(kCoverScalarHead);
    xs[0] = load(to_float(row[i]));
    f(xs, 1, i);
  }
  const int64_t nvec = (V - head) / N;
  const V16* vrow = reinterpret_cast<const V16*>(row + head);
  int64_t j = tid;
  for (; j + int64_t(UNROLL - 1) * nthreads < nvec; j += int64_t(UNROLL) * nthreads) {
    V16 buf[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) buf[u] = vrow[j + int64_t(u) * nthreads];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
      for (int e = 0; e < N; ++e) xs[e] = load(to_float(buf[u].v[e]));
      f(xs, N, head + (j + int64_t(u) * nthreads) * N);
    }
  }
  for (; j < nvec; j += nthreads) {
    const V16 buf = vrow[j];
#pragma unroll
    for (int e = 0; e < N; ++e) xs[e] = load(to_float(buf.v[e]));
    f(xs, N, head + j * N);
  }
  for (int64_t i = head + nvec * N + tid; i < V; i += nthreads) {
    RK_COVER(kCoverScalarTail);
    xs[0] = load(to_float(row[i]));
    f(xs, 1, i);
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Warp reductions (every lane of the warp must call them; all lanes get the result)
// ---------------------------------------------------------------------------------------------------------------------
template <int WIDTH = 32>
RK_DEVICE float warp_max(float v) {
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
template <int WIDTH = 32>
RK_DEVICE float warp_min(float v) {
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
template <typename U, int WIDTH = 32>
RK_DEVICE U warp_sum(U v) {
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// (value, index) argmax with 32-bit indices (V < 2^31): the larger value wins, equal values go to the LOWER index;
// NaN values never win.
struct ArgMax {
  float value;
  int32_t index;
  RK_DEVICE void merge(float v, int32_t i) {
    if (v > value || (v == value && i < index)) {
      value = v;
      index = i;
    }
  }
};
RK_DEVICE ArgMax warp_argmax(ArgMax a) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(kFullMask, a.value, o);
    const int32_t i = __shfl_xor_sync(kFullMask, a.index, o);
    a.merge(v, i);
  }
  return a;
}

// ---------------------------------------------------------------------------------------------------------------------
// The random stream (one spec for the CUDA, Triton and torch backends; see remax_kernels/ops/sampling.py):
//   for vocabulary index v: q = v >> 2, w = word (v & 3) of Philox4x32-10(key = (seed lo, seed hi),
//   counter = (q, r, step, 0)); u = ((w >> 9) + 0.5) / 2^23; g = -log(-log(u)).
// ---------------------------------------------------------------------------------------------------------------------
struct Philox4 {
  uint32_t w[4];
};

// Philox4x32-10 (Salmon et al., SC'11). c1, c2, c3 are per-row constants in our stream, so only c0 varies per call.
RK_DEVICE Philox4 philox4x32_10(uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(c0, 0xD2511F53u);
    const uint32_t lo0 = c0 * 0xD2511F53u;
    const uint32_t hi1 = __umulhi(c2, 0xCD9E8D57u);
    const uint32_t lo1 = c2 * 0xCD9E8D57u;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// 23 random bits + 0.5 ulp: u in [2^-24, 1 - 2^-24], both ends exact in fp32, so log(u) and log(-log(u)) are finite.
RK_DEVICE float uniform_from_word(uint32_t w) { return float(w >> 9) * (1.0f / 8388608.0f) + (0.5f / 8388608.0f); }

// The exact Gumbel value of the spec, with the accurate logf (the GPU's __logf has an absolute error ~1e-7 near
// u = 1, as large as -log(u) itself there).
RK_DEVICE float gumbel_from_uniform(float u) { return -logf(-logf(u)); }

// g <= -log(-log(1 - 2^-24)) = 16.6355...: an element with z + kGumbelBound <= best cannot win a race (fp32
// rounding of z + g is monotone in g, so fl(z + g) <= fl(z + kGumbelBound)).
constexpr float kGumbelBound = 16.75f;

// Per-row stream state: the key and the constant counter words, and a one-group cache of the last Philox call
// (a thread walks its elements in increasing order, so each group of four is computed once).
struct GumbelStream {
  uint32_t k0, k1, row_key, step;
  uint32_t cached_group;
  uint32_t w0, w1, w2, w3;
  RK_DEVICE void init(int64_t seed, uint32_t r, uint32_t s) {
    k0 = uint32_t(uint64_t(seed) & 0xFFFFFFFFu);
    k1 = uint32_t(uint64_t(seed) >> 32);
    row_key = r;
    step = s;
    cached_group = 0xFFFFFFFFu;  // no group: q = v >> 2 < 2^29 for V < 2^31
  }
  // The uniform of vocabulary entry v (one Philox call serves the four entries of a group).
  RK_DEVICE float uniform(int64_t v) {
    const uint32_t q = uint32_t(v >> 2);
    if (q != cached_group) {
      const Philox4 p = philox4x32_10(k0, k1, q, row_key, step, 0u);
      w0 = p.w[0];
      w1 = p.w[1];
      w2 = p.w[2];
      w3 = p.w[3];
      cached_group = q;
    }
    const int j = int(v & 3);
    const uint32_t w = j == 0 ? w0 : (j == 1 ? w1 : (j == 2 ? w2 : w3));  // selects, not a local-memory array
    return uniform_from_word(w);
  }
};

// Monotone fp32 -> int32 map (a < b <=> key(a) < key(b)); -0.0 and +0.0 share key 0 as they compare equal.
RK_DEVICE int32_t ordered_key(float z) {
  const int32_t bits = __float_as_int(z);
  const int32_t key = bits < 0 ? (bits ^ 0x7FFFFFFF) : bits;
  return z == 0.0f ? 0 : key;
}
RK_DEVICE float key_to_float(int32_t key) { return __int_as_float(key < 0 ? (key ^ 0x7FFFFFFF) : key); }

}  // namespace remax
