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
  static inline vf mulf(vf a, vf b) { return _mm256_mul_ps(a, b); }
  // No FMA in these TUs' flags: a * b is exact wherever fmaf is used, so two steps give the same.
  static inline vf fmaf(vf a, vf b, vf c) { return _mm256_add_ps(_mm256_mul_ps(a, b), c); }
  static inline vf bcastf(float x) { return _mm256_set1_ps(x); }
  static inline vi add(vi a, vi b) { return _mm256_add_epi32(a, b); }
  // F' = F + sext16(((w >> 16) - F) mod 2**16), the update of ukernel_simd.h (vpmaddwd by the word
  // pair (1, 0) sign-extends the low word; VVnni fuses the add as one vpdpwssd).
  static inline vi f_next(vi f, vi w) {
    const vi d = _mm256_sub_epi32(_mm256_srli_epi32(w, 16), f);
    return _mm256_add_epi32(f, _mm256_madd_epi16(d, _mm256_set1_epi32(1)));
  }
  // T = 2**16 * F + (W & 0xFFFF) of 8 lanes (see UkSimd::kernel), lanes 0..3 in l and 4..7 in u.
  static inline void wf64(const int32_t* pw, const int32_t* pf, __m256i& l, __m256i& u) {
    const vi f = load(pf);
    const vi lo = _mm256_and_si256(load(pw), _mm256_set1_epi32(0xFFFF));
    l = _mm256_add_epi64(_mm256_slli_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(f)), 16),
                         _mm256_cvtepu32_epi64(_mm256_castsi256_si128(lo)));
    u = _mm256_add_epi64(_mm256_slli_epi64(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(f, 1)), 16),
                         _mm256_cvtepu32_epi64(_mm256_extracti128_si256(lo, 1)));
  }
  // wide[0..8) (+)= T of (W, F).
  static inline void spill_wf(const int32_t* pw, const int32_t* pf, int64_t* wide, bool add) {
    __m256i* q = reinterpret_cast<__m256i*>(wide);
    __m256i l, u;
    wf64(pw, pf, l, u);
    if (add) {
      l = _mm256_add_epi64(_mm256_loadu_si256(q), l);
      u = _mm256_add_epi64(_mm256_loadu_si256(q + 1), u);
    }
    _mm256_storeu_si256(q, l);
    _mm256_storeu_si256(q + 1, u);
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
  // f(S) of 8 lanes: S = T of (W, F) (+ wide[0..8) when the block spilled), rounded once.
  static inline vf cvt_wf(const int32_t* pw, const int32_t* pf, const int64_t* wide) {
    __m256i l, u;
    wf64(pw, pf, l, u);
    if (wide) {
      const __m256i* q = reinterpret_cast<const __m256i*>(wide);
      l = _mm256_add_epi64(_mm256_loadu_si256(q), l);
      u = _mm256_add_epi64(_mm256_loadu_si256(q + 1), u);
    }
    return _mm256_set_m128(cvt64x4(u), cvt64x4(l));
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
