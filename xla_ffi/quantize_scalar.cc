// Portable scalar kernels of the conversion (three roundings), max |x| and statistics passes (no -m
// flags): the fallback on CPUs without AVX2, and the statistics kernel of the AVX2 / AVX-VNNI entries.
#include "quantize_kernels.h"

namespace jdfp {

void convert_scalar(const ConvertArgs& a, int64_t begin, int64_t end) { convert_ref(a, begin, end); }

void convert_stochastic_scalar(const ConvertArgs& a, int64_t begin, int64_t end) {
  convert_stochastic_ref(a, begin, end);
}

void convert_biased_scalar(const ConvertArgs& a, int64_t begin, int64_t end) { convert_biased_ref(a, begin, end); }

uint32_t amax_scalar(const float* x, int64_t begin, int64_t end) { return amax_ref(x, begin, end); }

void stats_scalar(const StatsArgs& a, int64_t begin, int64_t end, Counts& c) { stats_ref(a, begin, end, c); }

}  // namespace jdfp
