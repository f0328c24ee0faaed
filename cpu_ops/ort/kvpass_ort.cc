// kvpass onnxruntime custom-op library: the `kvpass.DecodeStep` node of an exported decode step
// (onnx_lsh="custom"), computed on the CPU with sparse cost — retrieval by SimHash collisions, then only
// the retrieved host keys are read — instead of the portable translation's dense-cost standard ops.
//
// Built without onnxruntime's headers (the pip wheel ships none): onnxruntime's C ABI is two tables of
// function pointers that only ever grow at the end — `OrtApi` (reached through OrtApiBase::GetApi) and
// `OrtCustomOp` (filled in here) — so this file declares the few slots it uses by position.  The slot
// numbers are checked once at load (a status made by CreateStatus must read back through
// GetErrorCode/GetErrorMessage) and the library refuses to register when they do not hold.
//
// The node (one per attention site), state in the capacity layout (see lowering/decode_step.py):
//   inputs   q [B,H,1,D] f32, k_new/v_new [B,Hkv,1,D] f32, static_k/static_v [B,Hkv,S+W,D] f32,
//            host_k/host_v [B,Hkv,CAP,D] f32, codes [B,Hkv,CAP,L] i16 (K <= 15), mu [B,Hkv,D] f32,
//            proj [Hkv,D,K·L] f32, logp [16385] f32, position [] i64
//   attrs    sink_size, window_size, lsh_k, threshold, min_keys (int), estimator ("exact"|"sample"|"none"),
//            scale
//   outputs  out [B,H,1,D] f32, then static_k, static_v, host_k, host_v, codes, mu after the step.
// Host token i (< N = max(0, position - S - W) before the step) is position S + i; rows >= N are free
// capacity.  The step writes the token leaving the window (once the ring is full) to host row N, the new
// token to its slot (sink `position` below S, else the ring's), then attends: the filled static slots
// exactly, the host part by the estimator, one softmax over both.  As the runtime store: while fewer
// than min_keys tokens are offloaded there is no index (codes 0) and every host key is read exactly;
// the step that offloads the min_keys-th token builds it (mu = their mean, every code hashed).
// When an output is bound to its input's buffer (onnxruntime IOBinding), the state is updated in place
// (O(1) bytes written); otherwise the input is copied to the output first (plain ONNX semantics).
#include <omp.h>

#include "../csrc/kvpass_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>


extern "C" {
struct OrtStatus;
struct OrtSessionOptions;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtCustomOpDomain;
struct OrtApiBase {
  const void* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};
}

namespace {

// ---------------------------------------------------------------- the C ABI, by slot

// Positions in onnxruntime's OrtApi table (stable: the table is append-only since API version 1).
enum Slot : int {
  kCreateStatus = 0,
  kGetErrorCode = 1,
  kGetErrorMessage = 2,
  kCreateCustomOpDomain = 26,
  kCustomOpDomainAdd = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetTensorElementType = 60,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttributeFloat = 85,
  kKernelInfoGetAttributeInt64 = 86,
  kKernelInfoGetAttributeString = 87,
  kKernelContextGetInput = 90,
  kKernelContextGetOutput = 91,
  kReleaseStatus = 93,
  kReleaseTensorTypeAndShapeInfo = 99,
};

constexpr int kOrtFail = 1, kOrtInvalidArgument = 2;
constexpr int kFloat = 1, kInt16 = 5, kInt64 = 7;  // ONNX TensorProto element types

const void* const* g_api = nullptr;

template <typename F>
F fn(Slot s) {
  return reinterpret_cast<F>(g_api[s]);
}

OrtStatus* make_status(int code, const std::string& msg) {
  return fn<OrtStatus* (*)(int, const char*)>(kCreateStatus)(code, msg.c_str());
}

struct Error {
  std::string msg;
};

#define ORT_CHECK(call)                                                                       \
  do {                                                                                        \
    OrtStatus* st_ = (call);                                                                  \
    if (st_) {                                                                                \
      std::string m_ = fn<const char* (*)(const OrtStatus*)>(kGetErrorMessage)(st_);          \
      fn<void (*)(OrtStatus*)>(kReleaseStatus)(st_);                                          \
      throw Error{m_};                                                                        \
    }                                                                                         \
  } while (0)

struct Tensor {
  void* data = nullptr;
  int type = 0;
  std::vector<int64_t> shape;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

Tensor describe(const OrtValue* v) {
  Tensor t;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ORT_CHECK(fn<OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**)>(kGetTensorTypeAndShape)(v, &info));
  size_t nd = 0;
  OrtStatus* st = fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int*)>(kGetTensorElementType)(info, &t.type);
  if (!st) st = fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*)>(kGetDimensionsCount)(info, &nd);
  if (!st) {
    t.shape.resize(nd);
    st = fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)>(kGetDimensions)(info, t.shape.data(), nd);
  }
  fn<void (*)(OrtTensorTypeAndShapeInfo*)>(kReleaseTensorTypeAndShapeInfo)(info);
  ORT_CHECK(st);
  ORT_CHECK(fn<OrtStatus* (*)(OrtValue*, void**)>(kGetTensorMutableData)(const_cast<OrtValue*>(v), &t.data));
  return t;
}

