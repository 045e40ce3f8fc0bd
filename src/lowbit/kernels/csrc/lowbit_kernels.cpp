// Fused CPU kernels for lowbit's packed group-wise formats.
//
// Registered as torch ops (namespace ``lowbit``):
//   gemm_int(x, codes, scale, zero, bias?, bits, group_size, in_features) -> y
//   gemm_lut(x, codes, scale_a, scale_b?, table, bias?, bits, group_size, in_features) -> y
//   dequant_int(codes, scale, zero, bits, group_size, in_features) -> W (out, in) float32
//   dequant_lut(codes, scale_a, scale_b?, table, bits, group_size, in_features) -> W
//   isa() -> int            1 = AVX2+FMA path active, 0 = portable scalar path
//   set_isa(int) -> int     force 0 (scalar) or 1 (AVX2, if the CPU has it); returns the active isa
//
// Kernel layout (derived at load time by lowbit/kernels/layout.py from the canonical
// checkpoint layout; see that module): codes (out, row_bytes) uint8. Each row is
// n_groups groups, each group padded with code 0 to gsp = roundup(group_size, 32)
// columns, i.e. gsp / 32 blocks of 32 codes (the last, possibly shorter group to
// roundup(its width, 32)). Inside a block code c = 8*j + l sits in
// lane l (0..7), chunk j (0..3), so chunk j of a block covers 8 consecutive columns:
//   4 bits: 16 bytes, lane l = uint16 at bytes 2l..2l+1, code (j, l) = bits 4j..4j+3
//   2 bits:  8 bytes, lane l = byte l, code (j, l) = bits 2j..2j+1
//   3 bits: 12 bytes, the low 2 bits as in the 2-bit block, then one uint32 whose
//           bit 4l + j is bit 2 of code (j, l)
// so a block takes 4 * bits bytes (exactly bits per code).
//
// int:  w = (q - zero) * scale          (zero uint8 (out, G), scale fp16 (out, G))
//       y = sum_g scale_g * (dot(q_g, x_g) - zero_g * sum(x_g))
// lut:  w = table[q] * scale_a          (scale_b undefined: one scale)
//       w = table[q] * (table[q] > 0 ? scale_a : scale_b)   (two scales, AFPQ)
//       (two scales: the AVX2 path looks up each group's scaled table, so every weight it
//       multiplies is exactly the dequantized weight)
//
// Threads: rows of W are split across threads (at::parallel_for, OpenMP); every
// output element is computed by one thread in a fixed order, so results do not
// depend on the thread count.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define LOWBIT_X86 1
#include <immintrin.h>
#endif

