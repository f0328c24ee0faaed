// kvpass LSH kernels: bucket tables of the SimHash index, and one fused retrieve → gather → score →
// online softmax → V pass per query row, for the "sample", "topk" and "oracle" estimators.
//
// Index layout (one per (batch row, kv head)); the Python side (runtime/lsh.py) owns the tensors:
//   sealed segment s = tokens [base, base + n) of the host store, for each of the L tables a CSR
//     bucket table: starts[l][c] = first slot of bucket c (uint16, the end is starts[l][c+1] or n) and
//     ids[l] = the segment-local token ids ordered by bucket, bit-packed at w = bit_length(n - 1) bits
//     (n <= 32768, so w <= 15: the ids take w/8 <= 1.875 bytes per token per table, half of an int32).
//   tail = the newest tokens not yet sealed: codes[l][j] (uint16), scanned (bounded by the seal size).
// Retrieval visits the query's bucket in every table of every segment and counts collisions per key;
// keys reaching `threshold` collisions are the candidates.  Nothing scans all keys' codes.
//
// The "sketch" retriever (topk only) instead scans a sketch of every centred key, code = round((k - mu) /
// scale) per dimension, int8 or int4 (lowering/reference.py: sketch_codes), scoring all of them
// approximately, in integers: round(q * scale, 127 levels) . code (sketch_project, computed by the caller;
// sketch_query, sketch_scores; AVX512-VNNI where the CPU has it) — once per (batch row, kv head) for all
// the group's query rows (run_rows: one thread per kv head, or key chunks over all threads) — and attends
// the `budget` best with their exact scores (the sketch ranks like q.k: at int8 precision its best keys are
// the exact best, at int4 98% of them, measured on Qwen2.5-Coder-0.5B keys; re-ranking 2-4x as many by
// exact score changed nothing).
//
// The formulas shared with the onnxruntime op library (score and weight, log P lookup, sign bits, online
// softmax, SIMD clones) are kvpass_math.h.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <omp.h>

#include "kvpass_math.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>
#include <cstring>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <vector>

// lambdas in the per-row code must inline too: an outlined lambda is compiled for the baseline ISA,
// not for the SIMD clone that calls it
#define KVPASS_LAMBDA_INLINE __attribute__((always_inline))

