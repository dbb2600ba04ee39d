// The per-token log-prob / entropy row pass, forward and backward: the math of the Triton kernels
// `_token_logprobs_fwd_kernel` / `_token_logprobs_bwd_kernel` (remax_kernels/ops/token_logprobs.py), for the
// token_logprobs op and for the fused-linear pipeline, which runs it on each chunk of logits between its GEMMs.
//
// Grid: one group of ROW_THREADS threads per row: a whole block (ROW_THREADS == BLOCK) for long rows, a warp
// (ROW_THREADS == 32, BLOCK / 32 rows per block) for short ones, so that a block never idles on a short row.
//
// Cost model (per row of V elements of E bytes):
//   forward : ONE read of the row (V * E bytes, 16-byte vector loads, 2 in flight per thread) + one scalar load of
//             the target logit; per element 1 exp (MUFU) + ~6 FP32 ops (+2 for the entropy); a warp-shuffle +
//             shared-memory reduction of (max, sum, sum e*d) per row; 12 bytes written per row (16 with the entropy).
//   backward: one read and one write of the row (2 * V * E bytes; vector loads and stores), 1 exp + ~8 FP32 ops per
//             element. In place (grad == logits) the write goes over the row just read, by the same thread.
// Both are bandwidth-bound on A100/H100 for E <= 4: ~3.3 TB/s on H100 allows ~1.6e12 bf16 elements/s, far below
// the MUFU and FP32 rates at these op counts.
//   soft-capping (SOFTCAP, Gemma-2/3): per element +1 exp and +1 fast division (2 MUFU) and ~4 FP32 ops, in the same
//             passes (the backward recomputes the cap from the raw logit and multiplies by 1 - tanh^2): still under
//             the MUFU rate (16 per SM per clock on H100: ~4e12 MUFU ops/s, 3 per element forward).
#pragma once

#include "common.cuh"
#include "launch.h"

namespace remax {
namespace row_logprobs {

RK_DEVICE int64_t row_offset(const RowLayout& l, int64_t row) { return (row / l.T1) * l.s0 + (row % l.T1) * l.s1; }

// Online softmax state relative to the running max m (taken on x, before the temperature): s = sum exp(d),
// w = sum exp(d) * d with d = (x - m) * inv_t. Rescaled when m grows, exactly as the Triton kernel does.
struct SoftmaxState {
  float m, s, w;

  template <bool ENTROPY>
  RK_DEVICE void add(const float* xs, int n, float inv_t) {
    float vmax = xs[0];
    for (int i = 1; i < n; ++i) vmax = fmaxf(vmax, xs[i]);
    const float m_new = fmaxf(m, vmax);
    // While every value so far is -inf, shift by 0 instead of -inf (inf - inf = NaN).
    const float m_safe = m_new == neg_inf() ? 0.0f : m_new;
    const float shift = m == neg_inf() ? 0.0f : (m - m_safe) * inv_t;
    const float scale = __expf(shift);
    float ssum = 0.0f, wsum = 0.0f;
    for (int i = 0; i < n; ++i) {
      const float d = (xs[i] - m_safe) * inv_t;
      const float e = __expf(d);
      ssum += e;
      if (ENTROPY) wsum += e * d;
    }
    if (ENTROPY) w = scale * (w + s * shift) + wsum;
    s = s * scale + ssum;
    m = m_new;
  }

  // Merge another thread's state (the same rescaling, applied to both sides).
  RK_DEVICE void merge(float om, float os, float ow, float inv_t) {
    const float m_new = fmaxf(m, om);
    const float m_safe = m_new == neg_inf() ? 0.0f : m_new;
    const float sh_a = m == neg_inf() ? 0.0f : (m - m_safe) * inv_t;
    const float sh_b = om == neg_inf() ? 0.0f : (om - m_safe) * inv_t;
    const float sc_a = __expf(sh_a), sc_b = __expf(sh_b);
    w = sc_a * (w + s * sh_a) + sc_b * (ow + os * sh_b);
    s = s * sc_a + os * sc_b;
    m = m_new;
  }
};

RK_DEVICE SoftmaxState warp_merge(SoftmaxState st, float inv_t) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float om = __shfl_xor_sync(kFullMask, st.m, o);
    const float os = __shfl_xor_sync(kFullMask, st.s, o);
    const float ow = __shfl_xor_sync(kFullMask, st.w, o);
    st.merge(om, os, ow, inv_t);
  }
  return st;
}

