// LUT GEMM: table formats (FP, NF; one or two scales; 2-4 bits) for batches of inputs.
//
// Registered as a torch op (namespace ``lowbit``) and bound directly (bindings.cpp):
//   gemm_lut_tiled(x, codes, scale_a, scale_b?, table, bias?, bits, group_size, in_features, mode) -> y
//
// Same kernel layout and arguments as gemm_lut (lowbit_kernels.cpp). Instead of decoding every weight
// again for every few input rows (the fused GEMV/GEMM does that), a tile of output rows is decoded once
// into a small float buffer, exactly the dequantized weights (t[q] times the group's scale for that
// level's sign), and reused for a whole chunk of input rows:
//   mode 0 ("tile"): TR = 16, 8 or 4 rows x the padded row width (at most about 40 KiB); the buffer stays in L1 and a hand-written
//          micro-kernel (4 weight rows x 6 input rows of 16-wide accumulators, AVX-512; 8-wide on AVX2,
//          or with LOWBIT_KERNEL_NO_AVX512=1; scalar otherwise) runs the whole input chunk over it;
//   mode 1 ("mm"): TL = 64 rows, and the buffer is multiplied by the input chunk with at::mm
//          (torch's BLAS, one thread per tile: the tiles are what the threads share).
// Input rows are taken in chunks of about 256 KiB, each chunk decoding every tile once, so the
// chunk and the tile stay in cache. Every output element is computed by one thread in a fixed order
// (results do not depend on the thread count); they equal x @ W.T up to float summation order.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define LOWBIT_X86 1
#include <immintrin.h>
#endif

namespace lowbit {  // lowbit_kernels.cpp
int active_isa();
}  // namespace lowbit

namespace lowbit_lutgemm {

struct Geo {
  int64_t gs, G, gsp, nb_last, row_bytes, Kp;
  int64_t nblocks(int64_t g) const { return g == G - 1 ? nb_last : gsp / 32; }
};

static Geo geometry(int64_t bits, int64_t group_size, int64_t in_features) {
  Geo g;
  g.gs = (group_size <= 0 || group_size >= in_features) ? in_features : group_size;
  g.G = (in_features + g.gs - 1) / g.gs;
  g.gsp = (g.gs + 31) / 32 * 32;
  g.nb_last = (in_features - (g.G - 1) * g.gs + 31) / 32;
  g.Kp = (g.G - 1) * g.gsp + g.nb_last * 32;
  g.row_bytes = g.Kp / 32 * 4 * bits;
  return g;
}

struct Problem {
  const float* xp;       // (M, Kp) zero-padded input
  const uint8_t* codes;  // (out, row_bytes)
  const c10::Half* sa;   // (out, G)
  const c10::Half* sb;   // (out, G): sa for one-scale formats
  float table[16];       // 2^bits entries, the rest 0
  const float* bias;     // (out) or nullptr
  float* y;              // (M, out)
  int bits;
  int64_t M, out;
  Geo geo;
};

// ------------------------------------------------------------------ decoding a tile
// Row o's weight at padded column c: t[q] * (t[q] > 0 ? sa : sb), the arithmetic of dequant_lut, so
// the buffer holds exactly the dequantized weights (padding columns hold t[0] * s and meet zero inputs).

static inline int code_at(const uint8_t* blk, int bits, int c) {
  const int j = c / 8, l = c % 8;
  if (bits == 4) return ((blk[2 * l] | (blk[2 * l + 1] << 8)) >> (4 * j)) & 15;
  int q = (blk[l] >> (2 * j)) & 3;
  if (bits == 3) {
    uint32_t h;
    std::memcpy(&h, blk + 8, 4);
    q |= ((h >> (4 * l + j)) & 1) << 2;
  }
  return q;
}

static void decode_rows_scalar(const Problem& p, int64_t o0, int64_t nr, float* dst) {
  const Geo& g = p.geo;
  const int64_t nb = g.gsp / 32;
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* row = p.codes + (o0 + r) * g.row_bytes;
    float* d = dst + r * g.Kp;
    for (int64_t gi = 0; gi < g.G; ++gi) {
      const float sa = float(p.sa[(o0 + r) * g.G + gi]), sb = float(p.sb[(o0 + r) * g.G + gi]);
      for (int64_t b = 0; b < g.nblocks(gi); ++b) {
        const uint8_t* blk = row + (gi * nb + b) * 4 * p.bits;
        for (int c = 0; c < 32; ++c) {
          const float t = p.table[code_at(blk, p.bits, c)];
          d[gi * g.gsp + b * 32 + c] = t * (t > 0.f ? sa : sb);
        }
      }
    }
  }
}

#if LOWBIT_X86
#define AVX512_FN __attribute__((target("avx512f,avx512vl,avx512bw,avx2,fma,f16c")))
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))

