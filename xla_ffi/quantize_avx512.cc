// AVX-512 kernels of the conversion (three roundings), max |x| and statistics passes: masked tails,
// no scalar loop except in amax.  Compiled with -mavx512f -mavx512bw -mavx512vl -mpopcnt (see CMakeLists.txt);
// only called after a cpuid + XCR0 check.
#include <immintrin.h>

#include "counts_avx512.h"
#include "quantize_kernels.h"

namespace jdfp {
namespace {

// 16 floats -> 16 int16, as quantize1: NaN lanes zeroed, clamped to +-qmax (so the saturating
// narrowing never saturates), rounded with the MXCSR mode (round-to-nearest-even: set by the worker).
inline __m256i convert16(__m512 v, __m512 s1, __m512 s2, __m512 lo, __m512 hi) {
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(v, s1), s2);
  y = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y, y, _CMP_ORD_Q), y);
  y = _mm512_min_ps(_mm512_max_ps(y, lo), hi);
  return _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(y));
}

// y = scale2(x, -e), NaN lanes zeroed, clamped to +-qm (as scaled_clamped).
inline __m512 scaled16(__m512 v, __m512 s1, __m512 s2, __m512 lo, __m512 hi) {
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(v, s1), s2);
  y = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y, y, _CMP_ORD_Q), y);
  return _mm512_min_ps(_mm512_max_ps(y, lo), hi);
}

// |x| * p1 * p2, the magnitude the saturation count compares with qmax (stats_ref's order).
inline __m512 abs_scaled16(__m512 x, __m512 p1, __m512 p2) { return _mm512_mul_ps(_mm512_mul_ps(_mm512_abs_ps(x), p1), p2); }

// round_stochastic1 on 16 lanes: floor(y) + (u < frac); exact integers, so the conversion is exact.
inline __m256i sround16(__m512 y, __m512i w) {
  const __m512 low = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 8)), _mm512_set1_ps(0x1p-24f));
  const __mmask16 up = _mm512_cmp_ps_mask(u, _mm512_sub_ps(y, low), _CMP_LT_OQ);
  const __m512 r = _mm512_mask_add_ps(low, up, low, _mm512_set1_ps(1.0f));
  return _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(r));
}

// round_biased1 on 16 lanes (the sign is or-ed back as bits: _mm512_or_ps needs AVX512DQ).
inline __m256i bround16(__m512 y) {
  const __m512 m = _mm512_abs_ps(y);
  const __m512 low = _mm512_roundscale_ps(m, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(m, low), _mm512_set1_ps(0.25f), _CMP_GE_OQ);
  const __m512i r = _mm512_castps_si512(_mm512_mask_add_ps(low, up, low, _mm512_set1_ps(1.0f)));
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(int(0x80000000u)));
  return _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_castsi512_ps(_mm512_or_si512(r, sign))));
}

// Lane l of the Philox vectors computes block 4 * (l % 4) + l / 4 of a group of 16: after the
// in-lane 4x4 transposes of `words64`, vector t then holds the words of elements 16t .. 16t + 15 in
// order, with no cross-lane shuffle.
inline __m512i block_order16() { return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15); }

// The Philox words of the 64 elements from element 4 * j0 on (16 blocks), in element order.
inline void words64(uint64_t j0, PhiloxKey key, __m512i w[4]) {
  const __m512i order = block_order16();
  const __m512i lo = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(j0))), order);
  const __m512i hi0 = _mm512_set1_epi32(int(uint32_t(j0 >> 32)));
  // The counter's high word takes the carry of the low word (a 2**32-block boundary in the group).
  const __m512i hi = _mm512_mask_add_epi32(hi0, _mm512_cmplt_epu32_mask(lo, order), hi0, _mm512_set1_epi32(1));
  __m512i x[4];
  philox_avx512(lo, hi, key, x);
  const __m512i t0 = _mm512_unpacklo_epi32(x[0], x[1]), t1 = _mm512_unpackhi_epi32(x[0], x[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(x[2], x[3]), t3 = _mm512_unpackhi_epi32(x[2], x[3]);
  w[0] = _mm512_unpacklo_epi64(t0, t2), w[1] = _mm512_unpackhi_epi64(t0, t2);
  w[2] = _mm512_unpacklo_epi64(t1, t3), w[3] = _mm512_unpackhi_epi64(t1, t3);
}

inline __mmask16 lanes_left(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : (left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u));
}

}  // namespace

