// Nearest-codeword search for vector quantization (VPTQ's k-means and code assignment), CPU.
//
//   vq_nearest(x (n, v) float32, codebook_t (v, k) float32, c_sq (k) float32) -> (idx (n) int64, dist (n) float32)
//   vq_min_dist_(d2 (n) float32, x (n, v), c (v)) -> d2     d2 = min(d2, |x_i - c|^2), in place (k-means++ seeding)
//   vq_linear(x, codes, codebook, res_codes?, res_codebook?, main_cols, out_codes?, out_codebook?, outlier_cols?,
//             col_scale?, col_bias?, bias?, v, v0) -> y      the VQ GEMV (see below)
//
// For each row x_i: idx_i = argmin_c (|c|^2 - 2 x_i.c) (ties to the lower index) and
// dist_i = max(0, min + |x_i|^2), the same quantities as the plain-torch
// lowbit.formats.codebook.nearest, which computes them by a matmul into an (n, k) distance
// matrix and a min over it. Here the distances of eight codewords at a time stay in registers,
// so nothing of size n x k is written or read back: the search is compute-bound instead of
// memory-bound. Rows are split across threads; every row is computed by one thread in a fixed
// order, so results do not depend on the thread count.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define LOWBIT_VQ_X86 1
#include <immintrin.h>
#endif

namespace lowbit {
int active_isa();  // defined in lowbit_kernels.cpp
}

namespace lowbit_vq {

// codewords c0..k-1 of one row in scalar code, updating (best, bi); strict < keeps the lowest index on ties
static inline void scan_scalar(const float* xi, const float* ct, const float* csq, int64_t v, int64_t k, int64_t c0,
                               float& best, int64_t& bi) {
  for (int64_t c = c0; c < k; ++c) {
    float acc = 0.f;
    for (int64_t j = 0; j < v; ++j) acc = std::fma(xi[j], ct[j * k + c], acc);
    const float d = std::fma(-2.f, acc, csq[c]);
    if (d < best) best = d, bi = c;
  }
}

// one row's result: the index and dist = max(0, min + |x|^2)
static inline void store_row(const float* xi, int64_t v, float best, int64_t bi, int64_t* idx, float* dist) {
  float xx = 0.f;
  for (int64_t j = 0; j < v; ++j) xx += xi[j] * xi[j];
  *idx = bi;
  *dist = std::max(0.f, best + xx);
}

// scalar path (and any vector length)
static void rows_scalar(const float* x, const float* ct, const float* csq, int64_t v, int64_t k, int64_t r0,
                        int64_t r1, int64_t* idx, float* dist) {
  for (int64_t i = r0; i < r1; ++i) {
    float best = std::numeric_limits<float>::infinity();
    int64_t bi = 0;
    scan_scalar(x + i * v, ct, csq, v, k, 0, best, bi);
    store_row(x + i * v, v, best, bi, idx + i, dist + i);
  }
}

#if LOWBIT_VQ_X86
#define VQ_AVX2 __attribute__((target("avx2,fma,f16c")))

// V: vector length; k8: codewords rounded down to a multiple of 8 (the tail is done in scalar code)
template <int V>
VQ_AVX2 static void rows_avx2(const float* x, const float* ct, const float* csq, int64_t k, int64_t r0, int64_t r1,
                              int64_t* idx, float* dist) {
  const int64_t k8 = k / 8 * 8;
  const __m256 m2 = _mm256_set1_ps(-2.f);
  const __m256i step = _mm256_set1_epi32(8);
  for (int64_t i = r0; i < r1; ++i) {
    const float* xi = x + i * V;
    __m256 xb[V];
    for (int j = 0; j < V; ++j) xb[j] = _mm256_set1_ps(xi[j]);
    __m256 best = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    __m256i bidx = _mm256_setzero_si256();
    __m256i cur = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t c = 0; c < k8; c += 8) {
      __m256 acc = _mm256_mul_ps(xb[0], _mm256_loadu_ps(ct + c));
      for (int j = 1; j < V; ++j) acc = _mm256_fmadd_ps(xb[j], _mm256_loadu_ps(ct + j * k + c), acc);
      const __m256 d = _mm256_fmadd_ps(m2, acc, _mm256_loadu_ps(csq + c));
      const __m256 lt = _mm256_cmp_ps(d, best, _CMP_LT_OQ);  // strict: the first (lowest) index keeps a tie
      best = _mm256_blendv_ps(best, d, lt);
      bidx = _mm256_blendv_epi8(bidx, cur, _mm256_castps_si256(lt));
      cur = _mm256_add_epi32(cur, step);
    }
    alignas(32) float bv[8];
    alignas(32) int32_t bix[8];
    _mm256_store_ps(bv, best);
    _mm256_store_si256((__m256i*)bix, bidx);
    float b = std::numeric_limits<float>::infinity();
    int64_t bi = 0;
    for (int l = 0; l < 8; ++l)
      if (bv[l] < b || (bv[l] == b && bix[l] < bi)) b = bv[l], bi = bix[l];
    scan_scalar(xi, ct, csq, V, k, k8, b, bi);
    store_row(xi, V, b, bi, idx + i, dist + i);
  }
}

