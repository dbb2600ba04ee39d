// The torch binding of remax-kernels' CUDA kernels, and the only file of csrc/ that includes torch: it checks the
// inputs (device, dtype, shape, strides, memory extent), sets the device guard, takes the current stream, calls
// the launch functions of csrc/launch.h and registers the ops with torch.library in their own namespace,
// `remax_cuda` (the package's Python custom ops own `remax_kernels`), so they are dispatcher ops that torch.compile
// and CUDA graphs see as single nodes. remax_kernels/_cuda.py loads this extension lazily and adds the fake (meta)
// implementations.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "launch.h"

namespace {

using at::Tensor;

remax::DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return remax::DType::kFloat32;
    case at::kHalf:
      return remax::DType::kFloat16;
    case at::kBFloat16:
      return remax::DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, ": expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(const Tensor& t, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, ": is on ", t.device(), " but the logits are on ", ref.device());
}

void check_vector(const Tensor& t, const Tensor& ref, const char* name, at::ScalarType dtype, int64_t n) {
  check_cuda(t, ref, name);
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, ": expected shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": must be contiguous");
}

// The rows (r / t1) * s0 + (r % t1) * s1 + [0, vocab) for r < n must lie inside the tensor's storage.
void check_layout(const Tensor& t, int64_t n, int64_t t1, int64_t s0, int64_t s1, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) <= 1, name, ": the last dimension must be contiguous");
  TORCH_CHECK(t1 >= 1 && s0 >= 0 && s1 >= 0, name, ": invalid row layout (t1=", t1, ", s0=", s0, ", s1=", s1, ")");
  if (n == 0) return;
  const int64_t last = n - 1;
  int64_t max_offset = (last / t1) * s0 + (last % t1) * s1;
  if (last / t1 >= 1) max_offset = std::max(max_offset, (last / t1 - 1) * s0 + (t1 - 1) * s1);
  const int64_t available = int64_t(t.storage().nbytes() / t.element_size()) - t.storage_offset();
  TORCH_CHECK(max_offset + t.size(-1) <= available, name, ": the row layout reaches element ",
              max_offset + t.size(-1), " but only ", available, " are stored after the data pointer");
}