namespace lowbit {

enum Kind { kInt = 0, kLutSym = 1, kLutTwo = 2 };

struct Problem {
  const float* xp;      // (M, G * gsp) zero-padded input
  const float* xsum;    // (M, G) sums of real inputs per group (int kind)
  const uint8_t* codes; // (out, row_bytes)
  const c10::Half* sa;  // (out, G)
  const c10::Half* sb;  // (out, G) or nullptr
  const uint8_t* zero;  // (out, G) or nullptr
  const float* table;   // (2^bits) or nullptr
  const float* bias;    // (out) or nullptr
  float* y;             // (M, out)
  int64_t M, out, G, gsp, nb_last, row_bytes;  // nb_last: blocks of the (possibly short) last group
  int64_t K() const { return (G - 1) * gsp + nb_last * 32; }
  int64_t nblocks(int64_t g) const { return g == G - 1 ? nb_last : gsp / 32; }
};

// Int codes of 2 or 4 bits are multiplied in place (see decode()): the padded
// input's chunk j is pre-scaled by 2^(-bits*j), and the kernels use q * 2^(bits*j).
template <int BITS, int KIND>
struct InPlace {
  static constexpr bool value = KIND == kInt && BITS != 3;
};

static int g_isa = -1;  // -1: not yet detected

static int detect_isa() {
#if LOWBIT_X86 && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return 1;
#endif
  return 0;
}

// The ISA every kernel of the extension uses (vq_ops.cpp declares it too), so set_isa(0) forces
// the scalar path everywhere.
int active_isa() {
  if (g_isa < 0) g_isa = detect_isa();
  return g_isa;
}

// ------------------------------------------------------------------ scalar path

template <int BITS>
static inline int code_at(const uint8_t* blk, int j, int l) {
  if (BITS == 4) {
    unsigned v = blk[2 * l] | (blk[2 * l + 1] << 8);
    return (v >> (4 * j)) & 15;
  } else if (BITS == 2) {
    return (blk[l] >> (2 * j)) & 3;
  } else {
    uint32_t h;
    std::memcpy(&h, blk + 8, 4);
    return ((blk[l] >> (2 * j)) & 3) | (((h >> (4 * l + j)) & 1) << 2);
  }
}

template <int BITS, int KIND>
static void rows_scalar(const Problem& p, int64_t r0, int64_t r1) {
  const int64_t nb = p.gsp / 32, K = p.K();
  for (int64_t o = r0; o < r1; ++o) {
    const uint8_t* row = p.codes + o * p.row_bytes;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.xp + m * K;
      float acc = 0.f;
      for (int64_t g = 0; g < p.G; ++g) {
        float d = 0.f, dn = 0.f;
        for (int64_t b = 0; b < p.nblocks(g); ++b) {
          const uint8_t* blk = row + (g * nb + b) * 4 * BITS;
          const float* xb = x + g * p.gsp + b * 32;
          for (int j = 0; j < 4; ++j)
            for (int l = 0; l < 8; ++l) {
              int q = code_at<BITS>(blk, j, l);
              float xv = xb[8 * j + l];
              if (KIND == kInt) {
                d += float(InPlace<BITS, KIND>::value ? q << (BITS * j) : q) * xv;
              } else {
                float t = p.table[q];
                d += t * xv;
                if (KIND == kLutTwo) dn += (t < 0.f ? t : 0.f) * xv;
              }
            }
        }
        float sa = float(p.sa[o * p.G + g]);
        if (KIND == kInt) {
          acc += sa * (d - float(p.zero[o * p.G + g]) * p.xsum[m * p.G + g]);
        } else if (KIND == kLutSym) {
          acc += sa * d;
        } else {
          float sb = float(p.sb[o * p.G + g]);
          acc += sa * (d - dn) + sb * dn;
        }
      }
      p.y[m * p.out + o] = acc + (p.bias ? p.bias[o] : 0.f);
    }
  }
}

// ------------------------------------------------------------------ AVX2 path

#if LOWBIT_X86
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))

// An fp16 scale as float32 in one F16C instruction (c10::Half's own conversion is a software one
// unless the whole file is built for F16C); q8_ops.cpp has the same one-liner.
AVX2_FN static inline float h2f(c10::Half h) { return _cvtsh_ss(h.x); }

// codes of chunk j of a block, one per int32 lane (upper bits zero)
template <int BITS>
AVX2_FN static inline __m256i load_block(const uint8_t* blk, __m256i* hi) {
  if (BITS == 4) return _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)blk));
  __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)blk));
  if (BITS == 3) {
    uint32_t h;
    std::memcpy(&h, blk + 8, 4);
    *hi = _mm256_srlv_epi32(_mm256_set1_epi32((int)h), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
  }
  return lo;
}

template <int BITS>
AVX2_FN static inline __m256i chunk_codes(__m256i v, __m256i hi, int j) {
  if (BITS == 4) return _mm256_and_si256(_mm256_srli_epi32(v, 4 * j), _mm256_set1_epi32(15));
  __m256i q = _mm256_and_si256(_mm256_srli_epi32(v, 2 * j), _mm256_set1_epi32(3));
  if (BITS == 3) {
    // bit j of hi -> bit 2
    __m256i h = j <= 2 ? _mm256_slli_epi32(hi, 2 - j) : _mm256_srli_epi32(hi, j - 2);
    q = _mm256_or_si256(q, _mm256_and_si256(h, _mm256_set1_epi32(4)));
  }
  return q;
}

