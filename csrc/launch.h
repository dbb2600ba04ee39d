// Host-side entry points of remax-kernels' CUDA kernels: parameter structs and the launch functions that
// csrc/*.cu define (each picks a block configuration and launches on the given stream; returns the launch error).
// No device code here, so csrc/bindings.cpp (the only file that includes torch) can include it.
#pragma once

#if defined(REMAX_KERNELS_EMU)
#include "emu/cuda_emu.h"
#else
#include <cuda_runtime.h>
#endif

#include <cstdint>

namespace remax {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Row r of a [..., V] tensor starts (r / T1) * s0 + (r % T1) * s1 elements after the data pointer: a 2-D [n, V]
// tensor with row stride s is (T1 = n, s0 = 0, s1 = s); a [B, T, V] view such as logits[:, :-1] is
// (T1 = T - 1, s0 = T * V, s1 = V). The last dimension is contiguous.
struct RowLayout {
  int64_t T1, s0, s1;
};

// Per-token log-prob row pass (forward): for each row with target != ignore_index, with m = max(x),
// d = (x - m) * inv_temperature, s = sum exp(d):
//   logp = min(d[target] - log(s), 0), row_max = m, log_norm = log(s), entropy = max(log(s) - sum(exp(d) * d) / s, 0)
// (the clamps keep NaN); ignored rows get 0 in all four outputs. All outputs are fp32 [n_rows]. With softcap > 0, x is
// the soft-capped logit softcap * tanh(logits / softcap) (computed as the row is read; 0 = off).
struct RowLogprobsFwdParams {
  const void* logits;  // element type given by the DType argument
  RowLayout layout;
  int64_t n_rows, vocab;
  const int64_t* targets;
  int64_t ignore_index;
  float inv_temperature;
  float* logp;
  float* row_max;
  float* log_norm;
  float* entropy;  // nullptr: entropy not computed
  float softcap;   // > 0: soft-cap the logits as they are read; 0: off (last, so older initializers leave it off)
};

// Backward: grad[v] = (g_lp * (1[v == target] - p_v) - g_ent * p_v * (log p_v + H)) * inv_temperature with
// log p_v = (x_v - row_max) * inv_temperature - log_norm, written in the logits' dtype; zero rows where ignored.
// `grad` may be the logits themselves with the same layout (in place: each element is read before it is written,
// by the same thread). With softcap > 0, x_v is the capped logit and grad is w.r.t. the raw logits (the chain rule's
// factor 1 - tanh(logits / softcap)^2 computed in the same pass).
struct RowLogprobsBwdParams {
  const void* logits;
  RowLayout layout;
  int64_t n_rows, vocab;
  const int64_t* targets;
  int64_t ignore_index;
  float inv_temperature;
  const float* row_max;
  const float* log_norm;
  const float* entropy;       // read only when grad_entropy != nullptr
  const float* grad_logp;     // nullptr: no log-prob gradient
  const float* grad_entropy;  // nullptr: no entropy gradient
  void* grad;
  RowLayout grad_layout;
  float softcap;  // as in the forward
};

cudaError_t row_logprobs_forward(DType dtype, const RowLogprobsFwdParams& p, cudaStream_t stream);
cudaError_t row_logprobs_backward(DType dtype, const RowLogprobsBwdParams& p, cudaStream_t stream);

// One decoding step (see remax_kernels/ops/sampling.py for the exact definitions shared with the Triton kernel and
// the torch path): greedy rows take the first argmax, sampled rows a Gumbel-max sample over the kept set of
// temperature / top-k / top-p / min-p; the chosen token's log-prob ("processed" or raw) is returned.
struct SampleParams {
  const void* logits;
  int64_t row_stride;  // elements; the last dimension is contiguous
  int64_t batch, vocab;
  const uint8_t* greedy;      // [batch], nonzero = greedy row
  const float* temperature;   // [batch]; <= 0 means 1 (greedy rows only)
  const int32_t* top_k;       // [batch]; 0 or >= #finite disables
  const float* top_p;         // [batch]; 1 disables
  const float* log_min_p;     // [batch]; -inf disables
  const int64_t* seeds;       // [batch]
  const int64_t* step;        // [1], the decode step, read by the kernel: a captured CUDA graph replays it
  bool key_row;   // row key = row position (an int seed) or 0 (per-row seeds)
  bool truncate;  // some row may have top-k / top-p / min-p active
  bool raw;       // log-probs of log_softmax(logits) instead of the processed distribution
  int64_t* tokens;   // [batch]
  float* logprobs;   // [batch]
  float softcap;     // > 0: the logits are soft-capped (softcap * tanh(x / softcap)) as each pass reads them; 0: off
};

cudaError_t sample_and_greedy(DType dtype, const SampleParams& p, cudaStream_t stream);

}  // namespace remax
