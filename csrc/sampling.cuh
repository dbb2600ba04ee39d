// One decoding step: a greedy token for some rows, a seeded sample for the others, with temperature, top-k, top-p
// and min-p, and the chosen token's log-prob. The exact definitions (tie rules, kept set, random stream, invalid
// rows) are those of remax_kernels/ops/sampling.py's docstring, shared with the Triton kernel and the torch path:
//   z = x / T;  greedy: first argmax of x;  sampled: argmax over the kept set K of z_v + g_v (ties: lowest index),
//   g_v the Gumbel value of the Philox stream (common.cuh);  K = top-k, then top-p on the top-k survivors, then
//   min-p;  log-prob "processed" = z_tok - logsumexp(z[K]) (greedy rows: z_tok - logsumexp(z)), "raw" =
//   log_softmax(x)[tok];  a row with a NaN, a +inf, only -inf, or an overflowing x / T gets token 0, log-prob NaN.
//
// Grid: one block of BLOCK threads per row; block-wide reductions by warp shuffles + shared memory. No global
// atomics and no inter-block communication; results do not depend on scheduling (see "Determinism").
//
// Soft-capping (SampleParams::softcap > 0, Gemma-2/3): x is softcap * tanh(logit / softcap), computed by every pass as
// it loads the row (common.cuh SoftCap: +2 MUFU ops and ~4 FP32 ops per element per pass, no extra pass); everything
// below then reads x as the logits. A separate instantiation, so the kernel without it is unchanged.
//
// Passes over the row (each a read of V * E bytes; after the first, mostly from L2 for the rows in flight):
//  * pass 1, always: greedy argmax, max and sum-exp of z (and of x for raw log-probs at T != 1), and, when no row of
//    the batch truncates (SampleParams::truncate false), the Gumbel race itself: ONE pass for sampled rows.
//  * sampled rows of a truncating batch without top-k and top-p (min-p alone is a closed form, or no option in this
//    row): the final pass, the race with the kept-set predicate: 2 passes.
//  * truncated sampled rows (top-k and/or top-p active):
//    L1, a histogram of the finite z over NB equal-width value bins below the max (bin 0 holds the max; the range is
//    capped at kValueRange nats, lower values share the last bin) with counts and masses exp(z - m). The top-k bin
//    follows from the counts; the top-p bin from the masses, for the unknown top-k survivor mass Z_k bracketed by
//    the k bin's bounds. Then ONE gather pass copies into shared memory the elements of either every bin down to the
//    deepest threshold bin ("all": the whole candidate set, when it holds <= CAP elements) or only the threshold
//    bins ("boundary"); a bitonic sort of that list gives both thresholds exactly. In "all" mode the race runs over
//    the list and no further pass is made: 3 passes in total. In "boundary" mode a final pass runs the race over
//    the row: 4 passes. When a threshold bin holds more than CAP elements (heavy duplicates, or a top-k reaching past
//    kValueRange nats below the max), a fallback refines each threshold by histograms over the fp32 values'
//    order-preserving int32 keys (NB bins per pass, <= ceil(32 / log2(NB)) passes each), then the final pass.
//    No sort of the row, ever.
//  * per element of a sampled row: ~30 integer/FP32 instructions (a quarter Philox4x32-10, the race screen) and
//    3 MUFU ops (the exp of the sum, the screen's two nested exps; at T != 1 the IEEE division x / T adds a
//    reciprocal); the two accurate logs of g run only for the few elements that pass the screen (those that can
//    beat the thread's current winner). A greedy row costs ~8 instructions and 1 MUFU per element. On H100 (132 SMs
//    x 128 lanes x ~1.9 GHz; 16 MUFU ops per SM per clock) either limit gives ~1e12 sampled elements/s against
//    ~1.6e12 bf16 elements/s of bandwidth, so sampled bf16 rows are compute-bound at ~1.6x one read of the logits,
//    greedy rows and fp32 rows bandwidth-bound (to be measured: benchmarks/, family "sampling").
//
// Determinism: masses are summed as 64-bit fixed-point integers (exp(z - m) * 2^S, S = 62 - bitlength(V)), so
// histogram atomics add exactly in any order; the shared-memory list is sorted by (key, index) before anything is
// summed over it; every other reduction has a fixed order. Thresholds therefore agree with the float64 reference
// except at near-ties of masses ~1e-13 relative, where the Triton kernel (fp32 sums) may also differ.
#pragma once

