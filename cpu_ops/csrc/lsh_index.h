// kvpass LSH index: bit-packed bucket ids, the retrieval probability, building and merging sealed segments.
//
// Part of the kernel's one translation unit: included by lsh_attention.cpp only, after its includes and
// common definitions (the SIMD clones and the forced inlining work within one unit).  The index's build side;
// hashing the queries is in rows.h.
#pragma once

namespace kvpass_cpu {
namespace {

// ---------------------------------------------------------------- bit-packed ids

KVPASS_INLINE uint32_t unpack_id(const uint8_t* bytes, int64_t i, int w) {
  const int64_t bit = i * w;
  uint32_t word;
  std::memcpy(&word, bytes + (bit >> 3), 4);  // rows carry 4 bytes of padding
  return (word >> (bit & 7)) & ((1u << w) - 1u);
}

KVPASS_INLINE void pack_id(uint8_t* bytes, int64_t slot, int w, uint32_t id) {  // bytes start zeroed
  const int64_t bit = slot * w;
  uint32_t word;
  std::memcpy(&word, bytes + (bit >> 3), 4);
  word |= id << (bit & 7);
  std::memcpy(bytes + (bit >> 3), &word, 4);
}

int id_width(int64_t n) {
  int w = 1;
  while ((int64_t(1) << w) < n) ++w;
  return w;
}

int64_t packed_bytes(int64_t n, int w) { return (n * w + 7) / 8 + 4; }

// ---------------------------------------------------------------- log P(retrieved | cos θ)

// P(collide in >= T of L tables), one table colliding with p = (1 - θ/π)^K, as log P over a grid
// of cos θ in [-1, 1].  Double precision; the small-p end sums the upper tail directly (the
// complement 1 - Σ_{t<T} would cancel).  Cached per (K, L, T).

double log_retrieval_probability(double cos_theta, int64_t K, int64_t L, int64_t T) {
  cos_theta = std::min(1.0, std::max(-1.0, cos_theta));
  const double p = std::pow(1.0 - std::acos(cos_theta) / M_PI, double(K));
  if (p <= 0.0) return -69.0;  // never collides: clamp (e^-69 ≈ 1e-30), never -inf or NaN
  if (p >= 1.0) return 0.0;
  auto log_term = [&](int64_t t) {  // log C(L,t) p^t (1-p)^(L-t)
    return std::lgamma(L + 1.0) - std::lgamma(t + 1.0) - std::lgamma(L - t + 1.0) + t * std::log(p) +
           (L - t) * std::log1p(-p);
  };
  double below = 0.0;  // P[fewer than T collisions]
  for (int64_t t = 0; t < T; ++t) below += std::exp(log_term(t));
  if (below < 0.5) return std::log1p(-below);
  double tail = 0.0;  // P small: sum the tail terms themselves
  for (int64_t t = T; t <= L; ++t) {
    const double x = std::exp(log_term(t));
    tail += x;
    if (x < tail * 1e-17) break;
  }
  return std::max(-69.0, std::log(tail));
}

const std::vector<float>& logp_table(int64_t K, int64_t L, int64_t T) {
  static std::mutex mu;
  static std::map<std::tuple<int64_t, int64_t, int64_t>, std::vector<float>> cache;
  std::lock_guard<std::mutex> g(mu);
  auto& tab = cache[{K, L, T}];
  if (tab.empty()) {
    tab.resize(kTable + 1);
    for (int i = 0; i <= kTable; ++i)
      tab[i] = float(log_retrieval_probability(-1.0 + 2.0 * i / kTable, K, L, T));
  }
  return tab;
}

// ---------------------------------------------------------------- building a segment

std::tuple<at::Tensor, at::Tensor> build_segment(const at::Tensor& codes_in, int64_t K) {
  TORCH_CHECK(codes_in.dim() == 4, "kvpass_cpu.lsh_build_segment: codes must be [B, Hkv, n, L], got ",
              codes_in.sizes());
  TORCH_CHECK(K >= 1 && K <= 16, "kvpass_cpu.lsh_build_segment: lsh_k must be in [1, 16], got ", K);
  const auto codes = codes_in.to(at::kInt).contiguous();
  const int64_t B = codes.size(0), Hkv = codes.size(1), n = codes.size(2), L = codes.size(3);
  TORCH_CHECK(n >= 1 && n <= kMaxSegment, "kvpass_cpu.lsh_build_segment: a segment holds 1..", kMaxSegment,
              " tokens, got ", n);
  const int w = id_width(n);
  const int64_t nb = packed_bytes(n, w), buckets = int64_t(1) << K;
  auto ids = at::zeros({B, Hkv, L, nb}, codes.options().dtype(at::kByte));
  auto starts = at::empty({B, Hkv, L, buckets}, codes.options().dtype(at::kShort));
  const int32_t* cp = codes.data_ptr<int32_t>();
  uint8_t* ip = ids.data_ptr<uint8_t>();
  uint16_t* sp = reinterpret_cast<uint16_t*>(starts.data_ptr<int16_t>());
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t bh = 0; bh < B * Hkv; ++bh) {
    for (int64_t l = 0; l < L; ++l) {
      std::vector<uint32_t> fill(buckets + 1, 0);
      const int32_t* c = cp + bh * n * L + l;
      for (int64_t j = 0; j < n; ++j) fill[(c[j * L] & (buckets - 1)) + 1]++;
      for (int64_t b = 0; b < buckets; ++b) fill[b + 1] += fill[b];
      uint16_t* st = sp + (bh * L + l) * buckets;
      for (int64_t b = 0; b < buckets; ++b) st[b] = uint16_t(fill[b]);
      uint8_t* out = ip + (bh * L + l) * nb;
      for (int64_t j = 0; j < n; ++j)  // stable: ids ascend within a bucket
        pack_id(out, fill[c[j * L] & (buckets - 1)]++, w, uint32_t(j));
    }
  }
  return {ids, starts};
}

// Two adjacent segments (A = tokens [base, base + n_a), B = the next n_b) as one: per bucket, A's ids
// then B's (shifted by n_a), re-packed at the wider id width.  Linear in the segments' size; no codes
// needed (they are not kept once sealed).
std::tuple<at::Tensor, at::Tensor> merge_segments(const at::Tensor& ids_a, const at::Tensor& starts_a, int64_t n_a,
                                                  const at::Tensor& ids_b, const at::Tensor& starts_b, int64_t n_b) {
  const char* fn = "kvpass_cpu.lsh_merge_segments: ";
  TORCH_CHECK(ids_a.dim() == 4 && ids_b.dim() == 4 && starts_a.sizes() == starts_b.sizes() &&
                  ids_a.size(0) == starts_a.size(0) && ids_a.size(1) == starts_a.size(1) &&
                  ids_a.size(2) == starts_a.size(2) && ids_b.sizes().slice(0, 3) == ids_a.sizes().slice(0, 3) &&
                  ids_a.is_contiguous() && ids_b.is_contiguous() && starts_a.is_contiguous() &&
                  starts_b.is_contiguous(), fn, "segments of different shapes");
  const int64_t n = n_a + n_b;
  TORCH_CHECK(n_a >= 1 && n_b >= 1 && n <= kMaxSegment, fn, "merged segment of ", n, " tokens exceeds ", kMaxSegment);
  const int wa = id_width(n_a), wb = id_width(n_b), w = id_width(n);
  TORCH_CHECK(ids_a.size(3) == packed_bytes(n_a, wa) && ids_b.size(3) == packed_bytes(n_b, wb), fn,
              "ids do not match the segment sizes");
  const int64_t BHL = starts_a.size(0) * starts_a.size(1) * starts_a.size(2), buckets = starts_a.size(3);
  const int64_t nb = packed_bytes(n, w);
  auto ids = at::zeros({starts_a.size(0), starts_a.size(1), starts_a.size(2), nb}, ids_a.options());
  auto starts = at::empty_like(starts_a);
  const uint8_t *pa = ids_a.data_ptr<uint8_t>(), *pb = ids_b.data_ptr<uint8_t>();
  const uint16_t* sa = reinterpret_cast<const uint16_t*>(starts_a.data_ptr<int16_t>());
  const uint16_t* sb = reinterpret_cast<const uint16_t*>(starts_b.data_ptr<int16_t>());
  uint16_t* so = reinterpret_cast<uint16_t*>(starts.data_ptr<int16_t>());
  uint8_t* po = ids.data_ptr<uint8_t>();
  const int64_t nba = ids_a.size(3), nbb = ids_b.size(3);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < BHL; ++r) {
    const uint16_t *ra = sa + r * buckets, *rb = sb + r * buckets;
    uint8_t* out = po + r * nb;
    int64_t slot = 0;
    auto put = [&](uint32_t id) { pack_id(out, slot++, w, id); };
    for (int64_t c = 0; c < buckets; ++c) {
      so[r * buckets + c] = uint16_t(slot);
      const int64_t a_hi = c + 1 < buckets ? ra[c + 1] : n_a, b_hi = c + 1 < buckets ? rb[c + 1] : n_b;
      for (int64_t i = ra[c]; i < a_hi; ++i) put(unpack_id(pa + r * nba, i, wa));
      for (int64_t i = rb[c]; i < b_hi; ++i) put(uint32_t(n_a) + unpack_id(pb + r * nbb, i, wb));
    }
  }
  return {ids, starts};
}

}  // namespace
}  // namespace kvpass_cpu
