// var_export::VarAttention — attention with Visual Attention Redistribution in one pass over
// K and V, an ONNX Runtime custom op for the CPU execution provider (the "kernel" formulation).
//
// It replaces a VAR layer's ONNX `Attention` node (opset 23) and computes, per (batch b, query
// head h, query row i), exactly what the standard-op formulations compute (DESIGN.md §1):
//
//   s_j  = scale * q_i . k_j  (+ additive mask | lowest where a bool mask is False)
//   e_j  = exp(s_j - max_j s_j),  Z = sum_j e_j
//   class masses (sink / visual non-sink / rest, from key code 2*visual + sink):
//          A_vs (code 3), A_ts (code 1), A_vn (code 2)
//   selected = eligible_i AND the sample has a visual sink AND A_vn > 0 AND head h allowed
//              AND (row_test: A_vs/Z / ((A_vs+A_vn)/Z + 1e-6 |V|) <= rho AND (A_vs+A_vn)/Z >= summ)
//   m    = (p, 1 + (1-p)(A_vs + A_ts)/A_vn, 1) on selected rows, (1, 1, 1) otherwise
//   y_i  = sum_j m_{class j} e_j v_j / Z
//
// The class decomposition of §1 needs one accumulator per key class when the masses are only
// known at the end of a streaming softmax. Here each block of up to four query rows keeps its
// T scores in a scratch row (no (B, H, S, T) tensor exists), so the three masses are known
// before the value product: the class constants fold into the weights and one accumulator
// does — FLOP-neutral, one read of K and V per query block. Keys outside a row's mask range
// (the causal future, left padding) are skipped in both products.
//
// Inputs:  0 Q (B,H,S,D) f32; 1 K (B,Hk,T,D) f32; 2 V (B,Hk,T,Dv) f32, H % Hk == 0 (grouped
//          query heads read K/V head h / (H/Hk)); 3 mask (optional): bool (True = attend) or
//          f32 additive, rank <= 4, broadcastable to (B,H,S,T); 4 sink (B,T) or (B,1,T) bool:
//          sink flags of this layer; 5 visual (B,T) bool: visual_token_mask; or, instead of 4,
//          the flags computed here (the sink detection of DESIGN.md §1 folded in): 6 the layer's
//          residual stream (B,S,Dm) f32, 7 its past sink row (B,P) or (B,1,P) bool, 8 the current
//          tokens that may be sinks (B,S) bool (not padding; prompt scope: only at prefill, so a
//          decode step computes nothing), with attributes sink_dims (ints) and tau (f32).
// Outputs: 0 Y (B,H,S,Dv) f32; 1 (optional) the layer's sink flags (B,1,T) bool, its row of
//          present_sink_mask.
// Attributes: scale (f32, > 0), is_causal (int, ONNX Attention's upper-left causal mask),
//          p, rho, summ (f32), heads (ints: the query heads VAR may change; empty = all),
//          row_test (int: 1 = the per-row portion/summation test, dynamic and hybrid modes).
// Query row i sits at key position T - S + i (the KV cache is concatenated before the op).

#include "onnxruntime_c_api.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

constexpr const char* kDomain = "var_export";
constexpr const char* kOpName = "VarAttention";
constexpr uint32_t kApiVersion = 17;  // KernelContext_ParallelFor: ONNX Runtime >= 1.17
constexpr float kPortionEps = 1e-6f;  // var_export.core.settings.PORTION_EPS
constexpr float kRmsEps = 1e-6f;  // var_export.core.settings.RMS_EPS
constexpr size_t kInputs = 9;
constexpr float kMasked = -1e37f;  // additive mask values at or below this mask the key
constexpr int64_t kTaskRows = 32;  // query rows per parallel task
constexpr int64_t kDirectRows = 4;  // S <= this (decode): dot products against K as it is laid out

const OrtApi* g_api = nullptr;

#if defined(__AVX512F__)
constexpr int VW = 16;  // floats per vector register
#else
constexpr int VW = 8;
#endif
constexpr int kRows = 4;  // query rows per micro-block (register blocking)
constexpr int kKeyVecs = 2;  // Q.K^T tile: kRows x (kKeyVecs * VW) scores in registers
constexpr int kValVecs = VW == 16 ? 4 : 2;  // A.V tile: kRows x (kValVecs * VW) outputs in registers
constexpr int64_t kKeyTile = kKeyVecs * VW;

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

inline vf loadv(const float* p) { vf r; std::memcpy(&r, p, sizeof r); return r; }
inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) {  // one broadcast (vf{} + x adds 0.f first: -0.f + 0.f is +0.f)
#if defined(__AVX512F__)
  return reinterpret_cast<vf>(_mm512_set1_ps(x));
#elif defined(__AVX__)
  return reinterpret_cast<vf>(_mm256_set1_ps(x));
#else
  vf r;
  for (int i = 0; i < VW; ++i) r[i] = x;
  return r;
#endif
}inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
}