static bool has_avx512() {
#if defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

// 16 codes (chunks j, j + 1 of a block: columns 8j .. 8j + 15) as int32 lanes; only their low 4 bits
// matter to vpermps, so 4-bit codes need no mask.
AVX512_FN static inline void decode_block_512(const uint8_t* blk, int bits, __m512 st, float* d) {
  if (bits == 4) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)blk));
    const __m512i vv = _mm512_inserti64x4(_mm512_castsi256_si512(v), v, 1);
    const __m512i s01 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
    const __m512i s23 = _mm512_setr_epi32(8, 8, 8, 8, 8, 8, 8, 8, 12, 12, 12, 12, 12, 12, 12, 12);
    _mm512_storeu_ps(d, _mm512_permutexvar_ps(_mm512_srlv_epi32(vv, s01), st));
    _mm512_storeu_ps(d + 16, _mm512_permutexvar_ps(_mm512_srlv_epi32(vv, s23), st));
    return;
  }
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)blk));
  const __m512i vv = _mm512_inserti64x4(_mm512_castsi256_si512(v), v, 1);
  const __m512i three = _mm512_set1_epi32(3);
  __m512i q01 = _mm512_and_si512(_mm512_srlv_epi32(vv, _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2,
                                                                         2, 2)), three);
  __m512i q23 = _mm512_and_si512(_mm512_srlv_epi32(vv, _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6,
                                                                         6, 6)), three);
  if (bits == 3) {
    uint32_t h;
    std::memcpy(&h, blk + 8, 4);
    const __m512i hv = _mm512_set1_epi32((int)h), four = _mm512_set1_epi32(4);
    // bit 4l + j of h is bit 2 of code (j, l): shift it to bit 2
    const __m512i l4 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    const __m512i c01 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i sh01 = _mm512_add_epi32(l4, c01), sh23 = _mm512_add_epi32(sh01, _mm512_set1_epi32(2));
    q01 = _mm512_or_si512(q01, _mm512_and_si512(_mm512_slli_epi32(_mm512_srlv_epi32(hv, sh01), 2), four));
    q23 = _mm512_or_si512(q23, _mm512_and_si512(_mm512_slli_epi32(_mm512_srlv_epi32(hv, sh23), 2), four));
  }
  _mm512_storeu_ps(d, _mm512_permutexvar_ps(q01, st));
  _mm512_storeu_ps(d + 16, _mm512_permutexvar_ps(q23, st));
}

AVX512_FN static void decode_rows_512(const Problem& p, int64_t o0, int64_t nr, float* dst) {
  const Geo& g = p.geo;
  const int64_t nb = g.gsp / 32, bb = 4 * p.bits;
  const __m512 t = _mm512_loadu_ps(p.table);
  const __mmask16 pos = _mm512_cmp_ps_mask(t, _mm512_setzero_ps(), _CMP_GT_OQ);
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* row = p.codes + (o0 + r) * g.row_bytes;
    float* d = dst + r * g.Kp;
    for (int64_t gi = 0; gi < g.G; ++gi) {
      const int64_t pg = (o0 + r) * g.G + gi;
      const __m512 va = _mm512_set1_ps(_cvtsh_ss(p.sa[pg].x)), vb = _mm512_set1_ps(_cvtsh_ss(p.sb[pg].x));
      const __m512 st = _mm512_mask_blend_ps(pos, _mm512_mul_ps(t, vb), _mm512_mul_ps(t, va));
      const int64_t n = g.nblocks(gi);
      for (int64_t b = 0; b < n; ++b) decode_block_512(row + (gi * nb + b) * bb, p.bits, st, d + gi * g.gsp + b * 32);
    }
  }
}

// ------------------------------------------------------------------ micro-kernels
// y[m, o] (+)= sum_k w[r, k] * x[m, k] for RR weight rows and MR input rows, dot-product form: RR * MR
// vector accumulators over the padded width (a multiple of 32), one horizontal sum each at the end.

AVX512_FN static inline float hsum512(__m512 v) {
  __m256 s = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

template <int RR, int MR>
AVX512_FN static void micro_512(const float* w, const float* x, int64_t Kp, float* y, int64_t ldy) {
  __m512 acc[RR][MR];
  for (int r = 0; r < RR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 16) {
    __m512 wv[RR];
    for (int r = 0; r < RR; ++r) wv[r] = _mm512_loadu_ps(w + r * Kp + k);
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * Kp + k);
      for (int r = 0; r < RR; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    if (RR == 4) {   // four rows' sums in one 128-bit store: halve each to 256 bits, then two rounds of hadd
      __m256 h[4];
      for (int r = 0; r < 4; ++r)
        h[r] = _mm256_add_ps(_mm512_castps512_ps256(acc[r][m]),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r][m]), 1)));
      const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
      _mm_storeu_ps(y + m * ldy, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
    } else {
      for (int r = 0; r < RR; ++r) y[m * ldy + r] = hsum512(acc[r][m]);
    }
  }
}

