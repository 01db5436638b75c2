// AVX-512 kernels of the conversion, max |x| and statistics passes: masked tails, no scalar loop
// except in amax.  Compiled with -mavx512f -mavx512bw -mavx512vl -mpopcnt (see CMakeLists.txt);
// only called after a cpuid + XCR0 check.
#include <immintrin.h>

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

}  // namespace

void convert_avx512(const ConvertArgs& a, int64_t begin, int64_t end) {
  const __m512 s1 = _mm512_set1_ps(a.s1), s2 = _mm512_set1_ps(a.s2);
  const __m512 hi = _mm512_set1_ps(a.qm), lo = _mm512_set1_ps(-a.qm);
  int64_t i = begin;
  for (; i + 32 <= end; i += 32) {
    const __m256i r0 = convert16(_mm512_loadu_ps(a.x + i), s1, s2, lo, hi);
    const __m256i r1 = convert16(_mm512_loadu_ps(a.x + i + 16), s1, s2, lo, hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.out + i), r0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.out + i + 16), r1);
  }
  if (i < end) {  // masked tail: no scalar loop
    for (; i < end; i += 16) {
      const int rem = int(std::min<int64_t>(16, end - i));
      const __mmask16 m = __mmask16((1u << rem) - 1u);
      const __m256i r = convert16(_mm512_maskz_loadu_ps(m, a.x + i), s1, s2, lo, hi);
      _mm256_mask_storeu_epi16(a.out + i, m, r);
    }
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
  const __m512i abs = _mm512_set1_epi32(int(kAbsMask)), tiny = _mm512_set1_epi32(int(kMinNormalBits)),
                inf = _mm512_set1_epi32(int(kInfBits));
  const __m512 p1 = _mm512_set1_ps(a.p1), p2 = _mm512_set1_ps(a.p2), qm = _mm512_set1_ps(a.qm);
  const __mmask16 gok = a.group_ok ? __mmask16(0xFFFF) : __mmask16(0);
  int64_t sat = 0, under = 0, nonfin = 0, ok = 0;
  for (int64_t i = begin; i < end; i += 16) {
    const __mmask16 in = end - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (end - i)) - 1u);
    const __m512i u = _mm512_and_si512(_mm512_maskz_loadu_epi32(in, a.x + i), abs);
    const __mmask16 bad = _mm512_mask_cmpge_epu32_mask(in, u, inf);
    const __mmask16 good = _mm512_mask_cmplt_epu32_mask(gok & in, u, inf) & _mm512_cmpge_epu32_mask(u, tiny);
    const __m512 s = _mm512_mul_ps(_mm512_mul_ps(_mm512_castsi512_ps(u), p1), p2);
    const __m512i q = _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(in, a.q + i));
    nonfin += _mm_popcnt_u32(bad);
    ok += _mm_popcnt_u32(good);
    sat += _mm_popcnt_u32(_mm512_mask_cmp_ps_mask(good, s, qm, _CMP_GT_OQ));
    under += _mm_popcnt_u32(_mm512_mask_cmpeq_epi32_mask(good, q, _mm512_setzero_si512()));
  }
  c.sat += sat, c.under += under, c.nonfin += nonfin, c.ok += ok;
}

}  // namespace jdfp
