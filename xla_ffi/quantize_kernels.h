// Per-ISA kernels of the float32 -> int16 conversion, the max |x| pass and the quantization
// statistics: their argument structs, function-pointer types and entry points (defined in
// quantize_scalar.cc, quantize_avx2.cc, quantize_avx512.cc), plus the scalar reference loops.
//
// Included by the handler TUs (baseline flags) and by the per-ISA TUs (-mavx2 / -mavx512*): like
// gemm_common.h, every function here is `static inline`, so each TU keeps a copy built with its own
// flags and no AVX copy can be merged into the scalar path (ODR).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "gemm_common.h"
#include "philox.h"

namespace jdfp {

// ---------------------------------------------------------------- conversion
// out[i] = quantize1(x[i], s1, s2, qm) (gemm_common.h) for i in [begin, end) with nearest rounding;
// the stochastic and biased kernels round y = scale2(x, -e) their own way (docs/arithmetic.md).
// [begin, end) are indices into the whole tensor: the stochastic kernels draw element i's bits
// from its global index, so any split into chunks gives the same result.
enum Rounding : int32_t { kRoundNearest = 0, kRoundStochastic = 1, kRoundBiased = 2 };

struct ConvertArgs {
  const float* x;
  int16_t* out;
  float s1, s2, qm;
  PhiloxKey key;  // stochastic rounding only
  // The tensor index of out[0]: 0 when `out` is the whole tensor; a segment's start when it is a
  // scratch row (the handlers' int8 outputs convert segment by segment into an int16 scratch and
  // narrow it while it is in cache), so element i lands at out[i - out_index0].
  int64_t out_index0 = 0;
  // The tensor index of x[0], likewise: a segment's start when `x` is a gathered row (the block
  // conversion of a conv's patch matrix, which never stores that matrix).
  int64_t x_index0 = 0;
};
using ConvertFn = void (*)(const ConvertArgs&, int64_t begin, int64_t end);

static inline void convert_ref(const ConvertArgs& a, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) a.out[i - a.out_index0] = quantize1(a.x[i - a.x_index0], a.s1, a.s2, a.qm);
}

// y = scale2(x, -e), NaN -> 0, clamped to +-qm.  Clamping before rounding gives what the contract's
// "round, then clip" gives (both roundings are monotone and qm is an integer) and keeps every
// rounded value exact in int16.
static inline float scaled_clamped(float x, float s1, float s2, float qm) {
  float y = (x * s1) * s2;
  if (!(y == y)) y = 0.0f;
  return y < -qm ? -qm : (y > qm ? qm : y);
}

// Stochastic: floor(y) + (u < frac), u = (word >> 8) * 2**-24 (exact in float32).
static inline float round_stochastic1(float y, uint32_t word) {
  const float low = std::floor(y);
  const float u = float(word >> 8) * 0x1p-24f;
  return low + (u < y - low ? 1.0f : 0.0f);
}

// Biased (Intel's): the magnitude rounds up iff the discarded fraction is >= 1/4.
static inline float round_biased1(float y) {
  const float m = std::fabs(y), low = std::floor(m);
  return std::copysign(low + (m - low >= 0.25f ? 1.0f : 0.0f), y);
}

static inline void convert_stochastic_ref(const ConvertArgs& a, int64_t begin, int64_t end) {
  uint32_t w[4];
  int64_t block = -1;
  for (int64_t i = begin; i < end; ++i) {
    if ((i >> 2) != block) philox_block(uint64_t(block = i >> 2), a.key, w);
    a.out[i - a.out_index0] = int16_t(round_stochastic1(scaled_clamped(a.x[i - a.x_index0], a.s1, a.s2, a.qm), w[i & 3]));
  }
}

static inline void convert_biased_ref(const ConvertArgs& a, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i)
    a.out[i - a.out_index0] = int16_t(round_biased1(scaled_clamped(a.x[i - a.x_index0], a.s1, a.s2, a.qm)));
}

// int8 results (formats of <= 8 bits: |q| <= 127, so the narrowing is exact): the handlers convert a
// segment into an int16 scratch that stays in L1/L2, then narrow it here (a loop the compiler
// vectorizes at any ISA level), instead of XLA narrowing the whole int16 tensor in a second pass.
constexpr int64_t kNarrowSegment = 4096;  // elements: 8 KiB of int16 scratch

static inline void narrow_to_i8(const int16_t* q, int8_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = int8_t(q[i]);
}

// ---------------------------------------------------------------- max |x|
// max |x| as the bit pattern of a non-negative float (integer order == float order there):
// NaN patterns exceed Inf's, subnormals count as zero (DAZ, as XLA:CPU's own max reads them).
using AmaxFn = uint32_t (*)(const float* x, int64_t begin, int64_t end);
constexpr uint32_t kAbsMask = 0x7FFFFFFFu, kMinNormalBits = 0x00800000u, kInfBits = 0x7F800000u;

static inline uint32_t amax_ref(const float* x, int64_t begin, int64_t end) {
  uint32_t m = 0;
  for (int64_t i = begin; i < end; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    u &= kAbsMask;
    m = std::max(m, u < kMinNormalBits ? 0u : u);
  }
  return m;
}

