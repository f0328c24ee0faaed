// kvpass code scan: the int4/int8 sketch of every key scored against a kv head's query rows (AVX512-VNNI,
// AVX2, portable), and a unit's scan with its sampled threshold.
//
// Part of the kernel's one translation unit: included by lsh_attention.cpp only, after its includes and
// common definitions (the SIMD clones and the forced inlining work within one unit).  Its selection is
// select.h.
#pragma once

namespace kvpass_cpu {
namespace {

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

}  // namespace
}  // namespace kvpass_cpu