// Reduction over the ROW_THREADS threads of a row; the result is valid in thread 0 of the row group.
template <int BLOCK, int ROW_THREADS>
RK_DEVICE SoftmaxState row_merge(SoftmaxState st, float inv_t) {
  st = warp_merge(st, inv_t);
  if constexpr (ROW_THREADS > 32) {
    static_assert(ROW_THREADS == BLOCK, "a row is either one warp or the whole block");
    constexpr int WARPS = BLOCK / 32;
    __shared__ float sm[WARPS], ss[WARPS], sw[WARPS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
      sm[warp] = st.m;
      ss[warp] = st.s;
      sw[warp] = st.w;
    }
    __syncthreads();
    if (warp == 0) {
      st = lane < WARPS ? SoftmaxState{sm[lane], ss[lane], sw[lane]} : SoftmaxState{neg_inf(), 0.0f, 0.0f};
      st = warp_merge(st, inv_t);
    }
  }
  return st;
}

// SOFTCAP says "1 block per SM" to ptxas: without it, at 512 threads ptxas holds the fp32 capped variant to 40
// registers (the no-cap kernel's count) and spills on sm_80; with it 44, no spill. 0 (no constraint) for the no-cap
// kernel keeps its compilation as it was.
template <typename T, int BLOCK, int ROW_THREADS, bool SOFTCAP>
__global__ void __launch_bounds__(BLOCK, SOFTCAP ? 1 : 0) forward_kernel(const RowLogprobsFwdParams p) {
  constexpr int ROWS = BLOCK / ROW_THREADS;
  const int tid = int(threadIdx.x) % ROW_THREADS;
  const int64_t row = int64_t(blockIdx.x) * ROWS + int64_t(threadIdx.x) / ROW_THREADS;
  if (ROWS > 1 && row >= p.n_rows) return;  // a whole warp leaves; warp-per-row groups never use __syncthreads
  const int64_t target = p.targets[row];
  const bool valid = target != p.ignore_index;
  const T* x = static_cast<const T*>(p.logits) + row_offset(p.layout, row);
  const float inv_t = p.inv_temperature;
  const bool entropy = p.entropy != nullptr;
  const SoftCap<SOFTCAP> cap{p.softcap, SOFTCAP ? 1.0f / p.softcap : 0.0f};

  SoftmaxState st{neg_inf(), 0.0f, 0.0f};
  if (valid) {  // ignored rows skip the read (uniform within the row group)
    if (entropy) {
      for_each_chunk<T, 2>(
          x, p.vocab, tid, ROW_THREADS, [&](const float* xs, int n, int64_t) { st.template add<true>(xs, n, inv_t); },
          cap);
    } else {
      for_each_chunk<T, 2>(
          x, p.vocab, tid, ROW_THREADS, [&](const float* xs, int n, int64_t) { st.template add<false>(xs, n, inv_t); },
          cap);
    }
  }
  st = row_merge<BLOCK, ROW_THREADS>(st, inv_t);
  if (tid != 0) return;
  float logp = 0.0f, m = 0.0f, log_s = 0.0f, ent = 0.0f;
  if (valid) {
    const float x_target = cap(to_float(x[target]));
    m = st.m;
    log_s = logf(st.s);
    logp = (x_target - m) * inv_t - log_s;
    // logp <= 0 and entropy >= 0 hold exactly in real arithmetic; rounding must not cross them (positive
    // log-probs broke RL training: verl #2656). Comparisons, not fminf/fmaxf, so that NaN propagates.
    logp = logp > 0.0f ? 0.0f : logp;
    ent = log_s - st.w / st.s;
    ent = ent < 0.0f ? 0.0f : ent;
  }
  p.logp[row] = logp;
  p.row_max[row] = m;
  p.log_norm[row] = log_s;
  if (entropy) p.entropy[row] = ent;
}

template <bool SOFTCAP>
struct GradContext {
  float m, log_s, g_lp, g_ent, h, inv_t, cap, inv_cap;
  int64_t target;
  bool valid, has_lp, has_ent;
  // x: the raw logit. With SOFTCAP the softmax is that of y = cap * tanh(x / cap), and dy/dx = 1 - tanh^2.
  RK_DEVICE float grad(float x, int64_t v) const {
    if (!valid) return 0.0f;
    float dy_dx = 1.0f;
    if constexpr (SOFTCAP) {
      const float th = tanh_fast(x * inv_cap);
      dy_dx = 1.0f - th * th;
      x = x == neg_inf() ? x : cap * th;
    }
    const float log_p = (x - m) * inv_t - log_s;
    const float prob = __expf(log_p);
    float g = 0.0f;
    if (has_lp) g += g_lp * ((v == target ? 1.0f : 0.0f) - prob);
    if (has_ent) g -= g_ent * prob * (log_p + h);
    return SOFTCAP ? g * inv_t * dy_dx : g * inv_t;
  }
};

