// Instantiates the log-prob row pass (csrc/row_logprobs.cuh) for fp32, fp16 and bf16 logits.
#include "row_logprobs.cuh"

namespace remax {

cudaError_t row_logprobs_forward(DType dtype, const RowLogprobsFwdParams& p, cudaStream_t stream) {
  return with_element_type(dtype, [&](auto t) { return row_logprobs::run<typename decltype(t)::type>(p, stream); });
}

cudaError_t row_logprobs_backward(DType dtype, const RowLogprobsBwdParams& p, cudaStream_t stream) {
  return with_element_type(dtype, [&](auto t) { return row_logprobs::run<typename decltype(t)::type>(p, stream); });
}

}  // namespace remax
