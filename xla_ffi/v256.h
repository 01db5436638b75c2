// 256-bit vector traits shared by the AVX2 and AVX-VNNI kernels (see ukernel_simd.h).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "gemm_common.h"

namespace jdfp {
namespace {

struct V256Base {
  static constexpr int kLanes = 8;
  using vi = __m256i;
  using vf = __m256;
  template <class T>
  static inline vi load(const T* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  template <class T>
  static inline void store(T* p, vi v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static inline vf loadf(const float* p) { return _mm256_loadu_ps(p); }
  static inline void storef(float* p, vf v) { _mm256_storeu_ps(p, v); }
  static inline vi zero() { return _mm256_setzero_si256(); }
  static inline vf zerof() { return _mm256_setzero_ps(); }
  static inline vi bcast(int32_t x) { return _mm256_set1_epi32(x); }
  static inline vf cvt(vi x) { return _mm256_cvtepi32_ps(x); }
  static inline vf addf(vf a, vf b) { return _mm256_add_ps(a, b); }
  static inline vi add(vi a, vi b) { return _mm256_add_epi32(a, b); }
  // flush() of ukernel_simd.h: ih += x >> 16, il += x & 0xFFFF (exact, lane-local).
  static inline void split_add(const int32_t* x, vi& ih, vi& il) {
    const vi v = load(x);
    ih = _mm256_add_epi32(ih, _mm256_srai_epi32(v, 16));
    il = _mm256_add_epi32(il, _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF)));
  }
  // int64 block sums of 8 lanes in order at p[0..8) (+)= ih * 2**16 + il.
  static inline void put64(int64_t* p, vi ih, vi il, bool fresh) {
    __m256i* q = reinterpret_cast<__m256i*>(p);
    __m256i l = _mm256_add_epi64(_mm256_slli_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(ih)), 16),
                                 _mm256_cvtepi32_epi64(_mm256_castsi256_si128(il)));
    __m256i h = _mm256_add_epi64(_mm256_slli_epi64(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(ih, 1)), 16),
                                 _mm256_cvtepi32_epi64(_mm256_extracti128_si256(il, 1)));
    if (!fresh) {
      l = _mm256_add_epi64(_mm256_loadu_si256(q), l);
      h = _mm256_add_epi64(_mm256_loadu_si256(q + 1), h);
    }
    _mm256_storeu_si256(q, l);
    _mm256_storeu_si256(q + 1, h);
  }
  // f() of 4 exact int64 block sums, rounded once (half to even).  |s| < 2**51: s + bits(1.5 * 2**52)
  // is the double 1.5 * 2**52 + s exactly, so subtracting 1.5 * 2**52 gives s as an exact double and
  // cvtpd2ps rounds it once.  Larger sums take the scalar 64-bit convert.
  static inline __m128 cvt64x4(__m256i s) {
    const __m256i big = _mm256_srli_epi64(_mm256_add_epi64(s, _mm256_set1_epi64x(int64_t(1) << 51)), 52);
    if (!_mm256_testz_si256(big, big)) {
      alignas(32) int64_t v[4];
      _mm256_store_si256(reinterpret_cast<__m256i*>(v), s);
      return _mm_setr_ps(i64_to_f32(v[0]), i64_to_f32(v[1]), i64_to_f32(v[2]), i64_to_f32(v[3]));
    }
    const __m256d d = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_add_epi64(s, _mm256_set1_epi64x(0x4338000000000000))),
                                    _mm256_set1_pd(6755399441055744.0));
    return _mm256_cvtpd_ps(d);
  }
  // The 8 lanes' f(S) from put64's layout.
  static inline vf cvt64(const int64_t* p) {
    const __m256i* q = reinterpret_cast<const __m256i*>(p);
    return _mm256_set_m128(cvt64x4(_mm256_loadu_si256(q + 1)), cvt64x4(_mm256_loadu_si256(q)));
  }
  static inline vf pow2(vi e) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  }
  static inline vf scale2(vf x, vi e) {
    const vi lo = _mm256_set1_epi32(-126), hi = _mm256_set1_epi32(127);
    const vi e1 = _mm256_min_epi32(_mm256_max_epi32(e, lo), hi);
    const vi e2 = _mm256_min_epi32(_mm256_max_epi32(_mm256_sub_epi32(e, e1), lo), hi);
    return _mm256_mul_ps(_mm256_mul_ps(x, pow2(e1)), pow2(e2));
  }
};

}  // namespace
}  // namespace jdfp