// Table entries of chunk j: t0 holds entries 0-7, t1 entries 8-15. For 4-bit codes no masking is
// needed: vpermps reads only the low 3 bits of each lane and blendv only the top bit, so the lane is
// shifted right to put code bits 0-2 at the bottom and left to put code bit 3 at the top.
template <int BITS>
AVX2_FN static inline __m256 lut_lookup(__m256i v, __m256i hi, int j, __m256 t0, __m256 t1) {
  if (BITS < 4) return _mm256_permutevar8x32_ps(t0, chunk_codes<BITS>(v, hi, j));
  const __m256i q = j == 0 ? v : _mm256_srli_epi32(v, 4 * j);
  const __m256 lo = _mm256_permutevar8x32_ps(t0, q);
  const __m256 up = _mm256_permutevar8x32_ps(t1, q);
  return _mm256_blendv_ps(lo, up, _mm256_castsi256_ps(_mm256_slli_epi32(v, 28 - 4 * j)));
}

// (also used by q8_ops.cpp)
AVX2_FN float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Int codes of 2 or 4 bits are not shifted down: chunk j is masked in place,
// giving q * 2^(bits*j) exactly, and the padded input of chunk j was pre-scaled by
// 2^(-bits*j) (see run()), so each product equals q * x exactly.
template <int BITS, int KIND>
AVX2_FN static inline __m256 decode(__m256i v, __m256i hi, int j, __m256 t0, __m256 t1) {
  if (InPlace<BITS, KIND>::value)
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(((1 << BITS) - 1) << (BITS * j))));
  if (KIND == kInt) return _mm256_cvtepi32_ps(chunk_codes<BITS>(v, hi, j));
  return lut_lookup<BITS>(v, hi, j, t0, t1);
}

