// kvpass kernel state: one call's Problem (its inputs, outputs and counters) and a thread's Scratch.
//
// Part of the kernel's one translation unit: included by lsh_attention.cpp only, after its includes and
// common definitions (the SIMD clones and the forced inlining work within one unit).  Shared by every stage.
#pragma once

namespace kvpass_cpu {
namespace {

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

}  // namespace
}  // namespace kvpass_cpu
