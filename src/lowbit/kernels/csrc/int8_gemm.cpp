// INT8 x INT8 -> INT32 GEMM for CPUs with AVX2 but no VNNI (plus a portable scalar path).
//
// C[m, n] = sum_k A[m, k] * B[n, k]; A (M, Kp) and B (N, Kp) are row-major int8 with Kp a
// multiple of 32 (callers zero-pad K). Exact: every product and partial sum is an integer.
//
// AVX2 trick (no VNNI): _mm256_maddubs_epi16 multiplies unsigned by signed bytes and adds
// pairs into int16. We feed it |B| (unsigned; |-128| = 0x80 = 128 is right as u8) and
// A * sign(B) (signed). With A clamped to [-127, 127] (the callers' symmetric activation range)
// a pair sum is at most 2 * 128 * 127 = 32512 < 32767, so the int16 never saturates;
// _mm256_madd_epi16 with ones widens the pairs to int32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>

namespace {

__attribute__((target("avx2")))
inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_hadd_epi32(s, s);
  s = _mm_hadd_epi32(s, s);
  return _mm_cvtsi128_si32(s);
}

__attribute__((target("avx2")))
inline __m256i dot32(__m256i a, __m256i w, __m256i aw, __m256i ones) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(a, w)), ones);
}

// rows [m0, m1) x cols [n0, n1) of C
__attribute__((target("avx2")))
void tile_avx2(const int8_t* A, const int8_t* B, int32_t* C, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
               int64_t Kp, int64_t N) {
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t m = m0;
  for (; m + 2 <= m1; m += 2) {
    const int8_t* a0p = A + m * Kp;
    const int8_t* a1p = a0p + Kp;
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
      __m256i c00 = _mm256_setzero_si256(), c01 = c00, c02 = c00, c03 = c00;
      __m256i c10 = c00, c11 = c00, c12 = c00, c13 = c00;
      const int8_t* b0 = B + n * Kp;
      for (int64_t k = 0; k < Kp; k += 32) {
        __m256i a0 = _mm256_loadu_si256((const __m256i*)(a0p + k));
        __m256i a1 = _mm256_loadu_si256((const __m256i*)(a1p + k));
        __m256i w, aw;
        w = _mm256_loadu_si256((const __m256i*)(b0 + k)); aw = _mm256_sign_epi8(w, w);
        c00 = _mm256_add_epi32(c00, dot32(a0, w, aw, ones)); c10 = _mm256_add_epi32(c10, dot32(a1, w, aw, ones));
        w = _mm256_loadu_si256((const __m256i*)(b0 + Kp + k)); aw = _mm256_sign_epi8(w, w);
        c01 = _mm256_add_epi32(c01, dot32(a0, w, aw, ones)); c11 = _mm256_add_epi32(c11, dot32(a1, w, aw, ones));
        w = _mm256_loadu_si256((const __m256i*)(b0 + 2 * Kp + k)); aw = _mm256_sign_epi8(w, w);
        c02 = _mm256_add_epi32(c02, dot32(a0, w, aw, ones)); c12 = _mm256_add_epi32(c12, dot32(a1, w, aw, ones));
        w = _mm256_loadu_si256((const __m256i*)(b0 + 3 * Kp + k)); aw = _mm256_sign_epi8(w, w);
        c03 = _mm256_add_epi32(c03, dot32(a0, w, aw, ones)); c13 = _mm256_add_epi32(c13, dot32(a1, w, aw, ones));
      }
      int32_t* r0 = C + m * N + n;
      int32_t* r1 = r0 + N;
      r0[0] = hsum(c00); r0[1] = hsum(c01); r0[2] = hsum(c02); r0[3] = hsum(c03);
      r1[0] = hsum(c10); r1[1] = hsum(c11); r1[2] = hsum(c12); r1[3] = hsum(c13);
    }
    for (; n < n1; ++n) {
      __m256i c0 = _mm256_setzero_si256(), c1 = c0;
      const int8_t* b0 = B + n * Kp;
      for (int64_t k = 0; k < Kp; k += 32) {
        __m256i w = _mm256_loadu_si256((const __m256i*)(b0 + k)), aw = _mm256_sign_epi8(w, w);
        c0 = _mm256_add_epi32(c0, dot32(_mm256_loadu_si256((const __m256i*)(a0p + k)), w, aw, ones));
        c1 = _mm256_add_epi32(c1, dot32(_mm256_loadu_si256((const __m256i*)(a1p + k)), w, aw, ones));
      }
      C[m * N + n] = hsum(c0);
      C[(m + 1) * N + n] = hsum(c1);
    }
  }
  for (; m < m1; ++m) {
    const int8_t* a0p = A + m * Kp;
    for (int64_t n = n0; n < n1; ++n) {
      __m256i c0 = _mm256_setzero_si256();
      const int8_t* b0 = B + n * Kp;
      for (int64_t k = 0; k < Kp; k += 32) {
        __m256i w = _mm256_loadu_si256((const __m256i*)(b0 + k)), aw = _mm256_sign_epi8(w, w);
        c0 = _mm256_add_epi32(c0, dot32(_mm256_loadu_si256((const __m256i*)(a0p + k)), w, aw, ones));
      }
      C[m * N + n] = hsum(c0);
    }
  }
}