// RT weight rows x MT input rows at once; NA accumulators per pair (chunk j uses j % NA).
// One-scale tables look up t[q] and apply the group's scale once, at the end of the group. Two-scale
// tables look up the group's scaled table (t > 0: t * scale_a, t < 0: t * scale_b), built once per
// row and group, so each weight is exactly the dequantized value and a two-scale group needs one
// accumulator, not two (positive and negative parts).
template <int BITS, int KIND, int MT, int RT>
AVX2_FN static void tile_avx2(const Problem& p, int64_t o0, int64_t m0) {
  constexpr int NA = MT * RT >= 4 ? 1 : 4 / (MT * RT);
  const int64_t nb = p.gsp / 32, K = p.K();
  const __m256 zero = _mm256_setzero_ps();
  __m256 t0 = zero, t1 = zero, pos0 = zero, pos1 = zero;
  if (KIND != kInt) {
    float tab[16] = {0};
    for (int i = 0; i < (1 << BITS); ++i) tab[i] = p.table[i];
    t0 = _mm256_loadu_ps(tab);
    t1 = _mm256_loadu_ps(tab + 8);
    pos0 = _mm256_cmp_ps(t0, zero, _CMP_GT_OQ);
    pos1 = _mm256_cmp_ps(t1, zero, _CMP_GT_OQ);
  }
  __m256 racc[RT][MT];
  float corr[RT][MT];
  for (int r = 0; r < RT; ++r)
    for (int m = 0; m < MT; ++m) racc[r][m] = zero, corr[r][m] = 0.f;
  for (int64_t g = 0; g < p.G; ++g) {
    __m256 acc[RT][MT][NA];
    for (int r = 0; r < RT; ++r)
      for (int m = 0; m < MT; ++m)
        for (int a = 0; a < NA; ++a) acc[r][m][a] = zero;
    __m256 st0[RT], st1[RT];  // two scales: the group's scaled table per row
    if (KIND == kLutTwo) {
      for (int r = 0; r < RT; ++r) {
        const int64_t pg = (o0 + r) * p.G + g;
        const __m256 va = _mm256_set1_ps(h2f(p.sa[pg])), vb = _mm256_set1_ps(h2f(p.sb[pg]));
        st0[r] = _mm256_blendv_ps(_mm256_mul_ps(t0, vb), _mm256_mul_ps(t0, va), pos0);
        st1[r] = _mm256_blendv_ps(_mm256_mul_ps(t1, vb), _mm256_mul_ps(t1, va), pos1);
      }
    }
    const int64_t nbg = p.nblocks(g);
    for (int64_t b = 0; b < nbg; ++b) {
      const int64_t xoff = g * p.gsp + b * 32;
      __m256i v[RT], hi[RT];
      for (int r = 0; r < RT; ++r) {
        hi[r] = _mm256_setzero_si256();
        v[r] = load_block<BITS>(p.codes + (o0 + r) * p.row_bytes + (g * nb + b) * 4 * BITS, &hi[r]);
      }
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        __m256 w[RT];
        for (int r = 0; r < RT; ++r)
          w[r] = KIND == kLutTwo ? decode<BITS, KIND>(v[r], hi[r], j, st0[r], st1[r])
                                 : decode<BITS, KIND>(v[r], hi[r], j, t0, t1);
        for (int m = 0; m < MT; ++m) {
          const __m256 xv = _mm256_loadu_ps(p.xp + (m0 + m) * K + xoff + 8 * j);
          for (int r = 0; r < RT; ++r) acc[r][m][j % NA] = _mm256_fmadd_ps(w[r], xv, acc[r][m][j % NA]);
        }
      }
    }
    for (int r = 0; r < RT; ++r) {
      const int64_t pg = (o0 + r) * p.G + g;
      const float sa = h2f(p.sa[pg]);
      const __m256 vsa = _mm256_set1_ps(sa);
      for (int m = 0; m < MT; ++m) {
        __m256 d = acc[r][m][0];
        for (int a = 1; a < NA; ++a) d = _mm256_add_ps(d, acc[r][m][a]);
        if (KIND == kLutTwo) {
          racc[r][m] = _mm256_add_ps(racc[r][m], d);  // the scales are in the group's table
        } else {
          racc[r][m] = _mm256_fmadd_ps(vsa, d, racc[r][m]);
          if (KIND == kInt) corr[r][m] += sa * float(p.zero[pg]) * p.xsum[(m0 + m) * p.G + g];
        }
      }
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int m = 0; m < MT; ++m)
      p.y[(m0 + m) * p.out + o0 + r] = hsum(racc[r][m]) - corr[r][m] + (p.bias ? p.bias[o0 + r] : 0.f);
}

template <int BITS, int KIND, int MT>
static void rows_tile_avx2(const Problem& p, int64_t r0, int64_t r1, int64_t m) {
  // two weight rows share each input load, except where the rows' scaled tables (two scales: one
  // register per 8 entries and row) would not leave enough of the 16 AVX2 registers
  constexpr int RT = (KIND == kLutTwo && (MT == 4 || BITS == 4)) ? 1 : 2;
  int64_t o = r0;
  for (; o + RT <= r1; o += RT) tile_avx2<BITS, KIND, MT, RT>(p, o, m);
  for (; o < r1; ++o) tile_avx2<BITS, KIND, MT, 1>(p, o, m);
}

template <int BITS, int KIND>
static void rows_avx2(const Problem& p, int64_t r0, int64_t r1) {
  // a block of rows at a time, so the rows' codes stay in L1/L2 across the input tiles
  constexpr int64_t RB = 8;
  for (int64_t rb = r0; rb < r1; rb += RB) {
    const int64_t re = std::min(r1, rb + RB);
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) rows_tile_avx2<BITS, KIND, 4>(p, rb, re, m);
    for (; m + 2 <= p.M; m += 2) rows_tile_avx2<BITS, KIND, 2>(p, rb, re, m);
    for (; m < p.M; ++m) rows_tile_avx2<BITS, KIND, 1>(p, rb, re, m);
  }
}
#endif

