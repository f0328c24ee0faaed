// kvpass selection: the m best of a row's code scores, exactly, from a sampled threshold.
//
// Part of the kernel's one translation unit: included by lsh_attention.cpp only, after its includes and
// common definitions (the SIMD clones and the forced inlining work within one unit).  Used by the rows
// (rows.h) and the sketch scan's units (sketch_scan.h).
#pragma once

namespace kvpass_cpu {
namespace {

// ---------------------------------------------------------------- selecting the sketch's best keys

// The positions of the m largest of x[0, n) in ascending order, equal values by position (the reference's
// stable sort).  Usually one pass: a threshold τ from a sample of ~1024 (whole cache lines of 16 scores,
// 64 runs spread over the row, sample_run: one miss per 16 samples; sample_threshold) keeps every
// position with x ≥ τ — a superset of the answer
// whenever at least m pass, and then the best m of those are chosen exactly.  When fewer pass (an
// unrepresentative sample), a histogram of the top 11 bits of order-preserving integer keys finds the
// bin holding the m-th largest and the same exact choice runs on that bin's and the higher bins'
// positions.  Either way the result is exact.
KVPASS_INLINE uint32_t float_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // larger float, larger key
}

struct TopScratch {
  std::vector<uint32_t> hist, sample;
  std::vector<uint64_t> rank;
  std::vector<int32_t> above, edge;
};

// Appends to `out` the positions j of x[0, n) with x[j] >= tau, in order (AVX-512: a compare mask per 16).
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) void positions_at_least_avx512(const float* x, int64_t n, float tau,
                                                                   std::vector<int32_t>& out) {
  const __m512 t = _mm512_set1_ps(tau);
  int64_t j0 = 0;
  for (; j0 + 16 <= n; j0 += 16)
    for (uint32_t bits = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + j0), t, _CMP_GE_OQ); bits; bits &= bits - 1)
      out.push_back(int32_t(j0 + __builtin_ctz(bits)));
  for (; j0 < n; ++j0)
    if (x[j0] >= tau) out.push_back(int32_t(j0));
}
#endif

void positions_at_least(const float* x, int64_t n, float tau, std::vector<int32_t>& out) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return positions_at_least_avx512(x, n, tau, out);
#endif
  for (int64_t j = 0; j < n; ++j)
    if (x[j] >= tau) out.push_back(int32_t(j));
}

// A position's rank key: its score's key, then the lower position first — larger is better, all distinct.
KVPASS_INLINE uint64_t rank_key(float v, int32_t j) {
  return (uint64_t(float_key(v)) << 32) | uint64_t(0xFFFFFFFFu - uint32_t(j));
}

// Of `maybe` (positions in order, their scores score_of(i)), keeps the best `need` in place, in order: the
// need-th best rank key is found by selection; one pass in position order then keeps exactly those at or
// above it (no sort).  Returns how many are kept (need, or all when there are fewer).
template <typename ScoreOf>
KVPASS_INLINE int64_t keep_best(int32_t* maybe, int64_t count, int64_t need, ScoreOf score_of, TopScratch& t) {
  if (need >= count) return count;
  t.rank.resize(count);
  for (int64_t i = 0; i < count; ++i) t.rank[i] = rank_key(score_of(i), maybe[i]);
  std::nth_element(t.rank.begin(), t.rank.begin() + (need - 1), t.rank.begin() + count, std::greater<uint64_t>());
  const uint64_t cut = t.rank[need - 1];
  int64_t kept = 0;
  for (int64_t i = 0; i < count; ++i) {
    const uint64_t k = rank_key(score_of(i), maybe[i]);
    maybe[kept] = maybe[i];
    kept += k >= cut;
  }
  return kept;
}

// The score that ~2 m + 32 of n would reach, were the sample (float keys, reordered) representative: twice
// what is needed, so that the keys reaching it are fewer than m only when the sample is far off (with 1.5 m,
// 2 of 32 rows fell short on random keys at 32k — a listed scan then scans its unit again).
float sample_threshold(std::vector<uint32_t>& sample, int64_t n, int64_t m) {
  const int64_t s = int64_t(sample.size());
  const int64_t want = std::min<int64_t>(s - 1, (2 * m + 32) * s / n);
  std::nth_element(sample.begin(), sample.begin() + want, sample.end(), std::greater<uint32_t>());
  // as a float: x >= τ is then a superset of the key comparison's set (the two differ only in taking -0
  // with +0), which is all the exact choice needs
  const uint32_t tau = sample[want];
  const uint32_t u = (tau & 0x80000000u) ? (tau & 0x7fffffffu) : ~tau;
  float tau_f;
  std::memcpy(&tau_f, &u, 4);
  return tau_f;
}

constexpr int64_t kSampleLines = 64, kLine = 16;  // the threshold's sample: 64 runs of 16 neighbours
constexpr int64_t kSampleMin = 16 * kSampleLines * kLine;  // below this many keys: no sample

// The first of the 16 positions of sample run c of n (c < kSampleLines): runs spread evenly, each starting
// on a multiple of 16 — a whole tile of the sketch, one or two cache lines of a score row.
KVPASS_INLINE int64_t sample_run(int64_t c, int64_t n) { return c * (n / kSampleLines / kLine) * kLine; }

KVPASS_CLONES void top_positions(const float* x, int64_t n, int64_t m, int32_t* out, TopScratch& t) {
  if (m >= n) {
    std::iota(out, out + n, 0);
    return;
  }
  // `sure` are in the answer, `maybe` hold the rest of it (both in position order): their best `need`
  auto choose = [&](std::vector<int32_t>& sure, std::vector<int32_t>& maybe, int64_t need) {
    const int32_t* at = maybe.data();
    maybe.resize(keep_best(maybe.data(), int64_t(maybe.size()), need, [&](int64_t i) { return x[at[i]]; }, t));
    std::merge(sure.begin(), sure.end(), maybe.begin(), maybe.end(), out);
  };
  t.above.clear();
  t.edge.clear();
  if (n >= kSampleMin) {
    t.sample.clear();
    for (int64_t c = 0; c < kSampleLines; ++c)
      for (int64_t l = 0; l < kLine; ++l) t.sample.push_back(float_key(x[sample_run(c, n) + l]));
    positions_at_least(x, n, sample_threshold(t.sample, n, m), t.edge);
    if (int64_t(t.edge.size()) >= m) {
      choose(t.above, t.edge, m);
      return;
    }
    t.edge.clear();
  }
  constexpr int kShift = 21;
  constexpr uint32_t kBins = 1u << (32 - kShift);
  t.hist.assign(kBins, 0);
  for (int64_t j = 0; j < n; ++j) t.hist[float_key(x[j]) >> kShift]++;
  uint32_t bin = kBins - 1;
  int64_t need = m;
  while (t.hist[bin] < need) need -= t.hist[bin--];  // from the top: the bin holding the m-th largest
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t b = float_key(x[j]) >> kShift;
    if (b > bin) t.above.push_back(int32_t(j));
    else if (b == bin) t.edge.push_back(int32_t(j));
  }
  choose(t.above, t.edge, need);
}

// The best m of a listed superset (positions in order with their scores: every position whose score
// reaches a threshold, at least m of them), into out in order — top_positions' answer, without a pass
// over all scores.
void top_listed(int32_t* pos, const float* score, int64_t count, int64_t m, int32_t* out, TopScratch& t) {
  const int64_t kept = keep_best(pos, count, m, [&](int64_t i) { return score[i]; }, t);
  std::copy(pos, pos + kept, out);
}

}  // namespace
}  // namespace kvpass_cpu
