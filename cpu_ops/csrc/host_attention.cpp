// kvpass CPU attention kernel: one decode query block against KV that lives in host memory.
//
// Registration (TORCH_LIBRARY) sits at the bottom, apart from the inner loop.  The inner loop is plain
// C++ that the compiler vectorises; the per-head function is compiled for AVX-512, AVX2+FMA and
// baseline x86-64, and the one the CPU supports is picked at run time (GCC target_clones).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace kvpass_cpu {
namespace {

constexpr int64_t kTile = 128;  // keys scored per online-softmax step
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
inline __attribute__((always_inline)) void to_float_row(const T* src, float* dst, int64_t d) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]);
}

// State of the online softmax for `rows` query rows (the G query heads of one kv head times Tq).
struct RowState {
  std::vector<float> m, l, acc, s, kf, vf;
  RowState(int64_t rows, int64_t d)
      : m(rows, kNegInf), l(rows, 0.f), acc(rows * d, 0.f), s(rows * kTile), kf(kTile * d), vf(d) {}
};

// Folds keys [0, n) of one block (one batch row, one kv head) into the running state.
// k, v point at token 0 of the block; tokens are `k_stride` / `v_stride` elements apart.
template <typename T>
inline __attribute__((always_inline)) void fold_block(const float* q, int64_t rows, int64_t d, const T* k, int64_t k_stride, const T* v,
                int64_t v_stride, int64_t n, float scale, RowState& st) {
  for (int64_t j0 = 0; j0 < n; j0 += kTile) {
    const int64_t nt = std::min(kTile, n - j0);
    for (int64_t j = 0; j < nt; ++j) to_float_row(k + (j0 + j) * k_stride, st.kf.data() + j * d, d);
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = q + r * d;
      float* sr = st.s.data() + r * kTile;
      float tile_max = kNegInf;
      for (int64_t j = 0; j < nt; ++j) {
        const float* kj = st.kf.data() + j * d;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < d; ++i) dot += qr[i] * kj[i];
        sr[j] = dot * scale;
        tile_max = std::max(tile_max, sr[j]);
      }
      const float m_new = std::max(st.m[r], tile_max);
      // m_new is finite: scores of real keys are finite.
      const float corr = std::exp(st.m[r] - m_new);  // exp(-inf) = 0 on the first tile
      float* ar = st.acc.data() + r * d;
      for (int64_t i = 0; i < d; ++i) ar[i] *= corr;
      float sum = 0.f;
      for (int64_t j = 0; j < nt; ++j) {
        sr[j] = std::exp(sr[j] - m_new);
        sum += sr[j];
      }
      st.l[r] = st.l[r] * corr + sum;
      st.m[r] = m_new;
    }
    for (int64_t j = 0; j < nt; ++j) {
      to_float_row(v + (j0 + j) * v_stride, st.vf.data(), d);
      for (int64_t r = 0; r < rows; ++r) {
        const float p = st.s[r * kTile + j];
        float* ar = st.acc.data() + r * d;
        for (int64_t i = 0; i < d; ++i) ar[i] += p * st.vf[i];
      }
    }
  }
}

void check_inputs(const at::Tensor& q, const at::TensorList& kb, const at::TensorList& vb) {
  TORCH_CHECK(q.device().is_cpu(), "kvpass_cpu.host_attention: q must be on the CPU, got ", q.device());
  TORCH_CHECK(q.dim() == 4, "kvpass_cpu.host_attention: q must be [B, H, Tq, D], got ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat, "kvpass_cpu.host_attention: q must be float32, got ",
              q.scalar_type());
  TORCH_CHECK(kb.size() == vb.size(), "kvpass_cpu.host_attention: ", kb.size(), " key blocks but ",
              vb.size(), " value blocks");
  for (size_t i = 0; i < kb.size(); ++i) {
    const auto& k = kb[i];
    const auto& v = vb[i];
    TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu(), "kvpass_cpu.host_attention: block ", i,
                " is not on the CPU");
    TORCH_CHECK(k.dim() == 4 && v.dim() == 4, "kvpass_cpu.host_attention: block ", i,
                " must be [B, Hkv, N, D]");
    TORCH_CHECK(k.sizes() == v.sizes(), "kvpass_cpu.host_attention: key block ", i, " is ", k.sizes(),
                " but value block is ", v.sizes());
    TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), "kvpass_cpu.host_attention: block ",
                i, " ", k.sizes(), " does not match q ", q.sizes());
    TORCH_CHECK(q.size(1) % k.size(1) == 0, "kvpass_cpu.host_attention: ", q.size(1),
                " query heads are not a multiple of ", k.size(1), " kv heads");
    TORCH_CHECK(k.scalar_type() == kb[0].scalar_type() && v.scalar_type() == k.scalar_type(),
                "kvpass_cpu.host_attention: all blocks must share one dtype");
    TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "kvpass_cpu.host_attention: head_dim must be contiguous");
  }
}