void tile_scalar(const int8_t* A, const int8_t* B, int32_t* C, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                 int64_t Kp, int64_t N) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      int32_t s = 0;
      const int8_t* a = A + m * Kp;
      const int8_t* b = B + n * Kp;
      for (int64_t k = 0; k < Kp; ++k) s += int32_t(a[k]) * int32_t(b[k]);
      C[m * N + n] = s;
    }
}

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}

}  // namespace

// a (M, Kp) int8 with |a| <= 127, b (N, Kp) int8, Kp % 32 == 0 -> (M, N) int32
torch::Tensor gemm_s8s8s32(torch::Tensor a, torch::Tensor b, bool use_simd) {
  TORCH_CHECK(a.dtype() == torch::kInt8 && b.dtype() == torch::kInt8, "int8 inputs expected");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), "shapes (M, K) and (N, K) expected");
  TORCH_CHECK(a.size(1) % 32 == 0, "K must be a multiple of 32 (zero-pad it)");
  a = a.contiguous();
  b = b.contiguous();
  const int64_t M = a.size(0), N = b.size(0), Kp = a.size(1);
  auto c = torch::empty({M, N}, torch::dtype(torch::kInt32));
  const int8_t* A = a.data_ptr<int8_t>();
  const int8_t* B = b.data_ptr<int8_t>();
  int32_t* C = c.data_ptr<int32_t>();
  const bool simd = use_simd && has_avx2();
  // tiles: 64 weight rows (<= 64 * Kp bytes stay in L2) x 128 activation rows
  const int64_t NB = 64, MB = 128;
  const int64_t tn = (N + NB - 1) / NB, tm = (M + MB - 1) / MB;
  at::parallel_for(0, tn * tm, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t % tm, j = t / tm;
      const int64_t m0 = i * MB, m1 = std::min(M, m0 + MB), n0 = j * NB, n1 = std::min(N, n0 + NB);
      if (simd) tile_avx2(A, B, C, m0, m1, n0, n1, Kp, N);
      else tile_scalar(A, B, C, m0, m1, n0, n1, Kp, N);
    }
  });
  return c;
}

bool simd_available() { return has_avx2(); }

// ---- the work around the GEMM of a W8A8 linear: activation codes before it, the float rescale after it ----

namespace {

bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
  return ok;
}