// ---------------------------------------------------------------- the step

using kvpass_math::kTable;
enum Estimator { kExact, kSample, kNone };

struct Step {
  int64_t S, W, K, T, min_keys;
  Estimator est;
  float scale;
};

// SimHash codes of one row x [D] with the site's projection R [D, K·L]: bit j of table l = [x·R[:, lK+j] > 0].
KVPASS_CLONES void hash_row(const float* x, const float* R, int64_t D, int64_t K, int64_t L, float* y, int16_t* code) {
  const int64_t KL = K * L;
  std::fill(y, y + KL, 0.f);
  for (int64_t i = 0; i < D; ++i) {
    const float xi = x[i];
    const float* Ri = R + i * KL;
#pragma omp simd
    for (int64_t c = 0; c < KL; ++c) y[c] += xi * Ri[c];
  }
  for (int64_t l = 0; l < L; ++l) code[l] = int16_t(kvpass_math::sign_code(y + l * K, K));  // K <= 15 bits
}

struct Views {
  const float *q, *kn, *vn, *mu, *proj, *logp;
  float *sk, *sv, *hk, *hv, *out, *mu_out;
  int16_t* codes;
  int64_t B, H, Hkv, G, D, NS, CAP, L, N, filled;  // filled: static slots in use (the first ones)
};

constexpr int64_t kChunk = 2048;  // keys per retrieval task

// Retrieval for the G query heads of (batch row b, kv head hk) over host keys [j0, j1): one pass over
// the keys' codes for the whole group (the codes are the bytes this op streams; the group shares them),
// keys with >= T collisions appended to cand[g] in key order.
KVPASS_CLONES void retrieve_chunk(const Views& v, const Step& st, int64_t b, int64_t hk, int64_t j0, int64_t j1,
                                  const int16_t* qcodes, std::vector<int32_t>* cand) {
  const int64_t L = v.L, G = v.G;
  const int16_t* codes = v.codes + (b * v.Hkv + hk) * v.CAP * L;
  const int16_t* qc0 = qcodes + (b * v.H + hk * G) * L;
  for (int64_t j = j0; j < j1; ++j) {
    const int16_t* c = codes + j * L;
    for (int64_t g = 0; g < G; ++g) {
      const int16_t* want = qc0 + g * L;
      uint16_t hits = 0;  // L <= 65535: 16-bit lanes, twice as many per vector
#pragma omp simd reduction(+ : hits)
      for (int64_t l = 0; l < L; ++l) hits += c[l] == want[l];
      if (hits >= st.T) cand[g].push_back(int32_t(j));
    }
  }
}

