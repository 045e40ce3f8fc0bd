// Int8-activation GEMV/GEMM for 2-, 3- and 4-bit int codes and 3- and 4-bit table codes (FP, NF; one or
// two scales): integer dot products, as llama.cpp's Q8_0 path.
//
// Registered as a torch op (namespace ``lowbit``) and bound directly (bindings.cpp):
//   gemm_q8(x, codes, scale_a, scale_b?, zero?, pos?, neg?, level_pos, level_neg, bias?, bits, group_size,
//           in_features) -> y
//
// The weight is the kernel layout of lowbit_kernels.cpp (no new layout). 4 bits: byte k of a block of
// 32 codes holds the codes of columns lo(k) (low nibble) and hi(k) (high nibble), with
//   lo(2l) = l, lo(2l+1) = 16 + l, hi(2l) = 8 + l, hi(2l+1) = 24 + l   (l = 0..7).
// 2 bits: byte l of a block holds columns l, 8 + l, 16 + l, 24 + l in bits 0-1, 2-3, 4-5, 6-7; four
// blocks (32 bytes) go through one 256-bit step.
// 3 bits: the 2-bit block's 8 bytes for the low two bits, then a uint32 whose bit 4l + j is bit 2 of
// column 8j + l; four blocks (their low bytes and bit-2 words gathered) go through one 256-bit step.
//
// The input is quantized per block of 32 padded columns to int8: d = max|x| / 127, xq = round(x / d)
// (half to even), so it is x_hat = d * xq that gets multiplied, exactly as
// ``lowbit.kernels.reference.quantize_act_q8`` computes it. The products q * xq are exact integers
// (vpmaddubsw, vpmaddwd); each block's integer dot product is scaled by d in float.
//
// Weights:
//   int   (zero given):       w = (q - zero) * scale_a
//         y = sum_g scale_a_g * (sum_b d_b dot(q, xq)_b - zero_g * sum_b d_b sum(xq)_b)
//   table (pos, neg given):   w = level_pos * pos[q] * scale_a - level_neg * neg[q] * scale_b
//         pos / neg: uint8 tables of 16 entries (3 bits: the first 8 are used), at most 64: the positive
//         levels and the magnitudes of the negative levels as integer multiples of level_pos and level_neg
//         (lowbit.kernels.ops.q8_tables: exact for FP4 and FP3, whose levels are small integers times 1/2
//         or 1; NF levels rounded to 1/64 of the largest). One scale: scale_b = scale_a.
//         y = sum_g (level_pos * scale_a_g * sum_b d_b dot(pos[q], xq)_b - level_neg * scale_b_g * ...neg...)
//         The lookups are byte shuffles (vpshufb) of the 4-bit (3-bit) codes into the two tables.
//   Every block's dot product is an exact int32 (at most 4 * 64 * 127 per int16 sum of vpmaddubsw pairs).
//
// Threads: rows are split across threads; each output is computed by one thread in a fixed order,
// so results do not depend on the thread count.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define LOWBIT_Q8_X86 1
#include <immintrin.h>
#endif

namespace lowbit {  // lowbit_kernels.cpp
int active_isa();
int64_t min_task_bytes();
#if LOWBIT_Q8_X86
__attribute__((target("avx2,fma,f16c"))) float hsum(__m256 v);
#endif
}  // namespace lowbit

