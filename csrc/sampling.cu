// Instantiates the decoding-step kernel (csrc/sampling.cuh) for fp32, fp16 and bf16 logits.
#include "sampling.cuh"

namespace remax {

cudaError_t sample_and_greedy(DType dtype, const SampleParams& p, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return sampling::run<float>(p, stream);
    case DType::kFloat16:
      return sampling::run<__half>(p, stream);
    case DType::kBFloat16:
      return sampling::run<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace remax