// Attention of query head h of batch row b over the updated state: static slots (exact) and the host
// candidates (all keys 0..N for "exact"; the retrieved ones, weighted, for "sample"), one softmax.
KVPASS_CLONES void attend_row(const Views& v, const Step& st, int64_t b, int64_t h, const int32_t* cand, int64_t m,
                              std::vector<float>& score) {
  const int64_t D = v.D, hk = h / v.G, bh = b * v.Hkv + hk;
  const float* q = v.q + (b * v.H + h) * D;
  const float* sk = v.sk + bh * v.NS * D;
  const float* sv = v.sv + bh * v.NS * D;
  const float* hkey = v.hk + bh * v.CAP * D;
  const float* hval = v.hv + bh * v.CAP * D;
  const bool all = cand == nullptr;  // exact: keys 0..m-1
  float mx = kvpass_math::kNegInf;
  score.resize(v.NS + m);
  float* ss = score.data();
  for (int64_t j = 0; j < v.filled; ++j) {
    float qk = 0.f;
#pragma omp simd reduction(+ : qk)
    for (int64_t i = 0; i < D; ++i) qk += q[i] * sk[j * D + i];
    ss[j] = qk * st.scale;
    mx = std::max(mx, ss[j]);
  }
  float* hs = ss + v.NS;
  if (m > 0) {
    const float* mu = v.mu + bh * D;
    float qmu = 0.f, qq = 0.f, mumu = 0.f;
    for (int64_t i = 0; i < D; ++i) qmu += q[i] * mu[i], qq += q[i] * q[i], mumu += mu[i] * mu[i];
    const float qnorm = std::sqrt(qq);
    for (int64_t jj = 0; jj < m; ++jj) {
      const float* k = hkey + (all ? jj : int64_t(cand[jj])) * D;
      float qk = 0.f, sc;
      if (st.est == kSample) {
        float kmu = 0.f, kk = 0.f;
#pragma omp simd reduction(+ : qk, kmu, kk)
        for (int64_t i = 0; i < D; ++i) qk += q[i] * k[i], kmu += k[i] * mu[i], kk += k[i] * k[i];
        sc = kvpass_math::sample_score(qk, kmu, kk, qmu, qnorm, mumu, st.scale, v.logp);
      } else {
#pragma omp simd reduction(+ : qk)
        for (int64_t i = 0; i < D; ++i) qk += q[i] * k[i];
        sc = qk * st.scale;
      }
      hs[jj] = sc;
      mx = std::max(mx, sc);
    }
  }
  std::vector<float> acc(D);
  kvpass_math::OnlineSoftmax sm;
  sm.start(acc.data(), D, mx);  // the true maximum: nothing is rescaled
  for (int64_t j = 0; j < v.filled; ++j) sm.add(ss[j], sv + j * D);
  for (int64_t jj = 0; jj < m; ++jj) sm.add(hs[jj], hval + (all ? jj : int64_t(cand[jj])) * D);
  sm.finish(v.out + (b * v.H + h) * D);
}

struct Kernel {
  Step st;
};

void expect(const Tensor& t, int type, size_t rank, const char* name) {
  static const char* names[] = {"?", "float32", "?", "?", "?", "int16", "?", "int64"};
  if (t.type != type || t.shape.size() != rank)
    throw Error{std::string("kvpass.DecodeStep: input ") + name + " must be a rank-" + std::to_string(rank) + " " +
                names[type] + " tensor"};
}