#include "common.cuh"
#include "launch.h"

namespace remax {
namespace sampling {

// L1's value range below the max: exp(-64) ~ 1.6e-28 of the max's mass, nothing for top-p; a top-k threshold deeper
// than this takes the fallback.
constexpr float kValueRange = 64.0f;
// Screen margin on u: above the error of the screen's two fast exps (see race_step).
constexpr float kScreenMargin = 1.0f / 4096.0f;

using u64 = unsigned long long;

enum Mode : int { kAll = 0, kBoundary = 1, kFallback = 2 };

// Per-thread (then per-block) state of pass 1. A NaN in x shows as s = NaN (exp(NaN) enters the sum).
struct Pass1 {
  ArgMax greedy;  // max of x and its first index
  float m, s;       // max of z and sum exp(z - m)
  float mr, sr;     // the same for x (raw log-probs at T != 1)
  float zmin;       // smallest finite z
  int nfin;         // number of finite z
  ArgMax race;    // Gumbel race winner (score, index)
};

RK_DEVICE void lse_merge(float& m, float& s, float om, float os) {
  const float m_new = fmaxf(m, om);
  const float ref = m_new == neg_inf() ? 0.0f : m_new;  // all -inf so far: s stays 0 instead of exp(nan)
  s = s * __expf(m - ref) + os * __expf(om - ref);
  m = m_new;
}

RK_DEVICE void merge(Pass1& a, const Pass1& b) {
  a.greedy.merge(b.greedy.value, b.greedy.index);
  lse_merge(a.m, a.s, b.m, b.s);
  lse_merge(a.mr, a.sr, b.mr, b.sr);
  a.zmin = fminf(a.zmin, b.zmin);
  a.nfin += b.nfin;
  a.race.merge(b.race.value, b.race.index);
}

RK_DEVICE Pass1 shfl_xor(const Pass1& a, int o) {
  Pass1 b;
  b.greedy.value = __shfl_xor_sync(kFullMask, a.greedy.value, o);
  b.greedy.index = __shfl_xor_sync(kFullMask, a.greedy.index, o);
  b.m = __shfl_xor_sync(kFullMask, a.m, o);
  b.s = __shfl_xor_sync(kFullMask, a.s, o);
  b.mr = __shfl_xor_sync(kFullMask, a.mr, o);
  b.sr = __shfl_xor_sync(kFullMask, a.sr, o);
  b.zmin = __shfl_xor_sync(kFullMask, a.zmin, o);
  b.nfin = __shfl_xor_sync(kFullMask, a.nfin, o);
  b.race.value = __shfl_xor_sync(kFullMask, a.race.value, o);
  b.race.index = __shfl_xor_sync(kFullMask, a.race.index, o);
  return b;
}

// The race over the kept set, one element at a time in increasing index order per thread (strict '>' keeps the
// earlier index on equal scores). The screen skips the Philox call and the two logs of g for elements that cannot
// beat the thread's current winner `best`:
//  * z + kGumbelBound <= best: no u can make z + g exceed best (fp32 rounding of z + g is monotone in g);
//  * else the element wins iff g(u) > best - z, i.e. u > exp(-exp(z - best)). That bound is evaluated with fast exps
//    and lowered by a margin (kScreenMargin in u, covering their ~3e-5 error, and ~2 ulps of best in the exponent,
//    covering the rounding of z + g), so every element whose exact fp32 score z + g beats best is scored exactly.
// The screen only decides which elements get the exact score; the result equals the unscreened race.
struct Race {
  ArgMax best;
  GumbelStream rng;
  RK_DEVICE void step(float z, int32_t v) {
    if (!(z + kGumbelBound > best.value)) return;
    const float u = rng.uniform(v);
    if (best.value > neg_inf()) {
      const float margin = fabsf(best.value) * (1.0f / 4194304.0f);
      const float u_min = __expf(-__expf(z - best.value + margin)) - kScreenMargin;
      if (u < u_min) return;
    }
    const float score = z + gumbel_from_uniform(u);
    if (score > best.value) {
      best.value = score;
      best.index = v;
    }
  }
};

// Fixed-point mass of z relative to the row max m: exp(z - m) in [0, 1] times 2^S, truncated (exact in any order).
RK_DEVICE u64 fixed_mass(float z, float m, float scale) { return u64(__expf(z - m) * scale); }

// Packed list entry: sorting these u64 in DESCENDING order sorts by key descending, then by index ascending.
RK_DEVICE u64 pack(int32_t key, int64_t v) {
  return (u64(uint32_t(key) ^ 0x80000000u) << 32) | u64(0xFFFFFFFFu - uint32_t(v));
}
RK_DEVICE int32_t entry_key(u64 e) { return int32_t(uint32_t(e >> 32) ^ 0x80000000u); }
RK_DEVICE int64_t entry_index(u64 e) { return int64_t(0xFFFFFFFFu - uint32_t(e & 0xFFFFFFFFu)); }

// ceil(p * Z) clamped to [1, Z]: the smallest integer mass F with F >= p * Z (the top-p condition on integers).
RK_DEVICE u64 mass_target(float p, u64 total) {
  const double t = ceil(double(p) * double(total));
  const u64 target = t >= double(total) ? total : u64(t);
  return target < 1 ? 1 : target;
}

template <int BLOCK, int NB, int CAP>
struct Smem {
  static constexpr int WARPS = BLOCK / 32;
  unsigned int count[NB];
  u64 mass[NB];
  u64 list[CAP];
  Pass1 warp_state[WARPS];
  unsigned int list_n;
  // The plan, written by warp 0 and read by every thread after a barrier.
  int mode, jk, jp_lo, jp_hi, deepest;
  int32_t tau;         // keep z with ordered_key(z) >= tau
  int done;            // fallback loop: the current threshold is resolved
  int32_t lo, hi;      // fallback interval (keys)
  int shift;           // fallback bin width = 2^shift keys
  u64 above_count, above_mass, z_k;
};

// Warp-level crossing search over NB bins ordered from the top: the first bin j with
// sum(arr[0..j]) >= target, and the sum before it. Every lane of the calling warp gets the result.
template <int NB, typename U>
RK_DEVICE void warp_crossing(const U* arr, U target, int& bin, U& before) {
  static_assert(NB % 32 == 0, "NB must be a multiple of 32");
  constexpr int PER = NB / 32;
  const int lane = int(threadIdx.x) & 31;
  U local = 0;
  for (int i = 0; i < PER; ++i) local += arr[lane * PER + i];
  U incl = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const U y = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += y;
  }
  const unsigned hit = __ballot_sync(kFullMask, incl >= target);
  const int owner = hit ? __ffs(int(hit)) - 1 : 31;
  int b = NB - 1;
  U c = __shfl_sync(kFullMask, incl - local, owner);
  if (lane == owner) {
    for (int i = 0; i < PER; ++i) {
      const U a = arr[owner * PER + i];
      if (c + a >= target) {
        b = owner * PER + i;
        break;
      }
      c += a;
    }
  }
  bin = __shfl_sync(kFullMask, b, owner);
  before = __shfl_sync(kFullMask, c, owner);
}

// Sum of arr[j0..j1) by one warp (every lane gets it).
template <typename U>
RK_DEVICE U warp_range_sum(const U* arr, int j0, int j1) {
  U acc = 0;
  for (int j = j0 + (int(threadIdx.x) & 31); j < j1; j += 32) acc += arr[j];
  return warp_sum(acc);
}

// The row as the kernel reads it: x = cap(logit) (the soft-cap when SC, applied by every pass as it loads the row;
// the identity otherwise), z = x / T, with no division at T == 1.
template <typename T, bool SC>
struct RowIn {
  const T* x;
  int64_t V;
  float t;
  bool unit_t;
  SoftCap<SC> cap;
  RK_DEVICE float z(float xv) const { return unit_t ? xv : xv / t; }
  RK_DEVICE float load(int64_t v) const { return cap(to_float(x[v])); }
};

// Pass 1: greedy argmax, online max / sum-exp of z (and of x when raw_sums), the finite range (truncate), and the
// race itself for sampled rows without truncation. Returns the block-wide state in every thread.
template <typename T, bool SC, int BLOCK, int NB, int CAP>
RK_DEVICE Pass1 pass1(Smem<BLOCK, NB, CAP>& sh, const RowIn<T, SC>& r, bool raw_sums, bool truncate, bool race_now,
                      Race& race) {
  constexpr int N = Vec16<T>::N;
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  Pass1 st{ArgMax{neg_inf(), 0}, neg_inf(), 0.0f, neg_inf(), 0.0f, pos_inf(), 0, ArgMax{neg_inf(), 0}};
  for_each_chunk<T, 2>(r.x, r.V, tid, BLOCK, [&](const float* xs, int n, int64_t first) {
    float zs[N];
    float xmax = neg_inf(), zmax = neg_inf();
    for (int i = 0; i < n; ++i) {
      if (xs[i] > st.greedy.value) {  // strict: this thread walks upward, so the earlier index keeps ties
        st.greedy.value = xs[i];
        st.greedy.index = int32_t(first + i);
      }
      zs[i] = r.z(xs[i]);
      xmax = fmaxf(xmax, xs[i]);
      zmax = fmaxf(zmax, zs[i]);
    }
    const float m_new = fmaxf(st.m, zmax);
    const float ref = m_new == neg_inf() ? 0.0f : m_new;  // all -inf so far: s stays 0 instead of exp(nan)
    float ssum = 0.0f;
    for (int i = 0; i < n; ++i) ssum += __expf(zs[i] - ref);
    st.s = st.s * __expf(st.m - ref) + ssum;
    st.m = m_new;
    if (raw_sums) {
      const float mr_new = fmaxf(st.mr, xmax);
      const float rref = mr_new == neg_inf() ? 0.0f : mr_new;
      float rsum = 0.0f;
      for (int i = 0; i < n; ++i) rsum += __expf(xs[i] - rref);
      st.sr = st.sr * __expf(st.mr - rref) + rsum;
      st.mr = mr_new;
    }
    if (truncate) {
      for (int i = 0; i < n; ++i) {
        if (zs[i] > neg_inf()) {
          st.zmin = fminf(st.zmin, zs[i]);
          ++st.nfin;
        }
      }
    }
    if (race_now) {
      for (int i = 0; i < n; ++i) race.step(zs[i], int32_t(first + i));
    }
  }, r.cap);
  st.race = race.best;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) merge(st, shfl_xor(st, o));  // symmetric merges: all lanes agree
  if (lane == 0) sh.warp_state[warp] = st;
  __syncthreads();
  st = sh.warp_state[0];
  for (int w = 1; w < BLOCK / 32; ++w) merge(st, sh.warp_state[w]);  // same order in every thread
  __syncthreads();  // sh.warp_state is free again
  return st;
}

