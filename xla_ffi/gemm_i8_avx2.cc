// INT8 GEMM on AVX2 (ymm, no VNNI) and AVX-VNNI (VEX vpdpbusd ymm): 6 x 16 micro-tile for KB == 1,
// 3 x 16 for KB > 1.  AVX2 has no u8 x s8 dot into int32 without saturation, so it multiplies
// |a| by sign(a) * b with vpmaddubsw (a pair sum is at most 2 * 127 * 127 < 2**15: no saturation) and
// widens the pairs with vpmaddwd; B is packed unshifted there.  Compiled with -mavx2 (-mavxvnni for
// JDFP_I8_AVXVNNI); only called after a cpuid + XCR0 check.
#include <immintrin.h>

#include "gemm_i8_driver.h"

namespace jdfp {
namespace {

struct VI8YmmBase {
  static constexpr int kLanes = 8;
  using vi = __m256i;
  using vf = __m256;
  template <class T>
  static inline vi load(const T* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline void store(int32_t* p, vi v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static inline vf loadf(const float* p) { return _mm256_loadu_ps(p); }
  static inline void storef(float* p, vf v) { _mm256_storeu_ps(p, v); }
  static inline vi zero() { return _mm256_setzero_si256(); }
  static inline vf zerof() { return _mm256_setzero_ps(); }
  static inline vi bcast(int32_t x) { return _mm256_set1_epi32(x); }
  static inline vf bcastf(float x) { return _mm256_set1_ps(x); }
  static inline vf cvt(vi x) { return _mm256_cvtepi32_ps(x); }
  static inline vi add(vi a, vi b) { return _mm256_add_epi32(a, b); }
  static inline vf addf(vf a, vf b) { return _mm256_add_ps(a, b); }
  static inline vf mulf(vf a, vf b) { return _mm256_mul_ps(a, b); }
  // No FMA in this TU's flags: a * b is exact wherever fmaf is used, so two steps give the same.
  static inline vf fmaf(vf a, vf b, vf c) { return _mm256_add_ps(_mm256_mul_ps(a, b), c); }
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

#if defined(JDFP_I8_AVXVNNI)
struct VI8Ymm : VI8YmmBase {
  static constexpr bool kShiftB = true;
  static inline vi dp(vi acc, vi b, vi a) { return _mm256_dpbusd_avx_epi32(acc, b, a); }
};
#else
struct VI8Ymm : VI8YmmBase {
  static constexpr bool kShiftB = false;
  static inline vi dp(vi acc, vi b, vi a) {
    const vi p = _mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(b, a));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
  }
};
#endif

}  // namespace

#if defined(JDFP_I8_AVXVNNI)
int tile_i8_avxvnni(const ProblemI8& P, const Tile& T) {
#else
int tile_i8_avx2(const ProblemI8& P, const Tile& T) {
#endif
  return tile_i8<VI8Ymm, UkI8<VI8Ymm, 6, 2, false>, UkI8<VI8Ymm, 3, 2, true>>(P, T);
}

}  // namespace jdfp