void compute(const Kernel& kern, OrtKernelContext* ctx) {
  auto get_in = fn<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(kKernelContextGetInput);
  auto get_out = fn<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(kKernelContextGetOutput);
  Tensor in[12];
  for (size_t i = 0; i < 12; ++i) {
    const OrtValue* val = nullptr;
    ORT_CHECK(get_in(ctx, i, &val));
    in[i] = describe(val);
  }
  const char* names[] = {"q", "k_new", "v_new", "static_k", "static_v", "host_k", "host_v", "codes", "mu", "proj", "logp", "position"};
  for (int i : {0, 1, 2, 3, 4, 5, 6}) expect(in[i], kFloat, 4, names[i]);
  expect(in[7], kInt16, 4, names[7]);
  expect(in[8], kFloat, 3, names[8]);
  expect(in[9], kFloat, 3, names[9]);
  expect(in[10], kFloat, 1, names[10]);
  if (in[11].type != kInt64 || in[11].numel() != 1) throw Error{"kvpass.DecodeStep: position must be one int64"};
  const Step& st = kern.st;
  Views v{};
  v.B = in[0].shape[0], v.H = in[0].shape[1], v.D = in[0].shape[3];
  v.Hkv = in[1].shape[1], v.NS = in[3].shape[2], v.CAP = in[5].shape[2], v.L = in[7].shape[3];
  const int64_t pos = *static_cast<const int64_t*>(in[11].data);
  auto bad = [&](const std::string& m) { throw Error{"kvpass.DecodeStep: " + m}; };
  if (in[0].shape[2] != 1) bad("one query token per step (q is [B, H, 1, D])");
  if (v.Hkv <= 0 || v.H % v.Hkv) bad("query heads must be a multiple of kv heads");
  v.G = v.H / v.Hkv;
  if (v.NS != st.S + st.W) bad("static_k holds " + std::to_string(v.NS) + " slots, sink_size + window_size = " + std::to_string(st.S + st.W));
  for (int i : {1, 2, 3, 4, 5, 6, 7})
    if (in[i].shape[0] != v.B || in[i].shape[1] != v.Hkv) bad(std::string(names[i]) + " has the wrong batch or head count");
  for (int i : {1, 2, 3, 4, 5, 6})
    if (in[i].shape[3] != v.D) bad(std::string(names[i]) + " has the wrong head_dim");
  if (in[1].shape[2] != 1 || in[2].shape[2] != 1) bad("k_new and v_new hold one token");
  if (in[6].shape[2] != v.CAP || in[7].shape[2] != v.CAP) bad("host_k, host_v and codes must have the same capacity");
  if (v.L * st.K != in[9].shape[2] || in[9].shape[0] != v.Hkv || in[9].shape[1] != v.D) bad("proj must be [Hkv, D, lsh_k * L]");
  if (in[8].shape[0] != v.B || in[8].shape[1] != v.Hkv || in[8].shape[2] != v.D) bad("mu must be [B, Hkv, D]");
  if (in[10].shape[0] != kTable + 1) bad("logp must hold 16385 entries");
  if (pos < 0) bad("position must be >= 0");
  v.N = pos - st.S - st.W;  // < 0: the ring is not full yet, nothing leaves it
  v.filled = std::min(pos + 1, v.NS);
  if (v.N >= v.CAP)
    bad("the host buffers hold " + std::to_string(v.CAP) + " tokens and the step at position " + std::to_string(pos) +
        " writes token " + std::to_string(v.N) + ": allocate more capacity");
  Tensor out[7];
  for (size_t i = 0; i < 7; ++i) {
    const std::vector<int64_t>& shp = in[i == 0 ? 0 : i + 2].shape;
    OrtValue* val = nullptr;
    ORT_CHECK(get_out(ctx, i, shp.data(), shp.size(), &val));
    out[i] = describe(val);
  }
  // state: copy unless the caller bound each output to its input's buffer
  for (int i = 1; i < 7; ++i) {
    const Tensor& src = in[i + 2];
    if (out[i].data != src.data)
      std::memcpy(out[i].data, src.data, size_t(src.numel()) * (i == 5 ? sizeof(int16_t) : sizeof(float)));
  }
  v.q = static_cast<const float*>(in[0].data);
  v.kn = static_cast<const float*>(in[1].data);
  v.vn = static_cast<const float*>(in[2].data);
  v.mu = static_cast<const float*>(in[8].data);
  v.proj = static_cast<const float*>(in[9].data);
  v.logp = static_cast<const float*>(in[10].data);
  v.out = static_cast<float*>(out[0].data);
  v.sk = static_cast<float*>(out[1].data);
  v.sv = static_cast<float*>(out[2].data);
  v.hk = static_cast<float*>(out[3].data);
  v.hv = static_cast<float*>(out[4].data);
  v.codes = static_cast<int16_t*>(out[5].data);
  v.mu_out = static_cast<float*>(out[6].data);
  const int64_t D = v.D, slot = pos < st.S ? pos : kvpass_math::ring_slot(pos, st.S, st.W);
  const int64_t KL = st.K * v.L, n_host = std::max<int64_t>(v.N + 1, 0);  // host tokens after the step
  const bool build = n_host == st.min_keys, indexed = n_host > st.min_keys;
#pragma omp parallel for schedule(static)
  for (int64_t bh = 0; bh < v.B * v.Hkv; ++bh) {
    const int64_t hk = bh % v.Hkv;
    float* krow = v.sk + (bh * v.NS + slot) * D;
    float* vrow = v.sv + (bh * v.NS + slot) * D;
    std::vector<float> x(D), y(KL);
    if (v.N >= 0) {  // the token leaving the window goes to the host
      std::memcpy(v.hk + (bh * v.CAP + v.N) * D, krow, D * sizeof(float));
      std::memcpy(v.hv + (bh * v.CAP + v.N) * D, vrow, D * sizeof(float));
    }
    float* mu = v.mu_out + bh * D;
    if (build) {  // mu = the mean of the min_keys host keys (LSHIndex.add), then every code
      std::vector<double> sum(D, 0.0);
      for (int64_t j = 0; j < n_host; ++j)
        for (int64_t i = 0; i < D; ++i) sum[i] += v.hk[(bh * v.CAP + j) * D + i];
      for (int64_t i = 0; i < D; ++i) mu[i] = float(sum[i] / double(n_host));
    }
    for (int64_t j = build ? 0 : std::max<int64_t>(v.N, 0); j < n_host; ++j) {
      int16_t* code = v.codes + (bh * v.CAP + j) * v.L;
      if (!build && !indexed) {  // no index yet: a zero code, as the runtime's state has it
        std::fill(code, code + v.L, int16_t(0));
        continue;
      }
      const float* key = v.hk + (bh * v.CAP + j) * D;
      for (int64_t i = 0; i < D; ++i) x[i] = key[i] - mu[i];
      hash_row(x.data(), v.proj + hk * D * KL, D, st.K, v.L, y.data(), code);
    }
    std::memcpy(krow, v.kn + bh * D, D * sizeof(float));
    std::memcpy(vrow, v.vn + bh * D, D * sizeof(float));
  }
  const int64_t n = st.est == kNone ? 0 : n_host;  // host keys attended
  v.mu = v.mu_out;  // the index as it is after the step
  Step exact = st;  // below min_keys there is no index: every host key, exactly
  if (!build && !indexed) exact.est = kExact;
  const Step& sst = exact;
  const int64_t rows = v.B * v.H, groups = v.B * v.Hkv, chunks = (n + kChunk - 1) / kChunk;
  std::vector<int16_t> qcodes;
  std::vector<std::vector<int32_t>> cand;  // [group][chunk][g] candidate lists
  if (sst.est == kSample) {
    qcodes.resize(rows * v.L);
    cand.resize(groups * chunks * v.G);
#pragma omp parallel
    {
      std::vector<float> y(KL);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r)  // SimHash of the raw queries (no centring)
        hash_row(v.q + r * D, v.proj + ((r % v.H) / v.G) * D * KL, D, st.K, v.L, y.data(), qcodes.data() + r * v.L);
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < groups * chunks; ++t) {
        const int64_t g = t / chunks, c = t % chunks;
        retrieve_chunk(v, sst, g / v.Hkv, g % v.Hkv, c * kChunk, std::min(n, (c + 1) * kChunk), qcodes.data(),
                       cand.data() + t * v.G);
      }
    }
  }