struct Exact {
  const float* q;  // [B, H, Tq, D]
  float *out, *lse;
  int64_t H, Tq, D, G;
  float scale;
};

// One (batch row, kv head): its G*Tq query rows over every block.  Compiled per SIMD level (the
// OpenMP loop stays outside: an outlined parallel body would not inherit a clone's target).
template <typename T>
inline __attribute__((always_inline)) void head(const Exact& E, const at::TensorList& kb,
                                                const at::TensorList& vb, int64_t b, int64_t hk) {
  const int64_t rows = E.G * E.Tq, D = E.D;  // q[b, hk*G : (hk+1)*G] is contiguous: G*Tq rows of D
  RowState st(rows, D);
  const float* q = E.q + (b * E.H + hk * E.G) * E.Tq * D;
  for (size_t i = 0; i < kb.size(); ++i) {
    const auto& k = kb[i];
    const auto& v = vb[i];
    const int64_t n = k.size(2);
    if (n == 0) continue;
    const T* kp = k.data_ptr<T>() + b * k.stride(0) + hk * k.stride(1);
    const T* vp = v.data_ptr<T>() + b * v.stride(0) + hk * v.stride(1);
    fold_block<T>(q, rows, D, kp, k.stride(2), vp, v.stride(2), n, E.scale, st);
  }
  float* o = E.out + (b * E.H + hk * E.G) * E.Tq * D;
  float* ls = E.lse + (b * E.H + hk * E.G) * E.Tq;
  for (int64_t r = 0; r < rows; ++r) {
    if (st.l[r] > 0.f) {
      const float inv = 1.f / st.l[r];
      for (int64_t i = 0; i < D; ++i) o[r * D + i] = st.acc[r * D + i] * inv;
      ls[r] = st.m[r] + std::log(st.l[r]);
    } else {  // no keys: an empty set contributes nothing to the LSE merge
      for (int64_t i = 0; i < D; ++i) o[r * D + i] = 0.f;
      ls[r] = kNegInf;
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KVPASS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KVPASS_CLONES
#endif
using HeadFn = void (*)(const Exact&, const at::TensorList&, const at::TensorList&, int64_t, int64_t);
KVPASS_CLONES void head_f32(const Exact& E, const at::TensorList& k, const at::TensorList& v, int64_t b,
                            int64_t h) { head<float>(E, k, v, b, h); }
KVPASS_CLONES void head_bf16(const Exact& E, const at::TensorList& k, const at::TensorList& v, int64_t b,
                             int64_t h) { head<c10::BFloat16>(E, k, v, b, h); }
KVPASS_CLONES void head_f16(const Exact& E, const at::TensorList& k, const at::TensorList& v, int64_t b,
                            int64_t h) { head<c10::Half>(E, k, v, b, h); }

void run(HeadFn fn, const at::Tensor& qc, const at::TensorList& kb, const at::TensorList& vb, double scale,
         at::Tensor& out, at::Tensor& lse) {
  const int64_t B = qc.size(0), H = qc.size(1);
  const int64_t Hkv = kb.empty() ? H : kb[0].size(1);
  const Exact E{qc.data_ptr<float>(), out.data_ptr<float>(), lse.data_ptr<float>(), H, qc.size(2), qc.size(3),
                H / Hkv, static_cast<float>(scale)};
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t hk = 0; hk < Hkv; ++hk) fn(E, kb, vb, b, hk);
}

// out[b,h,t] = softmax_j(q[b,h,t]·k[b,h/G,j]·scale) · v[b,h/G,j] over the keys of every block,
// lse[b,h,t] = log Σ_j exp(q·k_j·scale).  q: [B,H,Tq,D] fp32; blocks: [B,Hkv,N_i,D] fp32/bf16/fp16.
std::tuple<at::Tensor, at::Tensor> host_attention(const at::Tensor& q, at::TensorList k_blocks,
                                                   at::TensorList v_blocks, double scale) {
  check_inputs(q, k_blocks, v_blocks);
  const auto qc = q.contiguous();
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const auto dtype = k_blocks.empty() ? at::kFloat : k_blocks[0].scalar_type();
  switch (dtype) {
    case at::kFloat: run(&head_f32, qc, k_blocks, v_blocks, scale, out, lse); break;
    case at::kBFloat16: run(&head_bf16, qc, k_blocks, v_blocks, scale, out, lse); break;
    case at::kHalf: run(&head_f16, qc, k_blocks, v_blocks, scale, out, lse); break;
    default: TORCH_CHECK(false, "kvpass_cpu.host_attention: KV dtype ", dtype,
                         " is not supported (float32, bfloat16, float16)");
  }
  return {out, lse};
}

}  // namespace
}  // namespace kvpass_cpu

TORCH_LIBRARY(kvpass_cpu, m) {
  m.def("host_attention(Tensor q, Tensor[] k_blocks, Tensor[] v_blocks, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kvpass_cpu, CPU, m) { m.impl("host_attention", &kvpass_cpu::host_attention); }