namespace kvpass_cpu {
namespace {

using kvpass_math::kNegInf;
using kvpass_math::kTable;
using kvpass_math::lookup_logp;
using kvpass_math::OnlineSoftmax;
using kvpass_math::sign_code;
constexpr int64_t kMaxSegment = 32768;

// the host part's estimators this kernel computes ("exact" is "oracle" with every key kept)
enum Estimator : int64_t { kSample = 1, kTopK = 2, kOracle = 3 };

Estimator parse_estimator(const std::string& name) {
  if (name == "sample") return kSample;
  if (name == "topk") return kTopK;
  TORCH_CHECK(name == "oracle", "kvpass_cpu.lsh_attention: estimator must be 'sample', 'topk' or 'oracle', got '",
              name, "'");
  return kOracle;
}

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

// ---------------------------------------------------------------- the fused attention pass

struct Segment {
  const uint8_t* ids;      // [B, Hkv, L, nb]
  const uint16_t* starts;  // [B, Hkv, L, 2^K]
  int64_t base, n, nb;
  int w;
};

struct Problem {
  int64_t B, H, Hkv, G, Tq, D, L, K, T, n_keys, block_size, budget, estimator, tail_base, tail_len, tail_cap;
  float scale;
  float softcap = 0.f;   // > 0: scores are soft-capped, c · tanh(s / c) (kvpass_math::soft_cap)
  const float* q;        // [B, H, Tq, D]
  const c10::BFloat16* proj;  // [Hkv, D, K*L]: the SimHash projection (query codes are computed here)
  int32_t* qcode;        // [B, H, Tq, L] out: the query's codes
  const float* mu;       // [B, Hkv, D]
  const void* sk = nullptr;  // static keys/values [B, Hkv, NS, D] (KV dtype) attended exactly, or null
  const void* sv = nullptr;
  const bool* s_allowed = nullptr;  // [Tq, NS], or [B, Tq, NS] (s_allowed_b = Tq·NS: per batch row)
  int64_t s_allowed_b = 0;
  const int64_t* row_lo = nullptr;  // [B]: host keys below row_lo[b] are not row b's (left padding), or null
  const int64_t* row_budget = nullptr;  // [B]: topk/oracle budget of row b (a padded batch's rows differ), or null
  // topk/oracle with a tail sample (stride > 0): besides the kept keys (the head), every stride-th other
  // host key of the row, from offset stride_off[b, hk], weighted by stride (lowering/reference.py:
  // estimator_scores) — an unbiased estimate of what the head leaves out
  int64_t stride = 0;
  const int64_t* stride_off = nullptr;  // [B, Hkv], in [0, stride)
  int64_t NS = 0, sk_s0 = 0, sk_s1 = 0, sk_s2 = 0, sv_s0 = 0, sv_s1 = 0, sv_s2 = 0;
  const uint16_t* tail;  // [B, Hkv, L, tail_cap]
  const float* logp;     // kTable + 1
  std::vector<Segment> segs;
  std::vector<const void*> kb, vb;  // per host block, at (b=0, hk=0, token 0)
  std::vector<const int8_t*> skb;   // retriever "sketch": per sketch block, [B, Hkv, tiles, words, 16, 4] (empty: LSH)
  std::vector<int32_t> sk_qw;       // sketch: the quantised query rows, [B, Hkv, G·Tq, qwords] words of 4 int8
  int64_t sk_bits = 8, sk_words = 0, sk_qwords = 0;  // code width; 4-byte words per key in a tile; per query row
  int sk_simd = 0;                  // sketch scan: 2 AVX512-VNNI, 1 AVX2, 0 the portable loop (the same sums)
  std::vector<int32_t> sk_qbias;    // AVX2 int8 scan: each query row's 128 · Σ_d q_d, [B, Hkv, G·Tq] (sketch_tile_avx2)
  int64_t skb_s0 = 0, skb_s1 = 0, sk_tiles = 0;  // strides; tiles of 16 keys per block
  const float* sk_q = nullptr;      // [B, H, Tq, D]: the query rows scaled as the codes are (q * scale)
  int64_t candidates = 0;           // sketch: keys handed to the exact top-k per row
  float* sk_score = nullptr;        // [B, H, Tq, n_keys] sketch scores when the scan is split in key chunks
                                    // over the threads (scratch, filled by sketch_scan); else null and
  bool sk_group = false;            // one work unit per (batch row, kv head) (sketch_group_units)
  bool sk_listed = true;            // group units list the keys above a sampled threshold (scan_unit)
  int threads = 1;                  // the OpenMP team of this call
  int64_t kb_s0, kb_s1, kb_s2, vb_s0, vb_s1, vb_s2;  // element strides (shared by all blocks)
  float* out;       // [B, H, Tq, D]
  float* lse;       // [B, H, Tq]
  int32_t* n_read;  // [B, H, Tq]: host keys scored
  int32_t* n_kept;  // [B, H, Tq]: of them, in the estimate (head + tail)
  // What the call read, per (batch row, kv head) (out, [B, Hkv, kReads]): the code bytes the sketch scans
  // read (every pass, the threshold's sample included), and the distinct host keys whose K row, and whose V
  // row, some query row of the kv head read — a row read by several query rows counted once (row: mark; reads_count)
  int64_t* reads = nullptr;
};

enum Read { kCodeBytes = 0, kKRows = 1, kVRows = 2, kReads = 3 };

struct Scratch {
  std::vector<uint8_t> count;  // per key, collisions of the current row, saturating (cleared via `touched`)
  std::vector<uint16_t> tail_count;
  std::vector<int32_t> touched, cand;
  std::vector<float> score, acc, proj, qpad, sscore;
  std::vector<int32_t> order, head, tailk;  // tail sample: the head's keys in key order, the tail's keys
  std::vector<int64_t> lo, hi;  // per table: the query's bucket in the current segment
  int64_t n_touched = 0, n_cand = 0;
  std::vector<uint64_t> seen;  // threshold <= 2: per 64 keys, the words "seen once" and "seen twice"
  TopScratch top;  // sketch: selecting the best sketch scores
  // sketch, group units (scan_unit): the unit's rows' scores, uninitialised, allocated on first use; the
  // listed scan's per-row lists (position, score) and counts, thresholds and sample
  std::unique_ptr<float[]> skg, lsc;
  std::unique_ptr<int32_t[]> lpos;
  int64_t skg_cap = 0, l_cap = 0;
  std::vector<int64_t> lcnt;
  std::vector<float> tau, samp;
  std::vector<uint8_t> listed;  // per row of the unit: its list holds the budget (else its scores are in skg)
  // the keys whose K / V rows this thread read, a bit per key: [units][2][words] (units: every (batch row,
  // kv head), or the one group unit being attended; row: mark; reads_count)
  std::vector<uint64_t> seen_rows;
  int64_t seen_unit0 = 0;  // the (batch row, kv head) of unit 0 of seen_rows
  const float* sk_row = nullptr;  // sketch: the current row's scores (n_keys), or
  int32_t* list_pos = nullptr;    // its list of the keys at or above its threshold (list_n >= 0)
  const float* list_sc = nullptr;
  int64_t list_n = -1;
};

// Prefetch one cache line (into L1).  Not __builtin_prefetch: GCC 12 deleted the K/V row prefetch loops
// (a loop whose body is only that builtin counts as side-effect free) — the built kernel had none, and
// every candidate row cost a full memory latency (one layer at 128k: 11 -> 5 ms with them back).  An
// asm volatile statement cannot be dropped.
KVPASS_INLINE void prefetch_line(const char* p) {
#if defined(__x86_64__) && defined(__GNUC__)
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

template <typename T>
KVPASS_INLINE float load(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// Batch row b's first host key (the ones before are its left padding; 0 without row_lo)
KVPASS_INLINE int64_t row_lo_of(const Problem& P, int64_t b) { return P.row_lo ? P.row_lo[b] : 0; }
// topk/oracle: keys kept for batch row b; sketch: keys handed to the exact top-k
KVPASS_INLINE int64_t budget_of(const Problem& P, int64_t b) { return P.row_budget ? P.row_budget[b] : P.budget; }
KVPASS_INLINE int64_t candidates_of(const Problem& P, int64_t b) {
  return P.row_budget ? std::max<int64_t>(P.row_budget[b], 1) : P.candidates;
}

// 64-bit words of one bitmap of the keys read (row: mark)
KVPASS_INLINE int64_t reads_words(const Problem& P) { return (P.n_keys + 63) / 64; }

// Row (b, h, t): candidates, scores, softmax, V.  Templated on the KV dtype; inlined into the
// per-dtype entry points below, which are the functions compiled per SIMD level.
template <typename T>
KVPASS_INLINE void row(const Problem& P, int64_t b, int64_t h, int64_t t, Scratch& s) {
  const int64_t hk = h / P.G, D = P.D, L = P.L;
  const int64_t r = (b * P.H + h) * P.Tq + t;
  const float* q = P.q + r * D;
  const int64_t bh = b * P.Hkv + hk;
  const int32_t* qc = P.qcode + r * L;  // filled by hash_queries
  s.n_touched = s.n_cand = 0;  // s.cand / s.touched are sized once per thread (n_keys + 1): never
  const int64_t lo_key = row_lo_of(P, b);  // left padding: keys before it are not this row's
  if (P.estimator == kOracle) {  // resized here, where zero-filling them would cost O(n_keys) per row
    std::iota(s.cand.begin(), s.cand.begin() + (P.n_keys - lo_key), int32_t(lo_key));
    s.n_cand = P.n_keys - lo_key;
  } else if (!P.skb.empty()) {  // sketch: the `candidates` best sketch scores, in key order
    const int64_t m = std::min(candidates_of(P, b), P.n_keys - lo_key);  // from the row's own keys only
    if (s.list_n >= 0) {
      const int64_t skip = std::lower_bound(s.list_pos, s.list_pos + s.list_n, int32_t(lo_key)) - s.list_pos;
      top_listed(s.list_pos + skip, s.list_sc + skip, s.list_n - skip, m, s.cand.data(), s.top);
    } else {
      top_positions(s.sk_row + lo_key, P.n_keys - lo_key, m, s.cand.data(), s.top);
      for (int64_t j = 0; lo_key && j < m; ++j) s.cand[j] += int32_t(lo_key);
    }
    s.n_cand = m;
  } else {
    const uint8_t thr = uint8_t(std::min<int64_t>(P.T, 255));  // T > 255: counted in `touched` below
    const int64_t buckets = int64_t(1) << P.K;
    // Each table costs two dependent cache misses (its bucket's start, then the bucket's ids) at a
    // random place: issue all L of a kind before using any, so they overlap instead of queueing.
    s.lo.resize(L);
    s.hi.resize(L);
    for (const Segment& g : P.segs) {
      for (int64_t l = 0; l < L; ++l)
        __builtin_prefetch(g.starts + (bh * L + l) * buckets + (qc[l] & (buckets - 1)), 0, 0);
      for (int64_t l = 0; l < L; ++l) {
        const uint16_t* st = g.starts + (bh * L + l) * buckets;
        const int64_t c = qc[l] & (buckets - 1);
        s.lo[l] = st[c];
        s.hi[l] = c + 1 < buckets ? st[c + 1] : g.n;
        const uint8_t* ids = g.ids + (bh * L + l) * g.nb + ((s.lo[l] * g.w) >> 3);
        __builtin_prefetch(ids, 0, 0);
        __builtin_prefetch(ids + 64, 0, 0);
      }
      // locals, not members: the counters are uint8_t, which may alias anything, so the compiler
      // would otherwise reload every member after each increment
      const int w = g.w;
      const int32_t base = int32_t(g.base);
      uint8_t* const count = s.count.data();
      int32_t* const touched = s.touched.data();
      int32_t* const cand = s.cand.data();
      int64_t n_touched = s.n_touched, n_cand = s.n_cand;
      if (P.T <= 2) {
        // threshold 1 or 2 (the default): per segment (a key lives in one segment, so counting per
        // segment is exact), two bitsets "seen" / "seen twice", interleaved so that one cache line
        // serves both — 2 bits per key, 8 KiB for the largest segment: L1-resident, where byte
        // counters over all keys would spill to L2.  Candidates come out in key order.
        uint64_t* const seen = s.seen.data();
        for (int64_t l = 0; l < L; ++l) {
          const int64_t lo = s.lo[l], hi = s.hi[l];
          const uint8_t* ids = g.ids + (bh * L + l) * g.nb;
          for (int64_t i = lo; i < hi; ++i) {
            const uint32_t key = unpack_id(ids, i, w);  // segment-local
            const uint64_t b = uint64_t(1) << (key & 63);
            uint64_t* pair = seen + 2 * (key >> 6);
            pair[1] |= pair[0] & b;
            pair[0] |= b;
          }
        }
        const int64_t words = (g.n + 63) / 64, pick = P.T == 2 ? 1 : 0;
        for (int64_t wd = 0; wd < words; ++wd) {
          for (uint64_t x = seen[2 * wd + pick]; x; x &= x - 1)
            cand[n_cand++] = base + int32_t(wd * 64 + __builtin_ctzll(x));
        }
        std::fill(seen, seen + 2 * words, 0);
        s.n_cand = n_cand;
        continue;
      }
      for (int64_t l = 0; l < L; ++l) {
        const int64_t lo = s.lo[l], hi = s.hi[l];
        const uint8_t* ids = g.ids + (bh * L + l) * g.nb;
        for (int64_t i = lo; i < hi; ++i) {
          const int32_t key = base + int32_t(unpack_id(ids, i, w));
          const uint8_t c = count[key];
          touched[n_touched] = key;
          n_touched += c == 0;
          const uint8_t c1 = c + (c < 255);  // saturates: a threshold above 255 is refused at the entry
          count[key] = c1;
          cand[n_cand] = key;
          n_cand += c1 == thr;
        }
      }
      s.n_touched = n_touched, s.n_cand = n_cand;
    }
    for (int64_t i = 0; i < s.n_touched; ++i) s.count[s.touched[i]] = 0;
    if (P.tail_len > 0) {
      uint16_t* tc = s.tail_count.data();
      std::fill(tc, tc + P.tail_len, 0);
      for (int64_t l = 0; l < L; ++l) {
        const uint16_t* codes = P.tail + (bh * L + l) * P.tail_cap;
        const uint16_t want = uint16_t(qc[l]);
#pragma omp simd
        for (int64_t j = 0; j < P.tail_len; ++j) tc[j] += codes[j] == want;
      }
      for (int64_t j = 0; j < P.tail_len; ++j)
        if (tc[j] >= P.T) s.cand[s.n_cand++] = int32_t(P.tail_base + j);
    }
    if (lo_key > 0) {  // LSH retrieval knows no rows: drop the padding keys (never attended, never counted)
      int64_t kept = 0;
      for (int64_t j = 0; j < s.n_cand; ++j) {
        s.cand[kept] = s.cand[j];
        kept += s.cand[j] >= lo_key;
      }
      s.n_cand = kept;
    }
  }
  const int64_t m = s.n_cand;
  P.n_read[r] = P.n_kept[r] = int32_t(m);
  float* o = P.out + r * D;
  // the static keys (sinks + window) when the caller fuses them in: exact scores, always kept
  const T* sk = static_cast<const T*>(P.sk) + b * P.sk_s0 + hk * P.sk_s1;
  const T* sv = static_cast<const T*>(P.sv) + b * P.sv_s0 + hk * P.sv_s1;
  s.sscore.assign(P.NS, kNegInf);
  float smx = kNegInf;
  for (int64_t j = 0; j < P.NS; ++j) {
    if (!P.s_allowed[b * P.s_allowed_b + t * P.NS + j]) continue;
    const T* k = sk + j * P.sk_s2;
    float qk = 0.f;
#pragma omp simd reduction(+ : qk)
    for (int64_t i = 0; i < D; ++i) qk += q[i] * load(k, i);
    s.sscore[j] = kvpass_math::soft_cap(qk * P.scale, P.softcap);
    smx = std::max(smx, s.sscore[j]);
  }
  if (m == 0 && smx == kNegInf && !(P.stride > 0 && lo_key < P.n_keys)) {
    std::fill(o, o + D, 0.f);
    P.lse[r] = kNegInf;
    return;
  }
  // q·μ and |q| for the angle to the centred key (sample only)
  const float* mu = P.mu + bh * D;
  float qmu = 0.f, qq = 0.f, mumu = 0.f;
#pragma omp simd reduction(+ : qmu, qq, mumu)
  for (int64_t i = 0; i < D; ++i) {
    qmu += q[i] * mu[i];
    qq += q[i] * q[i];
    mumu += mu[i] * mu[i];
  }
  const float qnorm = std::sqrt(qq);
  auto k_row = [&](int64_t key) KVPASS_LAMBDA_INLINE {
    return static_cast<const T*>(P.kb[key / P.block_size]) + b * P.kb_s0 + hk * P.kb_s1 +
           (key % P.block_size) * P.kb_s2;
  };
  auto v_row = [&](int64_t key) KVPASS_LAMBDA_INLINE {
    return static_cast<const T*>(P.vb[key / P.block_size]) + b * P.vb_s0 + hk * P.vb_s1 +
           (key % P.block_size) * P.vb_s2;
  };
  // K and V rows read, into the thread's bitmaps (reads_count turns them into distinct counts)
  uint64_t* const seen_k = s.seen_rows.data() + (bh - s.seen_unit0) * 2 * reads_words(P);
  uint64_t* const seen_v = seen_k + reads_words(P);
  auto mark = [&](uint64_t* seen, int64_t key) KVPASS_LAMBDA_INLINE {
    seen[key >> 6] |= uint64_t(1) << (key & 63);
  };
  // The score of one candidate: q·k scaled, and for "sample" its importance weight 1 / P(retrieved)
  auto score = [&](const T* k) KVPASS_LAMBDA_INLINE {
    float qk = 0.f;
    if (P.estimator == kSample) {
      float kmu = 0.f, kk = 0.f;
#pragma omp simd reduction(+ : qk, kmu, kk)
      for (int64_t i = 0; i < D; ++i) {
        const float x = load(k, i);
        qk += q[i] * x;
        kmu += x * mu[i];
        kk += x * x;
      }
      return kvpass_math::sample_score(qk, kmu, kk, qmu, qnorm, mumu, P.scale, P.logp, P.softcap);
    }
#pragma omp simd reduction(+ : qk)
    for (int64_t i = 0; i < D; ++i) qk += q[i] * load(k, i);
    return kvpass_math::soft_cap(qk * P.scale, P.softcap);
  };
  // Candidates are scattered over the host store: the loops are bound by memory latency unless the
  // rows a few iterations ahead are already on their way (K and V of a token are adjacent).
  const int64_t row_bytes = D * int64_t(sizeof(T));
  auto prefetch = [&](const T* p) KVPASS_LAMBDA_INLINE {
    const char* c = reinterpret_cast<const char*>(p);
    for (int64_t o = 0; o < row_bytes; o += 64) prefetch_line(c + o);
  };
  constexpr int64_t kAhead = 16;
  s.acc.resize(D);
  OnlineSoftmax sm;
  auto add_static = [&]() KVPASS_LAMBDA_INLINE {
    for (int64_t j = 0; j < P.NS; ++j)
      if (s.sscore[j] != kNegInf) sm.add(s.sscore[j], sv + j * P.sv_s2);
  };
  // Scores and adds keys[0, n) (each score + log_w: its weight w), K and V of a key read together, the rows
  // kAhead keys on already on their way
  auto attend_keys = [&](const int32_t* keys, int64_t n, float log_w) KVPASS_LAMBDA_INLINE {
    for (int64_t j = 0; j < std::min(n, kAhead); ++j) {
      prefetch(k_row(keys[j]));
      prefetch(v_row(keys[j]));
    }
    for (int64_t j = 0; j < n; ++j) {
      if (j + kAhead < n) {
        prefetch(k_row(keys[j + kAhead]));
        prefetch(v_row(keys[j + kAhead]));
      }
      const int64_t key = keys[j];
      mark(seen_k, key), mark(seen_v, key);
      sm.add(score(k_row(key)) + log_w, v_row(key));
    }
  };
  // The tail sample: the keys j = lo_key + offset + i·stride < n_keys (a padded row counts from its own first
  // key) that the head (`head`, nh keys in key order) does not hold, each weighted by stride (log stride added
  // to its score).  The rows of a kv head share the offset, so they read the same rows, back to back.
  int64_t n_tail = 0;
  auto add_tail = [&](const int32_t* head, int64_t nh) KVPASS_LAMBDA_INLINE {
    const int64_t step = P.stride;
    s.tailk.clear();
    int64_t hp = 0;
    for (int64_t j = lo_key + P.stride_off[bh]; j < P.n_keys; j += step) {
      while (hp < nh && head[hp] < j) ++hp;
      if (hp < nh && head[hp] == j) continue;
      s.tailk.push_back(int32_t(j));
    }
    n_tail = int64_t(s.tailk.size());
    attend_keys(s.tailk.data(), n_tail, std::log(float(step)));
  };
  int64_t kept = m;
  if (P.estimator == kSample || budget_of(P, b) >= m) {
    // every candidate is kept: one pass, online softmax — a row's K and V are read together, once
    sm.start(s.acc.data(), D, smx);
    add_static();
    attend_keys(s.cand.data(), m, 0.f);  // weight 1 (s + 0.f is s)
    if (P.stride > 0) {
      const int32_t* head = s.cand.data();
      if (!std::is_sorted(head, head + m)) {  // LSH retrieval above the threshold 2 lists keys as it meets them
        s.head.assign(head, head + m);
        std::sort(s.head.begin(), s.head.end());
        head = s.head.data();
      }
      add_tail(head, m);
    }
  } else {
    // topk / oracle: score every candidate, keep the `budget` largest, then read their V
    s.score.resize(m);
    for (int64_t j = 0; j < std::min(m, kAhead); ++j) prefetch(k_row(s.cand[j]));
    for (int64_t j = 0; j < m; ++j) {
      if (j + kAhead < m) prefetch(k_row(s.cand[j + kAhead]));
      s.score[j] = score(k_row(s.cand[j]));
      mark(seen_k, s.cand[j]);
    }
    const int64_t keep = std::max<int64_t>(budget_of(P, b), 0);
    s.order.resize(m);
    std::iota(s.order.begin(), s.order.end(), 0);
    std::nth_element(s.order.begin(), s.order.begin() + keep, s.order.end(),
                     [&](int32_t a, int32_t c) { return s.score[a] > s.score[c]; });
    s.order.resize(keep);
    float mx = smx;
    for (int32_t j : s.order) mx = std::max(mx, s.score[j]);
    sm.start(s.acc.data(), D, mx);  // the true maximum: nothing is rescaled below
    add_static();
    for (int64_t jj = 0; jj < std::min(keep, kAhead); ++jj) prefetch(v_row(s.cand[s.order[jj]]));
    for (int64_t jj = 0; jj < keep; ++jj) {
      if (jj + kAhead < keep) prefetch(v_row(s.cand[s.order[jj + kAhead]]));
      const int32_t j = s.order[jj];
      mark(seen_v, s.cand[j]);
      sm.add(s.score[j], v_row(s.cand[j]));
    }
    kept = keep;
    if (P.stride > 0) {
      s.head.resize(keep);
      for (int64_t jj = 0; jj < keep; ++jj) s.head[jj] = s.cand[s.order[jj]];
      std::sort(s.head.begin(), s.head.end());
      add_tail(s.head.data(), keep);
    }
  }
  P.n_read[r] = int32_t(m + n_tail);
  P.n_kept[r] = int32_t(kept + n_tail);
  P.lse[r] = sm.finish(o);
}

// SimHash of the raw queries of one (batch row, kv head), tables [l0, l1): bit j of table l =
// [q·R[:, lK + j] > 0].  The G·Tq rows of the group share R_hk, so it is streamed once for all of them.
KVPASS_CLONES void hash_queries(const Problem& P, int64_t b, int64_t hk, int64_t l0, int64_t l1,
                                std::vector<float>& y, std::vector<float>& qpad) {
  const int64_t D = P.D, KL = P.K * P.L, rows = P.G * P.Tq;
  const int64_t c_lo = l0 * P.K, nc_all = (l1 - l0) * P.K;  // this range's columns of R
  const c10::BFloat16* R = P.proj + hk * D * KL;  // bf16: half the bytes to stream, and exact (see lsh.py)
  const int64_t r0g = (b * P.H + hk * P.G) * P.Tq;  // the group's rows are consecutive
  y.assign(rows * nc_all, 0.f);
  // register-blocked: a tile of 4 rows x 16 columns accumulates over all of D in registers, so each
  // element of R is loaded and widened once per 4 rows, and y is written once
  constexpr int64_t kR = 4, kC = 16;
  qpad.resize(kR * D);  // the tile's rows, zero-padded when fewer than kR are left (per-thread scratch)
  for (int64_t r0 = 0; r0 < rows; r0 += kR) {
    const int64_t nr = std::min(kR, rows - r0);
    std::fill(qpad.begin(), qpad.end(), 0.f);
    std::copy(P.q + (r0g + r0) * D, P.q + (r0g + r0 + nr) * D, qpad.begin());
    const float* q0 = qpad.data();
    for (int64_t c0 = 0; c0 < nc_all; c0 += kC) {
      const int64_t nc = std::min(kC, nc_all - c0);
      const c10::BFloat16* Rc = R + c_lo + c0;
      float acc[kR][kC] = {};
      if (nc == kC) {
        for (int64_t i = 0; i < D; ++i) {
          float rv[kC];
#pragma omp simd
          for (int64_t c = 0; c < kC; ++c) rv[c] = static_cast<float>(Rc[i * KL + c]);
          for (int64_t rr = 0; rr < kR; ++rr) {
            const float qi = q0[rr * D + i];
#pragma omp simd
            for (int64_t c = 0; c < kC; ++c) acc[rr][c] += qi * rv[c];
          }
        }
      } else {  // edge tiles
        for (int64_t i = 0; i < D; ++i)
          for (int64_t rr = 0; rr < nr; ++rr)
            for (int64_t c = 0; c < nc; ++c) acc[rr][c] += q0[rr * D + i] * static_cast<float>(Rc[i * KL + c]);
      }
      for (int64_t rr = 0; rr < nr; ++rr)
        for (int64_t c = 0; c < nc; ++c) y[(r0 + rr) * nc_all + c0 + c] = acc[rr][c];
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    int32_t* qc = P.qcode + (r0g + r) * P.L;
    const float* yr = y.data() + r * nc_all;
    for (int64_t l = l0; l < l1; ++l) qc[l] = sign_code(yr + (l - l0) * P.K, P.K);
  }
}

// Sketch scores of key tiles [t0, t1) (16 keys each) for the G·Tq query rows of one (batch row, kv head),
// in integers: each row's q' = q · scale (handed in) rounded to ±127 levels of its max |q'_d|
// (lowering/reference.py: sketch_query), dotted with the keys' codes.  A tile is stored [words][16][4]
// (runtime/lsh.py: sketch_tiles): one 64-byte load holds 16 keys x 4 bytes, the operand of one int8
// dot-product instruction (AVX512-VNNI vpdpbusd: unsigned x signed bytes, 4 per 32-bit lane), which then
// serves every row of the group with the row's 4 query bytes broadcast.  int8: 4 dimensions a word;
// vpdpbusd needs the keys unsigned: code ^ 0x80 = code + 128, which adds 128 · Σ_d q_d, one constant per
// row — the same ranking and ties as Σ q_d · code_d.  int4: 8 dimensions a word, stored as code + 8 in
// nibbles (low: 4 dimensions, high: the next 4), two instructions a load (masked, shifted) and a constant
// 8 · Σ_d q_d.  The sums are exact integers (|s| ≤ 127 · 255 · 512 < 2^24 for D ≤ 512), stored as
// floats; the portable path computes the same ones.

// The quantised query rows of (batch row, kv head): 4-byte words [G·Tq][qwords] in P.sk_qw.
KVPASS_INLINE int64_t sketch_qw_offset(const Problem& P, int64_t b, int64_t hk) {
  return (b * P.Hkv + hk) * P.G * P.Tq * P.sk_qwords;
}

// Each row's quantised query as 4-byte words [rows][qwords] (zero past D), written at qw.
void sketch_query_words(const Problem& P, int64_t b, int64_t hk, int32_t* qw) {
  const int64_t D = P.D, QW = P.sk_qwords, rows = P.G * P.Tq;
  const float* qs = P.sk_q + (b * P.H + hk * P.G) * P.Tq * D;  // the group's rows are consecutive
  std::fill(qw, qw + rows * QW, 0);
  for (int64_t r = 0; r < rows; ++r, qs += D) {
    float m = 0.f;
    for (int64_t i = 0; i < D; ++i) m = std::max(m, std::fabs(qs[i]));
    const float inv = m > 0.f ? 127.f / m : 0.f;
    int8_t* bytes = reinterpret_cast<int8_t*>(qw + r * QW);
    for (int64_t i = 0; i < D; ++i) bytes[i] = static_cast<int8_t>(std::nearbyint(qs[i] * inv));
  }
}

KVPASS_INLINE const uint8_t* sketch_tile(const Problem& P, int64_t b, int64_t hk, int64_t tile) {
  return reinterpret_cast<const uint8_t*>(P.skb[tile / P.sk_tiles] + b * P.skb_s0 + hk * P.skb_s1) +
         (tile % P.sk_tiles) * P.sk_words * 64;
}

// Where a scan's scores go.  Stored: row r's score of key j at out[r * stride + j - key0].  Listed (tau set):
// only the keys whose score reaches the row's threshold tau[r], appended as (position, score) to row r's
// list — pos / sc + r * cap, count cnt[r] — in key order (cap >= n_keys + 16: the SIMD path stores 16 at
// a time).
struct ScanSink {
  float* out = nullptr;
  int64_t stride = 0, key0 = 0;
  const float* tau = nullptr;
  int32_t* pos = nullptr;
  float* sc = nullptr;
  int64_t* cnt = nullptr;
  int64_t cap = 0;
};

KVPASS_CLONES void sketch_scan_portable(const Problem& P, int64_t b, int64_t hk, int64_t t0, int64_t t1,
                                        const int32_t* qw, const ScanSink& o) {
  const int64_t W = P.sk_words, QW = P.sk_qwords, rows = P.G * P.Tq;
  const bool int4 = P.sk_bits == 4;
  for (int64_t tile = t0; tile < t1; ++tile) {
    const int64_t j = tile * 16, nl = std::min<int64_t>(16, P.n_keys - j);
    const uint8_t* c = sketch_tile(P, b, hk, tile);
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* qb = reinterpret_cast<const int8_t*>(qw + r * QW);
      int32_t acc[16] = {};
      for (int64_t g = 0; g < W; ++g)
        for (int64_t l = 0; l < 16; ++l)
          for (int64_t e = 0; e < 4; ++e) {
            const uint8_t x = c[g * 64 + l * 4 + e];
            if (int4)
              acc[l] += int32_t(x & 15u) * int32_t(qb[g * 8 + e]) + int32_t(x >> 4) * int32_t(qb[g * 8 + 4 + e]);
            else
              acc[l] += int32_t(uint8_t(x ^ 0x80u)) * int32_t(qb[g * 4 + e]);
          }
      for (int64_t l = 0; l < nl; ++l) {
        const float v = float(acc[l]);
        if (o.tau == nullptr) {
          o.out[r * o.stride + j + l - o.key0] = v;
        } else if (v >= o.tau[r]) {
          const int64_t at = r * o.cap + o.cnt[r]++;
          o.pos[at] = int32_t(j + l);
          o.sc[at] = v;
        }
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define KVPASS_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

// NR query rows (from r0) against one tile (keys j..j+15, `keep` of them); INT4: the tile's words hold
// nibbles (two query words each)
template <int NR, bool INT4>
KVPASS_VNNI KVPASS_INLINE void sketch_tile_vnni(const uint8_t* c, const int32_t* qw, int64_t W, int64_t QW,
                                                int64_t r0, int64_t j, __mmask16 keep, const ScanSink& o) {
  __m512i acc[NR];
  for (int rr = 0; rr < NR; ++rr) acc[rr] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), low = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < W; ++g) {
    const __m512i v = _mm512_loadu_si512(c + g * 64);
    if constexpr (INT4) {
      const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      for (int rr = 0; rr < NR; ++rr) {
        acc[rr] = _mm512_dpbusd_epi32(acc[rr], lo, _mm512_set1_epi32(qw[rr * QW + 2 * g]));
        acc[rr] = _mm512_dpbusd_epi32(acc[rr], hi, _mm512_set1_epi32(qw[rr * QW + 2 * g + 1]));
      }
    } else {
      const __m512i k = _mm512_xor_si512(v, flip);
      for (int rr = 0; rr < NR; ++rr) acc[rr] = _mm512_dpbusd_epi32(acc[rr], k, _mm512_set1_epi32(qw[rr * QW + g]));
    }
  }
  if (o.tau == nullptr) {
    for (int rr = 0; rr < NR; ++rr)
      _mm512_mask_storeu_ps(o.out + (r0 + rr) * o.stride + j - o.key0, keep, _mm512_cvtepi32_ps(acc[rr]));
    return;
  }
  const __m512i keys = _mm512_add_epi32(_mm512_set1_epi32(int32_t(j)),
                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  for (int rr = 0; rr < NR; ++rr) {
    const int64_t r = r0 + rr;
    const __m512 f = _mm512_cvtepi32_ps(acc[rr]);
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(keep, f, _mm512_set1_ps(o.tau[r]), _CMP_GE_OQ);
    // compressed in registers and stored whole, hit or not (16 slots of slack per list): a compress with a
    // memory destination is microcoded on Zen 4, ~10x slower, and a branch on `hit` mispredicts (a tile
    // holds a kept key about half the time)
    const int64_t at = r * o.cap + o.cnt[r];
    _mm512_storeu_ps(o.sc + at, _mm512_maskz_compress_ps(hit, f));
    _mm512_storeu_si512(o.pos + at, _mm512_maskz_compress_epi32(hit, keys));
    o.cnt[r] += __builtin_popcount(hit);
  }
}

template <bool INT4>
KVPASS_VNNI void sketch_scan_vnni(const Problem& P, int64_t b, int64_t hk, int64_t t0, int64_t t1,
                                  const int32_t* qw, const ScanSink& o) {
  const int64_t W = P.sk_words, QW = P.sk_qwords, rows = P.G * P.Tq;
  for (int64_t tile = t0; tile < t1; ++tile) {
    const int64_t j = tile * 16, nl = std::min<int64_t>(16, P.n_keys - j);
    const __mmask16 keep = static_cast<__mmask16>((1u << nl) - 1);
    const uint8_t* c = sketch_tile(P, b, hk, tile);
    if (tile + 1 < t1) prefetch_line(reinterpret_cast<const char*>(sketch_tile(P, b, hk, tile + 1)));
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
      const int32_t* q = qw + r0 * QW;
      switch (std::min<int64_t>(8, rows - r0)) {
        case 1: sketch_tile_vnni<1, INT4>(c, q, W, QW, r0, j, keep, o); break;
        case 2: sketch_tile_vnni<2, INT4>(c, q, W, QW, r0, j, keep, o); break;
        case 3: sketch_tile_vnni<3, INT4>(c, q, W, QW, r0, j, keep, o); break;
        case 4: sketch_tile_vnni<4, INT4>(c, q, W, QW, r0, j, keep, o); break;
        case 5: sketch_tile_vnni<5, INT4>(c, q, W, QW, r0, j, keep, o); break;
        case 6: sketch_tile_vnni<6, INT4>(c, q, W, QW, r0, j, keep, o); break;
        case 7: sketch_tile_vnni<7, INT4>(c, q, W, QW, r0, j, keep, o); break;
        default: sketch_tile_vnni<8, INT4>(c, q, W, QW, r0, j, keep, o); break;
      }
    }
  }
}

#define KVPASS_AVX2 __attribute__((target("avx2")))

// The same integer sums on AVX2 (no 8-bit dot-product instruction there): vpmaddubsw multiplies unsigned x
// signed bytes and adds neighbouring pairs into 16 bits, vpmaddwd with ones adds those pairs into the key's
// 32-bit lane — Σ of 4 byte products a lane, as vpdpbusd.  No pair saturates: int4 keys are 0..15
// (code + 8), so |pair| ≤ 2 · 15 · 127; int8 keys are the signed codes, multiplied as |code| x ±q
// (vpsignb), so |pair| ≤ 2 · 128 · 127 < 2^15, and the row's 128 · Σ_d q_d is added after (`bias`) to give
// VNNI's Σ (code + 128) · q exactly (int4: bias is null).  A 64-byte tile word is two 32-byte halves: keys
// 0-7 and 8-15.
template <int NR, bool INT4>
KVPASS_AVX2 KVPASS_INLINE void sketch_tile_avx2(const uint8_t* c, const int32_t* qw, int64_t W, int64_t QW,
                                                const int32_t* bias, int64_t r0, int64_t j, int64_t nl,
                                                const ScanSink& o) {
  __m256i acc[NR][2];
  for (int rr = 0; rr < NR; ++rr) acc[rr][0] = acc[rr][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);
  for (int64_t g = 0; g < W; ++g)
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + g * 64 + h * 32));
      if constexpr (INT4) {
        const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        for (int rr = 0; rr < NR; ++rr) {
          const __m256i a = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(qw[rr * QW + 2 * g]));
          const __m256i b = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(qw[rr * QW + 2 * g + 1]));
          acc[rr][h] = _mm256_add_epi32(acc[rr][h], _mm256_madd_epi16(_mm256_add_epi16(a, b), ones));
        }
      } else {
        const __m256i mag = _mm256_abs_epi8(v);
        for (int rr = 0; rr < NR; ++rr) {
          const __m256i q = _mm256_sign_epi8(_mm256_set1_epi32(qw[rr * QW + g]), v);
          acc[rr][h] = _mm256_add_epi32(acc[rr][h], _mm256_madd_epi16(_mm256_maddubs_epi16(mag, q), ones));
        }
      }
    }
  for (int rr = 0; rr < NR; ++rr) {
    const int64_t r = r0 + rr;
    alignas(32) float f[16];
    for (int h = 0; h < 2; ++h) {
      if constexpr (!INT4) acc[rr][h] = _mm256_add_epi32(acc[rr][h], _mm256_set1_epi32(bias[r]));
      _mm256_store_ps(f + 8 * h, _mm256_cvtepi32_ps(acc[rr][h]));
    }
    if (o.tau == nullptr) {
      std::copy(f, f + nl, o.out + r * o.stride + j - o.key0);
      continue;
    }
    const __m256 t = _mm256_set1_ps(o.tau[r]);
    uint32_t hit = uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_load_ps(f), t, _CMP_GE_OQ))) |
                   uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_load_ps(f + 8), t, _CMP_GE_OQ))) << 8;
    hit &= (1u << nl) - 1;
    int64_t at = r * o.cap + o.cnt[r];
    for (; hit; hit &= hit - 1, ++at) {  // ~2% of the keys reach the threshold: a short loop
      const int l = __builtin_ctz(hit);
      o.pos[at] = int32_t(j + l);
      o.sc[at] = f[l];
    }
    o.cnt[r] = at - r * o.cap;
  }
}