#pragma omp parallel
  {
    std::vector<float> score;
    std::vector<int32_t> mine;
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / v.H, h = r % v.H;
      if (sst.est != kSample) {
        attend_row(v, sst, b, h, nullptr, n, score);
        continue;
      }
      mine.clear();
      const int64_t grp = b * v.Hkv + h / v.G, g = h % v.G;
      for (int64_t c = 0; c < chunks; ++c) {
        const std::vector<int32_t>& part = cand[(grp * chunks + c) * v.G + g];
        mine.insert(mine.end(), part.begin(), part.end());
      }
      attend_row(v, sst, b, h, mine.data(), int64_t(mine.size()), score);
    }
  }
}

// ---------------------------------------------------------------- the OrtCustomOp table

// OrtCustomOp, API version 16 (the version that added CreateKernelV2/KernelComputeV2, which report
// errors as a status instead of aborting); fields by position, as onnxruntime reads them.
struct CustomOp {
  uint32_t version;
  void* (*CreateKernel)(const CustomOp*, const void*, const OrtKernelInfo*);
  const char* (*GetName)(const CustomOp*);
  const char* (*GetExecutionProviderType)(const CustomOp*);
  int (*GetInputType)(const CustomOp*, size_t);
  size_t (*GetInputTypeCount)(const CustomOp*);
  int (*GetOutputType)(const CustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const CustomOp*);
  void (*KernelCompute)(void*, OrtKernelContext*);
  void (*KernelDestroy)(void*);
  int (*GetInputCharacteristic)(const CustomOp*, size_t);
  int (*GetOutputCharacteristic)(const CustomOp*, size_t);
  int (*GetInputMemoryType)(const CustomOp*, size_t);
  int (*GetVariadicInputMinArity)(const CustomOp*);
  int (*GetVariadicInputHomogeneity)(const CustomOp*);
  int (*GetVariadicOutputMinArity)(const CustomOp*);
  int (*GetVariadicOutputHomogeneity)(const CustomOp*);
  OrtStatus* (*CreateKernelV2)(const CustomOp*, const void*, const OrtKernelInfo*, void**);
  OrtStatus* (*KernelComputeV2)(void*, OrtKernelContext*);
};