// codes of one row: q[k] = clamp(nearbyint(x[k] / s), -Q, Q) for k < K, 0 for K <= k < Kp. The division (not a
// multiplication by 1/s) and round-half-to-even match torch's ``round(x / s).clamp(-Q, Q)`` bit for bit.
__attribute__((target("avx512f,avx512bw,avx512vl")))
void quant_row_avx512(const float* x, int8_t* q, int64_t K, int64_t Kp, float s, float Q) {
  const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-Q), hi = _mm512_set1_ps(Q);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 v = _mm512_div_ps(_mm512_loadu_ps(x + k), vs);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  if (k < K) {
    const __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
    __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + k), vs);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    _mm_mask_storeu_epi8(q + k, m, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
    k += 16;
  }
  for (int64_t j = K; j < Kp; ++j) q[j] = 0;
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
float absmax_avx512(const float* x, int64_t K) {
  __m512 m = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  if (k < K) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps((__mmask16)((1u << (K - k)) - 1), x + k)));
  return _mm512_reduce_max_ps(m);
}

// y[n] = float(acc[n]) * (s * ws[n]) + b[n] (y may be acc's own storage); the product s * ws[n] first, then a
// separate multiply and add: the plain-torch reference's order. GCC would contract the multiply and add into an
// FMA (its default -ffp-contract=fast applies to intrinsics too), so not here.
__attribute__((target("avx512f"), optimize("fp-contract=off")))
void rescale_row_avx512(const void* acc, bool acc_float, float* y, const float* ws, const float* b, float s,
                        int64_t N) {
  const __m512 vs = _mm512_set1_ps(s);
  const int32_t* ai = static_cast<const int32_t*>(acc);
  const float* af = static_cast<const float*>(acc);
  for (int64_t n = 0; n < N; n += 16) {
    const __mmask16 m = N - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1);
    __m512 v = acc_float ? _mm512_maskz_loadu_ps(m, af + n) : _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, ai + n));
    v = _mm512_mul_ps(v, _mm512_mul_ps(vs, _mm512_maskz_loadu_ps(m, ws + n)));
    if (b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, b + n));
    _mm512_mask_storeu_ps(y + n, m, v);
  }
}

}  // namespace

// x (M, K) float32 -> (codes int8 (M, Kp), scale float32 (M, 1) or the given one). Per-token dynamic scale
// max(max|x'_m| / Q, 1e-8) when ``scale`` is None, else the static (1,) scale; Q = 2**(bits-1) - 1. With ``idx``
// (Kp,) int64 and ``inv_k`` (Kp,) float32, x' = x[:, idx] * inv_k (the flattening gather, padding included: one
// float multiply per element, as torch's ``index_select(...).mul_(inv_k)``), gathered a row at a time; else x' = x.
std::vector<torch::Tensor> quant_rows(torch::Tensor x, int64_t Kp, int64_t bits, c10::optional<torch::Tensor> scale,
                                      c10::optional<torch::Tensor> idx, c10::optional<torch::Tensor> inv_k) {
  TORCH_CHECK(has_avx512(), "quant_rows needs AVX-512");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "float32 (M, K) expected");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  const bool gather = idx.has_value();
  torch::Tensor ix, ik;
  if (gather) {
    ix = idx->to(torch::kInt64).contiguous();
    ik = inv_k->to(torch::kFloat32).contiguous();
    TORCH_CHECK(ix.numel() == Kp && ik.numel() == Kp, "idx and inv_k have Kp entries");
    TORCH_CHECK(ix.numel() == 0 || (ix.min().item<int64_t>() >= 0 && ix.max().item<int64_t>() < K), "idx out of range");
  } else {
    TORCH_CHECK(K <= Kp, "K <= Kp expected");
  }
  const float Q = float((1 << (bits - 1)) - 1);
  auto q = torch::empty({M, Kp}, torch::dtype(torch::kInt8));
  const bool dyn = !scale.has_value();
  torch::Tensor s = dyn ? torch::empty({M, 1}, torch::dtype(torch::kFloat32)) : scale->to(torch::kFloat32).contiguous();
  TORCH_CHECK(dyn || s.numel() == 1, "a static scale has one element");
  const float* X = x.data_ptr<float>();
  const int64_t* IX = gather ? ix.data_ptr<int64_t>() : nullptr;
  const float* IK = gather ? ik.data_ptr<float>() : nullptr;
  int8_t* Qp = q.data_ptr<int8_t>();
  float* S = s.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<float> buf(gather ? Kp : 0);
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = X + m * K;
      int64_t n = K;
      if (gather) {
        for (int64_t k = 0; k < Kp; ++k) buf[k] = row[IX[k]] * IK[k];
        row = buf.data();
        n = Kp;
      }
      float sm;
      if (dyn) {
        sm = absmax_avx512(row, n) / Q;
        sm = sm < 1e-8f ? 1e-8f : sm;
        S[m] = sm;
      } else {
        sm = S[0];
      }
      quant_row_avx512(row, Qp + m * Kp, n, Kp, sm, Q);
    }
  });
  return {q, s};
}

