// The Flax "dfp" collection's counters of an FP16 / BF16 cast (jdfp/_src/flax/state.py role_stats),
// in one pass over x (float32) and its cast q (the float16 / bfloat16 bit patterns) instead of the
// half dozen XLA reductions that cost more than the GEMM they describe.  With ok = x finite and
// nonzero (subnormals read as zero: XLA:CPU's DAZ):
//   amax = max |x| over ok, amin = min |x| over ok (as float32 bit patterns; 0 / Inf's bits when
//   there is none), saturated = #(x finite & q = +-Inf), underflow = #(ok & q = +-0),
//   nonfinite = #(x NaN/Inf).
// Integer-only and branch-free, so every ISA's copy (this loop compiled with its own -m flags and
// auto-vectorized) gives the same numbers; `static inline` keeps the copies apart (ODR).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace jdfp {

struct FloatStats {
  uint32_t amax = 0, amin = 0x7F800000u;
  int64_t sat = 0, under = 0, nonfin = 0;
};
// q_inf: the cast's Inf magnitude (0x7C00 float16, 0x7F80 bfloat16).
using FloatStatsFn = void (*)(const float* x, const uint16_t* q, int64_t n, uint16_t q_inf, FloatStats& s);

// One slice (< 2**32 elements: the uint32 counters cannot wrap); separate from the struct so the
// compiler sees plain locals and restrict pointers, and vectorizes.
static inline void float_stats_slice(const uint32_t* __restrict xb, const uint16_t* __restrict q, int64_t n,
                                     uint32_t q_inf, uint32_t* __restrict acc) {
  uint32_t amax = acc[0], amin = acc[1], sat = 0, under = 0, nonfin = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = xb[i] & 0x7FFFFFFFu;
    const uint32_t finite = u < 0x7F800000u, ok = finite & (u >= 0x00800000u);
    const uint32_t qa = uint32_t(q[i]) & 0x7FFFu;
    const uint32_t m = 0u - ok;  // all ones where ok: masks, not selects, keep the loop vectorizable
    amax = std::max(amax, u & m);
    amin = std::min(amin, (u & m) | (0x7F800000u & ~m));
    sat += finite & uint32_t(qa == q_inf);
    under += ok & uint32_t(qa == 0u);
    nonfin += 1u - finite;
  }
  acc[0] = amax;
  acc[1] = amin;
  acc[2] = sat;
  acc[3] = under;
  acc[4] = nonfin;
}

static inline void float_stats_ref(const float* x, const uint16_t* q, int64_t n, uint16_t q_inf, FloatStats& s) {
  constexpr int64_t kSlice = int64_t(1) << 30;
  const uint32_t* xb = reinterpret_cast<const uint32_t*>(x);  // float32 bit patterns (may_alias below)
  for (int64_t b = 0; b < n; b += kSlice) {
    uint32_t acc[5] = {s.amax, s.amin, 0, 0, 0};
    float_stats_slice(xb + b, q + b, std::min(kSlice, n - b), q_inf, acc);
    s.amax = acc[0];
    s.amin = acc[1];
    s.sat += acc[2];
    s.under += acc[3];
    s.nonfin += acc[4];
  }
}

// Per-ISA copies (float_stats_ffi.cc: scalar; float_stats_avx2.cc, float_stats_avx512.cc).
void float_stats_scalar(const float* x, const uint16_t* q, int64_t n, uint16_t q_inf, FloatStats& s);
void float_stats_avx2(const float* x, const uint16_t* q, int64_t n, uint16_t q_inf, FloatStats& s);
void float_stats_avx512(const float* x, const uint16_t* q, int64_t n, uint16_t q_inf, FloatStats& s);