// the extension's active ISA (lowbit_kernels.cpp): 1 = AVX2+FMA, 0 = scalar, forced by lowbit::set_isa
static bool has_avx2() { return lowbit::active_isa() == 1; }
#endif

std::tuple<at::Tensor, at::Tensor> vq_nearest(const at::Tensor& x_in, const at::Tensor& ct_in,
                                              const at::Tensor& csq_in) {
  auto x = x_in.contiguous(), ct = ct_in.contiguous(), csq = csq_in.contiguous();
  for (const auto* t : {&x, &ct, &csq})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "vq_nearest takes float32 CPU tensors");
  TORCH_CHECK(x.dim() == 2 && ct.dim() == 2 && ct.size(0) == x.size(1) && csq.numel() == ct.size(1),
              "vq_nearest: x (n, v), codebook_t (v, k), c_sq (k)");
  const int64_t n = x.size(0), v = x.size(1), k = ct.size(1);
  TORCH_CHECK(k > 0, "vq_nearest needs a non-empty codebook");
  auto idx = at::empty({n}, x.options().dtype(at::kLong));
  auto dist = at::empty({n}, x.options());
  const float *xp = x.data_ptr<float>(), *cp = ct.data_ptr<float>(), *sp = csq.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  float* dp = dist.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, k));
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
#if LOWBIT_VQ_X86
    if (has_avx2()) {
      switch (v) {
        case 1: return rows_avx2<1>(xp, cp, sp, k, r0, r1, ip, dp);
        case 2: return rows_avx2<2>(xp, cp, sp, k, r0, r1, ip, dp);
        case 4: return rows_avx2<4>(xp, cp, sp, k, r0, r1, ip, dp);
        case 6: return rows_avx2<6>(xp, cp, sp, k, r0, r1, ip, dp);
        case 8: return rows_avx2<8>(xp, cp, sp, k, r0, r1, ip, dp);
        case 12: return rows_avx2<12>(xp, cp, sp, k, r0, r1, ip, dp);
        case 16: return rows_avx2<16>(xp, cp, sp, k, r0, r1, ip, dp);
        default: break;
      }
    }
#endif
    rows_scalar(xp, cp, sp, v, k, r0, r1, ip, dp);
  });
  return {idx, dist};
}

at::Tensor& vq_min_dist_(at::Tensor& d2, const at::Tensor& x_in, const at::Tensor& c_in) {
  auto x = x_in.contiguous(), c = c_in.contiguous();
  TORCH_CHECK(d2.device().is_cpu() && d2.scalar_type() == at::kFloat && d2.is_contiguous() &&
                  x.scalar_type() == at::kFloat && c.scalar_type() == at::kFloat,
              "vq_min_dist_ takes contiguous float32 CPU tensors");
  const int64_t n = x.size(0), v = x.size(1);
  TORCH_CHECK(d2.numel() == n && c.numel() == v, "vq_min_dist_: d2 (n), x (n, v), c (v)");
  const float *xp = x.data_ptr<float>(), *cp = c.data_ptr<float>();
  float* dp = d2.data_ptr<float>();
  at::parallel_for(0, n, 16384, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      float s = 0.f;
      for (int64_t j = 0; j < v; ++j) {
        const float e = xp[i * v + j] - cp[j];
        s += e * e;
      }
      dp[i] = std::min(dp[i], s);
    }
  });
  return d2;
}