namespace lowbit_q8 {

struct Q8Problem {
  const int8_t* xq;     // (M, xq_stride): the quantized input in the kernel's order (see quantize_input)
  const float* xd;      // (M, xd_stride): each block's d, repeated to the width its lanes need
  const float* xs;      // (M, G): sum over the group's blocks of d * sum(xq)
  const uint8_t* codes;
  const c10::Half* sa;
  const c10::Half* sb;  // or nullptr (one scale)
  const uint8_t* zero;  // int kind, else nullptr
  uint8_t pos[16], neg[16];
  float level_pos, level_neg;
  const float* bias;
  float* y;
  int64_t M, out, G, nb, nb_last, row_bytes, nblk, xq_stride, xd_stride;
  int bits;
  bool table;
  int64_t nblocks(int64_t g) const { return g == G - 1 ? nb_last : nb; }
};

static inline int col_lo(int k) { return (k & 1) ? 16 + k / 2 : k / 2; }
static inline int col_hi(int k) { return (k & 1) ? 24 + k / 2 : 8 + k / 2; }

// Where (byte offsets into an input row's xq) block b (of nbg in its group, b counted from the
// group's first block at index blk) keeps its lo and hi bytes. Within each group, blocks go in pairs
// (b, b+1) and a trailing single block:
// a pair's 64 bytes at b*32 hold [lo(b), lo(b+1)] then [hi(b), hi(b+1)] (16 each, in the order of
// the code bytes); a single block's 32 bytes hold [lo(b), hi(b)]. lo(b)[k] is the quantized input of
// column col_lo(k) of block b.
static inline void block_slots(int64_t blk, int64_t b, int64_t nbg, int64_t* lo, int64_t* hi) {
  const bool paired = (b + 1 < nbg) || (b % 2 == 1);
  if (!paired) {
    *lo = blk * 32;
    *hi = *lo + 16;
  } else if (b % 2 == 0) {
    *lo = blk * 32;
    *hi = (blk + 1) * 32;
  } else {
    *lo = (blk - 1) * 32 + 16;
    *hi = blk * 32 + 16;
  }
}

// d = max|v| / 127 and q = round(v / d), half to even (nearbyint in the default rounding mode).
static float quantize_block_scalar(const float* v, int8_t* q) {
  float amax = 0.f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[i]));
  const float d = amax / 127.f;
  for (int i = 0; i < 32; ++i) q[i] = d > 0.f ? (int8_t)std::nearbyint(v[i] / d) : 0;
  return d;
}

#if LOWBIT_Q8_X86
// Same arithmetic as quantize_block_scalar: an IEEE division and round-half-even per element.
__attribute__((target("avx2,fma"))) static float quantize_block_avx2(const float* v, int8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(v));
  for (int i = 8; i < 32; i += 8) a = _mm256_max_ps(a, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float d = _mm_cvtss_f32(m) / 127.f;
  if (!(d > 0.f)) {
    std::memset(q, 0, 32);
    return d;
  }
  const __m256 vd = _mm256_set1_ps(d);
  __m256i r[4];
  for (int i = 0; i < 4; ++i)
    r[i] = _mm256_cvtps_epi32(
        _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(v + 8 * i), vd), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  // int32 -> int8 (values are within [-127, 127], so the saturating packs are exact), back in order
  const __m256i p16a = _mm256_packs_epi32(r[0], r[1]), p16b = _mm256_packs_epi32(r[2], r[3]);
  const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
  const __m256i fixed = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256((__m256i*)q, fixed);
  return d;
}
#endif

// Block b of the group whose columns start at x[c0] (n real columns): q (32 int8, zero padded) and d.
static float quantize_block(const float* x, int64_t c0, int64_t n, int64_t b, bool avx2, int8_t* q, int* sum) {
  float buf[32];
  const float* v = x + c0 + b * 32;
  if (b * 32 + 32 > n) {  // a short block: zero padded
    for (int i = 0; i < 32; ++i) buf[i] = b * 32 + i < n ? v[i] : 0.f;
    v = buf;
  }
#if LOWBIT_Q8_X86
  const float d = avx2 ? quantize_block_avx2(v, q) : quantize_block_scalar(v, q);
#else
  (void)avx2;
  const float d = quantize_block_scalar(v, q);
#endif
  int s = 0;
  for (int i = 0; i < 32; ++i) s += q[i];
  *sum = s;
  return d;
}

// Quantize one input row into the kernel's order.
//  4-bit codes: see block_slots; xd holds each block's d four times (nblk * 4 floats).
//  2- and 3-bit codes: each group's blocks go in quads (the last one possibly partial, zero filled); a quad
//    takes 128 bytes: for chunk j (0..3), 32 bytes [block 0: x[8j..8j+7], block 1: ..., block 3: ...],
//    as the bits 2j..2j+1 of the quad's 32 code bytes hold them; xd holds each block's d twice (8 per quad).
static void quantize_input(const float* x, int64_t in_features, int64_t gs, int64_t G, int64_t nb,
                           int64_t nb_last, int bits, int8_t* xq, float* xd, float* xs, bool avx2) {
  int64_t blk = 0, qd = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t nbg = g == G - 1 ? nb_last : nb;
    const int64_t c0 = g * gs, n = std::min(gs, in_features - c0);
    float gsum = 0.f;
    for (int64_t b = 0; b < nbg; ++b, ++blk) {
      int8_t q[32];
      int s;
      const float d = quantize_block(x, c0, n, b, avx2, q, &s);
      gsum += d * (float)s;
      if (bits != 4) {
        const int t = (int)(b % 4);
        int8_t* dst = xq + qd * 128;
        float* dd = xd + qd * 8;
        if (t == 0) {
          std::memset(dst, 0, 128);
          std::fill(dd, dd + 8, 0.f);
        }
        for (int j = 0; j < 4; ++j)
          for (int l = 0; l < 8; ++l) dst[j * 32 + t * 8 + l] = q[8 * j + l];
        dd[2 * t] = dd[2 * t + 1] = d;
        if (t == 3 || b == nbg - 1) ++qd;
        continue;
      }
      int64_t lo, hi;
      block_slots(blk, b, nbg, &lo, &hi);
      for (int k = 0; k < 16; ++k) {
        xq[lo + k] = q[col_lo(k)];
        xq[hi + k] = q[col_hi(k)];
      }
      for (int i = 0; i < 4; ++i) xd[blk * 4 + i] = d;
    }
    xs[g] = gsum;
  }
}