template <bool INT4>
KVPASS_AVX2 void sketch_scan_avx2(const Problem& P, int64_t b, int64_t hk, int64_t t0, int64_t t1,
                                  const int32_t* qw, const ScanSink& o) {
  const int64_t W = P.sk_words, QW = P.sk_qwords, rows = P.G * P.Tq;
  const int32_t* bias = INT4 ? nullptr : P.sk_qbias.data() + sketch_qw_offset(P, b, hk) / QW;
  for (int64_t tile = t0; tile < t1; ++tile) {
    const int64_t j = tile * 16, nl = std::min<int64_t>(16, P.n_keys - j);
    const uint8_t* c = sketch_tile(P, b, hk, tile);
    if (tile + 1 < t1) prefetch_line(reinterpret_cast<const char*>(sketch_tile(P, b, hk, tile + 1)));
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const int32_t* q = qw + r0 * QW;
      switch (std::min<int64_t>(4, rows - r0)) {
        case 1: sketch_tile_avx2<1, INT4>(c, q, W, QW, bias, r0, j, nl, o); break;
        case 2: sketch_tile_avx2<2, INT4>(c, q, W, QW, bias, r0, j, nl, o); break;
        case 3: sketch_tile_avx2<3, INT4>(c, q, W, QW, bias, r0, j, nl, o); break;
        default: sketch_tile_avx2<4, INT4>(c, q, W, QW, bias, r0, j, nl, o); break;
      }
    }
  }
}