// ------------------------------------------------------------------ VQ GEMV
// A VPTQ weight: w[o, c] = (C[idx[o / v, c]][o % v] (+ R[ridx[o / v, c]][o % v])) * s_c + b_c on the main
// columns, the same with the outlier codebook (vector length v0) on the outlier columns. So
//   y[o] = sum_main (C[idx] (+ R[ridx]))[o % v] * x'_c + sum_outlier O[oidx][o % v0] * x'_c + sum_c b_c x_c,
// with x' = s * x: every index adds one codebook row, scaled by one input, into v outputs.
// Kernel layout (kernels/vq_layout.py): codes int16 (out / v, n_main) (int16 holds the 16-bit index
// bit pattern), codebooks float32 or float16 (main and residual alike) with rows padded to VP = 8 or 16
// values (one or two AVX2 registers); a float16 codebook is half the bytes per index and converts in
// the load (F16C).
struct VQProblem {
  const float* xm;        // (M, n_main) scaled inputs of the main columns
  const float* xo;        // (M, n_out) scaled inputs of the outlier columns
  const float* beta;      // (M) sum_c b_c x_c
  const uint16_t* codes;  // (R, n_main)
  const void* cb;         // (k, VP) float32 or float16 (half_cb)
  const uint16_t* rcodes; // (R, n_main) or null
  const void* rcb;        // (k_res, VP), the same dtype
  const uint16_t* ocodes; // (R0, n_out) or null
  const float* ocb;       // (k0, v0)
  const float* bias;
  float* y;               // (M, out)
  int64_t M, out, R, n_main, n_out, v, VP, v0;
  bool half_cb;
};

// entry j of codebook row `row` (scalar path)
static inline float cb_at(const void* cb, bool half, int64_t row, int64_t VP, int64_t j) {
  return half ? float(static_cast<const c10::Half*>(cb)[row * VP + j]) : static_cast<const float*>(cb)[row * VP + j];
}

static void vq_rows_scalar(const VQProblem& p, int64_t r0, int64_t r1) {
  std::vector<float> acc(p.VP);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t m = 0; m < p.M; ++m) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const float* xm = p.xm + m * p.n_main;
      for (int64_t i = 0; i < p.n_main; ++i) {
        const float a = xm[i];
        const int64_t row = p.codes[r * p.n_main + i];
        for (int64_t j = 0; j < p.v; ++j) acc[j] += a * cb_at(p.cb, p.half_cb, row, p.VP, j);
        if (p.rcodes) {
          const int64_t rr = p.rcodes[r * p.n_main + i];
          for (int64_t j = 0; j < p.v; ++j) acc[j] += a * cb_at(p.rcb, p.half_cb, rr, p.VP, j);
        }
      }
      for (int64_t j = 0; j < p.v; ++j) p.y[m * p.out + r * p.v + j] = acc[j] + p.beta[m];
    }
}

#if LOWBIT_VQ_X86
// 8 entries of a codebook row, float32 or float16 (converted in the load)
template <bool HALF>
VQ_AVX2 static inline __m256 load8(const void* base, int64_t off) {
  if (HALF) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(static_cast<const c10::Half*>(base) + off)));
  return _mm256_loadu_ps(static_cast<const float*>(base) + off);
}

// acc += a * (codebook row ci (+ residual row rci)), NV registers per row
template <int NV, bool HALF>
VQ_AVX2 static inline void add_rows(const VQProblem& p, __m256 a, int64_t ci, const uint16_t* rci, __m256* acc) {
  for (int q = 0; q < NV; ++q) acc[q] = _mm256_fmadd_ps(a, load8<HALF>(p.cb, ci * 8 * NV + 8 * q), acc[q]);
  if (rci)
    for (int q = 0; q < NV; ++q)
      acc[q] = _mm256_fmadd_ps(a, load8<HALF>(p.rcb, int64_t(*rci) * 8 * NV + 8 * q), acc[q]);
}