// Histogram of the finite z of the row over NB bins: bin_of(z, key) returns the bin or -1 (not counted).
template <typename T, bool SC, int BLOCK, int NB, int CAP, typename BinOf>
RK_DEVICE void histogram(Smem<BLOCK, NB, CAP>& sh, const RowIn<T, SC>& r, float m, float scale, BinOf&& bin_of) {
  const int tid = int(threadIdx.x);
  for (int j = tid; j < NB; j += BLOCK) {
    sh.count[j] = 0;
    sh.mass[j] = 0;
  }
  __syncthreads();
  for_each_chunk<T, 1>(r.x, r.V, tid, BLOCK, [&](const float* xs, int n, int64_t) {
    for (int i = 0; i < n; ++i) {
      const float z = r.z(xs[i]);
      const int b = z > neg_inf() ? bin_of(z) : -1;
      if (b >= 0) {
        atomicAdd(&sh.count[b], 1u);
        atomicAdd(&sh.mass[b], fixed_mass(z, m, scale));
      }
    }
  }, r.cap);
  __syncthreads();
}

// Fallback threshold search over the order-preserving keys: the largest key tau with F(tau) >= target, where F(t)
// is the count (by_mass false) or fixed-point mass of the finite z with key >= max(t, floor_key). Each pass
// histograms the candidate interval [lo, hi] into NB bins of 2^shift keys (bin 0 = highest keys) and keeps the bin
// where F crosses the target; it stops when that bin holds one element or one key. Writes sh.tau and sh.z_k = F(tau).
// Not inlined: it is the rare path, and keeping it out of the kernel body keeps the hot passes' registers free.
template <typename T, bool SC, int BLOCK, int NB, int CAP>
__device__ __noinline__ void fallback_search(Smem<BLOCK, NB, CAP>& sh, const RowIn<T, SC> r, float m, float scale,
                                             int32_t lo0, int32_t floor_key, bool by_mass, u64 target) {
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  int log_nb = 0;
  while ((1 << log_nb) < NB) ++log_nb;
  __syncthreads();  // every thread has read the previous search's results
  if (tid == 0) {
    sh.lo = lo0;
    sh.hi = ordered_key(m);
    sh.above_count = 0;
    sh.above_mass = 0;
    sh.done = 0;
  }
  __syncthreads();
  while (!sh.done) {
    const int32_t lo = sh.lo, hi = sh.hi;
    const uint32_t span = uint32_t(hi) - uint32_t(lo);
    const int nbits = span == 0 ? 0 : 32 - __clz(int(span));
    const int shift = nbits > log_nb ? nbits - log_nb : 0;
    histogram<T>(sh, r, m, scale, [&](float z) {
      const int32_t key = ordered_key(z);
      if (key < floor_key || key < lo || key > hi) return -1;
      return int((uint32_t(hi) - uint32_t(key)) >> shift);
    });
    if (warp == 0) {
      int j;
      unsigned int c_before;
      u64 m_before;
      if (by_mass) {
        warp_crossing<NB>(sh.mass, target - sh.above_mass, j, m_before);
        c_before = warp_range_sum(sh.count, 0, j);
      } else {
        warp_crossing<NB>(sh.count, unsigned(target - sh.above_count), j, c_before);
        m_before = warp_range_sum(sh.mass, 0, j);
      }
      if (lane == 0) {
        const int64_t new_hi = int64_t(hi) - (int64_t(j) << shift);
        const int64_t new_lo_raw = int64_t(hi) - ((int64_t(j) + 1) << shift) + 1;
        const int32_t new_lo = new_lo_raw > lo ? int32_t(new_lo_raw) : lo;
        sh.above_count += c_before;
        sh.above_mass += m_before;
        sh.lo = new_lo;
        sh.hi = int32_t(new_hi);
        if (sh.count[j] <= 1u || new_lo == int32_t(new_hi)) {
          sh.done = 1;
          sh.tau = new_lo;  // no other element has a key in [new_lo, the crossing element's key)
          sh.z_k = sh.above_mass + sh.mass[j];
        }
      }
    }
    __syncthreads();
  }
}