// The sketch scan this CPU runs: 2 AVX512-VNNI, 1 AVX2, 0 the portable loop; $KVPASS_SKETCH_SCAN = "avx2" or
// "portable" caps it (tests compare the paths; each gives the same integers).
int sketch_simd() {
  static const int best = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                  __builtin_cpu_supports("avx512vnni")
                              ? 2
                              : __builtin_cpu_supports("avx2") ? 1 : 0;
  const char* scan = std::getenv("KVPASS_SKETCH_SCAN");
  if (scan && std::string(scan) == "portable") return 0;
  if (scan && std::string(scan) == "avx2") return std::min(best, 1);
  return best;
}
#else
int sketch_simd() { return 0; }
#endif

// Sketch scores of tiles [t0, t1) of (b, hk) for the unit's G·Tq rows, into the sink.
void sketch_scan(const Problem& P, int64_t b, int64_t hk, int64_t t0, int64_t t1, const ScanSink& o) {
  const int32_t* qw = P.sk_qw.data() + sketch_qw_offset(P, b, hk);
  // a tile is 16 keys x sk_words words of 4 bytes; chunks of one unit may be scanned by several threads
  __atomic_fetch_add(P.reads + (b * P.Hkv + hk) * kReads + kCodeBytes, (t1 - t0) * 64 * P.sk_words,
                     __ATOMIC_RELAXED);
#if defined(__x86_64__) && defined(__GNUC__)
  if (P.sk_simd == 2) {
    if (P.sk_bits == 4) return sketch_scan_vnni<true>(P, b, hk, t0, t1, qw, o);
    return sketch_scan_vnni<false>(P, b, hk, t0, t1, qw, o);
  }
  if (P.sk_simd == 1) {
    if (P.sk_bits == 4) return sketch_scan_avx2<true>(P, b, hk, t0, t1, qw, o);
    return sketch_scan_avx2<false>(P, b, hk, t0, t1, qw, o);
  }
#endif
  sketch_scan_portable(P, b, hk, t0, t1, qw, o);
}

