// AVX-VNNI (VEX-encoded, 256-bit) micro-kernel: vpdpwssd ymm, 6 x 16 tile.
// Compiled with -mavx2 -mavxvnni; only called after a cpuid + XCR0 check.
#include <immintrin.h>

#include "ukernel_simd.h"
#include "v256.h"

namespace jdfp {
namespace {

struct VVnni : V256Base {
  static inline vi dp(vi acc, vi b, vi a) { return _mm256_dpwssd_avx_epi32(acc, b, a); }
  // V256Base::f_next with the sign-extending add as one vpdpwssd.
  static inline vi f_next(vi f, vi w) {
    return _mm256_dpwssd_avx_epi32(f, _mm256_sub_epi32(_mm256_srli_epi32(w, 16), f), _mm256_set1_epi32(1));
  }
};

}  // namespace

int tile_avxvnni(const Problem& P, const Tile& T) { return run_tile<UkSimd<VVnni, 6, 2>>(P, T); }

}  // namespace jdfp