// The kept set's key threshold for a sampled valid row with top-k and/or top-p active (see the header comment).
// Returns tau; *all_in_list tells whether sh.list holds every candidate (sorted), so the race can run on it.
template <typename T, bool SC, int BLOCK, int NB, int CAP>
RK_DEVICE int32_t thresholds(Smem<BLOCK, NB, CAP>& sh, const RowIn<T, SC>& r, const Pass1& st, int32_t top_k, float top_p,
                             bool k_on, bool p_on, float scale, bool* all_in_list) {
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const float m = st.m;
  // L1: equal-width value bins over [m - range, m]; bin 0 holds the max, values below the range the last bin.
  const float range = fminf(m - st.zmin, kValueRange);
  const float inv_w = range > 0.0f ? float(NB) / range : 0.0f;
  auto value_bin = [m, inv_w](float z) {
    const float f = (m - z) * inv_w;
    return f < float(NB - 1) ? int(f) : NB - 1;
  };
  if (tid == 0) sh.list_n = 0;
  histogram<T>(sh, r, m, scale, value_bin);
  if (warp == 0) {
    const u64 z_all = warp_range_sum(sh.mass, 0, NB);
    int jk = 0, jp_lo = 0, jp_hi = 0;
    unsigned int ck_before = 0;
    u64 mk_before = 0;
    if (k_on) {
      warp_crossing<NB>(sh.count, unsigned(top_k), jk, ck_before);
      mk_before = warp_range_sum(sh.mass, 0, jk);
    }
    if (p_on) {
      // Before the k threshold is exact, the top-k survivors' mass is only known to lie in [z_lo, z_hi]; the
      // top-p bin is searched for both ends (the crossing is monotone in the target).
      const u64 z_lo = k_on ? mk_before : z_all;
      const u64 z_hi = k_on ? mk_before + sh.mass[jk] : z_all;
      u64 unused;
      warp_crossing<NB>(sh.mass, mass_target(top_p, z_lo), jp_lo, unused);
      warp_crossing<NB>(sh.mass, mass_target(top_p, z_hi), jp_hi, unused);
    }
    const int deepest = k_on ? jk : jp_hi;
    const unsigned int n_all = warp_range_sum(sh.count, 0, deepest + 1);
    unsigned int n_boundary = k_on ? sh.count[jk] : 0u;
    if (p_on) {
      n_boundary += warp_range_sum(sh.count, jp_lo, jp_hi + 1);
      if (k_on && jk >= jp_lo && jk <= jp_hi) n_boundary -= sh.count[jk];
    }
    if (lane == 0) {
      sh.mode = n_all <= unsigned(CAP) ? kAll : (n_boundary <= unsigned(CAP) ? kBoundary : kFallback);
      sh.jk = jk;
      sh.jp_lo = jp_lo;
      sh.jp_hi = jp_hi;
      sh.deepest = deepest;
      sh.above_count = ck_before;
      sh.above_mass = mk_before;
      sh.z_k = z_all;
    }
  }
  __syncthreads();
  const int mode = sh.mode;
  *all_in_list = mode == kAll;
  if (tid == 0) RK_COVER(mode == kAll ? kCoverThresholdAll : (mode == kBoundary ? kCoverThresholdBoundary
                                                                                 : kCoverThresholdFallback));

  if (mode == kFallback) {
    const u64 z_all = sh.z_k;
    int32_t tau = ordered_key(neg_inf());
    u64 z_total = z_all;
    if (k_on) {
      fallback_search<T>(sh, r, m, scale, ordered_key(st.zmin), tau, false, u64(top_k));
      tau = sh.tau;
      z_total = sh.z_k;
    }
    if (p_on) {
      fallback_search<T>(sh, r, m, scale, k_on ? tau : ordered_key(st.zmin), tau, true,
                         mass_target(top_p, z_total));
      tau = sh.tau;
    }
    return tau;
  }

  // Gather pass: the elements of the chosen bins into the shared list, then a bitonic sort (descending).
  const int jk = sh.jk, jp_lo = sh.jp_lo, jp_hi = sh.jp_hi, deepest = sh.deepest;
  auto gathered = [=](int b) {
    if (mode == kAll) return b <= deepest;
    return (k_on && b == jk) || (p_on && b >= jp_lo && b <= jp_hi);
  };
  for_each_chunk<T, 1>(r.x, r.V, tid, BLOCK, [&](const float* xs, int n, int64_t first) {
    for (int i = 0; i < n; ++i) {
      const float z = r.z(xs[i]);
      if (z > neg_inf() && gathered(value_bin(z))) sh.list[atomicAdd(&sh.list_n, 1u)] = pack(ordered_key(z), first + i);
    }
  }, r.cap);
  __syncthreads();
  const int n = int(sh.list_n);
  int padded = 1;
  while (padded < n) padded <<= 1;
  for (int i = n + tid; i < padded; i += BLOCK) sh.list[i] = 0;  // sorts last
  __syncthreads();
  // Entries are distinct (key, index) pairs, so the sorted order does not depend on the gather's order.
  for (int size = 2; size <= padded; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = tid; i < padded; i += BLOCK) {
        const int j = i ^ stride;
        if (j > i) {
          const u64 a = sh.list[i], b = sh.list[j];
          if (((i & size) == 0) ? (a < b) : (a > b)) {
            sh.list[i] = b;
            sh.list[j] = a;
          }
        }
      }
      __syncthreads();
    }
  }

  if (warp == 0) {
    // List index where bin j's elements start: the gathered elements of the bins above it.
    auto start_of = [&](int j) {
      unsigned int acc = 0;
      for (int b = lane; b < j; b += 32) acc += gathered(b) ? sh.count[b] : 0u;
      return int(warp_sum(acc));
    };
    auto mass_at = [&](int i) { return fixed_mass(key_to_float(entry_key(sh.list[i])), m, scale); };
    int32_t tau = ordered_key(neg_inf());
    int end = n;  // list entries [0, end) are top-k survivors
    u64 z_total = sh.z_k;
    if (k_on) {
      const int start_k = start_of(jk);
      const int at = start_k + (top_k - int(sh.above_count)) - 1;  // the k-th largest value of the row
      tau = entry_key(sh.list[at]);
      for (int c0 = at + 1; c0 < n; c0 += 32) {  // its ties follow it: survivors end at the first smaller key
        const int i = c0 + lane;
        const unsigned hit = __ballot_sync(kFullMask, i < n && entry_key(sh.list[i]) < tau);
        if (hit) {
          end = c0 + __ffs(int(hit)) - 1;
          break;
        }
      }
      u64 acc = 0;
      for (int i = start_k + lane; i < end; i += 32) acc += mass_at(i);
      z_total = sh.above_mass + warp_sum(acc);
    }
    if (p_on) {
      // First list entry (largest key) where the survivors' mass from the top reaches ceil(p * Z): its key is the
      // largest t with F(t) >= p * Z, and the ties of that key are kept by `key >= tau`.
      const u64 target = mass_target(top_p, z_total);
      u64 run = warp_range_sum(sh.mass, 0, jp_lo);  // the bins above jp_lo: all survivors
      for (int c0 = start_of(jp_lo); c0 < end; c0 += 32) {
        const int i = c0 + lane;
        u64 incl = i < end ? mass_at(i) : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const u64 y = __shfl_up_sync(kFullMask, incl, o);
          if (lane >= o) incl += y;
        }
        const unsigned hit = __ballot_sync(kFullMask, i < end && run + incl >= target);
        if (hit) {
          tau = entry_key(sh.list[c0 + __ffs(int(hit)) - 1]);
          break;
        }
        run += __shfl_sync(kFullMask, incl, 31);
      }
    }
    if (lane == 0) sh.tau = tau;
  }
  __syncthreads();
  return sh.tau;
}

