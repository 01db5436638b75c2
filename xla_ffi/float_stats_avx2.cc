// float_stats_ref (float_stats.h) compiled for AVX2: the compiler vectorizes its integer loop.
#include "float_stats.h"

namespace jdfp {

void float_stats_avx2(const float* x, const uint16_t* q, int64_t n, uint16_t q_inf, FloatStats& s) {
  float_stats_ref(x, q, n, q_inf, s);
}

void float_cast_stats_avx2(const float* x, uint16_t* q, int64_t n, bool bf16, FloatStats& s) {
  float_cast_stats_ref(x, q, n, bf16, s);
}

}  // namespace jdfp