// ------------------------------------------------------------------ scalar path (reference order)

// Code (j, l) of a 2- or 3-bit block (column 8j + l; see the layout above).
static inline int code_of(const uint8_t* cb, int bits, int j, int l) {
  int q = (cb[l] >> (2 * j)) & 3;
  if (bits == 3) {
    uint32_t h;
    std::memcpy(&h, cb + 8, 4);
    q |= ((h >> (4 * l + j)) & 1) << 2;
  }
  return q;
}

// One 2- or 3-bit group's dot products, its blocks in quads (see quantize_input): sum over its blocks
// of d * dot(q, xq) (for tables: of the positive levels in *dp, of the negative levels' magnitudes in *dn).
static void dot_quads(const Q8Problem& p, const uint8_t* row, int64_t blk, int64_t nbg, int64_t qd,
                      const int8_t* xq, const float* xd, float* dp, float* dn) {
  for (int64_t b = 0; b < nbg; b += 4, ++qd)
    for (int64_t t = 0; t < 4 && b + t < nbg; ++t) {
      const uint8_t* cb = row + (blk + b + t) * 4 * p.bits;
      int ip = 0, in = 0;
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 8; ++l) {
          const int q = code_of(cb, p.bits, j, l), x = xq[qd * 128 + j * 32 + t * 8 + l];
          ip += (p.table ? p.pos[q] : q) * x;
          in += p.table ? p.neg[q] * x : 0;
        }
      *dp += xd[qd * 8 + 2 * t] * (float)ip;
      *dn += xd[qd * 8 + 2 * t] * (float)in;
    }
}

// One 4-bit group's dot products: sum over its blocks of d * dot(q, xq) (for tables: of the positive
// levels in *dp, of the negative levels' magnitudes in *dn).
static void dot_blocks4(const Q8Problem& p, const uint8_t* row, int64_t blk, int64_t nbg, const int8_t* xq,
                        const float* xd, float* dp, float* dn) {
  for (int64_t b = 0; b < nbg; ++b, ++blk) {
    int64_t lo, hi;
    block_slots(blk, b, nbg, &lo, &hi);
    const uint8_t* cb = row + blk * 16;
    int ip = 0, in = 0;
    for (int k = 0; k < 16; ++k) {
      const int ql = cb[k] & 15, qh = cb[k] >> 4;
      if (p.table) {
        ip += p.pos[ql] * xq[lo + k] + p.pos[qh] * xq[hi + k];
        in += p.neg[ql] * xq[lo + k] + p.neg[qh] * xq[hi + k];
      } else {
        ip += ql * xq[lo + k] + qh * xq[hi + k];
      }
    }
    *dp += xd[blk * 4] * (float)ip;
    *dn += xd[blk * 4] * (float)in;
  }
}

