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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm_s8s8s32", &gemm_s8s8s32, "int8 x int8 -> int32 GEMM, C = A B^T");
  m.def("simd_available", &simd_available, "whether the AVX2 path runs on this CPU");
}
