// The estimator's log P(retrieved | cos θ) table lookup, shared by the torch kernels (lsh_attention.cpp)
// and the onnxruntime op library (../ort/kvpass_ort.cc), so both weight a key identically.
// The table holds kTable + 1 values at cos θ = -1 + 2i / kTable (lowering/decode_step.LOGP_GRID).
#pragma once
#include <algorithm>

namespace kvpass_logp {

constexpr int kTable = 16384;

// Linear interpolation in the table; cos θ is clamped to [-1, 1] first (never NaN).
inline __attribute__((always_inline)) float lookup_logp(const float* tab, float c) {
  c = std::min(1.f, std::max(-1.f, c));
  const float x = (c + 1.f) * 0.5f * kTable;
  const int i = std::min(kTable - 1, int(x));
  const float f = x - float(i);
  return tab[i] + f * (tab[i + 1] - tab[i]);
}

}  // namespace kvpass_logp
