// The conversion counters (stats_ref's saturated, underflow, non-finite, ok) on 16 lanes, for the
// AVX-512 conversion TUs only (quantize_avx512.cc, block_quantize_avx512.cc: AVX-512F/BW flags).
// Each count is a vector of 16 int32 lanes bumped with a masked add, reduced once per call: the
// per-step popcounts they replace moved every mask to a general register (kmov, popcnt, add, four
// times per 16 elements).  Measured, this is worth ~5 % on the int16 stochastic conversion and
// nothing visible elsewhere (those are bound by Philox or by memory: docs/benchmarks.md).
#pragma once

#include <immintrin.h>

#include "quantize_kernels.h"

namespace jdfp {

struct LaneCounts16 {
  // A lane counts at most one element per 16 of a call, and a call counts at most INT32_MAX
  // elements (the handlers check), so neither a lane nor the reduced sum overflows int32.
  __m512i sat = _mm512_setzero_si512(), under = _mm512_setzero_si512(), nonfin = _mm512_setzero_si512(),
          ok = _mm512_setzero_si512();

  // Lanes `in` of float32 bits xbits, in finite groups `gok` (a subset of in); yabs = |x| * p1 * p2
  // (the lane's scaled magnitude before clamping), q its rounded value.
  static inline __mmask16 good_lanes(__mmask16 in, __mmask16 gok, __m512i xbits, __mmask16* bad) {
    const __m512i u = _mm512_and_si512(xbits, _mm512_set1_epi32(int(kAbsMask)));
    const __m512i inf = _mm512_set1_epi32(int(kInfBits));
    *bad = _mm512_mask_cmpge_epu32_mask(in, u, inf);
    return _mm512_mask_cmplt_epu32_mask(gok, u, inf) & _mm512_cmpge_epu32_mask(u, _mm512_set1_epi32(int(kMinNormalBits)));
  }
  inline void add(__mmask16 in, __mmask16 gok, __m512i xbits, __m512 yabs, __m512 qm, __m512i q) {
    const __m512i one = _mm512_set1_epi32(1);
    __mmask16 bad;
    const __mmask16 good = good_lanes(in, gok, xbits, &bad);
    nonfin = _mm512_mask_add_epi32(nonfin, bad, nonfin, one);
    ok = _mm512_mask_add_epi32(ok, good, ok, one);
    sat = _mm512_mask_add_epi32(sat, _mm512_mask_cmp_ps_mask(good, yabs, qm, _CMP_GT_OQ), sat, one);
    under = _mm512_mask_add_epi32(under, _mm512_mask_cmpeq_epi32_mask(good, q, _mm512_setzero_si512()), under, one);
  }
  void flush(Counts& c) const {
    c.sat += uint32_t(_mm512_reduce_add_epi32(sat));
    c.under += uint32_t(_mm512_reduce_add_epi32(under));
    c.nonfin += uint32_t(_mm512_reduce_add_epi32(nonfin));
    c.ok += uint32_t(_mm512_reduce_add_epi32(ok));
  }
};

}  // namespace jdfp