static void rows_scalar(const Q8Problem& p, int64_t r0, int64_t r1) {
  for (int64_t o = r0; o < r1; ++o) {
    const uint8_t* row = p.codes + o * p.row_bytes;
    for (int64_t m = 0; m < p.M; ++m) {
      const int8_t* xq = p.xq + m * p.xq_stride;
      const float* xd = p.xd + m * p.xd_stride;
      float acc = 0.f, corr = 0.f;
      int64_t blk = 0, qd = 0;
      for (int64_t g = 0; g < p.G; ++g) {
        const int64_t nbg = p.nblocks(g);
        float dp = 0.f, dn = 0.f;
        if (p.bits != 4) {
          dot_quads(p, row, blk, nbg, qd, xq, xd, &dp, &dn);
          qd += (nbg + 3) / 4;
        } else {
          dot_blocks4(p, row, blk, nbg, xq, xd, &dp, &dn);
        }
        blk += nbg;
        const float sa = float(p.sa[o * p.G + g]);
        if (p.table) {
          const float sb = p.sb ? float(p.sb[o * p.G + g]) : sa;
          acc += p.level_pos * sa * dp - p.level_neg * sb * dn;
        } else {
          acc += sa * dp;
          corr += sa * float(p.zero[o * p.G + g]) * p.xs[m * p.G + g];
        }
      }
      p.y[m * p.out + o] = acc - corr + (p.bias ? p.bias[o] : 0.f);
    }
  }
}

// ------------------------------------------------------------------ AVX2 path

#if LOWBIT_Q8_X86
#define Q8_AVX2 __attribute__((target("avx2,fma,f16c")))

// an fp16 scale as float32 in one F16C instruction (as lowbit_kernels.cpp's h2f)
Q8_AVX2 static inline float h2f(c10::Half h) { return _cvtsh_ss(h.x); }

// The end of group g for RT rows: racc += scale * (the group's sums) (tables: level_pos * scale_a *
// positive sums - level_neg * scale_b * negative sums); int codes add the zero-point term to corr.
template <bool TABLE, int RT>
Q8_AVX2 static inline void group_end(const Q8Problem& p, int64_t o0, int64_t g, int64_t m, const __m256* ap,
                                     const __m256* an, __m256* racc, float* corr) {
  for (int r = 0; r < RT; ++r) {
    const int64_t pg = (o0 + r) * p.G + g;
    const float sa = h2f(p.sa[pg]);
    if (TABLE) {
      const float sb = p.sb ? h2f(p.sb[pg]) : sa;
      racc[r] = _mm256_fmadd_ps(_mm256_set1_ps(p.level_pos * sa), ap[r], racc[r]);
      racc[r] = _mm256_fnmadd_ps(_mm256_set1_ps(p.level_neg * sb), an[r], racc[r]);
    } else {
      racc[r] = _mm256_fmadd_ps(_mm256_set1_ps(sa), ap[r], racc[r]);
      corr[r] += sa * float(p.zero[pg]) * p.xs[m * p.G + g];
    }
  }
}

// y = the rows' sums - zero-point terms + bias
template <int RT>
Q8_AVX2 static inline void store_rows(const Q8Problem& p, int64_t o0, int64_t m, const __m256* racc,
                                      const float* corr) {
  for (int r = 0; r < RT; ++r)
    p.y[m * p.out + o0 + r] = lowbit::hsum(racc[r]) - corr[r] + (p.bias ? p.bias[o0 + r] : 0.f);
}

// int32 lanes: the sums of four neighbouring byte products a0 * x0 + a1 * x1 (a unsigned, x signed), exact
// while a <= 64: an int16 lane of vpmaddubsw sums two products, and two of those are added in int16
Q8_AVX2 static inline __m256i dot2(__m256i a0, __m256i x0, __m256i a1, __m256i x1) {
  const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(a0, x0), _mm256_maddubs_epi16(a1, x1));
  return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
}
Q8_AVX2 static inline __m128i dot2(__m128i a0, __m128i x0, __m128i a1, __m128i x1) {
  const __m128i s = _mm_add_epi16(_mm_maddubs_epi16(a0, x0), _mm_maddubs_epi16(a1, x1));
  return _mm_madd_epi16(s, _mm_set1_epi16(1));
}

// The 16-byte tables (pos, neg) in both 128-bit lanes, for vpshufb
Q8_AVX2 static inline void load_tables(const Q8Problem& p, __m256i* tp, __m256i* tn) {
  *tp = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p.pos));
  *tn = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p.neg));
}