// exp for x <= 0 (scores minus the row maximum), relative error ~1e-7; exactly 0 below -87.
inline vf expv(vf x) {
  const vf lo = splat(-87.0f);
  const vi dead = x < lo;
  x = x < lo ? lo : x;
  vf fx = x * 1.44269504088896341f + 0.5f;
  vf nf = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);
  nf = nf > fx ? nf - 1.0f : nf;  // floor
  x = x - nf * 0.693359375f - nf * -2.12194440e-4f;
  vf y = splat(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.0f;
  vi bits = (__builtin_convertvector(nf, vi) + 127) << 23;
  vf pow2;
  std::memcpy(&pow2, &bits, sizeof pow2);
  y = y * pow2;
  return dead ? splat(0.f) : y;
}

struct Attrs {
  float scale = 0.f, p = 0.6f, rho = 0.5f, summ = 0.2f, tau = 20.f;
  bool causal = false, row_test = true;
  std::vector<int64_t> heads, sink_dims;
};

struct Problem {
  int64_t B = 0, H = 0, Hk = 0, S = 0, T = 0, D = 0, Dv = 0;
  int64_t Tp = 0;  // T rounded up to kKeyTile: the row length of the scratch and of K^T
  const float *q = nullptr, *k = nullptr, *v = nullptr;
  float* kt = nullptr;  // K^T in key tiles (B, Hk, Tp/kKeyTile, D, kKeyTile), zero-padded; null when direct
  float* y = nullptr;
  const bool* mask_b = nullptr;
  const float* mask_f = nullptr;
  int64_t ms[4] = {0, 0, 0, 0};  // mask strides over (B, H, S, T); 0 on broadcast axes
  const Attrs* a = nullptr;
  std::vector<uint8_t> head_ok;  // H
  std::vector<uint8_t> visual;  // B*T
  std::vector<uint8_t> has_visual_sink;  // B
  std::vector<int64_t> first_visual;  // B: first visual key position, T when none
  std::vector<float> portion_eps;  // B: 1e-6 |V|
  std::vector<float> is_sink, is_visual_sink, is_visual_nonsink;  // B*Tp, 1.f / 0.f per key
  std::vector<int64_t> lo, hi;  // per (b, mask head, i): the keys a row may attend, [lo, hi)
  std::vector<uint8_t> dense;  // per (b, mask head, i): every key in [lo, hi) attended, no additive mask
  int64_t mask_heads = 1;  // H when the mask differs per head, else 1
  int64_t blocks = 0;  // row blocks per (b, h)
};

inline int64_t row_index(const Problem& P, int64_t b, int64_t h, int64_t i) {
  return (b * P.mask_heads + (P.mask_heads > 1 ? h : 0)) * P.S + i;
}

inline float mask_value(const Problem& P, int64_t b, int64_t h, int64_t i, int64_t j, bool* masked) {
  const int64_t off = b * P.ms[0] + h * P.ms[1] + i * P.ms[2] + j * P.ms[3];
  if (P.mask_b) {
    *masked = !P.mask_b[off];
    return 0.f;
  }
  if (P.mask_f) {
    const float m = P.mask_f[off];
    *masked = !(m > kMasked);
    return m;
  }
  *masked = false;
  return 0.f;
}

// The key range [lo, hi) a row may attend, and whether the mask keeps every key inside it: one
// task per (b, mask head, query row). A row with every key masked gets all T keys, each masked:
// equal scores, as ONNX Runtime's Attention computes such a row (finite, no NaN for the cache).
void row_range(void* data, size_t row) {
  Problem& P = *static_cast<Problem*>(data);
  const int64_t i = static_cast<int64_t>(row) % P.S, bm = static_cast<int64_t>(row) / P.S;
  const int64_t b = bm / P.mask_heads, h = bm % P.mask_heads;
  const int64_t end = P.a->causal ? std::min<int64_t>(P.T, i + 1) : P.T;
  int64_t first = 0, last = end - 1;
  bool dense = P.mask_f == nullptr;
  if (P.mask_b || P.mask_f) {
    bool masked = true;
    for (first = 0; first < end; ++first) {
      mask_value(P, b, h, i, first, &masked);
      if (!masked) break;
    }
    for (last = end - 1; last > first; --last) {
      mask_value(P, b, h, i, last, &masked);
      if (!masked) break;
    }
    if (first == end) {  // every key masked: a softmax over equal (lowest) scores, all T keys
      P.lo[row] = 0;
      P.hi[row] = P.T;
      P.dense[row] = 0;
      return;
    }
    for (int64_t j = first + 1; dense && j < last; ++j) {
      mask_value(P, b, h, i, j, &masked);
      dense = !masked;
    }
  }
  P.lo[row] = first;
  P.hi[row] = last + 1;
  P.dense[row] = dense;
}