// Every score of tiles [t0, t1) for the unit's rows, stored at scores [G·Tq][n_keys].
void sketch_scan_all(const Problem& P, int64_t b, int64_t hk, int64_t t0, int64_t t1, float* scores) {
  ScanSink o;
  o.out = scores, o.stride = P.n_keys;
  sketch_scan(P, b, hk, t0, t1, o);
}

// Sketch work units.  When the (batch row, kv head) units spread evenly over the threads (or are many),
// each is one unit: a thread scans its keys (scan_unit: into its own buffer, or listing only the keys
// above each row's threshold) and attends its rows right away — no shared score array written to memory
// and read back, no barrier between scanning and attending.  Otherwise (SmolLM2's 3 kv heads on 2 threads; one kv head)
// the scan is split in key chunks over all threads, into one shared array, then the rows are attended.
bool sketch_group_units(int64_t units, int64_t threads) {
  return units % threads == 0 || units >= 4 * threads;
}

// One group unit's scan.  From kSampleMin keys on, listed: each row's threshold from 64 sampled tiles (the
// 1024 scores of the runs top_positions samples: sample_run), then one scan that keeps only the keys
// at or above it, with their scores — no row's scores are written whole and read back.  A row whose list
// came out shorter than the budget (an unrepresentative sample) gets every score (skg) and top_positions.
void scan_unit(const Problem& P, int64_t b, int64_t hk, Scratch& s) {
  const int64_t lo = row_lo_of(P, b);  // keys before it: left padding, never chosen
  const int64_t R = P.G * P.Tq, n = P.n_keys, tiles = (n + 15) / 16, m = std::min(candidates_of(P, b), n - lo);
  s.listed.assign(R, 0);
  auto all = [&]() {
    if (s.skg_cap < R * n) s.skg.reset(new float[R * n]), s.skg_cap = R * n;
    sketch_scan_all(P, b, hk, 0, tiles, s.skg.get());
  };
  if (n < kSampleMin || m >= n - lo || !P.sk_listed) return all();
  const int64_t per_row = kSampleLines * kLine;
  s.samp.resize(R * per_row);
  for (int64_t c = 0; c < kSampleLines; ++c) {  // run c's 16 scores at columns [16 c, 16 c + 16)
    const int64_t tile = sample_run(c, n) / 16;
    ScanSink o;
    o.out = s.samp.data(), o.stride = per_row, o.key0 = sample_run(c, n) - c * kLine;
    sketch_scan(P, b, hk, tile, tile + 1, o);
  }
  s.tau.resize(R);
  for (int64_t r = 0; r < R; ++r) {
    s.top.sample.resize(per_row);
    for (int64_t i = 0; i < per_row; ++i) s.top.sample[i] = float_key(s.samp[r * per_row + i]);
    s.tau[r] = sample_threshold(s.top.sample, n, m);
  }
  const int64_t cap = n + 16;
  if (s.l_cap < R * cap) s.lpos.reset(new int32_t[R * cap]), s.lsc.reset(new float[R * cap]), s.l_cap = R * cap;
  s.lcnt.assign(R, 0);
  ScanSink o;
  o.tau = s.tau.data(), o.pos = s.lpos.get(), o.sc = s.lsc.get(), o.cnt = s.lcnt.data(), o.cap = cap;
  sketch_scan(P, b, hk, 0, tiles, o);
  bool short_list = false;
  for (int64_t r = 0; r < R; ++r) {  // a row's list must hold m of its own keys (past the padding)
    const int32_t* at = s.lpos.get() + r * cap;
    const int64_t own = s.lcnt[r] - (std::lower_bound(at, at + s.lcnt[r], int32_t(lo)) - at);
    short_list |= !(s.listed[r] = own >= m);
  }
  if (short_list) all();
}

// Tables per hashing work unit.  (batch row, kv head) units alone leave threads idle when there are
// fewer of them than threads, or a count that does not divide evenly (SmolLM2: 3 kv heads on 2 threads;
// one kv head; Llama's 8 on a 32-core host): then each unit's tables are split into chunks of whole
// 16-column tiles (K = 10: multiples of 8 tables), about 4 units per thread.  Otherwise one chunk per
// unit, which streams R in one sweep.  Each code is the same sum in the same order either way.
int64_t hash_chunk_tables(int64_t K, int64_t L, int64_t units, int64_t threads) {
  if (units % threads == 0 || units >= 4 * threads) return L;
  const int64_t per_tile = 16 / std::gcd<int64_t>(K, 16);  // tables per whole number of tiles
  const int64_t want = (4 * threads + units - 1) / units;  // chunks per unit
  const int64_t t = (L + want - 1) / want;
  return std::min(L, (t + per_tile - 1) / per_tile * per_tile);
}

KVPASS_CLONES void row_f32(const Problem& P, int64_t b, int64_t h, int64_t t, Scratch& s) {
  row<float>(P, b, h, t, s);
}
KVPASS_CLONES void row_bf16(const Problem& P, int64_t b, int64_t h, int64_t t, Scratch& s) {
  row<c10::BFloat16>(P, b, h, t, s);
}
KVPASS_CLONES void row_f16(const Problem& P, int64_t b, int64_t h, int64_t t, Scratch& s) {
  row<c10::Half>(P, b, h, t, s);
}

