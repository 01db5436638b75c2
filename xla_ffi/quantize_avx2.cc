// AVX2 kernels of the conversion and max |x| passes (also used by the AVX-VNNI table entry).
// Compiled with -mavx2; only called after a cpuid + XCR0 check.  The tails use the scalar reference
// loops of quantize_kernels.h, so every element gets the same arithmetic as the scalar path.
#include <immintrin.h>

#include "quantize_kernels.h"

namespace jdfp {

// Round with the MXCSR mode (round-to-nearest-even: set by the worker) after clamping to +-qmax, so
// the int32 -> int16 narrowing never saturates. NaN lanes are zeroed before the clamp.
void convert_avx2(const ConvertArgs& a, int64_t begin, int64_t end) {
  const __m256 s1 = _mm256_set1_ps(a.s1), s2 = _mm256_set1_ps(a.s2);
  const __m256 hi = _mm256_set1_ps(a.qm), lo = _mm256_set1_ps(-a.qm);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    __m256 y0 = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(a.x + i), s1), s2);
    __m256 y1 = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(a.x + i + 8), s1), s2);
    y0 = _mm256_and_ps(y0, _mm256_cmp_ps(y0, y0, _CMP_ORD_Q));
    y1 = _mm256_and_ps(y1, _mm256_cmp_ps(y1, y1, _CMP_ORD_Q));
    y0 = _mm256_min_ps(_mm256_max_ps(y0, lo), hi);
    y1 = _mm256_min_ps(_mm256_max_ps(y1, lo), hi);
    const __m256i p = _mm256_packs_epi32(_mm256_cvtps_epi32(y0), _mm256_cvtps_epi32(y1));
    // packs works per 128-bit lane: [a0..3 b0..3 | a4..7 b4..7] -> reorder the 64-bit quarters.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.out + i), _mm256_permute4x64_epi64(p, 0xD8));
  }
  convert_ref(a, i, end);
}

uint32_t amax_avx2(const float* x, int64_t begin, int64_t end) {
  const __m256i abs = _mm256_set1_epi32(int(kAbsMask)), tiny = _mm256_set1_epi32(int(kMinNormalBits));
  __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    __m256i u0 = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), abs);
    __m256i u1 = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 8)), abs);
    // Subnormals (0 < u < min normal) lose to any normal and are >= 0: only an all-subnormal
    // tensor could pick one; flush them (u < tiny -> 0) to keep DAZ semantics exactly.
    u0 = _mm256_andnot_si256(_mm256_cmpgt_epi32(tiny, u0), u0);
    u1 = _mm256_andnot_si256(_mm256_cmpgt_epi32(tiny, u1), u1);
    m0 = _mm256_max_epu32(m0, u0);
    m1 = _mm256_max_epu32(m1, u1);
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_max_epu32(m0, m1));
  uint32_t m = amax_ref(x, i, end);
  for (uint32_t v : lanes) m = std::max(m, v);
  return m;
}

}  // namespace jdfp
