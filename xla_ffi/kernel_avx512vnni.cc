// AVX-512 VNNI micro-kernel: vpdpwssd zmm (32 int16 MACs per instruction), A pairs broadcast from
// memory ({1to16} embedded broadcast), MR x 16*NV tile.  Compiled with -mavx512f -mavx512bw
// -mavx512vnni (see CMakeLists.txt); only called after a cpuid + XCR0 check.
#include <immintrin.h>

#include "ukernel_simd.h"

namespace jdfp {
namespace {

struct V512 {
  static constexpr int kLanes = 16;
  using vi = __m512i;
  using vf = __m512;
  template <class T>
  static inline vi load(const T* p) { return _mm512_loadu_si512(static_cast<const void*>(p)); }
  template <class T>
  static inline void store(T* p, vi v) { _mm512_storeu_si512(static_cast<void*>(p), v); }
  static inline vf loadf(const float* p) { return _mm512_loadu_ps(p); }
  static inline void storef(float* p, vf v) { _mm512_storeu_ps(p, v); }
  static inline vi zero() { return _mm512_setzero_si512(); }
  static inline vf zerof() { return _mm512_setzero_ps(); }
  static inline vi bcast(int32_t x) { return _mm512_set1_epi32(x); }
  static inline vi dp(vi acc, vi b, vi a) { return _mm512_dpwssd_epi32(acc, b, a); }
  static inline vf cvt(vi x) { return _mm512_cvtepi32_ps(x); }
  static inline vf addf(vf a, vf b) { return _mm512_add_ps(a, b); }
  static inline vi add(vi a, vi b) { return _mm512_add_epi32(a, b); }
  static inline vf pow2(vi e) {  // e in [-126, 127]
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(e, _mm512_set1_epi32(127)), 23));
  }
  static inline vf scale2(vf x, vi e) {
    const vi lo = _mm512_set1_epi32(-126), hi = _mm512_set1_epi32(127);
    const vi e1 = _mm512_min_epi32(_mm512_max_epi32(e, lo), hi);
    const vi e2 = _mm512_min_epi32(_mm512_max_epi32(_mm512_sub_epi32(e, e1), lo), hi);
    return _mm512_mul_ps(_mm512_mul_ps(x, pow2(e1)), pow2(e2));
  }
};

}  // namespace

int tile_avx512vnni(const Problem& P, const Tile& T) { return run_tile<UkSimd<V512, 14, 2>>(P, T); }

}  // namespace jdfp