void convert_avx512(const ConvertArgs& a, int64_t begin, int64_t end) {
  const __m512 s1 = _mm512_set1_ps(a.s1), s2 = _mm512_set1_ps(a.s2);
  const __m512 hi = _mm512_set1_ps(a.qm), lo = _mm512_set1_ps(-a.qm);
  int64_t i = begin;
  for (; i + 32 <= end; i += 32) {
    const __m256i r0 = convert16(_mm512_loadu_ps(a.x + (i - a.x_index0)), s1, s2, lo, hi);
    const __m256i r1 = convert16(_mm512_loadu_ps(a.x + (i + 16 - a.x_index0)), s1, s2, lo, hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.out + (i - a.out_index0)), r0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.out + (i + 16 - a.out_index0)), r1);
  }
  if (i < end) {  // masked tail: no scalar loop
    for (; i < end; i += 16) {
      const int rem = int(std::min<int64_t>(16, end - i));
      const __mmask16 m = __mmask16((1u << rem) - 1u);
      const __m256i r = convert16(_mm512_maskz_loadu_ps(m, a.x + (i - a.x_index0)), s1, s2, lo, hi);
      _mm256_mask_storeu_epi16(a.out + (i - a.out_index0), m, r);
    }
  }
}

// Stochastic rounding: 64 elements (16 Philox blocks) per step, the last step masked.  A chunk that
// starts off a block boundary (never, with the handler's chunking) takes its head elements scalar.
void convert_stochastic_avx512(const ConvertArgs& a, int64_t begin, int64_t end) {
  const __m512 s1 = _mm512_set1_ps(a.s1), s2 = _mm512_set1_ps(a.s2);
  const __m512 hi = _mm512_set1_ps(a.qm), lo = _mm512_set1_ps(-a.qm);
  const int64_t head = std::min(end, (begin + 3) & ~int64_t(3));
  convert_stochastic_ref(a, begin, head);
  for (int64_t i = head; i < end; i += 64) {
    __m512i w[4];
    words64(uint64_t(i) >> 2, a.key, w);
    for (int t = 0; t < 4; ++t) {
      const __mmask16 m = lanes_left(end - i - 16 * t);
      if (!m) break;
      const __m512 y = scaled16(_mm512_maskz_loadu_ps(m, a.x + (i + 16 * t - a.x_index0)), s1, s2, lo, hi);
      _mm256_mask_storeu_epi16(a.out + (i + 16 * t - a.out_index0), m, sround16(y, w[t]));
    }
  }
}

void convert_biased_avx512(const ConvertArgs& a, int64_t begin, int64_t end) {
  const __m512 s1 = _mm512_set1_ps(a.s1), s2 = _mm512_set1_ps(a.s2);
  const __m512 hi = _mm512_set1_ps(a.qm), lo = _mm512_set1_ps(-a.qm);
  for (int64_t i = begin; i < end; i += 16) {
    const __mmask16 m = lanes_left(end - i);
    const __m512 y = scaled16(_mm512_maskz_loadu_ps(m, a.x + (i - a.x_index0)), s1, s2, lo, hi);
    _mm256_mask_storeu_epi16(a.out + (i - a.out_index0), m, bround16(y));
  }
}

uint32_t amax_avx512(const float* x, int64_t begin, int64_t end) {
  const __m512i abs = _mm512_set1_epi32(int(kAbsMask)), tiny = _mm512_set1_epi32(int(kMinNormalBits));
  __m512i m0 = _mm512_setzero_si512(), m1 = _mm512_setzero_si512();
  int64_t i = begin;
  for (; i + 32 <= end; i += 32) {
    __m512i u0 = _mm512_and_si512(_mm512_loadu_si512(x + i), abs);
    __m512i u1 = _mm512_and_si512(_mm512_loadu_si512(x + i + 16), abs);
    // Subnormals flush to zero (DAZ), as in amax_ref.
    u0 = _mm512_maskz_mov_epi32(_mm512_cmpge_epu32_mask(u0, tiny), u0);
    u1 = _mm512_maskz_mov_epi32(_mm512_cmpge_epu32_mask(u1, tiny), u1);
    m0 = _mm512_max_epu32(m0, u0);
    m1 = _mm512_max_epu32(m1, u1);
  }
  return std::max(uint32_t(_mm512_reduce_max_epu32(_mm512_max_epu32(m0, m1))), amax_ref(x, i, end));
}

