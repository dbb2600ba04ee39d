// A thin C ABI over the CUDA kernels compiled for the CPU emulation (csrc/emu/cuda_emu.h), for the tests
// (tests/helpers/cuda_emu.py builds this file with g++ and drives it through ctypes). It includes the production
// .cu files, so the launch functions the torch binding calls are the ones under test; `config` picks either them
// (config 0) or an explicit small block configuration that exercises the same code with few threads.
//
// Every launch function returns 0 on success, else a cudaError_t value (cudaErrorInvalidValue for an unknown
// config or dtype).
#include "../row_logprobs.cu"
#include "../sampling.cu"

using namespace remax;

namespace {

// Params: RowLogprobsFwdParams or RowLogprobsBwdParams (row_logprobs::launch and ::run are overloaded on them).
template <typename T, typename Params>
cudaError_t row_config(int config, const Params& p) {
  switch (config) {
    case 0:
      return row_logprobs::run<T>(p, nullptr);
    case 1:
      return row_logprobs::launch<T, 64, 64>(p, nullptr);
    case 2:
      return row_logprobs::launch<T, 64, 32>(p, nullptr);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t sample_config(int config, const SampleParams& p) {
  switch (config) {
    case 0:
      return sampling::run<T>(p, nullptr);
    case 1:
      return sampling::launch<T, 64, 64, 256>(p, nullptr);
    case 2:
      return sampling::launch<T, 64, 32, 32>(p, nullptr);
    case 3:
      return sampling::launch<T, 32, 32, 64>(p, nullptr);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

extern "C" {

int rk_emu_row_logprobs_fwd(int dtype, int config, const void* logits, int64_t t1, int64_t s0, int64_t s1,
                            int64_t n_rows, int64_t vocab, const int64_t* targets, int64_t ignore_index,
                            float inv_temperature, float* logp, float* row_max, float* log_norm, float* entropy,
                            float softcap) {
  const RowLogprobsFwdParams p{logits, RowLayout{t1, s0, s1}, n_rows, vocab, targets, ignore_index,
                               inv_temperature, logp, row_max, log_norm, entropy, softcap};
  return with_element_type(DType(dtype), [&](auto t) { return row_config<typename decltype(t)::type>(config, p); });
}

int rk_emu_row_logprobs_bwd(int dtype, int config, const void* logits, int64_t t1, int64_t s0, int64_t s1,
                            int64_t n_rows, int64_t vocab, const int64_t* targets, int64_t ignore_index,
                            float inv_temperature, const float* row_max, const float* log_norm,
                            const float* entropy, const float* grad_logp, const float* grad_entropy, void* grad,
                            int64_t g_t1, int64_t g_s0, int64_t g_s1, float softcap) {
  const RowLogprobsBwdParams p{logits,   RowLayout{t1, s0, s1}, n_rows,    vocab,        targets,
                               ignore_index, inv_temperature,   row_max,   log_norm,     entropy,
                               grad_logp, grad_entropy,         grad,      RowLayout{g_t1, g_s0, g_s1}, softcap};
  return with_element_type(DType(dtype), [&](auto t) { return row_config<typename decltype(t)::type>(config, p); });
}

int rk_emu_sample(int dtype, int config, const void* logits, int64_t row_stride, int64_t batch, int64_t vocab,
                  const uint8_t* greedy, const float* temperature, const int32_t* top_k, const float* top_p,
                  const float* log_min_p, const int64_t* seeds, const int64_t* step, bool key_row, bool truncate,
                  bool raw, int64_t* tokens, float* logprobs, float softcap) {
  const SampleParams p{logits, row_stride, batch,    vocab, greedy,   temperature, top_k, top_p,
                       log_min_p, seeds,   step,     key_row, truncate, raw,       tokens, logprobs, softcap};
  return with_element_type(DType(dtype), [&](auto t) { return sample_config<typename decltype(t)::type>(config, p); });
}

// Copies the 16 path-coverage counters into out[0..16) and resets them.
void rk_emu_coverage(int64_t* out) {
  for (int i = 0; i < 16; ++i) out[i] = emu::coverage[i].exchange(0);
}

}  // extern "C"