template <typename T, int BLOCK, int NB, int CAP, bool SOFTCAP>
// Min 1 block per SM, said explicitly: without it ptxas may aim for 2 blocks of 512 threads (64 registers) on
// sm_80 and spill (seen with nvcc 13.0); one block of 512 threads per SM is what the design assumes (see `run`).
__global__ void __launch_bounds__(BLOCK, 1) sample_kernel(const SampleParams p) {
  static_assert(CAP >= 2 && (CAP & (CAP - 1)) == 0, "CAP must be a power of two");
  static_assert((NB & (NB - 1)) == 0 && NB >= 32, "NB must be a power of two >= 32");
  __shared__ Smem<BLOCK, NB, CAP> sh;
  constexpr int WARPS = BLOCK / 32;
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int64_t row = blockIdx.x;
  const uint32_t step = uint32_t(*p.step);  // a device value: a captured CUDA graph replays each step
  const bool greedy = p.greedy[row] != 0;
  const float temp = p.temperature[row];
  const float t = temp > 0.0f ? temp : 1.0f;
  const RowIn<T, SOFTCAP> r{static_cast<const T*>(p.logits) + row * p.row_stride, p.vocab, t, t == 1.0f,
                            SoftCap<SOFTCAP>{p.softcap, SOFTCAP ? 1.0f / p.softcap : 0.0f}};
  const bool raw_sums = p.raw && !r.unit_t;  // at T == 1 the raw sums are the processed ones

  Race race;
  race.best = ArgMax{neg_inf(), 0};
  race.rng.init(p.seeds[row], p.key_row ? uint32_t(row) : 0u, step);
  if (tid == 0 && !greedy && !p.truncate) RK_COVER(kCoverRaceInPass1);
  Pass1 st = pass1<T>(sh, r, raw_sums, p.truncate, !greedy && !p.truncate, race);
  const float m = st.m;
  const bool invalid = st.s != st.s || st.greedy.value == neg_inf() || st.greedy.value == pos_inf() || m == pos_inf();
  if (!raw_sums) {
    st.mr = m;
    st.sr = st.s;
  }
  int32_t token = greedy ? st.greedy.index : st.race.index;
  float log_norm = logf(st.s);

  if (p.truncate && !greedy && !invalid) {
    const int32_t top_k = p.top_k[row];
    const float top_p = p.top_p[row];
    const float log_min_p = p.log_min_p[row];
    const bool k_on = top_k > 0 && top_k < st.nfin;
    const bool p_on = top_p < 1.0f;
    int bitlen = 0;
    while ((int64_t(1) << bitlen) <= r.V) ++bitlen;
    const float scale = float(u64(1) << (62 - bitlen));  // V * 2^S < 2^62: fixed-point sums never overflow
    int32_t tau = ordered_key(neg_inf());  // no top-k / top-p (min-p alone): every finite value
    bool all_in_list = false;
    if (k_on || p_on) tau = thresholds<T>(sh, r, st, top_k, top_p, k_on, p_on, scale, &all_in_list);

    // The race over K = {finite z : key(z) >= tau, z - m >= log(min_p)} and K's mass.
    float s_kept = 0.0f;
    if (all_in_list) {  // every candidate is in the sorted list, K is a prefix of it: no further pass
      const int n = int(sh.list_n);
      for (int i = tid; i < n; i += BLOCK) {
        const u64 e = sh.list[i];
        const float z = key_to_float(entry_key(e));
        if (entry_key(e) >= tau && z - m >= log_min_p) {
          s_kept += __expf(z - m);
          const int32_t v = int32_t(entry_index(e));
          race.best.merge(z + gumbel_from_uniform(race.rng.uniform(v)), v);
        }
      }
    } else {
      if (tid == 0) RK_COVER(kCoverFinalPass);
      for_each_chunk<T, 1>(r.x, r.V, tid, BLOCK, [&](const float* xs, int n, int64_t first) {
        for (int i = 0; i < n; ++i) {
          const float z = r.z(xs[i]);
          if (z > neg_inf() && ordered_key(z) >= tau && z - m >= log_min_p) {
            s_kept += __expf(z - m);
            race.step(z, int32_t(first + i));
          }
        }
      }, r.cap);
    }
    s_kept = warp_sum(s_kept);
    ArgMax w = warp_argmax(race.best);
    if (lane == 0) {
      sh.warp_state[warp].race = w;
      sh.warp_state[warp].s = s_kept;
    }
    __syncthreads();
    w = sh.warp_state[0].race;
    s_kept = sh.warp_state[0].s;
    for (int i = 1; i < WARPS; ++i) {
      w.merge(sh.warp_state[i].race.value, sh.warp_state[i].race.index);
      s_kept += sh.warp_state[i].s;
    }
    token = w.index;
    log_norm = logf(s_kept > 0.0f ? s_kept : 1.0f);
  }

  if (tid != 0) return;
  float logp;
  if (invalid) {
    token = 0;
    logp = quiet_nan();
  } else {
    const float x_tok = greedy ? st.greedy.value : r.load(token);
    if (p.raw) {
      logp = (x_tok - st.mr) - logf(st.sr);
    } else {
      const float z_tok = greedy ? st.greedy.value / t : r.z(x_tok);
      logp = (z_tok - m) - log_norm;
    }
  }
  p.tokens[row] = token;
  p.logprobs[row] = logp;
}

// The soft-capping variant is its own instantiation, chosen from p.softcap on the host.
template <typename T, int BLOCK, int NB, int CAP>
cudaError_t launch(const SampleParams& p, cudaStream_t stream) {
  if (p.softcap > 0.0f) return launch_kernel(sample_kernel<T, BLOCK, NB, CAP, true>, p.batch, BLOCK, p, stream);
  return launch_kernel(sample_kernel<T, BLOCK, NB, CAP, false>, p.batch, BLOCK, p, stream);
}

// 512 threads per row, NB = 1024 value bins, CAP = 4096 list entries (12 KiB + 32 KiB of shared memory). At small
// batch a row's time is one SM reading it; 512 threads keep 16 KiB of loads in flight there.
template <typename T>
cudaError_t run(const SampleParams& p, cudaStream_t stream) {
  return launch<T, 512, 1024, 4096>(p, stream);
}

}  // namespace sampling
}  // namespace remax