template <typename T, int BLOCK, int ROW_THREADS, bool SOFTCAP>
__global__ void __launch_bounds__(BLOCK) backward_kernel(const RowLogprobsBwdParams p) {
  constexpr int ROWS = BLOCK / ROW_THREADS;
  constexpr int N = Vec16<T>::N;
  using V16 = Vec16<T>;
  const int tid = int(threadIdx.x) % ROW_THREADS;
  const int64_t row = int64_t(blockIdx.x) * ROWS + int64_t(threadIdx.x) / ROW_THREADS;
  if (row >= p.n_rows) return;  // no barriers in this kernel
  GradContext<SOFTCAP> c;
  c.cap = p.softcap;
  c.inv_cap = SOFTCAP ? 1.0f / p.softcap : 0.0f;
  c.target = p.targets[row];
  c.valid = c.target != p.ignore_index;
  c.m = p.row_max[row];
  c.log_s = p.log_norm[row];
  c.inv_t = p.inv_temperature;
  c.has_lp = p.grad_logp != nullptr;
  c.has_ent = p.grad_entropy != nullptr;
  c.g_lp = c.has_lp ? p.grad_logp[row] : 0.0f;
  c.g_ent = c.has_ent ? p.grad_entropy[row] : 0.0f;
  c.h = c.has_ent ? p.entropy[row] : 0.0f;
  const int64_t V = p.vocab;
  const T* x = static_cast<const T*>(p.logits) + row_offset(p.layout, row);
  T* g = static_cast<T*>(p.grad) + row_offset(p.grad_layout, row);

  const int64_t head = head_to_alignment(x, V);
  if (head != head_to_alignment(static_cast<const T*>(g), V)) {
    // Rows of the logits and of the gradient sit differently against 16-byte boundaries: scalar accesses.
    if (tid == 0) RK_COVER(kCoverGradScalar);
    for (int64_t i = tid; i < V; i += ROW_THREADS) g[i] = from_float<T>(c.grad(c.valid ? to_float(x[i]) : 0.0f, i));
    return;
  }
  for (int64_t i = tid; i < head; i += ROW_THREADS) g[i] = from_float<T>(c.grad(c.valid ? to_float(x[i]) : 0.0f, i));
  const int64_t nvec = (V - head) / N;
  const V16* xv = reinterpret_cast<const V16*>(x + head);
  V16* gv = reinterpret_cast<V16*>(g + head);
  for (int64_t j = tid; j < nvec; j += ROW_THREADS) {
    V16 in, out;
    if (c.valid) in = xv[j];
    const int64_t first = head + j * N;
#pragma unroll
    for (int e = 0; e < N; ++e) out.v[e] = from_float<T>(c.grad(c.valid ? to_float(in.v[e]) : 0.0f, first + e));
    gv[j] = out;
  }
  for (int64_t i = head + nvec * N + tid; i < V; i += ROW_THREADS) {
    g[i] = from_float<T>(c.grad(c.valid ? to_float(x[i]) : 0.0f, i));
  }
}

// Launch with an explicit configuration (the emulation tests drive small ones; `run` below picks for the GPU); the
// soft-capping variant is its own instantiation, chosen from p.softcap on the host.
template <typename T, int BLOCK, int ROW_THREADS>
cudaError_t launch(const RowLogprobsFwdParams& p, cudaStream_t stream) {
  constexpr int ROWS = BLOCK / ROW_THREADS;
  const int64_t grid = (p.n_rows + ROWS - 1) / ROWS;
  if (p.softcap > 0.0f) return launch_kernel(forward_kernel<T, BLOCK, ROW_THREADS, true>, grid, BLOCK, p, stream);
  return launch_kernel(forward_kernel<T, BLOCK, ROW_THREADS, false>, grid, BLOCK, p, stream);
}

template <typename T, int BLOCK, int ROW_THREADS>
cudaError_t launch(const RowLogprobsBwdParams& p, cudaStream_t stream) {
  constexpr int ROWS = BLOCK / ROW_THREADS;
  const int64_t grid = (p.n_rows + ROWS - 1) / ROWS;
  if (p.softcap > 0.0f) return launch_kernel(backward_kernel<T, BLOCK, ROW_THREADS, true>, grid, BLOCK, p, stream);
  return launch_kernel(backward_kernel<T, BLOCK, ROW_THREADS, false>, grid, BLOCK, p, stream);
}

// The configuration for a vocabulary, forward and backward alike: a warp per row up to 1024 entries (8 rows per
// 256-thread block), a 256-thread block per row up to 16384, else 512 threads (for V = 128k bf16: 32 16-byte loads
// per thread per row).
template <typename T, typename Params>
cudaError_t run(const Params& p, cudaStream_t stream) {
  if (p.vocab <= 1024) return launch<T, 256, 32>(p, stream);
  if (p.vocab <= 16384) return launch<T, 256, 256>(p, stream);
  return launch<T, 512, 512>(p, stream);
}

}  // namespace row_logprobs
}  // namespace remax
