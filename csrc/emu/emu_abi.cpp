// A thin C ABI over the CUDA kernels compiled for the CPU emulation (csrc/emu/cuda_emu.h), for the tests
// (tests/helpers/cuda_emu.py builds this file with g++ and drives it through ctypes). It includes the production
// .cu files, so the launch functions the torch binding calls are the ones under test; `config` picks either them
// (config 0) or an explicit small block configuration that exercises the same code with few threads.
//
// Every function returns 0 on success, else a cudaError_t value (or -1 for an unknown config/dtype).
#include "../row_logprobs.cu"
#include "../sampling.cu"

using namespace remax;

namespace {

template <typename T>
int fwd_config(int config, const RowLogprobsFwdParams& p) {
  switch (config) {
    case 0:
      return int(row_logprobs::forward<T>(p, nullptr));
    case 1:
      return int(row_logprobs::launch_forward<T, 64, 64>(p, nullptr));
    case 2:
      return int(row_logprobs::launch_forward<T, 64, 32>(p, nullptr));
  }
  return -1;
}

template <typename T>
int bwd_config(int config, const RowLogprobsBwdParams& p) {
  switch (config) {
    case 0:
      return int(row_logprobs::backward<T>(p, nullptr));
    case 1:
      return int(row_logprobs::launch_backward<T, 64, 64>(p, nullptr));
    case 2:
      return int(row_logprobs::launch_backward<T, 64, 32>(p, nullptr));
  }
  return -1;
}

template <typename T>
int sample_config(int config, const SampleParams& p) {
  switch (config) {
    case 0:
      return int(sampling::run<T>(p, nullptr));
    case 1:
      return int(sampling::launch<T, 64, 64, 256>(p, nullptr));
    case 2:
      return int(sampling::launch<T, 64, 32, 32>(p, nullptr));
    case 3:
      return int(sampling::launch<T, 32, 32, 64>(p, nullptr));
  }
  return -1;
}

template <template <typename> class F, typename... A>
int by_dtype(int dtype, A&&... args) {
  switch (DType(dtype)) {
    case DType::kFloat32:
      return F<float>::run(args...);
    case DType::kFloat16:
      return F<__half>::run(args...);
    case DType::kBFloat16:
      return F<__nv_bfloat16>::run(args...);
  }
  return -1;
}

template <typename T>
struct Fwd {
  static int run(int config, const RowLogprobsFwdParams& p) { return fwd_config<T>(config, p); }
};
template <typename T>
struct Bwd {
  static int run(int config, const RowLogprobsBwdParams& p) { return bwd_config<T>(config, p); }
};

template <typename T>
struct Sample {
  static int run(int config, const SampleParams& p) { return sample_config<T>(config, p); }
};

}  // namespace

extern "C" {

int rk_emu_row_logprobs_fwd(int dtype, int config, const void* logits, int64_t t1, int64_t s0, int64_t s1,
                            int64_t n_rows, int64_t vocab, const int64_t* targets, int64_t ignore_index,
                            float inv_temperature, float* logp, float* row_max, float* log_norm, float* entropy) {
  const RowLogprobsFwdParams p{logits, RowLayout{t1, s0, s1}, n_rows, vocab, targets, ignore_index,
                               inv_temperature, logp, row_max, log_norm, entropy};
  return by_dtype<Fwd>(dtype, config, p);
}

int rk_emu_row_logprobs_bwd(int dtype, int config, const void* logits, int64_t t1, int64_t s0, int64_t s1,
                            int64_t n_rows, int64_t vocab, const int64_t* targets, int64_t ignore_index,
                            float inv_temperature, const float* row_max, const float* log_norm,
                            const float* entropy, const float* grad_logp, const float* grad_entropy, void* grad,
                            int64_t g_t1, int64_t g_s0, int64_t g_s1) {
  const RowLogprobsBwdParams p{logits,   RowLayout{t1, s0, s1}, n_rows,    vocab,        targets,
                               ignore_index, inv_temperature,   row_max,   log_norm,     entropy,
                               grad_logp, grad_entropy,         grad,      RowLayout{g_t1, g_s0, g_s1}};
  return by_dtype<Bwd>(dtype, config, p);
}

int rk_emu_sample(int dtype, int config, const void* logits, int64_t row_stride, int64_t batch, int64_t vocab,
                  const uint8_t* greedy, const float* temperature, const int32_t* top_k, const float* top_p,
                  const float* log_min_p, const int64_t* seeds, const int64_t* step, bool key_row, bool truncate,
                  bool raw, int64_t* tokens, float* logprobs) {
  const SampleParams p{logits, row_stride, batch,    vocab, greedy,   temperature, top_k, top_p,
                       log_min_p, seeds,   step,     key_row, truncate, raw,       tokens, logprobs};
  return by_dtype<Sample>(dtype, config, p);
}

// Copies the 16 path-coverage counters into out[0..16) and resets them.
void rk_emu_coverage(int64_t* out) {
  for (int i = 0; i < 16; ++i) out[i] = emu::coverage[i].exchange(0);
}

}  // extern "C"