// ------------------------------------------------------------------ dispatch

using RowFn = void (*)(const Problem&, int64_t, int64_t);

template <int KIND>
static RowFn pick(int bits, int isa) {
#if LOWBIT_X86
  if (isa == 1) {
    switch (bits) {
      case 2: return rows_avx2<2, KIND>;
      case 3: return rows_avx2<3, KIND>;
      case 4: return rows_avx2<4, KIND>;
    }
  }
#endif
  switch (bits) {
    case 2: return rows_scalar<2, KIND>;
    case 3: return rows_scalar<3, KIND>;
    case 4: return rows_scalar<4, KIND>;
  }
  TORCH_CHECK(false, "lowbit kernels support 2, 3 and 4 bits, got ", std::to_string(bits));
}

// LOWBIT_KERNEL_TASK_KB: minimum work per thread, in KiB of codes x input rows (default 64); also used
// by q8_ops.cpp
int64_t min_task_bytes() {
  static const int64_t v = [] {
    const char* e = std::getenv("LOWBIT_KERNEL_TASK_KB");
    const int64_t kb = e ? std::atoll(e) : 64;
    return std::max<int64_t>(1, kb) * 1024;
  }();
  return v;
}

struct Geometry {
  int64_t gs, G, gsp, nb_last, row_bytes;
  int64_t K() const { return (G - 1) * gsp + nb_last * 32; }
};

static Geometry geometry(int64_t bits, int64_t group_size, int64_t in_features) {
  Geometry g;
  g.gs = (group_size <= 0 || group_size >= in_features) ? in_features : group_size;
  g.G = (in_features + g.gs - 1) / g.gs;
  g.gsp = (g.gs + 31) / 32 * 32;
  const int64_t tail = in_features - (g.G - 1) * g.gs;
  g.nb_last = (tail + 31) / 32;
  g.row_bytes = g.K() / 32 * 4 * bits;
  return g;
}

static void check_common(const at::Tensor& codes, const at::Tensor& sa, const Geometry& geo, int64_t out) {
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.dim() == 2 &&
                  codes.size(1) == geo.row_bytes && codes.is_contiguous(),
              "codes must be a contiguous CPU uint8 tensor (out, ", std::to_string(geo.row_bytes), ")");
  TORCH_CHECK(sa.scalar_type() == at::kHalf && sa.is_contiguous() && sa.size(0) == out && sa.size(1) == geo.G,
              "scales must be contiguous float16 (out, ", std::to_string(geo.G), ")");
}

