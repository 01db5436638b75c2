// Per-ISA kernels of the block conversion (block_quantize_ffi.cc): per-block max |x| along a row
// segment and the float32 -> int16 conversion of a row segment with one scale per block, plus their
// scalar reference loops.  A row segment starts at a block boundary and holds ceil(n / bc) blocks of
// bc elements (the last one possibly partial).
//
// Included by the handler TU (baseline flags) and by the per-ISA TUs: every function here is
// `static inline`, so each TU keeps a copy built with its own flags (as quantize_kernels.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "quantize_kernels.h"

namespace jdfp {

// Lanes of the per-block max accumulator: every ISA keeps 16 per block (scalar: lane 0 only), the
// handler reduces them once per block after all of the block's rows are read.
constexpr int kAmaxLanes = 16;

// acc[j * kAmaxLanes + lane] = max(acc, |x| bits) over block j of the segment x[0, n).  Bit patterns
// of |x| (NaN > Inf > finite); subnormals count as zero (DAZ, as XLA:CPU reads them).
using BlockAmaxFn = void (*)(const float* x, int64_t n, int64_t bc, uint32_t* acc);

// block_amax over `rows` row segments x + r * ld, r < rows, of n elements each, in one call: the column
// maxima of the band first (one load and one max per 16 elements, no block masks), then the blocks'.
// Same result: a max over the rows commutes with the DAZ test (all subnormal iff the max is).
using BlockAmaxRowsFn = void (*)(const float* x, int64_t rows, int64_t ld, int64_t n, int64_t bc, uint32_t* acc);

// The conversion of one segment: block j scales by (s1[j], s2[j]) (scale2(., -e_j) as two exact
// power-of-two multiplies; s1 = 0 for a NONFINITE block, whose NaN products then convert to 0), then
// rounds half to even (`biased` false) or with Intel's biased rule (magnitude up iff the discarded
// fraction >= 1/4), clipped to +-qm; NaN -> 0.
struct BlockConvertArgs {
  const float* s1;
  const float* s2;
  float qm;
  bool biased;
};
using BlockConvertFn = void (*)(const float* x, int16_t* out, int64_t n, int64_t bc, const BlockConvertArgs&);

// Stochastic rounding and statistics of a whole row segment with per-column scales (quantize_kernels.h
// convert_stochastic_cols_ref, stats_cols_avx512): where an ISA has them, one call per row replaces
// one call per block, which cost more than the conversion itself for 24-wide blocks.
using StochasticColsFn = void (*)(const float* x, int16_t* out, int64_t n, int64_t g0, PhiloxKey key,
                                  const float* s1, const float* s2, float qm);
using StatsColsFn = void (*)(const float* x, const int16_t* q, int64_t n, const float* s1, const float* s2, float qm,
                             Counts& c);

// Nearest / biased rounding of a row segment in one pass with per-column scales (exactly
// block_convert's arithmetic), counting when `c` is given (stats_cols's counts): for int8 results
// instead of an int16 row, a statistics pass over it and a narrowing pass; for int16 results
// instead of block-by-block calls (24-wide blocks: a full and a half-masked step each) and the
// statistics pass.
using ConvertColsI8Fn = void (*)(const float* x, int8_t* out, int64_t n, const float* s1, const float* s2, float qm,
                                 bool biased, Counts* c);
using StochasticColsI8Fn = void (*)(const float* x, int8_t* out, int64_t n, int64_t g0, PhiloxKey key, const float* s1,
                                    const float* s2, float qm, Counts* c);
using ConvertColsI16Fn = void (*)(const float* x, int16_t* out, int64_t n, const float* s1, const float* s2, float qm,
                                  bool biased, Counts* c);

static inline void block_amax_ref(const float* x, int64_t n, int64_t bc, uint32_t* acc) {
  for (int64_t c0 = 0, j = 0; c0 < n; c0 += bc, ++j) {
    const int64_t c1 = c0 + bc < n ? c0 + bc : n;
    uint32_t m = amax_ref(x, c0, c1);
    acc[j * kAmaxLanes] = m > acc[j * kAmaxLanes] ? m : acc[j * kAmaxLanes];
  }
}

// Biased rounding of one float (numerics/quantize.py round_to_int "biased", then the clip).
static inline int16_t quantize1_biased(float x, float s1, float s2, float qm) {
  float y = (x * s1) * s2;
  if (!(y == y)) y = 0.0f;
  const float ay = std::fabs(y), low = std::floor(ay);
  float r = low + (ay - low >= 0.25f ? 1.0f : 0.0f);
  r = r > qm ? qm : r;
  return int16_t(y < 0.0f ? -r : r);
}

static inline void block_convert_ref(const float* x, int16_t* out, int64_t n, int64_t bc, const BlockConvertArgs& a) {
  for (int64_t c0 = 0, j = 0; c0 < n; c0 += bc, ++j) {
    const int64_t c1 = c0 + bc < n ? c0 + bc : n;
    for (int64_t i = c0; i < c1; ++i)
      out[i] = a.biased ? quantize1_biased(x[i], a.s1[j], a.s2[j], a.qm) : quantize1(x[i], a.s1[j], a.s2[j], a.qm);
  }
}

// Scalar: always built.  AVX-512: x86 only (JDFP_HAVE_SIMD), called after the ISA check; the AVX2 /
// AVX-VNNI entries use the scalar kernels (block_quantize_ffi.cc's table).
void block_amax_scalar(const float* x, int64_t n, int64_t bc, uint32_t* acc);
void block_convert_scalar(const float* x, int16_t* out, int64_t n, int64_t bc, const BlockConvertArgs&);
void block_amax_avx512(const float* x, int64_t n, int64_t bc, uint32_t* acc);
void block_amax_rows_avx512(const float* x, int64_t rows, int64_t ld, int64_t n, int64_t bc, uint32_t* acc);
void block_convert_avx512(const float* x, int16_t* out, int64_t n, int64_t bc, const BlockConvertArgs&);
void convert_cols_i8_avx512(const float* x, int8_t* out, int64_t n, const float* s1, const float* s2, float qm,
                            bool biased, Counts* c);
void convert_cols_i16_avx512(const float* x, int16_t* out, int64_t n, const float* s1, const float* s2, float qm,
                             bool biased, Counts* c);

}  // namespace jdfp
