// kvpass's formulas in C++, each written once: shared by the torch kernels (lsh_attention.cpp) and the
// onnxruntime op library (../ort/kvpass_ort.cc), so that both compute a step identically.  The plain-torch
// definitions of the same formulas are lowering/reference.py.  No torch or onnxruntime headers here.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

// The hot functions are compiled for x86-64-v4 (AVX-512), v3 (AVX2+FMA) and baseline, and the loader picks
// one at run time (GCC target_clones / ifunc): never assumed at build time.  An OpenMP region's outlined
// body does not inherit a clone's target, so parallel loops stay outside the cloned functions.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KVPASS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KVPASS_CLONES
#endif
#define KVPASS_INLINE inline __attribute__((always_inline))

namespace kvpass_math {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------- the window ring

// Static slot of the token at absolute position pos >= S: the W window slots after the S sinks form a ring.
KVPASS_INLINE int64_t ring_slot(int64_t pos, int64_t S, int64_t W) { return S + ((pos - S) % W + W) % W; }

// ---------------------------------------------------------------- SimHash

// One table's code from its K projections y[0..K): bit j = [y[j] > 0] (NaN and ±0 give 0).
KVPASS_INLINE int32_t sign_code(const float* y, int64_t K) {
  int32_t code = 0;
  for (int64_t j = 0; j < K; ++j) code |= int32_t(y[j] > 0.f) << j;
  return code;
}

// ---------------------------------------------------------------- log P(retrieved | cos θ)

// The table holds kTable + 1 values at cos θ = -1 + 2i / kTable (reference.LOGP_GRID).
constexpr int kTable = 16384;

// Linear interpolation in the table; cos θ is clamped to [-1, 1] first (never NaN).
KVPASS_INLINE float lookup_logp(const float* tab, float c) {
  c = std::min(1.f, std::max(-1.f, c));
  const float x = (c + 1.f) * 0.5f * kTable;
  const int i = std::min(kTable - 1, int(x));
  const float f = x - float(i);
  return tab[i] + f * (tab[i + 1] - tab[i]);
}

// ---------------------------------------------------------------- scores

// Logit soft-capping (Gemma 2): a scaled score s becomes c · tanh(s / c); c <= 0 leaves it as it is.
KVPASS_INLINE float soft_cap(float s, float c) { return c > 0.f ? c * std::tanh(s / c) : s; }

// The "sample" estimator's score of one retrieved key: s = q·k·scale (soft-capped by softcap > 0), weighted
// by 1 / P(retrieved) as s - log P, P from the angle between q and the centred key k - μ.  From the dot
// products q·k, k·μ, k·k and the query's q·μ, |q|, μ·μ: cos θ = (q·k - q·μ) / (|q| |k - μ|),
// |k - μ|² = k·k - 2 k·μ + μ·μ.
KVPASS_INLINE float sample_score(float qk, float kmu, float kk, float qmu, float qnorm, float mumu, float scale,
                                 const float* logp, float softcap = 0.f) {
  const float denom = qnorm * std::sqrt(std::max(0.f, kk - 2.f * kmu + mumu));
  return soft_cap(qk * scale, softcap) - lookup_logp(logp, denom > 0.f ? (qk - qmu) / denom : 0.f);
}

// ---------------------------------------------------------------- online softmax

// Σ e^{s_i} v_i and Σ e^{s_i} over keys added one at a time, kept relative to the running maximum.
// acc: D floats of scratch.  finish() writes out = acc / Σ and returns lse = log Σ e^{s_i} (-inf, out = 0
// when nothing was added).
struct OnlineSoftmax {
  float* acc;
  int64_t D;
  float mx = kNegInf;
  double den = 0.0;

  KVPASS_INLINE void start(float* scratch, int64_t d, float max_hint = kNegInf) {
    acc = scratch, D = d, mx = max_hint, den = 0.0;
    std::fill(acc, acc + D, 0.f);
  }
  // A new maximum rescales what is summed so far (rare after the first few keys; never when the caller
  // passed the true maximum as max_hint).
  KVPASS_INLINE void rescale(float s) {
    const float c = std::exp(mx - s);  // 0 while nothing is summed (mx = -inf)
    den *= c;
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) acc[i] *= c;
    mx = s;
  }
  template <typename T>
  KVPASS_INLINE void add(float s, const T* v) {
    if (s > mx) rescale(s);
    const float p = std::exp(s - mx);
    den += p;
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) acc[i] += p * static_cast<float>(v[i]);
  }
  KVPASS_INLINE float finish(float* out) const {
    if (den <= 0.0) {
      std::fill(out, out + D, 0.f);
      return kNegInf;
    }
    const float inv = float(1.0 / den);
    for (int64_t i = 0; i < D; ++i) out[i] = acc[i] * inv;
    return mx + float(std::log(den));
  }
};

}  // namespace kvpass_math
