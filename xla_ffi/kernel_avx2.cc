// AVX2 micro-kernel: vpmaddwd + vpaddd (16 int16 MACs per pair of instructions), 6 x 16 tile.
// vpmaddwd's pair sum cannot overflow: |values| <= 32767, so 2 * 32767**2 < 2**31.
// Compiled with -mavx2; only called after a cpuid + XCR0 check.
#include <immintrin.h>

#include "ukernel_simd.h"
#include "v256.h"

namespace jdfp {
namespace {

struct VAvx2 : V256Base {
  static inline vi dp(vi acc, vi b, vi a) { return _mm256_add_epi32(acc, _mm256_madd_epi16(b, a)); }
};

}  // namespace

int tile_avx2(const Problem& P, const Tile& T) { return run_tile<UkSimd<VAvx2, 6, 2>>(P, T); }

}  // namespace jdfp