// ---------------------------------------------------------------- quantization statistics
// The Flax "dfp" collection's per-tensor counters (jdfp/_src/flax/core.py role_stats), in one pass
// over x and its int16 values q instead of several XLA reductions.  With ok = x finite, nonzero
// (subnormals read as zero: DAZ) and the exponent not the NONFINITE sentinel:
//   saturated = #(ok & scale2(|x|, -e) > qmax), underflow = #(ok & q == 0),
//   nonfinite = #(x is NaN/Inf), nonzero = #ok.
struct StatsArgs {
  const float* x;
  const int16_t* q;
  float p1, p2, qm;  // scale2(., -e) = (. * p1) * p2
  bool group_ok;     // e is not the sentinel
  int64_t q_index0 = 0;  // the tensor index of q[0] (as ConvertArgs::out_index0)
};
struct Counts {
  int64_t sat = 0, under = 0, nonfin = 0, ok = 0;
};
using StatsFn = void (*)(const StatsArgs&, int64_t begin, int64_t end, Counts&);

static inline void stats_ref(const StatsArgs& a, int64_t begin, int64_t end, Counts& c) {
  for (int64_t i = begin; i < end; ++i) {
    uint32_t u;
    std::memcpy(&u, a.x + i, 4);
    u &= kAbsMask;
    if (u >= kInfBits) {
      ++c.nonfin;
      continue;
    }
    if (u < kMinNormalBits || !a.group_ok) continue;
    ++c.ok;
    float ax;
    std::memcpy(&ax, &u, 4);
    c.sat += (ax * a.p1) * a.p2 > a.qm;
    c.under += a.q[i - a.q_index0] == 0;
  }
}

// ---------------------------------------------------------------- per-element scales
// The block conversion's row segments (block_quantize_ffi.cc) with every column's scale pair
// expanded once per work unit, so a row is one kernel call instead of one call per 24-wide block.
// x[0, n) are tensor elements [g0, g0 + n): element i draws the Philox bits of index g0 + i, as
// convert_stochastic_ref does.  s1[i] == 0 marks a NONFINITE block (its values convert to 0, its
// elements are not counted as ok); the statistics' scale of a block is its conversion scale.
static inline void convert_stochastic_cols_ref(const float* x, int16_t* out, int64_t n, int64_t g0, PhiloxKey key,
                                               const float* s1, const float* s2, float qm) {
  uint32_t w[4];
  int64_t block = -1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = g0 + i;
    if ((g >> 2) != block) philox_block(uint64_t(block = g >> 2), key, w);
    out[i] = int16_t(round_stochastic1(scaled_clamped(x[i], s1[i], s2[i], qm), w[g & 3]));
  }
}

// ---------------------------------------------------------------- per-ISA entry points
// Scalar: always built.  SIMD: built on x86 only (JDFP_HAVE_SIMD); called only after the ISA
// check of isa_table.cc.  AVX2 has no statistics kernel: GCC vectorizes stats_ref well enough for a
// statistics pass, so the table gives AVX2 / AVX-VNNI the scalar one.
void convert_scalar(const ConvertArgs&, int64_t begin, int64_t end);
void convert_stochastic_scalar(const ConvertArgs&, int64_t begin, int64_t end);
void convert_biased_scalar(const ConvertArgs&, int64_t begin, int64_t end);
uint32_t amax_scalar(const float* x, int64_t begin, int64_t end);
void stats_scalar(const StatsArgs&, int64_t begin, int64_t end, Counts&);

void convert_avx2(const ConvertArgs&, int64_t begin, int64_t end);
void convert_stochastic_avx2(const ConvertArgs&, int64_t begin, int64_t end);
void convert_biased_avx2(const ConvertArgs&, int64_t begin, int64_t end);
uint32_t amax_avx2(const float* x, int64_t begin, int64_t end);

void convert_avx512(const ConvertArgs&, int64_t begin, int64_t end);
void convert_stochastic_avx512(const ConvertArgs&, int64_t begin, int64_t end);
void convert_biased_avx512(const ConvertArgs&, int64_t begin, int64_t end);
uint32_t amax_avx512(const float* x, int64_t begin, int64_t end);
void stats_avx512(const StatsArgs&, int64_t begin, int64_t end, Counts&);
void convert_stochastic_cols_avx512(const float* x, int16_t* out, int64_t n, int64_t g0, PhiloxKey key,
                                    const float* s1, const float* s2, float qm);
void stats_cols_avx512(const float* x, const int16_t* q, int64_t n, const float* s1, const float* s2, float qm,
                       Counts& c);
// convert_stochastic_cols_avx512 with int8 results (|q| <= 127: formats of <= 8 bits) and, when c is
// given, stats_cols_avx512's counts, in one pass.
void convert_stochastic_cols_i8_avx512(const float* x, int8_t* out, int64_t n, int64_t g0, PhiloxKey key,
                                       const float* s1, const float* s2, float qm, Counts* c);

}  // namespace jdfp