int64_t attr_int(const OrtKernelInfo* info, const char* name) {
  int64_t v = 0;
  ORT_CHECK(fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*)>(kKernelInfoGetAttributeInt64)(info, name, &v));
  return v;
}

OrtStatus* create_kernel(const CustomOp*, const void*, const OrtKernelInfo* info, void** out) {
  try {
    Step st{};
    st.S = attr_int(info, "sink_size");
    st.W = attr_int(info, "window_size");
    st.K = attr_int(info, "lsh_k");
    st.T = attr_int(info, "threshold");
    st.min_keys = attr_int(info, "min_keys");
    ORT_CHECK(fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, float*)>(kKernelInfoGetAttributeFloat)(info, "scale", &st.scale));
    char buf[32] = {0};
    size_t size = sizeof(buf);
    ORT_CHECK(fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, char*, size_t*)>(kKernelInfoGetAttributeString)(info, "estimator", buf, &size));
    const std::string e(buf);
    if (e == "exact") st.est = kExact;
    else if (e == "sample") st.est = kSample;
    else if (e == "none") st.est = kNone;
    else throw Error{"kvpass.DecodeStep: estimator must be exact, sample or none, got '" + e + "'"};
    if (st.S < 0 || st.W < 1 || st.K < 1 || st.K > 15 || st.T < 1 || st.min_keys < 1)
      throw Error{"kvpass.DecodeStep: bad attributes (sink_size >= 0, window_size >= 1, 1 <= lsh_k <= 15, threshold >= 1, "
                  "min_keys >= 1)"};
    *out = new Kernel{st};
    return nullptr;
  } catch (const Error& e) {
    return make_status(kOrtInvalidArgument, e.msg);
  }
}