// The cast itself, as XLA:CPU's convert writes it (checked bit for bit in tests/ffi/test_float_stats.py),
// on the magnitude bits a = |x| (the caller ORs the sign back in). float16: round to nearest even,
// overflow to Inf (from 65520 up), float32 subnormals to 0, float16 subnormals exact, NaN quiet with
// the payload's top 10 bits (vcvtps2ph's rule). bfloat16: round to nearest even (subnormals kept),
// NaN the canonical quiet NaN 0x7FC0.
static inline uint32_t f16_magnitude(uint32_t a) {
  const uint32_t normal = (a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;  // rebias 127 -> 15
  // Below 2**-14: units of 2**-24, i.e. the 24-bit significand shifted right by 126 - e (>= 14; 31 for
  // anything under 2**-25, which rounds to 0, float32 subnormals included).
  const uint32_t e = a >> 23;
  const uint32_t sh = std::min(126u - std::min(e, 126u), 31u);
  const uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
  const uint32_t sub = (m + ((1u << sh) >> 1) - 1u + ((m >> sh) & 1u)) >> sh;
  // Masks, not selects: the loop stays branch-free and vectorizes.
  const uint32_t is_normal = 0u - uint32_t(a >= 0x38800000u), is_big = 0u - uint32_t(a >= 0x477FF000u);
  const uint32_t is_nan = 0u - uint32_t(a > 0x7F800000u);
  const uint32_t big = 0x7C00u | (is_nan & (0x0200u | ((a >> 13) & 0x3FFu)));
  const uint32_t fin = (normal & is_normal) | (sub & ~is_normal);
  return (big & is_big) | (fin & ~is_big);
}

static inline uint32_t bf16_magnitude(uint32_t a) {
  return a > 0x7F800000u ? 0x7FC0u : (a + 0x7FFFu + ((a >> 16) & 1u)) >> 16;
}

// float_stats_slice that also writes the cast q (instead of reading it): one pass for the GEMM
// operand and its counters.
template <bool kBf16>
static inline void float_cast_stats_slice(const uint32_t* __restrict xb, uint16_t* __restrict q, int64_t n,
                                          uint32_t* __restrict acc) {
  constexpr uint32_t q_inf = kBf16 ? 0x7F80u : 0x7C00u;
  uint32_t amax = acc[0], amin = acc[1], sat = 0, under = 0, nonfin = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = xb[i] & 0x7FFFFFFFu;
    const uint32_t finite = u < 0x7F800000u, ok = finite & (u >= 0x00800000u);
    const uint32_t qa = kBf16 ? bf16_magnitude(u) : f16_magnitude(u);
    q[i] = uint16_t(qa | ((xb[i] >> 16) & 0x8000u));
    const uint32_t m = 0u - ok;
    amax = std::max(amax, u & m);
    amin = std::min(amin, (u & m) | (0x7F800000u & ~m));
    sat += finite & uint32_t(qa == q_inf);
    under += ok & uint32_t(qa == 0u);
    nonfin += 1u - finite;
  }
  acc[0] = amax;
  acc[1] = amin;
  acc[2] = sat;
  acc[3] = under;
  acc[4] = nonfin;
}

static inline void float_cast_stats_ref(const float* x, uint16_t* q, int64_t n, bool bf16, FloatStats& s) {
  constexpr int64_t kSlice = int64_t(1) << 30;
  const uint32_t* xb = reinterpret_cast<const uint32_t*>(x);
  for (int64_t b = 0; b < n; b += kSlice) {
    uint32_t acc[5] = {s.amax, s.amin, 0, 0, 0};
    const int64_t len = std::min(kSlice, n - b);
    if (bf16) {
      float_cast_stats_slice<true>(xb + b, q + b, len, acc);
    } else {
      float_cast_stats_slice<false>(xb + b, q + b, len, acc);
    }
    s.amax = acc[0];
    s.amin = acc[1];
    s.sat += acc[2];
    s.under += acc[3];
    s.nonfin += acc[4];
  }
}
using FloatCastStatsFn = void (*)(const float* x, uint16_t* q, int64_t n, bool bf16, FloatStats& s);
void float_cast_stats_scalar(const float* x, uint16_t* q, int64_t n, bool bf16, FloatStats& s);
void float_cast_stats_avx2(const float* x, uint16_t* q, int64_t n, bool bf16, FloatStats& s);
void float_cast_stats_avx512(const float* x, uint16_t* q, int64_t n, bool bf16, FloatStats& s);

}  // namespace jdfp
