// AVX-512 kernels of the block conversion: 16-lane steps with masked tails inside every block (a
// 24-wide HBFP block is one full and one half step), no scalar loop.  Compiled with -mavx512f
// -mavx512bw -mavx512vl (see CMakeLists.txt); only called after a cpuid + XCR0 check.
#include <immintrin.h>

#include "block_quantize_kernels.h"
#include "counts_avx512.h"

namespace jdfp {
namespace {

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u); }

// 16 floats -> 16 int32, biased rounding: |y| floored, +1 where the discarded fraction >= 1/4,
// clipped to qm, sign restored (y's NaN lanes were zeroed by the caller).
inline __m512i round_biased16(__m512 y, __m512 qm) {
  const __m512 ay = _mm512_abs_ps(y);
  const __m512 low = _mm512_roundscale_ps(ay, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(ay, low), _mm512_set1_ps(0.25f), _CMP_GE_OQ);
  __m512 r = _mm512_mask_add_ps(low, up, low, _mm512_set1_ps(1.0f));
  r = _mm512_min_ps(r, qm);
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(int(0x80000000u)));
  return _mm512_cvtps_epi32(_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), sign)));
}

}  // namespace

void block_amax_avx512(const float* x, int64_t n, int64_t bc, uint32_t* acc) {
  const __m512i abs = _mm512_set1_epi32(int(kAbsMask)), tiny = _mm512_set1_epi32(int(kMinNormalBits));
  for (int64_t c0 = 0, j = 0; c0 < n; c0 += bc, ++j) {
    const int64_t c1 = c0 + bc < n ? c0 + bc : n;
    __m512i m = _mm512_loadu_si512(acc + j * kAmaxLanes);
    for (int64_t i = c0; i < c1; i += 16) {
      __m512i u = _mm512_and_si512(_mm512_maskz_loadu_epi32(tail_mask(c1 - i), x + i), abs);
      u = _mm512_maskz_mov_epi32(_mm512_cmpge_epu32_mask(u, tiny), u);  // DAZ, as amax_ref
      m = _mm512_max_epu32(m, u);
    }
    _mm512_storeu_si512(acc + j * kAmaxLanes, m);
  }
}

void block_amax_rows_avx512(const float* x, int64_t rows, int64_t ld, int64_t n, int64_t bc, uint32_t* acc) {
  const __m512i abs = _mm512_set1_epi32(int(kAbsMask)), tiny = _mm512_set1_epi32(int(kMinNormalBits));
  for (int64_t i = 0, j = 0, k = 0; i < n; i += 16) {  // block j holds column i at its offset k
    const __mmask16 m = tail_mask(n - i);
    __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();  // two chains: the loads overlap
    const float* p = x + i;
    int64_t r = 0;
    for (; r + 1 < rows; r += 2, p += 2 * ld) {
      a = _mm512_max_epu32(a, _mm512_and_si512(_mm512_maskz_loadu_epi32(m, p), abs));
      b = _mm512_max_epu32(b, _mm512_and_si512(_mm512_maskz_loadu_epi32(m, p + ld), abs));
    }
    if (r < rows) a = _mm512_max_epu32(a, _mm512_and_si512(_mm512_maskz_loadu_epi32(m, p), abs));
    a = _mm512_max_epu32(a, b);
    a = _mm512_maskz_mov_epi32(_mm512_cmpge_epu32_mask(a, tiny), a);  // DAZ
    // Each block's lanes of this chunk reduced at once (a 24-wide block: one or two per chunk).
    for (int64_t l0 = 0, cnt = n - i < 16 ? n - i : 16; l0 < cnt;) {
      const int64_t l1 = l0 + (bc - k) < cnt ? l0 + (bc - k) : cnt;
      const __mmask16 bm = __mmask16(((1u << l1) - 1u) & ~((1u << l0) - 1u));
      const uint32_t v = _mm512_mask_reduce_max_epu32(bm, a);
      uint32_t& lane = acc[j * kAmaxLanes];
      if (v > lane) lane = v;
      k += l1 - l0, l0 = l1;
      if (k == bc) k = 0, ++j;
    }
  }
}

