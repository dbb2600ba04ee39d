// The emulated kernels under ThreadSanitizer: tests/test_cuda_emu.py builds this program with -fsanitize=thread and
// runs it. A shared-memory access that no __syncthreads() / warp exchange orders against another thread's (a
// missing barrier, a reuse of shared memory too early) is a data race between the emulation's std::threads, which
// ThreadSanitizer reports (and the program then exits with status 66). It only sees the schedules it observes and
// the CPU's memory model: compute-sanitizer racecheck on a GPU remains the reference.
//
// Every kernel runs in its small emulation configurations and once in the production one, through each code path:
// the sampler without truncation, with every candidate in the shared list, with the threshold bins only, on the
// key-histogram fallback, with min-p alone, raw log-probs; the row pass forward and backward (in place) on rows off
// 16-byte boundaries, a block per row and a warp per row.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "emu_abi.cpp"

namespace {

int sampler_cases() {
  std::mt19937 gen(0);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  const int B = 3, V = 300;
  std::vector<float> logits(B * V);
  for (float& x : logits) x = normal(gen);
  for (int i = 0; i < 200; ++i) logits[V + i] = 9.0f;  // row 1: more duplicates than the small lists hold
  std::vector<uint8_t> greedy = {1, 0, 0};
  std::vector<float> temperature(B, 0.9f), top_p(B), log_min_p(B);
  std::vector<int32_t> top_k(B);
  std::vector<int64_t> seeds = {1, 2, 3}, tokens(B);
  std::vector<float> logprobs(B);
  struct Options {
    int k;
    float p, log_min_p;
    bool raw;
    float softcap;  // > 0: the soft-capping instantiation
  };
  const Options options[] = {{0, 1.0f, -INFINITY, false, 0.0f},  {5, 1.0f, -INFINITY, false, 0.0f},
                             {0, 0.9f, -INFINITY, true, 0.0f},   {10, 1.0f, -INFINITY, false, 0.0f},
                             {150, 0.5f, -INFINITY, false, 0.0f}, {0, 1.0f, -2.0f, false, 0.0f},
                             {0, 1.0f, -INFINITY, false, 3.0f},  {10, 0.9f, -INFINITY, false, 3.0f}};
  const int64_t step = 1;
  for (int config : {1, 2, 3, 0}) {
    for (const Options& o : options) {
      std::fill(top_k.begin(), top_k.end(), o.k);
      std::fill(top_p.begin(), top_p.end(), o.p);
      std::fill(log_min_p.begin(), log_min_p.end(), o.log_min_p);
      const bool truncate = o.k > 0 || o.p < 1.0f || o.log_min_p > -INFINITY;
      const int rc = rk_emu_sample(0, config, logits.data(), V, B, V, greedy.data(), temperature.data(), top_k.data(),
                                   top_p.data(), log_min_p.data(), seeds.data(), &step, true, truncate, o.raw,
                                   tokens.data(), logprobs.data(), o.softcap);
      if (rc != 0) return rc;
      if (config == 0) break;  // the production configuration (512 threads) once: it is slow under the sanitizer
    }
  }
  return 0;
}

int row_cases() {
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const int n = 8, stride = 37, V = 36;  // rows start at x + 1 + 37 r: off 16-byte boundaries
  std::vector<float> x(n * stride + 1);
  for (float& v : x) v = normal(gen);
  std::vector<int64_t> targets(n);
  for (int i = 0; i < n; ++i) targets[i] = i == 3 ? -100 : (i * 5) % V;
  std::vector<float> logp(n), row_max(n), log_norm(n), entropy(n), g_logp(n, 1.0f), g_entropy(n, 0.5f);
  for (float softcap : {0.0f, 2.0f}) {  // without and with the soft-capping instantiation
    for (int config : {1, 2, 0}) {
      int rc = rk_emu_row_logprobs_fwd(0, config, x.data() + 1, n, 0, stride, n, V, targets.data(), -100, 1.3f,
                                       logp.data(), row_max.data(), log_norm.data(), entropy.data(), softcap);
      if (rc != 0) return rc;
      rc = rk_emu_row_logprobs_bwd(0, config, x.data() + 1, n, 0, stride, n, V, targets.data(), -100, 1.3f,
                                   row_max.data(), log_norm.data(), entropy.data(), g_logp.data(), g_entropy.data(),
                                   x.data() + 1, n, 0, stride, softcap);
      if (rc != 0) return rc;
    }
  }
  return 0;
}

}  // namespace

int main() {
  const int rc = sampler_cases() || row_cases();
  std::printf("race_check: %s\n", rc == 0 ? "every case ran" : "a launch failed");
  return rc;
}