// ------------------------------------------------------------------------------------------
// The two products. Rows past `rows` of a micro-block repeat row 0 (no branches in the tiles).

// K (T, D) of one (b, kv head) -> Tp / kKeyTile tiles of (D, kKeyTile): each tile of keys is one
// contiguous block that the Q.K^T tile reads front to back.
void transpose_keys(void* data, size_t bk) {
  const Problem& P = *static_cast<const Problem*>(data);
  const float* K = P.k + static_cast<int64_t>(bk) * P.T * P.D;
  float* Kt = P.kt + static_cast<int64_t>(bk) * P.D * P.Tp;
  for (int64_t j0 = 0; j0 < P.Tp; j0 += kKeyTile) {
    float* tile = Kt + j0 * P.D;
    for (int64_t jj = 0; jj < kKeyTile; ++jj) {
      const int64_t j = j0 + jj;
      if (j < P.T) {
        const float* kj = K + j * P.D;
        for (int64_t d = 0; d < P.D; ++d) tile[d * kKeyTile + jj] = kj[d];
      } else {
        for (int64_t d = 0; d < P.D; ++d) tile[d * kKeyTile + jj] = 0.f;
      }
    }
  }
}

void scores_tiled(const Problem& P, const float* const* qrow, const float* Kt, int64_t j0, int64_t j1,
                  float* out) {
  const float scale = P.a->scale;
  for (int64_t j = j0; j < j1; j += kKeyTile) {
    const float* tile = Kt + j * P.D;
    vf acc[kRows][kKeyVecs];
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < kKeyVecs; ++c) acc[r][c] = splat(0.f);
    for (int64_t d = 0; d < P.D; ++d) {
      const float* kd = tile + d * kKeyTile;
      vf kk[kKeyVecs];
      for (int c = 0; c < kKeyVecs; ++c) kk[c] = loadv(kd + c * VW);
      for (int r = 0; r < kRows; ++r) {
        const vf qd = splat(qrow[r][d]);
        for (int c = 0; c < kKeyVecs; ++c) acc[r][c] += qd * kk[c];
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < kKeyVecs; ++c) storev(out + r * P.Tp + j + c * VW, acc[r][c] * scale);
  }
}

// R rows (1 for decode, kRows otherwise); two partial sums per row hide the FMA latency.
template <int R>
void scores_direct(const Problem& P, const float* const* qrow, const float* K, int64_t lo, int64_t hi,
                   float* out) {
  const int64_t D = P.D, Dw = D / VW * VW;
  for (int64_t j = lo; j < hi; ++j) {
    const float* kj = K + j * D;
    vf acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = splat(0.f);
    int64_t d = 0;
    for (; d + 2 * VW <= Dw; d += 2 * VW) {
      const vf k0 = loadv(kj + d), k1 = loadv(kj + d + VW);
      for (int r = 0; r < R; ++r) {
        acc[r][0] += loadv(qrow[r] + d) * k0;
        acc[r][1] += loadv(qrow[r] + d + VW) * k1;
      }
    }
    for (; d < Dw; d += VW) {
      const vf kk = loadv(kj + d);
      for (int r = 0; r < R; ++r) acc[r][0] += loadv(qrow[r] + d) * kk;
    }
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[r][0] + acc[r][1]);
      for (int64_t e = Dw; e < D; ++e) s += qrow[r][e] * kj[e];
      out[r * P.Tp + j] = s * P.a->scale;
    }
  }
}