// The distinct K and V rows of `n_units` units from u0 on, into P.reads, from their bitmaps ([unit][2][words]:
// K then V, a bit per key, set by row's `mark`).  One thread per unit: plain stores.
void reads_count(const Problem& P, const uint64_t* seen, int64_t u0, int64_t n_units) {
  const int64_t words = reads_words(P);
  for (int64_t u = 0; u < n_units; ++u)
    for (int kind = 0; kind < 2; ++kind) {
      const uint64_t* m = seen + (u * 2 + kind) * words;
      int64_t n = 0;
      for (int64_t w = 0; w < words; ++w) n += __builtin_popcountll(m[w]);
      P.reads[(u0 + u) * kReads + kKRows + kind] = n;
    }
}

// The SIMD-cloned functions are the per-row ones: an OpenMP region's outlined body would not inherit
// a clone's target, so the parallel loop stays outside them.
void run_rows(const Problem& P, at::ScalarType dtype) {
  auto* fn = dtype == at::kFloat ? &row_f32 : dtype == at::kBFloat16 ? &row_bf16 : &row_f16;
  const int64_t rows = P.B * P.H * P.Tq, tiles = (P.n_keys + 15) / 16;
  const bool sketch = !P.skb.empty();
  const int64_t units = P.B * P.Hkv, words = reads_words(P);
  std::vector<const uint64_t*> seen_of(std::max(P.threads, 1));  // each thread's bitmaps (rows over threads)
#pragma omp parallel num_threads(P.threads)
  {
    Scratch s;
    // each key enters each list at most once (+1: the branch-free stores write one slot past the end
    // before deciding to keep it)
    s.cand.resize(P.n_keys + 1);
    const bool lsh = P.estimator != kOracle && !sketch;
    if (lsh && P.T > 2) {
      s.count.assign(P.n_keys, 0);
      s.touched.resize(P.n_keys + 1);
    }
    if (lsh && P.T <= 2) {
      s.seen.assign(2 * ((kMaxSegment + 63) / 64), 0);
    }
    s.tail_count.resize(std::max<int64_t>(P.tail_len, 1));
    if (sketch && P.sk_group) {  // one unit per (batch row, kv head): scan, then its rows
      const int64_t unit_rows = P.G * P.Tq;
      s.seen_rows.resize(2 * words);
#pragma omp for collapse(2) schedule(dynamic, 1)
      for (int64_t b = 0; b < P.B; ++b)
        for (int64_t hk = 0; hk < P.Hkv; ++hk) {
          s.seen_unit0 = b * P.Hkv + hk;  // the unit's rows are all this thread's: its counts are final below
          std::fill(s.seen_rows.begin(), s.seen_rows.end(), 0);
          scan_unit(P, b, hk, s);
          for (int64_t i = 0; i < unit_rows; ++i) {
            if (s.listed[i]) {
              s.list_pos = s.lpos.get() + i * (P.n_keys + 16), s.list_sc = s.lsc.get() + i * (P.n_keys + 16);
              s.list_n = s.lcnt[i];
            } else {
              s.list_n = -1, s.sk_row = s.skg.get() + i * P.n_keys;
            }
            fn(P, b, hk * P.G + i / P.Tq, i % P.Tq, s);
          }
          reads_count(P, s.seen_rows.data(), s.seen_unit0, 1);
        }
    } else {
      s.seen_rows.assign(2 * words * units, 0);  // any thread may attend any row: every unit's bitmaps
      s.seen_unit0 = 0;
      seen_of[omp_get_thread_num()] = s.seen_rows.data();
      if (sketch) {  // sketch scores of every key for every row, in chunks of 128 tiles (2048 keys)
        constexpr int64_t kTiles = 128;
        const int64_t n_chunks = (tiles + kTiles - 1) / kTiles;
#pragma omp for collapse(3) schedule(dynamic, 1)
        for (int64_t b = 0; b < P.B; ++b)
          for (int64_t hk = 0; hk < P.Hkv; ++hk)
            for (int64_t c = 0; c < n_chunks; ++c)
              sketch_scan_all(P, b, hk, c * kTiles, std::min(tiles, (c + 1) * kTiles),
                          P.sk_score + (b * P.H + hk * P.G) * P.Tq * P.n_keys);
      } else if (P.estimator != kOracle) {
        const int64_t chunk = hash_chunk_tables(P.K, P.L, P.B * P.Hkv, omp_get_num_threads());
        const int64_t n_chunks = (P.L + chunk - 1) / chunk;
#pragma omp for collapse(3) schedule(static)
        for (int64_t b = 0; b < P.B; ++b)
          for (int64_t hk = 0; hk < P.Hkv; ++hk)
            for (int64_t c = 0; c < n_chunks; ++c)
              hash_queries(P, b, hk, c * chunk, std::min(P.L, (c + 1) * chunk), s.proj, s.qpad);
      }  // (the implicit barrier: every row's codes / scores exist before retrieval starts)
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t t = i % P.Tq, h = (i / P.Tq) % P.H, b = i / (P.Tq * P.H);
        if (sketch) s.sk_row = P.sk_score + i * P.n_keys;
        fn(P, b, h, t, s);
      }  // (the implicit barrier: every thread's bitmaps are complete)
      // a key read by rows of several threads counts once: OR the team's bitmaps, each thread a range of units
      const int team = omp_get_num_threads();
      std::vector<uint64_t> merged(2 * words);
#pragma omp for schedule(static)
      for (int64_t u = 0; u < units; ++u) {
        std::fill(merged.begin(), merged.end(), 0);
        for (int th = 0; th < team; ++th) {
          const uint64_t* m = seen_of[th] + u * 2 * words;
          for (int64_t w = 0; w < 2 * words; ++w) merged[w] |= m[w];
        }
        reads_count(P, merged.data(), u, 1);
      }
    }
  }
}

constexpr int64_t kSketchPage = 64;  // keys per sketch page when the sketch blocks' starts are given

// The first key of each host block: `starts` (int64 [n_blocks], ascending from 0, each a multiple of `page`:
// a forked store's blocks start where its own tokens do, after the blocks it shares), or i · page when
// absent (every block full but the last).  Block i then holds keys [start_i, start_{i+1}) — the last
// [start, n_keys) — from its token 0 (dimension 2, unit = 1 token, or `unit` for tiled sketch blocks).
std::vector<int64_t> host_block_starts(const char* fn, const char* what, at::TensorList blocks,
                                       const std::optional<at::Tensor>& starts, int64_t page, int64_t n_keys,
                                       int64_t unit = 1) {
  const int64_t nb = blocks.size();
  std::vector<int64_t> st(nb);
  if (starts.has_value()) {
    const auto s = starts->to(at::kLong).contiguous();
    TORCH_CHECK(s.device().is_cpu() && s.dim() == 1 && s.size(0) == nb, fn, what, "' starts must be int64 [",
                nb, "] on the CPU, got ", s.sizes());
    std::copy(s.data_ptr<int64_t>(), s.data_ptr<int64_t>() + nb, st.begin());
  } else {
    for (int64_t i = 0; i < nb; ++i) st[i] = i * page;
  }
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t end = i + 1 < nb ? st[i + 1] : std::max(n_keys, st[i]);
    TORCH_CHECK(st[i] % page == 0 && (i > 0 || st[i] == 0) && (i + 1 == nb ? end >= st[i] : end > st[i]) &&
                    end - st[i] <= blocks[i].size(2) * unit, fn, what, " ", i, " starts at key ", st[i],
                " and holds ", blocks[i].size(2) * unit, " keys: the starts must rise from 0 in multiples of ", page,
                " and each block must hold the keys up to the next start");
  }
  TORCH_CHECK(n_keys >= 0 && n_keys < (int64_t(1) << 31) && (nb ? st[nb - 1] + blocks[nb - 1].size(2) * unit : 0) >= n_keys,
              fn, n_keys, " keys do not fit the ", nb, " ", what);
  return st;
}