template <int NV, bool HALF>  // NV registers of 8 values per codebook row (VP = 8 * NV)
VQ_AVX2 static void vq_rows_avx2(const VQProblem& p, int64_t r0, int64_t r1) {
  // four independent accumulator chains: one chain would wait on the FMA latency (4 cycles) per index
  constexpr int CH = 4;
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* cr = p.codes + r * p.n_main;
    const uint16_t* rcr = p.rcodes ? p.rcodes + r * p.n_main : nullptr;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* xm = p.xm + m * p.n_main;
      __m256 acc[CH][NV];
      for (int c = 0; c < CH; ++c)
        for (int q = 0; q < NV; ++q) acc[c][q] = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + CH <= p.n_main; i += CH)
        for (int c = 0; c < CH; ++c)
          add_rows<NV, HALF>(p, _mm256_broadcast_ss(xm + i + c), cr[i + c], rcr ? rcr + i + c : nullptr, acc[c]);
      for (; i < p.n_main; ++i)
        add_rows<NV, HALF>(p, _mm256_broadcast_ss(xm + i), cr[i], rcr ? rcr + i : nullptr, acc[0]);
      alignas(32) float tmp[8 * NV];
      for (int q = 0; q < NV; ++q)
        _mm256_store_ps(tmp + 8 * q, _mm256_add_ps(_mm256_add_ps(acc[0][q], acc[1][q]),
                                                   _mm256_add_ps(acc[2][q], acc[3][q])));
      for (int64_t j = 0; j < p.v; ++j) p.y[m * p.out + r * p.v + j] = tmp[j] + p.beta[m];
    }
  }
}
#endif

// outputs o0..o1-1: add the outlier columns' lookups and the bias
static void vq_rows_epilogue(const VQProblem& p, int64_t o0, int64_t o1) {
  for (int64_t m = 0; m < p.M; ++m) {
    float* y = p.y + m * p.out;
    if (p.bias)
      for (int64_t o = o0; o < o1; ++o) y[o] += p.bias[o];
    if (!p.ocodes) continue;
    const float* xo = p.xo + m * p.n_out;
    for (int64_t g = o0 / p.v0; g * p.v0 < o1; ++g) {  // outlier vector groups overlapping o0..o1-1
      const uint16_t* oc = p.ocodes + g * p.n_out;
      for (int64_t j = 0; j < p.v0; ++j) {
        const int64_t o = g * p.v0 + j;
        if (o < o0 || o >= o1) continue;
        float s = 0.f;
        for (int64_t i = 0; i < p.n_out; ++i) s += xo[i] * p.ocb[int64_t(oc[i]) * p.v0 + j];
        y[o] += s;
      }
    }
  }
}