// The 4-bit blocks [blk, bend) of one group for RT rows in 256-bit steps (two blocks, then a single trailing
// block in 128 bits): ap += d * dot(level, xq) per block (tables: pos levels; an: neg levels' magnitudes).
template <bool TABLE, int RT>
Q8_AVX2 static inline void steps4(const Q8Problem& p, int64_t o0, const int8_t* xq, const float* xd, int64_t blk,
                                  int64_t bend, __m256i tp, __m256i tn, __m256* ap, __m256* an) {
  const __m256i m0f = _mm256_set1_epi8(15);
  for (; blk + 2 <= bend; blk += 2) {
    const __m256i xl = _mm256_loadu_si256((const __m256i*)(xq + blk * 32));
    const __m256i xh = _mm256_loadu_si256((const __m256i*)(xq + blk * 32 + 32));
    const __m256 dv = _mm256_loadu_ps(xd + blk * 4);
    for (int r = 0; r < RT; ++r) {
      // the same bytes of the next tile's rows: with rows of 1-2 KiB, RT rows read side by side are
      // RT streams that the hardware prefetcher follows poorly (measured 1.1-1.5x faster from DRAM on the
      // zoo shapes); a prefetch past the end of the array is a harmless hint
      _mm_prefetch((const char*)(p.codes + (o0 + r + RT) * p.row_bytes + blk * 16), _MM_HINT_T0);
      const __m256i v = _mm256_loadu_si256((const __m256i*)(p.codes + (o0 + r) * p.row_bytes + blk * 16));
      const __m256i lo = _mm256_and_si256(v, m0f);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);
      if (TABLE) {
        const __m256i sp = dot2(_mm256_shuffle_epi8(tp, lo), xl, _mm256_shuffle_epi8(tp, hi), xh);
        const __m256i sn = dot2(_mm256_shuffle_epi8(tn, lo), xl, _mm256_shuffle_epi8(tn, hi), xh);
        an[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sn), dv, an[r]);
        ap[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sp), dv, ap[r]);
      } else {
        ap[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot2(lo, xl, hi, xh)), dv, ap[r]);
      }
    }
  }
  if (blk < bend) {  // a single trailing block of the group: 128-bit
    const __m128i m0f4 = _mm_set1_epi8(15);
    const __m128i xl = _mm_loadu_si128((const __m128i*)(xq + blk * 32));
    const __m128i xh = _mm_loadu_si128((const __m128i*)(xq + blk * 32 + 16));
    const __m128 dv = _mm_loadu_ps(xd + blk * 4);
    const __m128i tp4 = _mm256_castsi256_si128(tp), tn4 = _mm256_castsi256_si128(tn);
    for (int r = 0; r < RT; ++r) {
      const __m128i v = _mm_loadu_si128((const __m128i*)(p.codes + (o0 + r) * p.row_bytes + blk * 16));
      const __m128i lo = _mm_and_si128(v, m0f4);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m0f4);
      const __m128i sp = TABLE ? dot2(_mm_shuffle_epi8(tp4, lo), xl, _mm_shuffle_epi8(tp4, hi), xh) : dot2(lo, xl, hi, xh);
      const __m128 fp = _mm_mul_ps(_mm_cvtepi32_ps(sp), dv);
      ap[r] = _mm256_add_ps(ap[r], _mm256_insertf128_ps(_mm256_setzero_ps(), fp, 0));
      if (TABLE) {
        const __m128i sn = dot2(_mm_shuffle_epi8(tn4, lo), xl, _mm_shuffle_epi8(tn4, hi), xh);
        const __m128 fn = _mm_mul_ps(_mm_cvtepi32_ps(sn), dv);
        an[r] = _mm256_add_ps(an[r], _mm256_insertf128_ps(_mm256_setzero_ps(), fn, 0));
      }
    }
  }
}

// 4-bit codes, RT weight rows against one input row.
template <bool TABLE, int RT>
Q8_AVX2 static void tile_q8(const Q8Problem& p, int64_t o0, int64_t m) {
  __m256i tp = _mm256_setzero_si256(), tn = tp;
  if (TABLE) load_tables(p, &tp, &tn);
  const int8_t* xq = p.xq + m * p.xq_stride;
  const float* xd = p.xd + m * p.xd_stride;
  __m256 racc[RT];
  float corr[RT];
  for (int r = 0; r < RT; ++r) racc[r] = _mm256_setzero_ps(), corr[r] = 0.f;
  int64_t blk = 0;
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t nbg = p.nblocks(g);
    __m256 ap[RT], an[RT];
    for (int r = 0; r < RT; ++r) ap[r] = _mm256_setzero_ps(), an[r] = _mm256_setzero_ps();
    steps4<TABLE, RT>(p, o0, xq, xd, blk, blk + nbg, tp, tn, ap, an);
    blk += nbg;
    group_end<TABLE, RT>(p, o0, g, m, ap, an, racc, corr);
  }
  store_rows<RT>(p, o0, m, racc, corr);
}