// The counters of stats_ref as lane masks: one masked 16-lane step per iteration, tail included.
void stats_avx512(const StatsArgs& a, int64_t begin, int64_t end, Counts& c) {
  const __m512 p1 = _mm512_set1_ps(a.p1), p2 = _mm512_set1_ps(a.p2), qm = _mm512_set1_ps(a.qm);
  const __mmask16 gok = a.group_ok ? __mmask16(0xFFFF) : __mmask16(0);
  LaneCounts16 k;
  for (int64_t i = begin; i < end; i += 16) {
    const __mmask16 in = lanes_left(end - i);
    const __m512 xv = _mm512_maskz_loadu_ps(in, a.x + i);
    k.add(in, gok & in, _mm512_castps_si512(xv), abs_scaled16(xv, p1, p2), qm,
          _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(in, a.q + (i - a.q_index0))));
  }
  k.flush(c);
}

// Stochastic rounding of a row segment with per-element scales (convert_stochastic_cols_ref): 64
// elements per Philox step from the first 4-aligned tensor index, the head before it scalar.
namespace {

// Stochastic rounding of a row segment with per-column scales: put(i, mask, q16) receives the int16
// values of elements [i, i + 16), the head up to the next Philox block (<= 3 elements) first.
template <class Put>
void stochastic_cols(const float* x, int64_t n, int64_t g0, PhiloxKey key, const float* s1, const float* s2, float qm,
                     Put&& put) {
  const __m512 hi = _mm512_set1_ps(qm), lo = _mm512_set1_ps(-qm);
  const int64_t head = std::min(n, ((g0 + 3) & ~int64_t(3)) - g0);
  if (head > 0) {
    alignas(32) int16_t q[16] = {};
    convert_stochastic_cols_ref(x, q, head, g0, key, s1, s2, qm);
    put(0, lanes_left(head), _mm256_load_si256(reinterpret_cast<const __m256i*>(q)));
  }
  for (int64_t i = std::max<int64_t>(head, 0); i < n; i += 64) {
    __m512i w[4];
    words64(uint64_t(g0 + i) >> 2, key, w);
    for (int t = 0; t < 4; ++t) {
      const int64_t c = i + 16 * t;
      const __mmask16 m = lanes_left(n - c);
      if (!m) break;
      const __m512 y = scaled16(_mm512_maskz_loadu_ps(m, x + c), _mm512_maskz_loadu_ps(m, s1 + c),
                                _mm512_maskz_loadu_ps(m, s2 + c), lo, hi);
      put(c, m, sround16(y, w[t]));
    }
  }
}

}  // namespace

void convert_stochastic_cols_avx512(const float* x, int16_t* out, int64_t n, int64_t g0, PhiloxKey key,
                                    const float* s1, const float* s2, float qm) {
  stochastic_cols(x, n, g0, key, s1, s2, qm,
                  [&](int64_t i, __mmask16 m, __m256i q16) { _mm256_mask_storeu_epi16(out + i, m, q16); });
}

void convert_stochastic_cols_i8_avx512(const float* x, int8_t* out, int64_t n, int64_t g0, PhiloxKey key,
                                       const float* s1, const float* s2, float qm, Counts* c) {
  const __m512 qmv = _mm512_set1_ps(qm);
  LaneCounts16 k;
  stochastic_cols(x, n, g0, key, s1, s2, qm, [&](int64_t i, __mmask16 m, __m256i q16) {
    _mm256_mask_cvtepi16_storeu_epi8(out + i, m, q16);
    if (!c) return;
    const __m512 p1 = _mm512_maskz_loadu_ps(m, s1 + i), p2 = _mm512_maskz_loadu_ps(m, s2 + i);
    const __mmask16 gok = _mm512_mask_cmp_ps_mask(m, p1, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + i);
    k.add(m, gok, _mm512_castps_si512(xv), abs_scaled16(xv, p1, p2), qmv, _mm512_cvtepi16_epi32(q16));
  });
  if (c) k.flush(*c);
}

// stats_avx512 of a row segment with per-element scales; s1 == 0 lanes belong to NONFINITE blocks.
void stats_cols_avx512(const float* x, const int16_t* q, int64_t n, const float* s1, const float* s2, float qmf,
                       Counts& c) {
  const __m512 qm = _mm512_set1_ps(qmf);
  LaneCounts16 k;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 in = lanes_left(n - i);
    const __m512 p1 = _mm512_maskz_loadu_ps(in, s1 + i), p2 = _mm512_maskz_loadu_ps(in, s2 + i);
    const __mmask16 gok = _mm512_mask_cmp_ps_mask(in, p1, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    const __m512 xv = _mm512_maskz_loadu_ps(in, x + i);
    k.add(in, gok, _mm512_castps_si512(xv), abs_scaled16(xv, p1, p2), qm,
          _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(in, q + i)));
  }
  k.flush(c);
}

}  // namespace jdfp
