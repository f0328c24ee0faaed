// kvpass row attention: per query row, its candidates (LSH retrieval, the sketch's best, or all), exact
// scores, the tail sample, online softmax over V; hashing the queries.
//
// Part of the kernel's one translation unit: included by lsh_attention.cpp only, after its includes and
// common definitions (the SIMD clones and the forced inlining work within one unit).  The team that runs it
// is run_rows in lsh_attention.cpp.
#pragma once

namespace kvpass_cpu {
namespace {

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

}  // namespace
}  // namespace kvpass_cpu