cudaStream_t current_stream(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "remax_cuda.", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> row_logprobs_fwd(const Tensor& logits, const Tensor& targets, int64_t t1,
                                                            int64_t s0, int64_t s1, double inv_temperature,
                                                            int64_t ignore_index, bool need_entropy,
                                                            double softcap) {
  TORCH_CHECK(logits.is_cuda(), "logits: expected a CUDA tensor, got one on ", logits.device());
  const remax::DType dtype = dtype_of(logits, "logits");
  const int64_t n = targets.numel();
  check_vector(targets, logits, "targets", at::kLong, n);
  check_layout(logits, n, t1, s0, s1, "logits");
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const auto f32 = logits.options().dtype(at::kFloat);
  Tensor logp = at::empty({n}, f32), row_max = at::empty({n}, f32), log_norm = at::empty({n}, f32);
  Tensor entropy = at::empty({need_entropy ? n : 0}, f32);
  const remax::RowLogprobsFwdParams p{logits.data_ptr(),  remax::RowLayout{t1, s0, s1},
                                      n,                  logits.size(-1),
                                      targets.data_ptr<int64_t>(), ignore_index,
                                      float(inv_temperature), logp.data_ptr<float>(),
                                      row_max.data_ptr<float>(),  log_norm.data_ptr<float>(),
                                      need_entropy ? entropy.data_ptr<float>() : nullptr,
                                      float(softcap)};
  check_launch(remax::row_logprobs_forward(dtype, p, current_stream(logits)), "row_logprobs_fwd");
  return {logp, row_max, log_norm, entropy};
}

void row_logprobs_bwd(const Tensor& logits, const Tensor& targets, const Tensor& row_max, const Tensor& log_norm,
                      const std::optional<Tensor>& entropy, const std::optional<Tensor>& grad_logp,
                      const std::optional<Tensor>& grad_entropy, int64_t t1, int64_t s0, int64_t s1,
                      double inv_temperature, int64_t ignore_index, const Tensor& grad, int64_t g_t1, int64_t g_s0,
                      int64_t g_s1, double softcap) {
  TORCH_CHECK(logits.is_cuda(), "logits: expected a CUDA tensor, got one on ", logits.device());
  const remax::DType dtype = dtype_of(logits, "logits");
  const int64_t n = targets.numel();
  check_vector(targets, logits, "targets", at::kLong, n);
  check_vector(row_max, logits, "row_max", at::kFloat, n);
  check_vector(log_norm, logits, "log_norm", at::kFloat, n);
  if (grad_logp) check_vector(*grad_logp, logits, "grad_logp", at::kFloat, n);
  if (grad_entropy) {
    check_vector(*grad_entropy, logits, "grad_entropy", at::kFloat, n);
    TORCH_CHECK(entropy.has_value(), "entropy: required with grad_entropy");
    check_vector(*entropy, logits, "entropy", at::kFloat, n);
  }
  check_cuda(grad, logits, "grad");
  TORCH_CHECK(grad.scalar_type() == logits.scalar_type(), "grad: dtype ", grad.scalar_type(), " differs from the logits' ",
              logits.scalar_type());
  TORCH_CHECK(grad.size(-1) == logits.size(-1), "grad: last dimension ", grad.size(-1), " differs from the logits' ",
              logits.size(-1));
  check_layout(logits, n, t1, s0, s1, "logits");
  check_layout(grad, n, g_t1, g_s0, g_s1, "grad");
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const remax::RowLogprobsBwdParams p{
      logits.data_ptr(),
      remax::RowLayout{t1, s0, s1},
      n,
      logits.size(-1),
      targets.data_ptr<int64_t>(),
      ignore_index,
      float(inv_temperature),
      row_max.data_ptr<float>(),
      log_norm.data_ptr<float>(),
      grad_entropy ? entropy->data_ptr<float>() : nullptr,
      grad_logp ? grad_logp->data_ptr<float>() : nullptr,
      grad_entropy ? grad_entropy->data_ptr<float>() : nullptr,
      grad.data_ptr(),
      remax::RowLayout{g_t1, g_s0, g_s1},
      float(softcap)};
  check_launch(remax::row_logprobs_backward(dtype, p, current_stream(logits)), "row_logprobs_bwd");
}

std::tuple<Tensor, Tensor> sample_and_greedy(const Tensor& logits, const Tensor& greedy, const Tensor& temperature,
                                             const Tensor& top_k, const Tensor& top_p, const Tensor& log_min_p,
                                             const Tensor& seeds, const Tensor& step, bool key_row,
                                             bool truncate, bool raw, double softcap) {
  TORCH_CHECK(logits.is_cuda(), "logits: expected a CUDA tensor, got one on ", logits.device());
  const remax::DType dtype = dtype_of(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "logits: expected [B, V], got ", logits.sizes());
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab >= 1 && vocab <= std::numeric_limits<int32_t>::max(), "logits: V must be in [1, 2^31), got ",
              vocab);
  TORCH_CHECK(logits.stride(0) >= 0, "logits: negative row stride");
  check_layout(logits, batch, batch > 0 ? batch : 1, 0, logits.stride(0), "logits");
  TORCH_CHECK(greedy.scalar_type() == at::kBool || greedy.scalar_type() == at::kByte,
              "greedy: expected bool or uint8, got ", greedy.scalar_type());
  check_vector(greedy, logits, "greedy", greedy.scalar_type(), batch);
  check_vector(temperature, logits, "temperature", at::kFloat, batch);
  check_vector(top_k, logits, "top_k", at::kInt, batch);
  check_vector(top_p, logits, "top_p", at::kFloat, batch);
  check_vector(log_min_p, logits, "log_min_p", at::kFloat, batch);
  check_vector(seeds, logits, "seeds", at::kLong, batch);
  check_vector(step, logits, "step", at::kLong, 1);  // its value is read on the device (range-checked in Python)
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  Tensor tokens = at::empty({batch}, logits.options().dtype(at::kLong));
  Tensor logprobs = at::empty({batch}, logits.options().dtype(at::kFloat));
  const remax::SampleParams p{logits.data_ptr(),
                              logits.stride(0),
                              batch,
                              vocab,
                              static_cast<const uint8_t*>(greedy.data_ptr()),
                              temperature.data_ptr<float>(),
                              top_k.data_ptr<int32_t>(),
                              top_p.data_ptr<float>(),
                              log_min_p.data_ptr<float>(),
                              seeds.data_ptr<int64_t>(),
                              step.data_ptr<int64_t>(),
                              key_row,
                              truncate,
                              raw,
                              tokens.data_ptr<int64_t>(),
                              logprobs.data_ptr<float>(),
                              float(softcap)};
  check_launch(remax::sample_and_greedy(dtype, p, current_stream(logits)), "sample_and_greedy");
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY(remax_cuda, m) {
  m.def(
      "row_logprobs_fwd(Tensor logits, Tensor targets, int t1, int s0, int s1, float inv_temperature, "
      "int ignore_index, bool need_entropy, float softcap=0.0) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "row_logprobs_bwd(Tensor logits, Tensor targets, Tensor row_max, Tensor log_norm, Tensor? entropy, "
      "Tensor? grad_logp, Tensor? grad_entropy, int t1, int s0, int s1, float inv_temperature, int ignore_index, "
      "Tensor(a!) grad, int g_t1, int g_s0, int g_s1, float softcap=0.0) -> ()");
  m.def(
      "sample_and_greedy(Tensor logits, Tensor greedy, Tensor temperature, Tensor top_k, Tensor top_p, "
      "Tensor log_min_p, Tensor seeds, Tensor step, bool key_row, bool truncate, bool raw, float softcap=0.0) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(remax_cuda, CUDA, m) {
  m.impl("row_logprobs_fwd", &row_logprobs_fwd);
  m.impl("row_logprobs_bwd", &row_logprobs_bwd);
  m.impl("sample_and_greedy", &sample_and_greedy);
}

// An importable module: `import remax_kernels._C` runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "remax-kernels CUDA kernels (ops under torch.ops.remax_cuda)"; }