static at::Tensor run(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& sa,
                      const c10::optional<at::Tensor>& sb, const c10::optional<at::Tensor>& zero,
                      const c10::optional<at::Tensor>& table, const c10::optional<at::Tensor>& bias, int kind,
                      int64_t bits, int64_t group_size, int64_t in_features) {
  const Geometry geo = geometry(bits, group_size, in_features);
  const int64_t out = codes.size(0);
  check_common(codes, sa, geo, out);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.size(-1) == in_features,
              "x must be float32 with last dimension ", std::to_string(in_features));
  auto x = x_in.reshape({-1, in_features}).contiguous();
  const int64_t M = x.size(0);
  // zero-padded input (M, G * gsp) and per-group sums
  auto xp = at::zeros({M, geo.K()}, x.options());
  auto xsum = at::empty({M, geo.G}, x.options());
  {
    const float* xs = x.data_ptr<float>();
    float* xd = xp.data_ptr<float>();
    float* ss = xsum.data_ptr<float>();
    const bool prescale = kind == kInt && bits != 3;
    const float chunk_scale[4] = {1.f, std::ldexp(1.f, -(int)bits), std::ldexp(1.f, -2 * (int)bits),
                                  std::ldexp(1.f, -3 * (int)bits)};
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < geo.G; ++g) {
        const int64_t c0 = g * geo.gs, n = std::min(geo.gs, in_features - c0);
        float* dst = xd + m * geo.K() + g * geo.gsp;
        const float* src = xs + m * in_features + c0;
        float s = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          // exact power-of-two scaling (see InPlace); |x| < 2^-114 would lose bits to subnormals
          dst[i] = prescale ? src[i] * chunk_scale[(i % 32) / 8] : src[i];
          s += src[i];
        }
        ss[m * geo.G + g] = s;
      }
  }
  auto sizes = x_in.sizes().vec();
  sizes.back() = out;
  auto y = at::empty({M, out}, x.options());
  at::Tensor bias_c;
  Problem p{};
  p.xp = xp.data_ptr<float>();
  p.xsum = xsum.data_ptr<float>();
  p.codes = codes.data_ptr<uint8_t>();
  p.sa = sa.data_ptr<c10::Half>();
  if (kind == kInt) {
    TORCH_CHECK(zero.has_value() && zero->scalar_type() == at::kByte && zero->is_contiguous() &&
                    zero->numel() == out * geo.G, "zero must be contiguous uint8 (out, G)");
    p.zero = zero->data_ptr<uint8_t>();
  } else {
    TORCH_CHECK(table.has_value() && table->scalar_type() == at::kFloat && table->numel() == (1 << bits) &&
                    table->is_contiguous(), "table must be float32 with 2**bits entries");
    p.table = table->data_ptr<float>();
    if (kind == kLutTwo) {
      TORCH_CHECK(sb->scalar_type() == at::kHalf && sb->is_contiguous() && sb->numel() == out * geo.G,
                  "scale_b must be contiguous float16 (out, G)");
      p.sb = sb->data_ptr<c10::Half>();
    }
  }
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_c.numel() == out, "bias must have out_features entries");
    p.bias = bias_c.data_ptr<float>();
  }
  p.y = y.data_ptr<float>();
  p.M = M, p.out = out, p.G = geo.G, p.gsp = geo.gsp, p.nb_last = geo.nb_last, p.row_bytes = geo.row_bytes;
  RowFn fn = kind == kInt ? pick<kInt>(bits, active_isa())
             : kind == kLutSym ? pick<kLutSym>(bits, active_isa()) : pick<kLutTwo>(bits, active_isa());
  // enough rows per task that waking a thread pays off: at least min_task_bytes()
  // of codes (times the input rows) per task, so small layers run on one thread
  const int64_t grain = std::max<int64_t>(1, min_task_bytes() / std::max<int64_t>(1, geo.row_bytes * M));
  at::parallel_for(0, out, grain, [&](int64_t r0, int64_t r1) { fn(p, r0, r1); });
  return y.view(sizes);
}

at::Tensor gemm_int(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                    const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size, int64_t in_features) {
  return run(x, codes, scale, c10::nullopt, zero, c10::nullopt, bias, kInt, bits, group_size, in_features);
}

at::Tensor gemm_lut(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale_a,
                    const c10::optional<at::Tensor>& scale_b, const at::Tensor& table,
                    const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size, int64_t in_features) {
  const bool two = scale_b.has_value() && scale_b->defined();
  return run(x, codes, scale_a, scale_b, c10::nullopt, table, bias, two ? kLutTwo : kLutSym, bits, group_size,
             in_features);
}

// ------------------------------------------------------------------ dequantization
// Same arithmetic as the formats' dequantize, element by element, so the float
// weight is bitwise equal to the plain-torch one: (q - z) * s, or t * s.