AVX2_FN static inline float hsum256(__m256 v) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

template <int RR, int MR>
AVX2_FN static void micro_256(const float* w, const float* x, int64_t Kp, float* y, int64_t ldy) {
  __m256 acc[RR][MR];
  for (int r = 0; r < RR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 8) {
    __m256 wv[RR];
    for (int r = 0; r < RR; ++r) wv[r] = _mm256_loadu_ps(w + r * Kp + k);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * Kp + k);
      for (int r = 0; r < RR; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < RR; ++r) y[m * ldy + r] = hsum256(acc[r][m]);
}
#endif

template <int RR, int MR>
static void micro_scalar(const float* w, const float* x, int64_t Kp, float* y, int64_t ldy) {
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < RR; ++r) {
      float s = 0.f;
      for (int64_t k = 0; k < Kp; ++k) s += w[r * Kp + k] * x[m * Kp + k];
      y[m * ldy + r] = s;
    }
}

using MicroFn = void (*)(const float*, const float*, int64_t, float*, int64_t);
using DecodeFn = void (*)(const Problem&, int64_t, int64_t, float*);

constexpr int RRMAX = 4, MRMAX = 6;

// micro[rr - 1][mr - 1] for the chosen ISA
struct Kernels {
  MicroFn micro[RRMAX][MRMAX];
  DecodeFn decode;
};

#define LB_ROW(FN, R) {FN<R, 1>, FN<R, 2>, FN<R, 3>, FN<R, 4>, FN<R, 5>, FN<R, 6>}
#define LB_ALL(FN) {LB_ROW(FN, 1), LB_ROW(FN, 2), LB_ROW(FN, 3), LB_ROW(FN, 4)}

static Kernels kernels_for(int isa) {
#if LOWBIT_X86
  static const bool avx512 = has_avx512();
  // LOWBIT_KERNEL_NO_AVX512=1 takes the AVX2 path on an AVX-512 CPU (tests run both)
  const char* no512 = std::getenv("LOWBIT_KERNEL_NO_AVX512");
  if (isa == 1 && avx512 && !(no512 && no512[0] == '1')) return Kernels{LB_ALL(micro_512), decode_rows_512};
  if (isa == 1) return Kernels{LB_ALL(micro_256), decode_rows_scalar};
#endif
  (void)isa;
  return Kernels{LB_ALL(micro_scalar), decode_rows_scalar};
}

// input rows per chunk: about 256 KiB of padded input, a multiple of MRMAX
static int64_t chunk_rows(int64_t Kp, int64_t M) {
  const int64_t c = std::max<int64_t>(MRMAX, (256 * 1024 / (4 * Kp)) / MRMAX * MRMAX);
  return std::min(c, M);
}

static void rows_tile(const Problem& p, const Kernels& kn, int64_t r0, int64_t r1) {
  // a tile of at most about 40 KiB, so it stays in L1 while the input rows stream past it; 16, 8 or 4 rows
  // (divisors of the 16-row unit the threads split, so the 4-row groups never depend on the thread count)
  const int64_t Kp = p.geo.Kp, MC = chunk_rows(Kp, p.M);
  const int64_t TR = Kp <= 640 ? 16 : Kp <= 1280 ? 8 : 4;
  std::vector<float> buf(TR * Kp);
  for (int64_t m0 = 0; m0 < p.M; m0 += MC) {
    const int64_t m1 = std::min(p.M, m0 + MC);
    for (int64_t o0 = r0; o0 < r1; o0 += TR) {
      const int64_t nr = std::min(TR, r1 - o0);
      kn.decode(p, o0, nr, buf.data());
      for (int64_t m = m0; m < m1; m += MRMAX) {
        const int64_t mr = std::min<int64_t>(MRMAX, m1 - m);
        for (int64_t r = 0; r < nr; r += RRMAX) {
          const int64_t rr = std::min<int64_t>(RRMAX, nr - r);
          kn.micro[rr - 1][mr - 1](buf.data() + r * Kp, p.xp + m * Kp, Kp, p.y + m * p.out + o0 + r, p.out);
        }
      }
    }
  }
}