// Per page of `page` keys, the address of its first key (at batch row 0, kv head 0): the kernel finds key
// j at page j / page, row j % page (every block shares the strides).
std::vector<const void*> page_table(at::TensorList blocks, const std::vector<int64_t>& starts, int64_t page,
                                    int64_t n_keys) {
  std::vector<const void*> ptr((n_keys + page - 1) / page);
  size_t i = 0;
  for (int64_t p = 0; p < int64_t(ptr.size()); ++p) {
    while (i + 1 < starts.size() && starts[i + 1] <= p * page) ++i;
    const auto& t = blocks[i];
    // tiled sketch blocks ([B, Hkv, tiles, words, 16, 4]): dimension 2 counts tiles of 16 keys
    const int64_t rows = t.dim() == 6 ? (p * page - starts[i]) / 16 : p * page - starts[i];
    ptr[p] = static_cast<const char*>(t.data_ptr()) + rows * t.stride(2) * t.element_size();
  }
  return ptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lsh_attention(
    const at::Tensor& q, const at::Tensor& proj, const at::Tensor& mu, at::TensorList k_blocks,
    at::TensorList v_blocks, int64_t block_size, int64_t n_keys, at::TensorList seg_ids,
    at::TensorList seg_starts, const at::Tensor& seg_meta, const at::Tensor& tail_codes, int64_t tail_base,
    int64_t tail_len, int64_t lsh_k, int64_t threshold, c10::string_view estimator_name, int64_t budget, double scale,
    const std::optional<at::Tensor>& static_k, const std::optional<at::Tensor>& static_v,
    const std::optional<at::Tensor>& static_allowed, std::optional<at::TensorList> sketch_blocks,
    const std::optional<at::Tensor>& sketch_query, int64_t sketch_bits, int64_t threads,
    const std::optional<at::Tensor>& row_lo, const std::optional<at::Tensor>& row_budget, double softcap,
    int64_t stride, const std::optional<at::Tensor>& stride_offset, const std::optional<at::Tensor>& block_starts,
    const std::optional<at::Tensor>& sketch_starts) {
  const char* fn = "kvpass_cpu.lsh_attention: ";
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.device().is_cpu(), fn,
              "q must be a [B, H, Tq, D] float32 CPU tensor, got ", q.sizes(), " ", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3);
  TORCH_CHECK(proj.dim() == 3 && proj.size(1) == D && proj.size(2) % lsh_k == 0 && proj.scalar_type() == at::kBFloat16,
              fn, "proj must be bfloat16 [Hkv, D, lsh_k * lsh_l], got ", proj.sizes(), " ", proj.scalar_type());
  const int64_t L = proj.size(2) / lsh_k;
  TORCH_CHECK(mu.dim() == 3 && mu.size(0) == B && mu.size(2) == D && mu.scalar_type() == at::kFloat &&
                  mu.size(1) == proj.size(0), fn, "mu must be float32 [B, Hkv, D], got ", mu.sizes());
  const int64_t Hkv = mu.size(1);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, fn, H, " query heads are not a multiple of ", Hkv, " kv heads");
  const Estimator estimator = parse_estimator(std::string(estimator_name));
  TORCH_CHECK(lsh_k >= 1 && lsh_k <= 16 && threshold >= 1 && threshold <= L && threshold <= 255, fn,
              "need 1 <= lsh_k <= 16 and 1 <= lsh_threshold <= min(lsh_l, 255), got lsh_k=", lsh_k,
              " lsh_threshold=", threshold, " lsh_l=", L);
  TORCH_CHECK(k_blocks.size() == v_blocks.size(), fn, "key and value block counts differ");
  TORCH_CHECK(block_size >= 1, fn, "block_size must be >= 1, got ", block_size);
  const auto kv_starts = host_block_starts(fn, "k_blocks", k_blocks, block_starts, block_size, n_keys);
  auto out = at::empty({B, H, Tq, D}, q.options());
  auto lse = at::empty({B, H, Tq}, q.options());
  auto n_read = at::zeros({B, H, Tq}, q.options().dtype(at::kInt));
  auto n_kept = at::zeros({B, H, Tq}, q.options().dtype(at::kInt));
  auto q_codes = at::zeros({B, H, Tq, L}, q.options().dtype(at::kInt));
  auto reads = at::zeros({B, Hkv, kReads}, q.options().dtype(at::kLong));
  const bool fuse_static = static_k.has_value();
  TORCH_CHECK(fuse_static == static_v.has_value() && fuse_static == static_allowed.has_value(), fn,
              "static_k, static_v and static_allowed come together");
  if (n_keys == 0 && !fuse_static) {
    out.zero_();
    lse.fill_(kNegInf);
    return {out, lse, n_read, n_kept, q_codes, reads};
  }
  const auto dtype = fuse_static ? static_k->scalar_type() : k_blocks[0].scalar_type();
  for (size_t i = 0; i < k_blocks.size(); ++i) {
    const auto &k = k_blocks[i], &v = v_blocks[i];
    TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu() && k.dim() == 4 && v.dim() == 4 &&
                    k.size(0) == B && k.size(1) == Hkv && k.size(3) == D && v.sizes() == k.sizes(),
                fn, "block ", i, " must be CPU [B, Hkv, n, D] = [", B, ", ", Hkv, ", n, ", D, "], got ",
                k.sizes(), " / ", v.sizes());
    TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, fn, "all blocks must share one dtype");
    TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.strides() == k_blocks[0].strides() &&
                    v.strides() == v_blocks[0].strides(), fn, "blocks must share strides, head_dim contiguous");
  }
  TORCH_CHECK(seg_ids.size() == seg_starts.size() && seg_meta.dim() == 2 &&
                  seg_meta.size(0) == int64_t(seg_ids.size()) && seg_meta.size(1) == 2 &&
                  seg_meta.scalar_type() == at::kLong, fn, "seg_meta must be int64 [num_segments, 2] (base, n)");
  TORCH_CHECK(tail_codes.dim() == 4 && tail_codes.scalar_type() == at::kShort && tail_codes.size(0) == B &&
                  tail_codes.size(1) == Hkv && tail_codes.size(2) == L && tail_codes.is_contiguous() &&
                  tail_len <= tail_codes.size(3), fn, "tail_codes must be contiguous int16 [B, Hkv, L, cap]");

  at::Tensor allowed_c;
  if (fuse_static) {
    const auto &sk = *static_k, &sv = *static_v;
    TORCH_CHECK(sk.device().is_cpu() && sk.dim() == 4 && sk.size(0) == B && sk.size(1) == Hkv && sk.size(3) == D &&
                    sv.sizes() == sk.sizes() && sk.scalar_type() == dtype && sv.scalar_type() == dtype &&
                    sk.stride(3) == 1 && sv.stride(3) == 1, fn, "static_k/static_v must be CPU [B, Hkv, NS, D] "
                "in the KV dtype, head_dim contiguous; got ", sk.sizes());
    allowed_c = static_allowed->to(at::kBool).contiguous();
    const bool per_row = allowed_c.dim() == 3;
    TORCH_CHECK((allowed_c.dim() == 2 || (per_row && allowed_c.size(0) == B)) && allowed_c.size(-2) == Tq &&
                    allowed_c.size(-1) == sk.size(2), fn, "static_allowed must be bool [Tq, NS] or [B, Tq, NS], got ",
                allowed_c.sizes());
  }
  at::Tensor row_lo_c, row_budget_c;
  if (row_budget.has_value()) {
    row_budget_c = row_budget->to(at::kLong).contiguous();
    TORCH_CHECK(row_budget_c.dim() == 1 && row_budget_c.size(0) == B && row_budget_c.device().is_cpu() &&
                    (B == 0 || row_budget_c.min().item<int64_t>() >= 0), fn,
                "row_budget must be int64 [B] >= 0 on the CPU, got ", row_budget_c.sizes());
  }
  if (row_lo.has_value()) {
    row_lo_c = row_lo->to(at::kLong).contiguous();
    TORCH_CHECK(row_lo_c.dim() == 1 && row_lo_c.size(0) == B && row_lo_c.device().is_cpu(), fn,
                "row_lo must be int64 [B] on the CPU, got ", row_lo_c.sizes());
    TORCH_CHECK(B == 0 || (row_lo_c.min().item<int64_t>() >= 0 && row_lo_c.max().item<int64_t>() <= n_keys), fn,
                "row_lo must lie in [0, n_keys = ", n_keys, "]");
  }

  Problem P;
  if (fuse_static) {
    P.sk = static_k->data_ptr(), P.sv = static_v->data_ptr(), P.s_allowed = allowed_c.data_ptr<bool>();
    P.NS = static_k->size(2);
    P.s_allowed_b = allowed_c.dim() == 3 ? Tq * P.NS : 0;
    P.sk_s0 = static_k->stride(0), P.sk_s1 = static_k->stride(1), P.sk_s2 = static_k->stride(2);
    P.sv_s0 = static_v->stride(0), P.sv_s1 = static_v->stride(1), P.sv_s2 = static_v->stride(2);
  }
  P.B = B, P.H = H, P.Hkv = Hkv, P.G = H / Hkv, P.Tq = Tq, P.D = D, P.L = L, P.K = lsh_k, P.T = threshold;
  P.n_keys = n_keys, P.block_size = block_size, P.budget = budget, P.estimator = estimator;
  P.tail_base = tail_base, P.tail_len = tail_len, P.tail_cap = tail_codes.size(3);
  P.scale = float(scale);
  P.softcap = float(softcap);
  const auto qc = q.contiguous(), projc = proj.contiguous(), muc = mu.contiguous();
  P.q = qc.data_ptr<float>(), P.proj = projc.data_ptr<c10::BFloat16>(), P.qcode = q_codes.data_ptr<int32_t>();
  P.mu = muc.data_ptr<float>();
  P.tail = reinterpret_cast<const uint16_t*>(tail_codes.data_ptr<int16_t>());
  if (row_lo_c.defined()) P.row_lo = row_lo_c.data_ptr<int64_t>();
  if (row_budget_c.defined()) P.row_budget = row_budget_c.data_ptr<int64_t>();
  P.logp = logp_table(lsh_k, L, threshold).data();
  const int64_t* meta = seg_meta.data_ptr<int64_t>();
  for (size_t i = 0; i < seg_ids.size(); ++i) {
    const auto &ids = seg_ids[i], &st = seg_starts[i];
    const int64_t base = meta[2 * i], n = meta[2 * i + 1];
    const int w = id_width(n);
    TORCH_CHECK(ids.is_contiguous() && st.is_contiguous() && ids.scalar_type() == at::kByte &&
                    st.scalar_type() == at::kShort && ids.dim() == 4 && st.dim() == 4 &&
                    ids.size(2) == L && st.size(3) == (int64_t(1) << lsh_k) && ids.size(3) == packed_bytes(n, w) &&
                    base >= 0 && base + n <= n_keys, fn, "segment ", i, " does not match its metadata");
    P.segs.push_back({ids.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(st.data_ptr<int16_t>()), base, n,
                      ids.size(3), w});
  }
  TORCH_CHECK(tail_base + tail_len <= n_keys, fn, "tail exceeds the stored keys");
  P.kb = page_table(k_blocks, kv_starts, block_size, n_keys);
  P.vb = page_table(v_blocks, kv_starts, block_size, n_keys);
  if (!k_blocks.empty()) {
    P.kb_s0 = k_blocks[0].stride(0), P.kb_s1 = k_blocks[0].stride(1), P.kb_s2 = k_blocks[0].stride(2);
    P.vb_s0 = v_blocks[0].stride(0), P.vb_s1 = v_blocks[0].stride(1), P.vb_s2 = v_blocks[0].stride(2);
  }
  P.out = out.data_ptr<float>(), P.lse = lse.data_ptr<float>(), P.n_read = n_read.data_ptr<int32_t>();
  P.n_kept = n_kept.data_ptr<int32_t>();
  at::Tensor stride_off_c;
  TORCH_CHECK(stride >= 0, fn, "stride must be >= 0 (0: no tail sample), got ", stride);
  if (stride > 0) {
    TORCH_CHECK(estimator != kSample, fn, "the tail sample (stride > 0) goes with 'topk' or 'oracle', not 'sample'");
    TORCH_CHECK(stride_offset.has_value(), fn, "stride > 0 needs stride_offset, int64 [B, Hkv]");
    stride_off_c = stride_offset->to(at::kLong).contiguous();
    TORCH_CHECK(stride_off_c.device().is_cpu() && stride_off_c.dim() == 2 && stride_off_c.size(0) == B &&
                    stride_off_c.size(1) == Hkv, fn, "stride_offset must be int64 [B, Hkv] = [", B, ", ", Hkv,
                "] on the CPU, got ", stride_off_c.sizes());
    TORCH_CHECK(stride_off_c.numel() == 0 ||
                    (stride_off_c.min().item<int64_t>() >= 0 && stride_off_c.max().item<int64_t>() < stride),
                fn, "stride_offset must lie in [0, stride = ", stride, ")");
    P.stride = stride, P.stride_off = stride_off_c.data_ptr<int64_t>();
  }
  TORCH_CHECK(threads >= 0, fn, "threads must be >= 0 (0: OpenMP's default), got ", threads);
  P.threads = threads > 0 ? int(threads) : omp_get_max_threads();
  at::Tensor sk_score, sk_q;
  if (sketch_blocks.has_value() && !sketch_blocks->empty() && estimator == kTopK) {
    const auto& blocks = *sketch_blocks;
    TORCH_CHECK(sketch_query.has_value() && sketch_query->scalar_type() == at::kFloat &&
                    sketch_query->sizes() == q.sizes(), fn, "sketch_query must be float32 [B, H, Tq, D] = ",
                q.sizes(), "; got ", sketch_query.has_value() ? sketch_query->sizes() : at::IntArrayRef{});
    TORCH_CHECK(sketch_bits == 8 || sketch_bits == 4, fn, "sketch_bits must be 8 or 4, got ", sketch_bits);
    TORCH_CHECK(D <= 512, fn, "the sketch needs head_dim <= 512");
    P.sk_bits = sketch_bits;
    P.sk_words = sketch_bits == 8 ? (D + 3) / 4 : (D + 7) / 8;
    P.sk_qwords = sketch_bits == 8 ? P.sk_words : 2 * P.sk_words;
    const int64_t tiles = blocks[0].dim() == 6 ? blocks[0].size(2) : 0, D4 = P.sk_words;
    for (size_t i = 0; i < blocks.size(); ++i)
      TORCH_CHECK(blocks[i].scalar_type() == at::kChar && blocks[i].dim() == 6 && blocks[i].size(0) == B &&
                      blocks[i].size(1) == Hkv && blocks[i].size(2) == tiles && blocks[i].size(3) == D4 &&
                      blocks[i].size(4) == 16 && blocks[i].size(5) == 4 && blocks[i].stride(5) == 1 &&
                      blocks[i].stride(4) == 4 && blocks[i].stride(3) == 64 && blocks[i].stride(2) == 64 * D4 &&
                      blocks[i].strides() == blocks[0].strides(), fn,
                  "sketch block ", i, " must be int8 [B, Hkv, tiles, words, 16, 4] = [", B, ", ", Hkv, ", ",
                  tiles, ", ", D4, ", 16, 4], tiles contiguous, with the others' strides; got ", blocks[i].sizes(),
                  " ", blocks[i].scalar_type());
    // pages of one block each, or (sketch_starts) of kSketchPage keys: a fork's blocks start on such a page
    const int64_t sk_page = sketch_starts.has_value() ? kSketchPage : tiles * 16;
    TORCH_CHECK(tiles > 0, fn, "sketch blocks must hold at least one tile");
    const auto sk_starts = host_block_starts(fn, "sketch_blocks", blocks, sketch_starts, sk_page, n_keys, 16);
    for (const void* t : page_table(blocks, sk_starts, sk_page, n_keys)) P.skb.push_back(static_cast<const int8_t*>(t));
    P.skb_s0 = blocks[0].stride(0), P.skb_s1 = blocks[0].stride(1), P.sk_tiles = sk_page / 16;
    sk_q = sketch_query->contiguous();
    P.sk_q = sk_q.data_ptr<float>();
    P.candidates = std::max<int64_t>(budget, 1);
    P.sk_simd = sketch_simd();
    P.sk_qw.resize(B * H * Tq * P.sk_qwords);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t hk = 0; hk < Hkv; ++hk) sketch_query_words(P, b, hk, P.sk_qw.data() + sketch_qw_offset(P, b, hk));
    if (P.sk_simd == 1 && P.sk_bits == 8) {  // once a call, not once per scanned range (sketch_tile_avx2)
      const int8_t* qb = reinterpret_cast<const int8_t*>(P.sk_qw.data());
      P.sk_qbias.assign(B * H * Tq, 0);
      for (int64_t r = 0; r < B * H * Tq; ++r)
        for (int64_t i = 0; i < 4 * P.sk_qwords; ++i) P.sk_qbias[r] += 128 * int32_t(qb[r * 4 * P.sk_qwords + i]);
    }
    P.sk_group = sketch_group_units(B * Hkv, P.threads);
    const char* select = std::getenv("KVPASS_SKETCH_SELECT");  // "scores": every score stored (tests, A/B)
    P.sk_listed = !(select && std::string(select) == "scores");
    if (!P.sk_group) {
      sk_score = at::empty({B * H * Tq, std::max<int64_t>(n_keys, 1)}, q.options());
      P.sk_score = sk_score.data_ptr<float>();
    }
  }
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, fn, "KV dtype ", dtype,
              " is not supported (float32, bfloat16, float16)");
  P.reads = reads.data_ptr<int64_t>();
  run_rows(P, dtype);
  return {out, lse, n_read, n_kept, q_codes, reads};
}

