// Nearest-codeword search for vector quantization (VPTQ's k-means and code assignment), CPU.
//
//   vq_nearest(x (n, v) float32, codebook_t (v, k) float32, c_sq (k) float32) -> (idx (n) int64, dist (n) float32)
//   vq_min_dist_(d2 (n) float32, x (n, v), c (v)) -> d2     d2 = min(d2, |x_i - c|^2), in place (k-means++ seeding)
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

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#if defined(__x86_64__) || defined(_M_X64)
#define LOWBIT_VQ_X86 1
#include <immintrin.h>
#endif

namespace lowbit_vq {

// scalar path (and any vector length)
static void rows_scalar(const float* x, const float* ct, const float* csq, int64_t v, int64_t k, int64_t r0,
                        int64_t r1, int64_t* idx, float* dist) {
  for (int64_t i = r0; i < r1; ++i) {
    const float* xi = x + i * v;
    float best = std::numeric_limits<float>::infinity();
    int64_t bi = 0;
    for (int64_t c = 0; c < k; ++c) {
      float acc = 0.f;
      for (int64_t j = 0; j < v; ++j) acc = std::fma(xi[j], ct[j * k + c], acc);
      const float d = std::fma(-2.f, acc, csq[c]);
      if (d < best) best = d, bi = c;
    }
    float xx = 0.f;
    for (int64_t j = 0; j < v; ++j) xx += xi[j] * xi[j];
    idx[i] = bi;
    dist[i] = std::max(0.f, best + xx);
  }
}

#if LOWBIT_VQ_X86
#define VQ_AVX2 __attribute__((target("avx2,fma")))

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
    for (int64_t c = k8; c < k; ++c) {
      float acc = xi[0] * ct[c];
      for (int j = 1; j < V; ++j) acc = std::fma(xi[j], ct[j * k + c], acc);
      const float d = std::fma(-2.f, acc, csq[c]);
      if (d < b) b = d, bi = c;
    }
    float xx = 0.f;
    for (int j = 0; j < V; ++j) xx += xi[j] * xi[j];
    idx[i] = bi;
    dist[i] = std::max(0.f, b + xx);
  }
}

static bool has_avx2() {
  static const int ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
  }();
  return ok;
}
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

}  // namespace lowbit_vq

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("vq_nearest(Tensor x, Tensor codebook_t, Tensor c_sq) -> (Tensor, Tensor)");
  m.def("vq_min_dist_(Tensor(a!) d2, Tensor x, Tensor c) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("vq_nearest", &lowbit_vq::vq_nearest);
  m.impl("vq_min_dist_", &lowbit_vq::vq_min_dist_);
}