// acc (M, N) int32 (or its float32 conversion) -> out (M, N) float32 = acc * (s (M or 1) outer ws (N,)) + bias (N,). ``out``: rows with unit
// column stride (a column block of a wider output, say), or None for acc's own storage (acc is consumed).
torch::Tensor rescale(torch::Tensor acc, torch::Tensor s, torch::Tensor ws, c10::optional<torch::Tensor> bias,
                      c10::optional<torch::Tensor> out) {
  TORCH_CHECK(has_avx512(), "rescale needs AVX-512");
  const bool acc_float = acc.dtype() == torch::kFloat32;
  TORCH_CHECK((acc_float || acc.dtype() == torch::kInt32) && acc.dim() == 2 && acc.is_contiguous(),
              "contiguous int32 or float32 (M, N) expected");
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(s.dtype() == torch::kFloat32 && (s.numel() == M || s.numel() == 1), "float32 scale of M or 1 values");
  TORCH_CHECK(ws.dtype() == torch::kFloat32 && ws.numel() == N && ws.is_contiguous(), "float32 (N,) weight scale");
  torch::Tensor y = out.has_value() ? *out : (acc_float ? acc : acc.view(torch::kFloat32));
  TORCH_CHECK(y.dtype() == torch::kFloat32 && y.dim() == 2 && y.size(0) == M && y.size(1) == N && y.stride(1) == 1,
              "float32 (M, N) output with unit column stride");
  s = s.contiguous();
  const float* B = nullptr;
  torch::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.dtype() == torch::kFloat32 && b.numel() == N, "float32 (N,) bias");
    B = b.data_ptr<float>();
  }
  const char* A = static_cast<const char*>(acc.data_ptr());   // 4-byte elements either way
  float* Y = y.data_ptr<float>();
  const int64_t ldy = y.stride(0);
  const float* S = s.data_ptr<float>();
  const float* W = ws.data_ptr<float>();
  const bool per_row = s.numel() == M && M > 1;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) rescale_row_avx512(A + 4 * m * N, acc_float, Y + m * ldy, W, B, per_row ? S[m] : S[0], N);
  });
  return y;
}

bool epilogue_available() { return has_avx512(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm_s8s8s32", &gemm_s8s8s32, "int8 x int8 -> int32 GEMM, C = A B^T");
  m.def("simd_available", &simd_available, "whether the AVX2 path runs on this CPU");
  m.def("quant_rows", &quant_rows, "per-row (or static) symmetric int8 activation codes, zero-padded to Kp, "
        "optionally of a gathered and scaled x[:, idx] * inv_k");
  m.def("rescale", &rescale, "int32 GEMM result -> float acc * (s outer ws) + bias, into out or in place");
  m.def("epilogue_available", &epilogue_available, "whether quant_rows / rescale_ run on this CPU");
}
