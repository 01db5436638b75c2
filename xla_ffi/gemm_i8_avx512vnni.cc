// INT8 GEMM on AVX-512 VNNI: vpdpbusd zmm (64 u8 x s8 products per instruction), B shifted to u8 in
// the vector operand, A broadcast as s8 ({1to16} embedded broadcast).  Micro-tiles: 12 x 32 for
// KB == 1 (24 int32 accumulators), 6 x 32 for KB > 1 (12 int32 + 12 float32 accumulators, so the
// per-block epilogue stays in registers).  Compiled with -mavx512f -mavx512bw -mavx512vnni (see
// CMakeLists.txt); only called after a cpuid + XCR0 check.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "gemm_i8_driver.h"

namespace jdfp {
namespace {

struct VI8Zmm {
  static constexpr int kLanes = 16;
  static constexpr bool kShiftB = true;
  using vi = __m512i;
  using vf = __m512;
  template <class T>
  static inline vi load(const T* p) { return _mm512_loadu_si512(p); }
  static inline void store(int32_t* p, vi v) { _mm512_storeu_si512(p, v); }
  static inline vf loadf(const float* p) { return _mm512_loadu_ps(p); }
  static inline void storef(float* p, vf v) { _mm512_storeu_ps(p, v); }
  static inline vi zero() { return _mm512_setzero_si512(); }
  static inline vf zerof() { return _mm512_setzero_ps(); }
  static inline vi bcast(int32_t x) { return _mm512_set1_epi32(x); }
  static inline vf bcastf(float x) { return _mm512_set1_ps(x); }
  static inline vf cvt(vi x) { return _mm512_cvtepi32_ps(x); }
  static inline vi add(vi a, vi b) { return _mm512_add_epi32(a, b); }
  static inline vf addf(vf a, vf b) { return _mm512_add_ps(a, b); }
  static inline vf mulf(vf a, vf b) { return _mm512_mul_ps(a, b); }
  static inline vf fmaf(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
  // acc + sum of 4 products (b' u8) x (a s8) per lane, modulo 2**32.
  static inline vi dp(vi acc, vi b, vi a) { return _mm512_dpbusd_epi32(acc, b, a); }
  static inline vf pow2(vi e) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(e, _mm512_set1_epi32(127)), 23)); }
  static inline vf scale2(vf x, vi e) {
    const vi lo = _mm512_set1_epi32(-126), hi = _mm512_set1_epi32(127);
    const vi e1 = _mm512_min_epi32(_mm512_max_epi32(e, lo), hi);
    const vi e2 = _mm512_min_epi32(_mm512_max_epi32(_mm512_sub_epi32(e, e1), lo), hi);
    return _mm512_mul_ps(_mm512_mul_ps(x, pow2(e1)), pow2(e2));
  }
};

}  // namespace

// Outputs at most 16 wide on 12 x 16 micro-tiles (as the INT16 kernel's narrow case, kernel_avx512vnni.cc).
int tile_i8_avx512vnni(const ProblemI8& P, const Tile& T) {
  if (P.N <= 16) return tile_i8<VI8Zmm, UkI8<VI8Zmm, 12, 1, false>, UkI8<VI8Zmm, 12, 1, true>>(P, T);
  return tile_i8<VI8Zmm, UkI8<VI8Zmm, 12, 2, false>, UkI8<VI8Zmm, 6, 2, true>>(P, T);
}

}  // namespace jdfp
