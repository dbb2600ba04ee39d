// Instantiates the log-prob row pass (csrc/row_logprobs.cuh) for fp32, fp16 and bf16 logits.
#include "row_logprobs.cuh"

namespace remax {

cudaError_t row_logprobs_forward(DType dtype, const RowLogprobsFwdParams& p, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return row_logprobs::forward<float>(p, stream);
    case DType::kFloat16:
      return row_logprobs::forward<__half>(p, stream);
    case DType::kBFloat16:
      return row_logprobs::forward<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t row_logprobs_backward(DType dtype, const RowLogprobsBwdParams& p, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return row_logprobs::backward<float>(p, stream);
    case DType::kFloat16:
      return row_logprobs::backward<__half>(p, stream);
    case DType::kBFloat16:
      return row_logprobs::backward<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace remax