at::Tensor vq_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& codebook,
                     const c10::optional<at::Tensor>& res_codes, const c10::optional<at::Tensor>& res_codebook,
                     const at::Tensor& main_cols, const c10::optional<at::Tensor>& out_codes,
                     const c10::optional<at::Tensor>& out_codebook, const c10::optional<at::Tensor>& outlier_cols,
                     const c10::optional<at::Tensor>& col_scale, const c10::optional<at::Tensor>& col_bias,
                     const c10::optional<at::Tensor>& bias, int64_t v, int64_t v0) {
  auto defined = [](const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); };
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat, "x must be float32 on the CPU");
  TORCH_CHECK(codes.scalar_type() == at::kShort && codes.is_contiguous() && codes.dim() == 2,
              "codes must be contiguous int16 (out / v, n_main)");
  const bool half_cb = codebook.scalar_type() == at::kHalf;
  TORCH_CHECK((half_cb || codebook.scalar_type() == at::kFloat) && codebook.is_contiguous() && codebook.size(1) >= v &&
                  (codebook.size(1) == 8 || codebook.size(1) == 16),
              "codebook must be contiguous float32 or float16 (k, VP) with VP = 8 or 16 >= v");
  const int64_t R = codes.size(0), n_main = codes.size(1), VP = codebook.size(1), out = R * v;
  const int64_t in = x_in.size(-1);
  auto x = x_in.reshape({-1, in}).contiguous();
  const int64_t M = x.size(0);
  TORCH_CHECK(main_cols.scalar_type() == at::kLong && main_cols.numel() == n_main, "main_cols must be int64 (n_main)");
  // inputs of the main and outlier columns, column-scaled, and beta = sum_c b_c x_c: plain loops, since
  // at decode sizes a chain of tensor ops would cost more than the GEMV itself
  auto f32 = [&](const c10::optional<at::Tensor>& t, int64_t n, const char* name) -> const float* {
    if (!defined(t)) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n, name,
                " must be contiguous float32 with ", std::to_string(n), " entries");
    return t->data_ptr<float>();
  };
  const float* sc = f32(col_scale, in, "col_scale");
  const float* bc = f32(col_bias, in, "col_bias");
  const float* bias_p = f32(bias, out, "bias");
  const int64_t n_out = defined(outlier_cols) ? outlier_cols->numel() : 0;
  const uint16_t* oc = nullptr;
  const float* ob = nullptr;
  if (n_out) {
    TORCH_CHECK(defined(out_codes) && out_codes->scalar_type() == at::kShort && out_codes->is_contiguous() &&
                    defined(out_codebook) && out_codebook->scalar_type() == at::kFloat &&
                    out_codebook->is_contiguous() && out_codebook->size(1) == v0 && out_codes->size(0) * v0 == out &&
                    out_codes->size(1) == n_out && outlier_cols->scalar_type() == at::kLong,
                "outlier codes (out / v0, n_out), codebook float32 (k0, v0) and int64 columns must come together");
    oc = reinterpret_cast<const uint16_t*>(out_codes->data_ptr<int16_t>());
    ob = out_codebook->data_ptr<float>();
  }
  auto xm = at::empty({M, n_main}, x.options());
  auto xo = at::empty({M, std::max<int64_t>(n_out, 1)}, x.options());
  auto beta = at::zeros({M}, x.options());
  {
    const float* xp = x.data_ptr<float>();
    const int64_t* mc = main_cols.data_ptr<int64_t>();
    const int64_t* ocol = n_out ? outlier_cols->data_ptr<int64_t>() : nullptr;
    float *xmp = xm.data_ptr<float>(), *xop = xo.data_ptr<float>(), *bp = beta.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = xp + m * in;
      for (int64_t i = 0; i < n_main; ++i) xmp[m * n_main + i] = xr[mc[i]] * (sc ? sc[mc[i]] : 1.f);
      for (int64_t i = 0; i < n_out; ++i) xop[m * n_out + i] = xr[ocol[i]] * (sc ? sc[ocol[i]] : 1.f);
      if (bc) {
        float s = 0.f;
        for (int64_t c = 0; c < in; ++c) s += bc[c] * xr[c];
        bp[m] = s;
      }
    }
  }
  auto y = at::empty({M, out}, x.options());
  VQProblem p{};
  p.xm = xm.data_ptr<float>();
  p.xo = xo.data_ptr<float>();
  p.beta = beta.data_ptr<float>();
  p.codes = reinterpret_cast<const uint16_t*>(codes.data_ptr<int16_t>());
  p.cb = codebook.data_ptr();
  p.half_cb = half_cb;
  p.ocodes = oc, p.ocb = ob, p.bias = bias_p;
  if (defined(res_codes)) {
    TORCH_CHECK(res_codes->scalar_type() == at::kShort && res_codes->sizes() == codes.sizes() &&
                    res_codes->is_contiguous() && defined(res_codebook) &&
                    res_codebook->scalar_type() == codebook.scalar_type() && res_codebook->is_contiguous() &&
                    res_codebook->size(1) == VP,
                "residual codes must match codes, and the residual codebook must have the codebook's dtype and "
                "row width (k_res, VP)");
    p.rcodes = reinterpret_cast<const uint16_t*>(res_codes->data_ptr<int16_t>());
    p.rcb = res_codebook->data_ptr();
  }
  p.y = y.data_ptr<float>();
  p.M = M, p.out = out, p.R = R, p.n_main = n_main, p.n_out = n_out, p.v = v, p.VP = VP, p.v0 = v0;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n_main * 2 * M));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
#if LOWBIT_VQ_X86
    if (has_avx2())
      (VP == 8 ? (half_cb ? vq_rows_avx2<1, true> : vq_rows_avx2<1, false>)
               : (half_cb ? vq_rows_avx2<2, true> : vq_rows_avx2<2, false>))(p, r0, r1);
    else
#endif
      vq_rows_scalar(p, r0, r1);
    vq_rows_epilogue(p, r0 * v, r1 * v);
  });
  auto sizes = x_in.sizes().vec();
  sizes.back() = out;
  return y.view(sizes);
}

}  // namespace lowbit_vq

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("vq_nearest(Tensor x, Tensor codebook_t, Tensor c_sq) -> (Tensor, Tensor)");
  m.def("vq_min_dist_(Tensor(a!) d2, Tensor x, Tensor c) -> Tensor(a!)");
  m.def("vq_linear(Tensor x, Tensor codes, Tensor codebook, Tensor? res_codes, Tensor? res_codebook, "
        "Tensor main_cols, Tensor? out_codes, Tensor? out_codebook, Tensor? outlier_cols, Tensor? col_scale, "
        "Tensor? col_bias, Tensor? bias, int v, int v0) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("vq_nearest", &lowbit_vq::vq_nearest);
  m.impl("vq_min_dist_", &lowbit_vq::vq_min_dist_);
  m.impl("vq_linear", &lowbit_vq::vq_linear);
}
