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
//
// The stages live in files named for them, all in this one translation unit (the SIMD clones and the
// forced inlining need it): lsh_index.h (building the LSH index), select.h (choosing a row's best keys),
// problem.h (a call's state), rows.h (each query row's candidates, scores and attention; hashing the
// queries), sketch_scan.h (scanning the key sketch).  This file: the team that runs them (run_rows), the
// checked entry points and the bindings.
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

}  // namespace
}  // namespace kvpass_cpu

// the kernel's stages, in the order they depend on one another
#include "lsh_index.h"
#include "select.h"
#include "problem.h"
#include "rows.h"
#include "sketch_scan.h"

namespace kvpass_cpu {
namespace {

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
