// Small fused CPU ops for the lean decode loop (lowbit/runtime/decode.py), float32 only.
//
// Each replaces a chain of torch operator calls whose dispatch cost dominates a one-token
// decode step; runtime/decode.py holds the plain-torch version of each (the reference the
// tests compare against, and the path on other devices):
//   rms_norm(x, w, eps) -> y                    y = x * rsqrt(mean(x^2) + eps) * w, over the last dim
//   rope_cache(qkv, cos, ssin, kc, vc, pos, nq, nkv, qk_w?, qk_eps) -> q
//       qkv (n, (nq + 2 nkv) d): optional per-head rms-norm of the q and k heads (weights qk_w
//       (nq + nkv, d)), rotary embedding of q and k with rows pos..pos+n-1 of cos / ssin (L, d)
//       (rope(x) = x * cos + roll(x, d/2) * ssin), k and v written to kc / vc (nkv, L, d) at
//       those positions; returns the rotated q (n, nq, d)
//   attn_decode(q, kc, vc, lo, hi, scale) -> o
//       one query per head, q (nq, d); keys lo..hi-1 of the caches; grouped heads (nq / nkv
//       queries share a kv head); softmax(scale q k^T) v, returned as (1, nq * d)
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace lowbit_decode {

static void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
}

static inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

static inline float inv_rms(const float* x, int64_t n, double eps) {
  return 1.f / std::sqrt(dot(x, x, n) / float(n) + float(eps));
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w, double eps) {
  auto x = x_in.contiguous();
  check_f32(x, "x");
  check_f32(w, "w");
  const int64_t d = x.size(-1), rows = x.numel() / d;
  TORCH_CHECK(w.numel() == d, "w must have ", std::to_string(d), " entries");
  auto y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * d;
    float* yr = yp + r * d;
    const float s = inv_rms(xr, d, eps);
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) yr[i] = xr[i] * s * wp[i];
  }
  return y;
}

at::Tensor rope_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& ssin, const at::Tensor& kc,
                      const at::Tensor& vc, int64_t pos, int64_t nq, int64_t nkv,
                      const c10::optional<at::Tensor>& qk_w, double qk_eps) {
  check_f32(qkv, "qkv");
  check_f32(cos, "cos");
  check_f32(ssin, "ssin");
  check_f32(kc, "k cache");
  check_f32(vc, "v cache");
  const int64_t d = kc.size(2), L = kc.size(1), n = qkv.size(0);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (nq + 2 * nkv) * d, "qkv must be (n, (nq + 2 nkv) * d)");
  TORCH_CHECK(kc.size(0) == nkv && vc.sizes() == kc.sizes(), "caches must be (nkv, L, d)");
  TORCH_CHECK(pos >= 0 && pos + n <= L && cos.size(0) >= pos + n && cos.size(1) == d, "positions out of range");
  const float* wq = nullptr;
  if (qk_w.has_value() && qk_w->defined()) {
    check_f32(*qk_w, "qk_w");
    TORCH_CHECK(qk_w->numel() == (nq + nkv) * d, "qk_w must be (nq + nkv, d)");
    wq = qk_w->data_ptr<float>();
  }
  auto q = at::empty({n, nq, d}, qkv.options());
  const int64_t half = d / 2, width = (nq + 2 * nkv) * d;
  std::vector<float> tmp(d);
  for (int64_t i = 0; i < n; ++i) {
    const float* row = qkv.data_ptr<float>() + i * width;
    const float* c = cos.data_ptr<float>() + (pos + i) * d;
    const float* s = ssin.data_ptr<float>() + (pos + i) * d;
    for (int64_t h = 0; h < nq + nkv; ++h) {
      const float* src = row + h * d;
      float* dst = h < nq ? q.data_ptr<float>() + (i * nq + h) * d : kc.data_ptr<float>() + ((h - nq) * L + pos + i) * d;
      const float* x = src;
      if (wq) {  // per-head rms-norm first
        const float r = inv_rms(src, d, qk_eps);
        const float* w = wq + h * d;
        for (int64_t j = 0; j < d; ++j) tmp[j] = src[j] * r * w[j];
        x = tmp.data();
      }
      for (int64_t j = 0; j < d; ++j) dst[j] = x[j] * c[j] + x[j < half ? j + half : j - half] * s[j];
    }
    for (int64_t h = 0; h < nkv; ++h)
      std::copy(row + (nq + nkv + h) * d, row + (nq + nkv + h + 1) * d, vc.data_ptr<float>() + (h * L + pos + i) * d);
  }
  return q;
}

at::Tensor attn_decode(const at::Tensor& q_in, const at::Tensor& kc, const at::Tensor& vc, int64_t lo, int64_t hi,
                       double scale) {
  auto q = q_in.contiguous();
  check_f32(q, "q");
  check_f32(kc, "k cache");
  check_f32(vc, "v cache");
  const int64_t nkv = kc.size(0), L = kc.size(1), d = kc.size(2);
  const int64_t nq = q.numel() / d;
  TORCH_CHECK(q.numel() == nq * d && nq % nkv == 0, "q must hold a multiple of nkv heads of size ", std::to_string(d));
  TORCH_CHECK(0 <= lo && lo < hi && hi <= L, "key range out of the cache");
  auto out = at::empty({1, nq * d}, q.options());
  const int64_t T = hi - lo, group = nq / nkv;
  const float* qp = q.data_ptr<float>();
  const float* kp = kc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // heads in parallel only when there is enough work to pay for waking threads
  const int64_t grain = T * d >= 32768 ? 1 : nq;
  at::parallel_for(0, nq, grain, [&](int64_t h0, int64_t h1) {
    std::vector<float> p(T);
    for (int64_t h = h0; h < h1; ++h) {
      const float* qh = qp + h * d;
      const float* kb = kp + ((h / group) * L + lo) * d;
      const float* vb = vp + ((h / group) * L + lo) * d;
      float mx = -INFINITY;
      for (int64_t t = 0; t < T; ++t) {
        p[t] = dot(qh, kb + t * d, d) * float(scale);
        mx = std::max(mx, p[t]);
      }
      float sum = 0.f;
      for (int64_t t = 0; t < T; ++t) sum += (p[t] = std::exp(p[t] - mx));
      float* o = op + h * d;
      std::fill(o, o + d, 0.f);
      for (int64_t t = 0; t < T; ++t) {
        const float a = p[t] / sum;
        const float* v = vb + t * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) o[j] += a * v[j];
      }
    }
  });
  return out;
}

}  // namespace lowbit_decode

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope_cache(Tensor qkv, Tensor cos, Tensor ssin, Tensor(a!) kc, Tensor(b!) vc, int pos, int nq, int nkv, "
        "Tensor? qk_w, float qk_eps) -> Tensor");
  m.def("attn_decode(Tensor q, Tensor kc, Tensor vc, int lo, int hi, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("rms_norm", &lowbit_decode::rms_norm);
  m.impl("rope_cache", &lowbit_decode::rope_cache);
  m.impl("attn_decode", &lowbit_decode::attn_decode);
}