static at::Tensor dequant(const at::Tensor& codes, const at::Tensor& sa, const c10::optional<at::Tensor>& sb,
                          const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& table, int kind,
                          int64_t bits, int64_t group_size, int64_t in_features) {
  const Geometry geo = geometry(bits, group_size, in_features);
  const int64_t out = codes.size(0);
  check_common(codes, sa, geo, out);
  auto w = at::empty({out, in_features}, at::TensorOptions().dtype(at::kFloat));
  float* wd = w.data_ptr<float>();
  const uint8_t* cd = codes.data_ptr<uint8_t>();
  const c10::Half* sad = sa.data_ptr<c10::Half>();
  const c10::Half* sbd = kind == kLutTwo ? sb->data_ptr<c10::Half>() : nullptr;
  const uint8_t* zd = kind == kInt ? zero->data_ptr<uint8_t>() : nullptr;
  const float* td = kind == kInt ? nullptr : table->data_ptr<float>();
  const int64_t nb = geo.gsp / 32;
  at::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t o = r0; o < r1; ++o)
      for (int64_t g = 0; g < geo.G; ++g) {
        const float s = float(sad[o * geo.G + g]);
        const float s2 = sbd ? float(sbd[o * geo.G + g]) : s;
        const float z = zd ? float(zd[o * geo.G + g]) : 0.f;
        const int64_t c0 = g * geo.gs, n = std::min(geo.gs, in_features - c0);
        for (int64_t i = 0; i < n; ++i) {
          const uint8_t* blk = cd + o * geo.row_bytes + (g * nb + i / 32) * 4 * bits;
          const int j = (i % 32) / 8, l = i % 8;
          const int q = bits == 4 ? code_at<4>(blk, j, l) : bits == 3 ? code_at<3>(blk, j, l) : code_at<2>(blk, j, l);
          float v;
          if (kind == kInt) v = (float(q) - z) * s;
          else v = td[q] * (td[q] > 0.f ? s : s2);
          wd[o * in_features + c0 + i] = v;
        }
      }
  });
  return w;
}

at::Tensor dequant_int(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                       int64_t group_size, int64_t in_features) {
  return dequant(codes, scale, c10::nullopt, zero, c10::nullopt, kInt, bits, group_size, in_features);
}

at::Tensor dequant_lut(const at::Tensor& codes, const at::Tensor& scale_a, const c10::optional<at::Tensor>& scale_b,
                       const at::Tensor& table, int64_t bits, int64_t group_size, int64_t in_features) {
  const bool two = scale_b.has_value() && scale_b->defined();
  return dequant(codes, scale_a, scale_b, c10::nullopt, table, two ? kLutTwo : kLutSym, bits, group_size,
                 in_features);
}

int64_t isa() { return active_isa(); }

int64_t set_isa(int64_t want) {
  g_isa = (want == 1 && detect_isa() == 1) ? 1 : 0;
  return g_isa;
}

}  // namespace lowbit

TORCH_LIBRARY(lowbit, m) {
  m.def("gemm_int(Tensor x, Tensor codes, Tensor scale, Tensor zero, Tensor? bias, int bits, int group_size, "
        "int in_features) -> Tensor");
  m.def("gemm_lut(Tensor x, Tensor codes, Tensor scale_a, Tensor? scale_b, Tensor table, Tensor? bias, int bits, "
        "int group_size, int in_features) -> Tensor");
  m.def("dequant_int(Tensor codes, Tensor scale, Tensor zero, int bits, int group_size, int in_features) -> Tensor");
  m.def("dequant_lut(Tensor codes, Tensor scale_a, Tensor? scale_b, Tensor table, int bits, int group_size, "
        "int in_features) -> Tensor");
  m.def("isa() -> int", &lowbit::isa);
  m.def("set_isa(int isa) -> int", &lowbit::set_isa);
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("gemm_int", &lowbit::gemm_int);
  m.impl("gemm_lut", &lowbit::gemm_lut);
  m.impl("dequant_int", &lowbit::dequant_int);
  m.impl("dequant_lut", &lowbit::dequant_lut);
}