template <int R, int C>
int64_t values_pass(const Problem& P, const float* const* wrow, const float* V, int64_t blo, int64_t bhi,
                    int64_t d, float* const* yrow, int rows) {
  for (; d + C * VW <= P.Dv; d += C * VW) {
    vf acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = splat(0.f);
    for (int64_t j = blo; j < bhi; ++j) {
      const float* vj = V + j * P.Dv + d;
      vf x[C];
      for (int c = 0; c < C; ++c) x[c] = loadv(vj + c * VW);
      for (int r = 0; r < R; ++r) {
        const vf w = splat(wrow[r][j]);
        for (int c = 0; c < C; ++c) acc[r][c] += w * x[c];
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < C; ++c) storev(yrow[r] + d + c * VW, acc[r][c]);
  }
  return d;
}

template <int R>
void values(const Problem& P, const float* const* wrow, const float* V, int64_t blo, int64_t bhi,
            float* const* yrow, int rows) {
  int64_t d = values_pass<R, kValVecs>(P, wrow, V, blo, bhi, 0, yrow, rows);
  d = values_pass<R, 1>(P, wrow, V, blo, bhi, d, yrow, rows);
  for (; d < P.Dv; ++d) {
    for (int r = 0; r < rows; ++r) {
      float acc = 0.f;
      for (int64_t j = blo; j < bhi; ++j) acc += wrow[r][j] * V[j * P.Dv + d];
      yrow[r][d] = acc;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Softmax, class masses, selection and the class constants, folded into the weights.

// Row i's weights in w (its [lo, hi) keys; 0 elsewhere in [blo, bhi)).
void weights_row(const Problem& P, int64_t b, int64_t h, int64_t i, int64_t blo, int64_t bhi, float* w) {
  const Attrs& a = *P.a;
  const int64_t row = row_index(P, b, h, i), lo = P.lo[row], hi = P.hi[row];
  for (int64_t j = blo; j < lo; ++j) w[j] = 0.f;
  for (int64_t j = hi; j < bhi; ++j) w[j] = 0.f;
  if (!P.dense[row]) {
    bool masked = false;
    for (int64_t j = lo; j < hi; ++j) {
      const float m = mask_value(P, b, h, i, j, &masked);
      w[j] = masked ? -FLT_MAX : w[j] + m;
    }
  }
  int64_t j = lo;
  vf vmx = splat(-FLT_MAX);
  for (; j + VW <= hi; j += VW) {
    const vf x = loadv(w + j);
    vmx = x > vmx ? x : vmx;
  }
  float mx = -FLT_MAX;
  for (int l = 0; l < VW; ++l) mx = std::max(mx, vmx[l]);
  for (; j < hi; ++j) mx = std::max(mx, w[j]);
  const float* sink = P.is_sink.data() + b * P.Tp;
  const float* vsink = P.is_visual_sink.data() + b * P.Tp;
  const float* vnon = P.is_visual_nonsink.data() + b * P.Tp;
  vf z8 = splat(0.f), s8 = splat(0.f), vs8 = splat(0.f), vn8 = splat(0.f);
  for (j = lo; j + VW <= hi; j += VW) {
    const vf e = expv(loadv(w + j) - mx);
    storev(w + j, e);
    z8 += e;
    s8 += e * loadv(sink + j);
    vs8 += e * loadv(vsink + j);
    vn8 += e * loadv(vnon + j);
  }
  float z = hsum(z8), sink_mass = hsum(s8), vs_mass = hsum(vs8), vn_mass = hsum(vn8);
  for (; j < hi; ++j) {
    const float e = w[j] - mx < -87.f ? 0.f : std::exp(w[j] - mx);  // as expv
    w[j] = e;
    z += e;
    sink_mass += e * sink[j];
    vs_mass += e * vsink[j];
    vn_mass += e * vnon[j];
  }
  const int64_t pos = P.T - P.S + i;  // the query's key position
  const bool eligible = !P.visual[b * P.T + pos] && P.first_visual[b] <= pos;
  bool selected = eligible && P.has_visual_sink[b] && P.head_ok[h] && vn_mass > 0.f;
  if (selected && a.row_test) {
    const float vs = vs_mass / z, vn = vn_mass / z, image = vs + vn;
    selected = vs / (image + P.portion_eps[b]) <= a.rho && image >= a.summ;
  }
  const float inv = 1.f / z;
  if (!selected) {
    for (j = lo; j + VW <= hi; j += VW) storev(w + j, loadv(w + j) * inv);
    for (; j < hi; ++j) w[j] *= inv;
    return;
  }
  // per key: inv * (1 + (p - 1) [sink] + (boost - 1) [visual non-sink])
  const float boost = 1.f + (1.f - a.p) * sink_mass / vn_mass;
  const float ks = (a.p - 1.f) * inv, kv = (boost - 1.f) * inv;
  for (j = lo; j + VW <= hi; j += VW)
    storev(w + j, loadv(w + j) * (inv + ks * loadv(sink + j) + kv * loadv(vnon + j)));
  for (; j < hi; ++j) w[j] *= inv + ks * sink[j] + kv * vnon[j];
}

struct Block {
  int rows = 0;
  int64_t lo[kRows], hi[kRows], blo = 0, bhi = 0;
  const float* q[kRows];
  float* y[kRows];
};

// Up to kRows rows from i0.
Block next_block(const Problem& P, int64_t b, int64_t h, int64_t i0, int64_t end) {
  Block k;
  k.blo = P.T;
  for (; k.rows < kRows && i0 + k.rows < end; ++k.rows) {
    const int64_t i = i0 + k.rows;
    const int64_t lo = P.lo[row_index(P, b, h, i)], hi = P.hi[row_index(P, b, h, i)];
    float* y = P.y + ((b * P.H + h) * P.S + i) * P.Dv;
    k.lo[k.rows] = lo;
    k.hi[k.rows] = hi;
    k.q[k.rows] = P.q + ((b * P.H + h) * P.S + i) * P.D;
    k.y[k.rows] = y;
    k.blo = std::min(k.blo, lo);
    k.bhi = std::max(k.bhi, hi);
  }
  for (int r = k.rows; r < kRows; ++r) k.q[r] = k.q[0];
  return k;
}

void run_task(void* data, size_t task) {
  const Problem& P = *static_cast<const Problem*>(data);
  const int64_t bh = static_cast<int64_t>(task) / P.blocks, blk = static_cast<int64_t>(task) % P.blocks;
  const int64_t b = bh / P.H, h = bh % P.H, kvh = h / (P.H / P.Hk);
  const float* K = P.k + (b * P.Hk + kvh) * P.T * P.D;
  const float* V = P.v + (b * P.Hk + kvh) * P.T * P.Dv;
  thread_local std::vector<float> scratch;
  if (scratch.size() < static_cast<size_t>(kRows * P.Tp)) scratch.resize(kRows * P.Tp);
  float* s = scratch.data();
  const int64_t end = std::min(P.S, (blk + 1) * kTaskRows);
  for (int64_t i0 = blk * kTaskRows; i0 < end;) {
    const Block k = next_block(P, b, h, i0, end);
    if (P.kt) {
      const int64_t j0 = k.blo / kKeyTile * kKeyTile, j1 = (k.bhi + kKeyTile - 1) / kKeyTile * kKeyTile;
      scores_tiled(P, k.q, P.kt + (b * P.Hk + kvh) * P.D * P.Tp, j0, j1, s);
    } else {
      if (k.rows == 1) scores_direct<1>(P, k.q, K, k.blo, k.bhi, s);
      else scores_direct<kRows>(P, k.q, K, k.blo, k.bhi, s);
    }
    const float* wrow[kRows];
    for (int r = 0; r < kRows; ++r) {
      wrow[r] = s + (r < k.rows ? r : 0) * P.Tp;
      if (r < k.rows) weights_row(P, b, h, i0 + r, k.blo, k.bhi, s + r * P.Tp);
    }
    if (k.rows == 1) values<1>(P, wrow, V, k.blo, k.bhi, k.y, 1);  // decode: no padding rows
    else values<kRows>(P, wrow, V, k.blo, k.bhi, k.y, k.rows);
    i0 += k.rows;
  }
}

// ------------------------------------------------------------------------------------------
// ONNX Runtime glue

OrtStatus* fail(const std::string& what) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string("VarAttention: ") + what).c_str());
}

#define RETURN_IF(expr)                 \
  do {                                  \
    if (OrtStatus* _st = (expr)) return _st; \
  } while (0)

struct TensorView {
  bool present = false;  // an absent optional input, unlike an empty tensor (P = 0), has no value
  const void* data = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
};

OrtStatus* view(OrtKernelContext* ctx, size_t index, TensorView* out) {
  const OrtValue* value = nullptr;
  RETURN_IF(g_api->KernelContext_GetInput(ctx, index, &value));
  if (!value) return nullptr;
  out->present = true;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  RETURN_IF(g_api->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* st = g_api->GetTensorElementType(info, &out->type);
  if (!st) st = g_api->GetDimensionsCount(info, &rank);
  if (!st) {
    out->shape.resize(rank);
    st = g_api->GetDimensions(info, out->shape.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  RETURN_IF(st);
  void* data = nullptr;  // GetTensorData is API 23; the kernel asks for 17
  RETURN_IF(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  out->data = data;
  return nullptr;
}

std::string dims(const std::vector<int64_t>& s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + ")";
}

OrtStatus* check_inputs(const TensorView* in, Problem* P) {
  const char* names[3] = {"Q", "K", "V"};
  for (int i = 0; i < 3; ++i) {
    if (in[i].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || in[i].shape.size() != 4)
      return fail(std::string("expected ") + names[i] + " as a 4-D float tensor (B, heads, length, head size), found rank " +
                  std::to_string(in[i].shape.size()) + " " + dims(in[i].shape));
  }
  const auto &q = in[0].shape, &k = in[1].shape, &v = in[2].shape;
  P->B = q[0], P->H = q[1], P->S = q[2], P->D = q[3];
  P->Hk = k[1], P->T = k[2], P->Dv = v[3];
  if (k[0] != P->B || v[0] != P->B || v[1] != P->Hk || v[2] != P->T || k[3] != P->D)
    return fail("Q " + dims(q) + ", K " + dims(k) + " and V " + dims(v) + " do not agree (expected Q (B,H,S,D), K (B,Hk,T,D), V (B,Hk,T,Dv))");
  if (P->Hk <= 0 || P->H % P->Hk)
    return fail("the query head count " + std::to_string(P->H) + " is not a multiple of the key/value head count " + std::to_string(P->Hk));
  if (P->S > P->T) return fail("more queries (" + std::to_string(P->S) + ") than keys (" + std::to_string(P->T) + ")");
  for (int i = 4; i < 6; ++i) {  // (B, T), or (B, 1, T) as the sink detection writes it
    const std::vector<int64_t> bt = {P->B, P->T}, b1t = {P->B, 1, P->T};
    if (!in[i].present) continue;  // sink flags computed from the residual (inputs 6-8)
    if (in[i].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL || (in[i].shape != bt && in[i].shape != b1t))
      return fail(std::string(i == 4 ? "sink" : "visual") + " must be bool " + dims(bt) + " or " + dims(b1t) +
                  ", found " + dims(in[i].shape));
  }
  const TensorView& m = in[3];
  if (m.present) {
    if (m.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL && m.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      return fail("the mask must be bool or float");
    if (m.shape.size() > 4) return fail("the mask has rank " + std::to_string(m.shape.size()) + ", expected <= 4");
    const int64_t full[4] = {P->B, P->H, P->S, P->T};
    int64_t stride = 1;
    for (int ax = 3, mx = static_cast<int>(m.shape.size()) - 1; ax >= 0; --ax, --mx) {
      int64_t dim = mx >= 0 ? m.shape[mx] : 1;
      if (dim != 1 && dim != full[ax])
        return fail("the mask " + dims(m.shape) + " does not broadcast to (B, H, S, T) = " + dims({P->B, P->H, P->S, P->T}));
      P->ms[ax] = dim == 1 ? 0 : stride;
      stride *= dim;
    }
    if (m.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL) P->mask_b = static_cast<const bool*>(m.data);
    else P->mask_f = static_cast<const float*>(m.data);
  }
  return nullptr;
}

void per_sample(const bool* sink, const bool* visual, Problem* P) {
  const int64_t B = P->B, T = P->T, Tp = P->Tp;
  P->visual.assign(visual, visual + B * T);
  P->has_visual_sink.assign(B, 0);
  P->first_visual.assign(B, T);
  P->portion_eps.assign(B, 0.f);
  P->is_sink.assign(B * Tp, 0.f);
  P->is_visual_sink.assign(B * Tp, 0.f);
  P->is_visual_nonsink.assign(B * Tp, 0.f);
  for (int64_t b = 0; b < B; ++b) {
    int64_t count = 0;
    for (int64_t j = 0; j < T; ++j) {
      const bool vis = visual[b * T + j], snk = sink[b * T + j];
      P->is_sink[b * Tp + j] = snk;
      P->is_visual_sink[b * Tp + j] = vis && snk;
      P->is_visual_nonsink[b * Tp + j] = vis && !snk;
      if (vis && snk) P->has_visual_sink[b] = 1;
      if (vis && P->first_visual[b] == T) P->first_visual[b] = j;
      count += vis;
    }
    P->portion_eps[b] = kPortionEps * static_cast<float>(count);
  }
  P->head_ok.assign(P->H, P->a->heads.empty() ? 1 : 0);
  for (int64_t h : P->a->heads)
    if (h >= 0 && h < P->H) P->head_ok[h] = 1;
}

// The layer's sink flags (B, T) = the past row, then the current tokens that may be sinks and
// whose residual x (B, S, Dm) has max_d x_d^2 > tau^2 (mean(x^2) + 1e-6) over the sink dims d
// (passes/builders.py build_sink_flags, the same fp32 operations).
OrtStatus* sink_flags(const TensorView* in, const Attrs& a, const Problem& P, bool* out) {
  const TensorView &x = in[6], &past = in[7], &may = in[8];
  const int64_t Pn = P.T - P.S;
  if (!past.present || !may.present)
    return fail("the residual stream (input 6) needs the layer's past sink row (7) and the tokens that may be sinks (8)");
  if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || x.shape.size() != 3 || x.shape[0] != P.B || x.shape[1] != P.S)
    return fail("the residual must be float (B, S, D) = (" + std::to_string(P.B) + ", " + std::to_string(P.S) +
                ", D), found " + dims(x.shape));
  const std::vector<int64_t> bp = {P.B, Pn}, b1p = {P.B, 1, Pn}, bs = {P.B, P.S};
  if (past.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL || (past.shape != bp && past.shape != b1p))
    return fail("the past sink row must be bool " + dims(bp) + " or " + dims(b1p) + ", found " + dims(past.shape));
  if (may.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL || may.shape != bs)
    return fail("the tokens that may be sinks must be bool " + dims(bs) + ", found " + dims(may.shape));
  const int64_t D = x.shape[2];
  if (a.sink_dims.empty()) return fail("the sink_dims attribute is needed with the residual input");
  for (int64_t d : a.sink_dims)
    if (d < 0 || d >= D) return fail("sink dim " + std::to_string(d) + " is outside the residual's " + std::to_string(D));
  const float tau2 = a.tau * a.tau, tau2_eps = tau2 * kRmsEps;
  const float* xs = static_cast<const float*>(x.data);
  const bool* pr = static_cast<const bool*>(past.data);
  const bool* mr = static_cast<const bool*>(may.data);
  for (int64_t b = 0; b < P.B; ++b) {
    if (Pn > 0) std::memcpy(out + b * P.T, pr + b * Pn, static_cast<size_t>(Pn));
    for (int64_t s = 0; s < P.S; ++s) {
      bool sink = false;
      if (mr[b * P.S + s]) {  // prompt scope: only at prefill, so decode steps skip this
        const float* row = xs + (b * P.S + s) * D;
        float sum = 0.f, peak = 0.f;
        for (int64_t d = 0; d < D; ++d) sum += row[d] * row[d];
        for (int64_t d : a.sink_dims) peak = std::max(peak, row[d] * row[d]);
        sink = peak > (sum / static_cast<float>(D)) * tau2 + tau2_eps;
      }
      out[b * P.T + Pn + s] = sink;
    }
  }
  return nullptr;
}

OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  const Attrs& a = *static_cast<const Attrs*>(kernel);
  TensorView in[kInputs];
  size_t n_in = 0, n_out = 0;
  RETURN_IF(g_api->KernelContext_GetInputCount(ctx, &n_in));
  RETURN_IF(g_api->KernelContext_GetOutputCount(ctx, &n_out));
  for (size_t i = 0; i < std::min<size_t>(n_in, kInputs); ++i) RETURN_IF(view(ctx, i, &in[i]));
  for (int i : {0, 1, 2, 5})
    if (!in[i].present) return fail("input " + std::to_string(i) + " is missing");
  if (in[4].present == in[6].present)
    return fail("expected the sink flags (input 4) or the residual stream (inputs 6-8), exactly one of them");
  Problem P;
  P.a = &a;
  RETURN_IF(check_inputs(in, &P));
  std::unique_ptr<bool[]> flags(new bool[static_cast<size_t>(P.B * P.T)]);
  if (in[6].present) {
    RETURN_IF(sink_flags(in, a, P, flags.get()));
  } else {
    std::memcpy(flags.get(), in[4].data, static_cast<size_t>(P.B * P.T));
  }
  if (n_out > 1) {  // this layer's row of present_sink_mask
    const int64_t row_shape[3] = {P.B, 1, P.T};
    OrtValue* row = nullptr;
    void* row_data = nullptr;
    RETURN_IF(g_api->KernelContext_GetOutput(ctx, 1, row_shape, 3, &row));
    RETURN_IF(g_api->GetTensorMutableData(row, &row_data));
    std::memcpy(row_data, flags.get(), static_cast<size_t>(P.B * P.T));
  }
  for (int64_t h : a.heads)
    if (h < 0 || h >= P.H) return fail("heads lists head " + std::to_string(h) + " of " + std::to_string(P.H));
  P.q = static_cast<const float*>(in[0].data);
  P.k = static_cast<const float*>(in[1].data);
  P.v = static_cast<const float*>(in[2].data);
  P.Tp = (P.T + kKeyTile - 1) / kKeyTile * kKeyTile;
  per_sample(flags.get(), static_cast<const bool*>(in[5].data), &P);
  const int64_t out_shape[4] = {P.B, P.H, P.S, P.Dv};
  OrtValue* out = nullptr;
  RETURN_IF(g_api->KernelContext_GetOutput(ctx, 0, out_shape, 4, &out));
  RETURN_IF(g_api->GetTensorMutableData(out, reinterpret_cast<void**>(&P.y)));
  if (P.B * P.H * P.S == 0) return nullptr;
  P.mask_heads = P.ms[1] ? P.H : 1;
  const size_t rows = static_cast<size_t>(P.B * P.mask_heads * P.S);
  P.lo.resize(rows);
  P.hi.resize(rows);
  P.dense.resize(rows);
  RETURN_IF(g_api->KernelContext_ParallelFor(ctx, row_range, rows, 0, &P));
  thread_local std::vector<float> kt;  // K^T, reused across calls on this thread
  if (P.S > kDirectRows) {
    kt.resize(static_cast<size_t>(P.B * P.Hk * P.D * P.Tp));
    P.kt = kt.data();
    RETURN_IF(g_api->KernelContext_ParallelFor(ctx, transpose_keys, static_cast<size_t>(P.B * P.Hk), 0, &P));
  }
  P.blocks = (P.S + kTaskRows - 1) / kTaskRows;
  const size_t tasks = static_cast<size_t>(P.B * P.H * P.blocks);
  return g_api->KernelContext_ParallelFor(ctx, run_task, tasks, 0, &P);
}

OrtStatus* create(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  auto* a = new Attrs();
  auto get_f = [&](const char* name, float* out, bool required) -> OrtStatus* {
    OrtStatus* st = g_api->KernelInfoGetAttribute_float(info, name, out);
    if (st && !required) {
      g_api->ReleaseStatus(st);
      return nullptr;
    }
    return st;
  };
  auto get_i = [&](const char* name, int64_t def, int64_t* out) {
    if (OrtStatus* st = g_api->KernelInfoGetAttribute_int64(info, name, out)) {
      g_api->ReleaseStatus(st);
      *out = def;
    }
  };
  OrtStatus* st = get_f("scale", &a->scale, true);
  if (!st) st = get_f("p", &a->p, false);
  if (!st) st = get_f("rho", &a->rho, false);
  if (!st) st = get_f("summ", &a->summ, false);
  if (!st) st = get_f("tau", &a->tau, false);
  int64_t causal = 0, row_test = 1;
  get_i("is_causal", 0, &causal);
  get_i("row_test", 1, &row_test);
  a->causal = causal != 0;
  a->row_test = row_test != 0;
  auto get_ints = [&](const char* name, std::vector<int64_t>* out) -> OrtStatus* {  // absent: empty
    size_t n = 0;
    if (OrtStatus* absent = g_api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &n)) {
      g_api->ReleaseStatus(absent);
      return nullptr;
    }
    out->resize(n);
    return n ? g_api->KernelInfoGetAttributeArray_int64(info, name, out->data(), &n) : nullptr;
  };
  if (!st) st = get_ints("heads", &a->heads);
  if (!st) st = get_ints("sink_dims", &a->sink_dims);
  if (!st && !(a->scale > 0.f)) st = fail("the scale attribute must be > 0");
  if (st) {
    delete a;
    return st;
  }
  *kernel = a;
  return nullptr;
}

const char* op_name(const OrtCustomOp*) { return kOpName; }
const char* op_ep(const OrtCustomOp*) { return "CPUExecutionProvider"; }
size_t n_inputs(const OrtCustomOp*) { return kInputs; }
size_t n_outputs(const OrtCustomOp*) { return 2; }
ONNXTensorElementDataType in_type(const OrtCustomOp*, size_t i) {
  // the mask is bool or float: undefined lets either through (checked in compute)
  if (i == 3) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  if (i == 6) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;  // the residual stream
  return i >= 4 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
ONNXTensorElementDataType out_type(const OrtCustomOp*, size_t i) {
  return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
}
OrtCustomOpInputOutputCharacteristic in_char(const OrtCustomOp*, size_t i) {
  // Q, K, V and visual are required; the mask, and the sink flags (4) or what they are computed
  // from (6: residual, 7: past row, 8: tokens that may be sinks) are optional
  return (i == 3 || i == 4 || i >= 6) ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic out_char(const OrtCustomOp*, size_t i) {
  return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}
OrtMemType in_mem(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
void destroy(void* kernel) { delete static_cast<Attrs*>(kernel); }
int start_version(const OrtCustomOp*) { return 1; }
int end_version(const OrtCustomOp*) { return 1; }

OrtCustomOp make_op() {
  OrtCustomOp op;
  std::memset(&op, 0, sizeof op);
  op.version = kApiVersion;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_ep;
  op.GetInputType = in_type;
  op.GetInputTypeCount = n_inputs;
  op.GetOutputType = out_type;
  op.GetOutputTypeCount = n_outputs;
  op.GetInputCharacteristic = in_char;
  op.GetOutputCharacteristic = out_char;
  op.GetInputMemoryType = in_mem;
  op.KernelDestroy = destroy;
  op.CreateKernelV2 = create;
  op.KernelComputeV2 = compute;
  op.GetStartVersion = start_version;
  op.GetEndVersion = end_version;
  return op;
}

const OrtCustomOp g_op = make_op();

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  g_api = api_base->GetApi(kApiVersion);
  if (!g_api) return nullptr;  // cannot even report: ONNX Runtime older than 1.17
  OrtCustomOpDomain* domain = nullptr;
  RETURN_IF(g_api->CreateCustomOpDomain(kDomain, &domain));
  RETURN_IF(g_api->CustomOpDomain_Add(domain, &g_op));
  return g_api->AddCustomOpDomain(options, domain);
}
