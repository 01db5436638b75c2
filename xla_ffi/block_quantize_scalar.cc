// Portable scalar kernels of the block conversion (no -m flags): the fallback on CPUs without
// AVX-512, and the AVX2 / AVX-VNNI table entries.
#include "block_quantize_kernels.h"

namespace jdfp {

void block_amax_scalar(const float* x, int64_t n, int64_t bc, uint32_t* acc) { block_amax_ref(x, n, bc, acc); }

void block_convert_scalar(const float* x, int16_t* out, int64_t n, int64_t bc, const BlockConvertArgs& a) {
  block_convert_ref(x, out, n, bc, a);
}

}  // namespace jdfp