// The codes of one quad of 2- or 3-bit blocks (k of the 4 present; a partial quad reads only its
// blocks' bytes), chunk j in q[j]: lane 8t + l holds code (j, l) of block t, i.e. the bits 2j..2j+1 of
// block t's byte l, plus (3 bits) bit 4l + j of its bit-2 word as bit 2.
template <int BITS>
Q8_AVX2 static inline void quad_codes(const uint8_t* src, int64_t k, __m256i* q) {
  const __m256i m3 = _mm256_set1_epi8(3);
  __m256i v, h = _mm256_setzero_si256();
  if (BITS == 2) {  // four 8-byte blocks side by side: one load, masked for a partial quad
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(2 * k)), lane);
    v = k == 4 ? _mm256_loadu_si256((const __m256i*)src) : _mm256_maskload_epi32((const int*)src, mask);
  } else {  // 12-byte blocks: gather the low bytes (8) and bit-2 words (4) of each
    int64_t lo[4] = {0, 0, 0, 0};
    int32_t hw[4] = {0, 0, 0, 0};
    for (int t = 0; t < k; ++t) {
      std::memcpy(&lo[t], src + 12 * t, 8);
      std::memcpy(&hw[t], src + 12 * t + 8, 4);
    }
    v = _mm256_setr_epi64x(lo[0], lo[1], lo[2], lo[3]);
    // lane 8t + l reads byte l / 2 of block t's bit-2 word (bytes 4t..4t+3 of each 128-bit half)
    const __m256i hsel = _mm256_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11,
                                          12, 12, 13, 13, 14, 14, 15, 15);
    h = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_setr_epi32(hw[0], hw[1], hw[2], hw[3])), hsel);
  }
  for (int j = 0; j < 4; ++j) {
    q[j] = _mm256_and_si256(_mm256_srli_epi16(v, 2 * j), m3);
    if (BITS == 3) {
      // column 8j + l's bit 2 sits at bit 4 * (l % 2) + j of its byte: 4 where set
      const __m256i bit = _mm256_slli_epi16(_mm256_set1_epi16(0x1001), j);
      q[j] = _mm256_or_si256(
          q[j], _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit), _mm256_set1_epi8(4)));
    }
  }
}

// 2- or 3-bit codes (int, or 3-bit table), RT weight rows against one input row: a quad of blocks per step;
// chunk j of the quad's codes (quad_codes) meets the quad's input chunk j (see quantize_input). Tables
// look each code up in the pos and neg tables (vpshufb: codes 0-7 index the first 8 entries).
template <int BITS, bool TABLE, int RT>
Q8_AVX2 static void tile_quads(const Q8Problem& p, int64_t o0, int64_t m) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i tp = _mm256_setzero_si256(), tn = tp;
  if (TABLE) load_tables(p, &tp, &tn);
  const int8_t* xq = p.xq + m * p.xq_stride;
  const float* xd = p.xd + m * p.xd_stride;
  __m256 racc[RT];
  float corr[RT];
  for (int r = 0; r < RT; ++r) racc[r] = _mm256_setzero_ps(), corr[r] = 0.f;
  int64_t blk = 0, qd = 0;
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t nbg = p.nblocks(g);
    __m256 acc[RT], an[RT];
    for (int r = 0; r < RT; ++r) acc[r] = _mm256_setzero_ps(), an[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nbg; b += 4, ++qd) {
      const int64_t k = std::min<int64_t>(4, nbg - b);  // blocks in this quad
      const int8_t* xj = xq + qd * 128;
      const __m256 dv = _mm256_loadu_ps(xd + qd * 8);
      __m256i x[4];
      for (int j = 0; j < 4; ++j) x[j] = _mm256_loadu_si256((const __m256i*)(xj + 32 * j));
      for (int r = 0; r < RT; ++r) {
        const uint8_t* src = p.codes + (o0 + r) * p.row_bytes + (blk + b) * 4 * BITS;
        _mm_prefetch((const char*)(src + RT * p.row_bytes), _MM_HINT_T0);
        __m256i q[4];
        quad_codes<BITS>(src, k, q);
        if (TABLE) {  // levels up to 64: int16 sums of two chunks (dot2)
          __m256i t[4];
          for (int j = 0; j < 4; ++j) t[j] = _mm256_shuffle_epi8(tp, q[j]);
          const __m256i sp = _mm256_add_epi32(dot2(t[0], x[0], t[1], x[1]), dot2(t[2], x[2], t[3], x[3]));
          for (int j = 0; j < 4; ++j) t[j] = _mm256_shuffle_epi8(tn, q[j]);
          const __m256i sn = _mm256_add_epi32(dot2(t[0], x[0], t[1], x[1]), dot2(t[2], x[2], t[3], x[3]));
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sp), dv, acc[r]);
          an[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sn), dv, an[r]);
          continue;
        }
        // int16 sums of the four chunks: codes up to 7 times |xq| <= 127, eight products, stay below 2^15
        __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(q[0], x[0]), _mm256_maddubs_epi16(q[1], x[1]));
        s = _mm256_add_epi16(s, _mm256_add_epi16(_mm256_maddubs_epi16(q[2], x[2]), _mm256_maddubs_epi16(q[3], x[3])));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones)), dv, acc[r]);
      }
    }
    blk += nbg;
    group_end<TABLE, RT>(p, o0, g, m, acc, an, racc, corr);
  }
  store_rows<RT>(p, o0, m, racc, corr);
}