OrtStatus* compute_v2(void* k, OrtKernelContext* ctx) {
  try {
    compute(*static_cast<Kernel*>(k), ctx);
    return nullptr;
  } catch (const Error& e) {
    return make_status(kOrtInvalidArgument, e.msg);
  } catch (const std::exception& e) {
    return make_status(kOrtFail, std::string("kvpass.DecodeStep: ") + e.what());
  }
}

void compute_v1(void* k, OrtKernelContext* ctx) {  // never used by onnxruntime >= 1.16 (V2 is)
  OrtStatus* st = compute_v2(k, ctx);
  if (st) fn<void (*)(OrtStatus*)>(kReleaseStatus)(st);
}

CustomOp make_op() {
  CustomOp op{};
  op.version = 16;
  op.CreateKernel = [](const CustomOp* o, const void* a, const OrtKernelInfo* i) -> void* {
    void* k = nullptr;
    OrtStatus* st = create_kernel(o, a, i, &k);
    if (st) fn<void (*)(OrtStatus*)>(kReleaseStatus)(st);
    return k;
  };
  op.GetName = [](const CustomOp*) { return "DecodeStep"; };
  op.GetExecutionProviderType = [](const CustomOp*) -> const char* { return nullptr; };  // CPU
  op.GetInputType = [](const CustomOp*, size_t i) { return i == 7 ? kInt16 : i == 11 ? kInt64 : kFloat; };
  op.GetInputTypeCount = [](const CustomOp*) -> size_t { return 12; };
  op.GetOutputType = [](const CustomOp*, size_t i) { return i == 5 ? kInt16 : kFloat; };
  op.GetOutputTypeCount = [](const CustomOp*) -> size_t { return 7; };
  op.KernelCompute = compute_v1;
  op.KernelDestroy = [](void* k) { delete static_cast<Kernel*>(k); };
  op.GetInputCharacteristic = [](const CustomOp*, size_t) { return 0; };   // required
  op.GetOutputCharacteristic = [](const CustomOp*, size_t) { return 0; };  // required
  op.GetInputMemoryType = [](const CustomOp*, size_t) { return 0; };       // OrtMemTypeDefault
  op.GetVariadicInputMinArity = [](const CustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const CustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const CustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const CustomOp*) { return 1; };
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute_v2;
  return op;
}

CustomOp g_op = make_op();

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                              const OrtApiBase* base) {
  const void* api = base->GetApi(16);
  if (!api) return nullptr;  // onnxruntime older than 1.16: nothing registered, the session load names the op
  g_api = static_cast<const void* const*>(api);
  {  // the slot numbers: a status must read back what it was made with
    OrtStatus* probe = make_status(kOrtInvalidArgument, "kvpass-abi-probe");
    const bool ok = fn<int (*)(const OrtStatus*)>(kGetErrorCode)(probe) == kOrtInvalidArgument &&
                    std::string(fn<const char* (*)(const OrtStatus*)>(kGetErrorMessage)(probe)) == "kvpass-abi-probe";
    fn<void (*)(OrtStatus*)>(kReleaseStatus)(probe);
    if (!ok) return make_status(kOrtFail, "kvpass: this onnxruntime's C API does not have the expected layout");
  }
  OrtCustomOpDomain* domain = nullptr;
  OrtStatus* st = fn<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(kCreateCustomOpDomain)("kvpass", &domain);
  if (st) return st;
  st = fn<OrtStatus* (*)(OrtCustomOpDomain*, const CustomOp*)>(kCustomOpDomainAdd)(domain, &g_op);
  if (st) return st;
  return fn<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(kAddCustomOpDomain)(options, domain);
}
