// AVX2 kernels of the conversion (nearest, stochastic, biased) and max |x| passes (also used by the
// AVX-VNNI table entry).  Compiled with -mavx2; only called after a cpuid + XCR0 check.  The tails
// use the scalar reference loops of quantize_kernels.h, so every element gets the same arithmetic as
// the scalar path.
#include <immintrin.h>

#include "quantize_kernels.h"

namespace jdfp {
namespace {

// y = scale2(x, -e), NaN lanes zeroed, clamped to +-qm (as scaled_clamped).
inline __m256 scaled8(__m256 v, __m256 s1, __m256 s2, __m256 lo, __m256 hi) {
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(v, s1), s2);
  y = _mm256_and_ps(y, _mm256_cmp_ps(y, y, _CMP_ORD_Q));
  return _mm256_min_ps(_mm256_max_ps(y, lo), hi);
}

// round_stochastic1 on 8 lanes, as int32 (exact integers).
inline __m256i sround8(__m256 y, __m256i w) {
  const __m256 low = _mm256_round_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 8)), _mm256_set1_ps(0x1p-24f));
  const __m256 up = _mm256_cmp_ps(u, _mm256_sub_ps(y, low), _CMP_LT_OQ);
  return _mm256_cvtps_epi32(_mm256_add_ps(low, _mm256_and_ps(up, _mm256_set1_ps(1.0f))));
}

// round_biased1 on 8 lanes, as int32.
inline __m256i bround8(__m256 y) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 m = _mm256_andnot_ps(sign, y);
  const __m256 low = _mm256_round_ps(m, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m256 up = _mm256_cmp_ps(_mm256_sub_ps(m, low), _mm256_set1_ps(0.25f), _CMP_GE_OQ);
  const __m256 r = _mm256_add_ps(low, _mm256_and_ps(up, _mm256_set1_ps(1.0f)));
  return _mm256_cvtps_epi32(_mm256_or_ps(r, _mm256_and_ps(sign, y)));
}

// Two int32 vectors (exact values within +-32767) -> 16 int16 in element order.
inline void store16(int16_t* out, __m256i a, __m256i b) {
  const __m256i p = _mm256_packs_epi32(a, b);  // per 128-bit lane: reorder the 64-bit quarters
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(p, 0xD8));
}

// The Philox words of the 32 elements from element 4 * j0 on (8 blocks), in element order: lane l
// computes block 2 * (l % 4) + l / 4, so the in-lane 4x4 transposes leave them in order.
inline void words32(uint64_t j0, PhiloxKey key, __m256i w[4]) {
  const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256i lo = _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(j0))), order);
  // Carry into the high word where lo wrapped (unsigned lo < order, compared with the sign flipped).
  const __m256i flip = _mm256_set1_epi32(int(0x80000000u));
  const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(order, flip), _mm256_xor_si256(lo, flip));
  const __m256i hi = _mm256_sub_epi32(_mm256_set1_epi32(int(uint32_t(j0 >> 32))), carry);
  __m256i x[4];
  philox_avx2(lo, hi, key, x);
  const __m256i t0 = _mm256_unpacklo_epi32(x[0], x[1]), t1 = _mm256_unpackhi_epi32(x[0], x[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(x[2], x[3]), t3 = _mm256_unpackhi_epi32(x[2], x[3]);
  w[0] = _mm256_unpacklo_epi64(t0, t2), w[1] = _mm256_unpackhi_epi64(t0, t2);
  w[2] = _mm256_unpacklo_epi64(t1, t3), w[3] = _mm256_unpackhi_epi64(t1, t3);
}

}  // namespace

// Round with the MXCSR mode (round-to-nearest-even: set by the worker) after clamping to +-qmax, so
// the int32 -> int16 narrowing never saturates. NaN lanes are zeroed before the clamp.
void convert_avx2(const ConvertArgs& a, int64_t begin, int64_t end) {
  const __m256 s1 = _mm256_set1_ps(a.s1), s2 = _mm256_set1_ps(a.s2);
  const __m256 hi = _mm256_set1_ps(a.qm), lo = _mm256_set1_ps(-a.qm);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    __m256 y0 = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(a.x + (i - a.x_index0)), s1), s2);
    __m256 y1 = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(a.x + (i + 8 - a.x_index0)), s1), s2);
    y0 = _mm256_and_ps(y0, _mm256_cmp_ps(y0, y0, _CMP_ORD_Q));
    y1 = _mm256_and_ps(y1, _mm256_cmp_ps(y1, y1, _CMP_ORD_Q));
    y0 = _mm256_min_ps(_mm256_max_ps(y0, lo), hi);
    y1 = _mm256_min_ps(_mm256_max_ps(y1, lo), hi);
    const __m256i p = _mm256_packs_epi32(_mm256_cvtps_epi32(y0), _mm256_cvtps_epi32(y1));
    // packs works per 128-bit lane: [a0..3 b0..3 | a4..7 b4..7] -> reorder the 64-bit quarters.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.out + (i - a.out_index0)), _mm256_permute4x64_epi64(p, 0xD8));
  }
  convert_ref(a, i, end);
}

// Stochastic rounding: 32 elements (8 Philox blocks) per step; the head (off a block boundary) and
// the tail go through the scalar reference loop.
void convert_stochastic_avx2(const ConvertArgs& a, int64_t begin, int64_t end) {
  const __m256 s1 = _mm256_set1_ps(a.s1), s2 = _mm256_set1_ps(a.s2);
  const __m256 hi = _mm256_set1_ps(a.qm), lo = _mm256_set1_ps(-a.qm);
  int64_t i = std::min(end, (begin + 3) & ~int64_t(3));
  convert_stochastic_ref(a, begin, i);
  for (; i + 32 <= end; i += 32) {
    __m256i w[4];
    words32(uint64_t(i) >> 2, a.key, w);
    __m256i r[4];
    for (int t = 0; t < 4; ++t) r[t] = sround8(scaled8(_mm256_loadu_ps(a.x + (i + 8 * t - a.x_index0)), s1, s2, lo, hi), w[t]);
    store16(a.out + (i - a.out_index0), r[0], r[1]);
    store16(a.out + (i + 16 - a.out_index0), r[2], r[3]);
  }
  convert_stochastic_ref(a, i, end);
}

void convert_biased_avx2(const ConvertArgs& a, int64_t begin, int64_t end) {
  const __m256 s1 = _mm256_set1_ps(a.s1), s2 = _mm256_set1_ps(a.s2);
  const __m256 hi = _mm256_set1_ps(a.qm), lo = _mm256_set1_ps(-a.qm);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m256i r0 = bround8(scaled8(_mm256_loadu_ps(a.x + (i - a.x_index0)), s1, s2, lo, hi));
    store16(a.out + (i - a.out_index0), r0, bround8(scaled8(_mm256_loadu_ps(a.x + (i + 8 - a.x_index0)), s1, s2, lo, hi)));
  }
  convert_biased_ref(a, i, end);
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