using Tile = void (*)(const Q8Problem&, int64_t, int64_t);

// A block of RB rows at a time, so their codes stay in cache across input rows; RT rows per tile.
template <int RT, Tile TILE, Tile TILE1>
static void rows_tiled(const Q8Problem& p, int64_t r0, int64_t r1) {
  constexpr int64_t RB = 8;
  for (int64_t rb = r0; rb < r1; rb += RB) {
    const int64_t re = std::min(r1, rb + RB);
    for (int64_t m = 0; m < p.M; ++m) {
      int64_t o = rb;
      for (; o + RT <= re; o += RT) TILE(p, o, m);
      for (; o < re; ++o) TILE1(p, o, m);
    }
  }
}

// rows per tile: 4 for int codes, 2 for tables (twice the accumulators)
template <int BITS, bool TABLE>
static constexpr auto rows_quads = rows_tiled<TABLE ? 2 : 4, tile_quads<BITS, TABLE, TABLE ? 2 : 4>,
                                              tile_quads<BITS, TABLE, 1>>;
template <bool TABLE>
static constexpr auto rows_avx2 = rows_tiled<TABLE ? 2 : 4, tile_q8<TABLE, TABLE ? 2 : 4>, tile_q8<TABLE, 1>>;

using Fn = void (*)(const Q8Problem&, int64_t, int64_t);

static Fn pick_avx2(int bits, bool table) {
  if (bits == 2) return rows_quads<2, false>;
  if (bits == 3) return table ? rows_quads<3, true> : rows_quads<3, false>;
  return table ? rows_avx2<true> : rows_avx2<false>;
}
#endif