// SimHash codes from projections y [..., K·L] (float32): code_l = Σ_j [y[lK + j] > 0] << j, int32 [..., L].
// The same bits as runtime/lsh.hash_codes' torch packing (a comparison, then a sum of powers of two),
// in one pass over y instead of several full-size temporaries: that packing was most of the cost of
// hashing a prompt on the CPU (SmolLM2, 2k tokens: 1.5 of 2.2 s over 30 layers).
at::Tensor sign_codes(const at::Tensor& y_in, int64_t K) {
  const char* fn = "kvpass_cpu.sign_codes: ";
  TORCH_CHECK(y_in.scalar_type() == at::kFloat && y_in.device().is_cpu() && y_in.dim() >= 1, fn,
              "y must be a float32 CPU tensor [..., lsh_k * lsh_l], got ", y_in.sizes(), " ", y_in.scalar_type());
  TORCH_CHECK(K >= 1 && K <= 16 && y_in.size(-1) % K == 0, fn, "the last dimension (", y_in.size(-1),
              ") must be a multiple of lsh_k = ", K, " (1 <= lsh_k <= 16)");
  const auto y = y_in.contiguous();
  const int64_t KL = y.size(-1), L = KL / K, rows = KL ? y.numel() / KL : 0;
  auto sizes = y.sizes().vec();
  sizes.back() = L;
  auto out = at::empty(sizes, y.options().dtype(at::kInt));
  const float* yp = y.data_ptr<float>();
  int32_t* op = out.data_ptr<int32_t>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* yr = yp + r * KL;
    int32_t* o = op + r * L;
    for (int64_t l = 0; l < L; ++l) o[l] = sign_code(yr + l * K, K);
  }
  return out;
}

at::Tensor log_retrieval_probability_op(const at::Tensor& cos_theta, int64_t K, int64_t L, int64_t T) {
  auto c = cos_theta.to(at::kDouble).contiguous();
  auto out = at::empty_like(c);
  const double* cp = c.data_ptr<double>();
  double* op = out.data_ptr<double>();
  for (int64_t i = 0; i < c.numel(); ++i) op[i] = log_retrieval_probability(cp[i], K, L, T);
  return out;
}

// The SIMD clone the dispatcher picks on this CPU: 2 = x86-64-v4 (AVX-512), 1 = v3 (AVX2+FMA), 0 = baseline.
int64_t simd_level() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("x86-64-v4")) return 2;
  if (__builtin_cpu_supports("x86-64-v3")) return 1;
#endif
  return 0;
}

}  // namespace
}  // namespace kvpass_cpu

TORCH_LIBRARY_FRAGMENT(kvpass_cpu, m) {
  m.def("lsh_build_segment(Tensor codes, int lsh_k) -> (Tensor, Tensor)");
  m.def("lsh_merge_segments(Tensor ids_a, Tensor starts_a, int n_a, Tensor ids_b, Tensor starts_b, int n_b) -> "
        "(Tensor, Tensor)");
  m.def("lsh_attention(Tensor q, Tensor proj, Tensor mu, Tensor[] k_blocks, Tensor[] v_blocks, int block_size, "
        "int n_keys, Tensor[] seg_ids, Tensor[] seg_starts, Tensor seg_meta, Tensor tail_codes, int tail_base, "
        "int tail_len, int lsh_k, int threshold, str estimator, int budget, float scale, Tensor? static_k=None, "
        "Tensor? static_v=None, Tensor? static_allowed=None, Tensor[]? sketch_blocks=None, Tensor? sketch_query=None, "
        "int sketch_bits=8, int threads=0, Tensor? row_lo=None, Tensor? row_budget=None, float softcap=0.0, "
        "int stride=0, Tensor? stride_offset=None, Tensor? block_starts=None, Tensor? sketch_starts=None) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("log_retrieval_probability(Tensor cos_theta, int lsh_k, int lsh_l, int threshold) -> Tensor");
  m.def("sign_codes(Tensor y, int lsh_k) -> Tensor");
  m.def("simd_level() -> int", &kvpass_cpu::simd_level);
}

TORCH_LIBRARY_IMPL(kvpass_cpu, CPU, m) {
  m.impl("lsh_build_segment", &kvpass_cpu::build_segment);
  m.impl("lsh_merge_segments", &kvpass_cpu::merge_segments);
  m.impl("lsh_attention", &kvpass_cpu::lsh_attention);
  m.impl("log_retrieval_probability", &kvpass_cpu::log_retrieval_probability_op);
  m.impl("sign_codes", &kvpass_cpu::sign_codes);
}