void block_convert_avx512(const float* x, int16_t* out, int64_t n, int64_t bc, const BlockConvertArgs& a) {
  const __m512 hi = _mm512_set1_ps(a.qm), lo = _mm512_set1_ps(-a.qm);
  for (int64_t c0 = 0, j = 0; c0 < n; c0 += bc, ++j) {
    const int64_t c1 = c0 + bc < n ? c0 + bc : n;
    const __m512 s1 = _mm512_set1_ps(a.s1[j]), s2 = _mm512_set1_ps(a.s2[j]);
    for (int64_t i = c0; i < c1; i += 16) {
      const __mmask16 m = tail_mask(c1 - i);
      __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), s1), s2);
      y = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y, y, _CMP_ORD_Q), y);  // NaN -> 0
      // Nearest: clamp first (the narrowing never saturates), round with the MXCSR mode (RNE).
      const __m512i r = a.biased ? round_biased16(y, hi) : _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(y, lo), hi));
      _mm256_mask_storeu_epi16(out + i, m, _mm512_cvtsepi32_epi16(r));
    }
  }
}

namespace {

// Per-column scales, one pass: convert (block_convert_avx512's arithmetic), store as int8 or int16,
// count when c is given (stats_cols_avx512's counts).
template <class Q>
void convert_cols_avx512(const float* x, Q* out, int64_t n, const float* s1, const float* s2, float qm, bool biased,
                         Counts* c) {
  const __m512 hi = _mm512_set1_ps(qm), lo = _mm512_set1_ps(-qm);
  LaneCounts16 k;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 p1 = _mm512_maskz_loadu_ps(m, s1 + i), p2 = _mm512_maskz_loadu_ps(m, s2 + i);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + i);
    const __m512 y_raw = _mm512_mul_ps(_mm512_mul_ps(xv, p1), p2);
    const __m512 y = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y_raw, y_raw, _CMP_ORD_Q), y_raw);  // NaN -> 0
    const __m512i r = biased ? round_biased16(y, hi) : _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(y, lo), hi));
    // Narrow in a register, then a plain store where the step is whole: the masked narrowing store
    // (vpmovsdb to memory) was this loop's bottleneck.
    if constexpr (sizeof(Q) == 1) {
      const __m128i r8 = _mm512_cvtsepi32_epi8(r);
      if (m == 0xFFFF) _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), r8);
      else _mm_mask_storeu_epi8(out + i, m, r8);
    } else {
      const __m256i r16 = _mm512_cvtsepi32_epi16(r);
      if (m == 0xFFFF) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), r16);
      else _mm256_mask_storeu_epi16(out + i, m, r16);
    }
    if (!c) continue;
    // As stats_cols_avx512: s1 == 0 marks a NONFINITE block, whose elements are never ok.  |y| before
    // NaN lanes are zeroed is |x| * p1 * p2 exactly (the products round alike for either sign).
    const __mmask16 gok = _mm512_mask_cmp_ps_mask(m, p1, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    k.add(m, gok, _mm512_castps_si512(xv), _mm512_abs_ps(y_raw), hi, r);
  }
  if (c) k.flush(*c);
}

}  // namespace

void convert_cols_i8_avx512(const float* x, int8_t* out, int64_t n, const float* s1, const float* s2, float qm,
                            bool biased, Counts* c) {
  convert_cols_avx512(x, out, n, s1, s2, qm, biased, c);
}

void convert_cols_i16_avx512(const float* x, int16_t* out, int64_t n, const float* s1, const float* s2, float qm,
                             bool biased, Counts* c) {
  convert_cols_avx512(x, out, n, s1, s2, qm, biased, c);
}

}  // namespace jdfp