static void rows_mm(const Problem& p, const Kernels& kn, int64_t r0, int64_t r1, const at::Tensor& xp) {
  constexpr int64_t TL = 64;
  const int64_t Kp = p.geo.Kp, MC = chunk_rows(Kp, p.M);
  auto buf = at::empty({TL, Kp}, xp.options());
  auto yt = at::empty({MC, TL}, xp.options());
  for (int64_t m0 = 0; m0 < p.M; m0 += MC) {
    const int64_t mc = std::min(p.M, m0 + MC) - m0;
    for (int64_t o0 = r0; o0 < r1; o0 += TL) {
      const int64_t nr = std::min(TL, r1 - o0);
      kn.decode(p, o0, nr, buf.data_ptr<float>());
      auto out = yt.narrow(0, 0, mc).narrow(1, 0, nr);
      at::mm_out(out, xp.narrow(0, m0, mc), buf.narrow(0, 0, nr).t());
      const float* src = out.data_ptr<float>();
      const int64_t lds = out.stride(0);
      for (int64_t m = 0; m < mc; ++m) std::memcpy(p.y + (m0 + m) * p.out + o0, src + m * lds, nr * sizeof(float));
    }
  }
}

at::Tensor gemm_lut_tiled(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& sa,
                          const c10::optional<at::Tensor>& sb, const at::Tensor& table,
                          const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size,
                          int64_t in_features, int64_t mode) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "gemm_lut_tiled supports 2, 3 and 4 bits, got ",
              std::to_string(bits));
  TORCH_CHECK(mode == 0 || mode == 1, "gemm_lut_tiled: mode must be 0 (tile) or 1 (mm), got ", std::to_string(mode));
  TORCH_CHECK(in_features > 0, "in_features must be positive");
  const Geo geo = geometry(bits, group_size, in_features);
  const int64_t out = codes.size(0);
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.dim() == 2 &&
                  codes.size(1) == geo.row_bytes && codes.is_contiguous(),
              "codes must be a contiguous CPU uint8 tensor (out, ", std::to_string(geo.row_bytes), ")");
  TORCH_CHECK(sa.scalar_type() == at::kHalf && sa.is_contiguous() && sa.dim() == 2 && sa.size(0) == out &&
                  sa.size(1) == geo.G, "scale_a must be contiguous float16 (out, ", std::to_string(geo.G), ")");
  const bool two = sb.has_value() && sb->defined();
  if (two)
    TORCH_CHECK(sb->scalar_type() == at::kHalf && sb->is_contiguous() && sb->numel() == out * geo.G,
                "scale_b must be contiguous float16 (out, ", std::to_string(geo.G), ")");
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() && table.numel() == (1 << bits),
              "table must be float32 with 2**bits entries");
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() >= 1 &&
                  x_in.size(-1) == in_features, "x must be a CPU float32 tensor with last dimension ",
              std::to_string(in_features));
  auto x = x_in.reshape({-1, in_features}).contiguous();
  const int64_t M = x.size(0);
  // zero-padded input (M, Kp): x itself when no group needs padding
  at::Tensor xp = x;
  if (geo.Kp != in_features || geo.gs % 32 != 0) {
    xp = at::zeros({M, geo.Kp}, x.options());
    for (int64_t g = 0; g < geo.G; ++g) {
      const int64_t c0 = g * geo.gs, n = std::min(geo.gs, in_features - c0);
      xp.narrow(1, g * geo.gsp, n).copy_(x.narrow(1, c0, n));
    }
  }
  auto y = at::empty({M, out}, x.options());
  Problem p{};
  p.xp = xp.data_ptr<float>();
  p.codes = codes.data_ptr<uint8_t>();
  p.sa = sa.data_ptr<c10::Half>();
  p.sb = two ? sb->data_ptr<c10::Half>() : p.sa;
  std::memset(p.table, 0, sizeof(p.table));
  std::memcpy(p.table, table.data_ptr<float>(), sizeof(float) << bits);
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_c.numel() == out, "bias must have out_features entries");
    p.bias = bias_c.data_ptr<float>();
  }
  p.y = y.data_ptr<float>();
  p.bits = (int)bits;
  p.M = M, p.out = out, p.geo = geo;
  if (M > 0 && out > 0) {
    const Kernels kn = kernels_for(lowbit::active_isa());
    // tiles of 16 rows (mode 0) or 64 (mode 1) are the unit of work, split evenly over the threads
    const int64_t unit = mode == 0 ? 16 : 64;
    at::parallel_for(0, (out + unit - 1) / unit, 1, [&](int64_t t0, int64_t t1) {
      const int64_t r0 = t0 * unit, r1 = std::min(out, t1 * unit);
      if (mode == 0) rows_tile(p, kn, r0, r1);
      else rows_mm(p, kn, r0, r1, xp);
    });
    if (p.bias) y.add_(bias_c);
  }
  auto sizes = x_in.sizes().vec();
  sizes.back() = out;
  return y.view(sizes);
}

}  // namespace lowbit_lutgemm

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("gemm_lut_tiled(Tensor x, Tensor codes, Tensor scale_a, Tensor? scale_b, Tensor table, Tensor? bias, "
        "int bits, int group_size, int in_features, int mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("gemm_lut_tiled", &lowbit_lutgemm::gemm_lut_tiled); }
