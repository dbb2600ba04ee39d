// Instantiates the decoding-step kernel (csrc/sampling.cuh) for fp32, fp16 and bf16 logits.
#include "sampling.cuh"

namespace remax {

cudaError_t sample_and_greedy(DType dtype, const SampleParams& p, cudaStream_t stream) {
  return with_element_type(dtype, [&](auto t) { return sampling::run<typename decltype(t)::type>(p, stream); });
}

}  // namespace remax
