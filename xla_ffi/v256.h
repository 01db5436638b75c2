// 256-bit vector traits shared by the AVX2 and AVX-VNNI kernels (see ukernel_simd.h).
#pragma once
#include <immintrin.h>

#include <cstdint>

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