at::Tensor gemm_q8(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& sa,
                   const c10::optional<at::Tensor>& sb, const c10::optional<at::Tensor>& zero,
                   const c10::optional<at::Tensor>& pos, const c10::optional<at::Tensor>& neg, double level_pos,
                   double level_neg, const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size,
                   int64_t in_features) {
  TORCH_CHECK(bits >= 2 && bits <= 4, "gemm_q8 handles 2-, 3- and 4-bit codes, got ", std::to_string(bits));
  const int64_t gs = (group_size <= 0 || group_size >= in_features) ? in_features : group_size;
  const int64_t G = (in_features + gs - 1) / gs, gsp = (gs + 31) / 32 * 32, nb = gsp / 32;
  const int64_t nb_last = (in_features - (G - 1) * gs + 31) / 32, nblk = (G - 1) * nb + nb_last;
  const int64_t out = codes.size(0), row_bytes = nblk * 4 * bits;
  const int64_t nq = (G - 1) * ((nb + 3) / 4) + (nb_last + 3) / 4;  // 2 and 3 bits: quads of blocks
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.dim() == 2 &&
                  codes.size(1) == row_bytes && codes.is_contiguous(),
              "codes must be a contiguous CPU uint8 tensor (out, ", std::to_string(row_bytes), ") in the ",
              std::to_string(bits), "-bit kernel layout");
  TORCH_CHECK(sa.scalar_type() == at::kHalf && sa.is_contiguous() && sa.numel() == out * G,
              "scale_a must be contiguous float16 (out, ", std::to_string(G), ")");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.size(-1) == in_features,
              "x must be float32 with last dimension ", std::to_string(in_features));
  const bool table = pos.has_value() && pos->defined();
  TORCH_CHECK(!(table && bits == 2), "gemm_q8 takes tables for 3- and 4-bit codes only (2 bits: int codes)");
  Q8Problem p{};
  if (table) {
    TORCH_CHECK(neg.has_value() && neg->defined() && pos->scalar_type() == at::kByte && neg->scalar_type() == at::kByte &&
                    pos->numel() == 16 && neg->numel() == 16,
                "pos and neg must be uint8 tables of 16 entries");
    const auto pc = pos->contiguous(), nc = neg->contiguous();
    for (int i = 0; i < 16; ++i) {
      p.pos[i] = pc.data_ptr<uint8_t>()[i];
      p.neg[i] = nc.data_ptr<uint8_t>()[i];
      TORCH_CHECK(p.pos[i] <= 64 && p.neg[i] <= 64, "table levels must be at most 64 in magnitude");
    }
    TORCH_CHECK(std::isfinite(level_pos) && std::isfinite(level_neg), "level_pos and level_neg must be finite");
    if (sb.has_value() && sb->defined()) {
      TORCH_CHECK(sb->scalar_type() == at::kHalf && sb->is_contiguous() && sb->numel() == out * G,
                  "scale_b must be contiguous float16 (out, ", std::to_string(G), ")");
      p.sb = sb->data_ptr<c10::Half>();
    }
  } else {
    TORCH_CHECK(zero.has_value() && zero->defined() && zero->scalar_type() == at::kByte && zero->is_contiguous() &&
                    zero->numel() == out * G,
                "zero must be contiguous uint8 (out, ", std::to_string(G), ") for int codes");
    p.zero = zero->data_ptr<uint8_t>();
  }
  auto x = x_in.reshape({-1, in_features}).contiguous();
  const int64_t M = x.size(0);
  // the quantized input lives in per-thread scratch (no allocation per call)
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xd, xs;
  const int64_t xq_stride = bits != 4 ? nq * 128 : nblk * 32, xd_stride = bits != 4 ? nq * 8 : nblk * 4;
  xq.resize(M * xq_stride);
  xd.resize(M * xd_stride);
  xs.resize(M * G);
  bool avx2 = false;
#if LOWBIT_Q8_X86
  avx2 = lowbit::active_isa() == 1;
#endif
  for (int64_t m = 0; m < M; ++m)
    quantize_input(x.data_ptr<float>() + m * in_features, in_features, gs, G, nb, nb_last, (int)bits,
                   xq.data() + m * xq_stride, xd.data() + m * xd_stride, xs.data() + m * G, avx2);
  auto y = at::empty({M, out}, x.options());
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_c.numel() == out, "bias must have out_features entries");
    p.bias = bias_c.data_ptr<float>();
  }
  p.xq = xq.data();
  p.xd = xd.data();
  p.xs = xs.data();
  p.codes = codes.data_ptr<uint8_t>();
  p.sa = sa.data_ptr<c10::Half>();
  p.level_pos = (float)level_pos;
  p.level_neg = (float)level_neg;
  p.y = y.data_ptr<float>();
  p.M = M, p.out = out, p.G = G, p.nb = nb, p.nb_last = nb_last, p.row_bytes = row_bytes, p.nblk = nblk;
  p.xq_stride = xq_stride, p.xd_stride = xd_stride, p.bits = (int)bits;
  p.table = table;
  void (*fn)(const Q8Problem&, int64_t, int64_t) = rows_scalar;
#if LOWBIT_Q8_X86
  if (avx2) fn = pick_avx2((int)bits, table);
#endif
  const int64_t grain = std::max<int64_t>(1, lowbit::min_task_bytes() / std::max<int64_t>(1, row_bytes * M));
  at::parallel_for(0, out, grain, [&](int64_t r0, int64_t r1) { fn(p, r0, r1); });
  auto sizes = x_in.sizes().vec();
  sizes.back() = out;
  return y.view(sizes);
}

}  // namespace lowbit_q8

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("gemm_q8(Tensor x, Tensor codes, Tensor scale_a, Tensor? scale_b, Tensor? zero, Tensor? pos, Tensor? neg, "
        "float level_pos, float level_neg, Tensor? bias, int bits, int group_size, int in_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("gemm_q8", &lowbit_q8::gemm_q8); }
