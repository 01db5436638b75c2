// BF16 GEMM (docs/arithmetic.md, "BF16 GEMM"): out[m, n] = the vdpbf16ps chain over k of a[m, k] * b[k, n],
// bfloat16 operands (or float32 rounded to bfloat16 while packing), float32 accumulation.
//
// The contract is what one AVX512_BF16 vdpbf16ps lane does, measured on Zen 5 (docs/arithmetic.md):
// for k-pair p = (k0 = 2p, k1 = 2p + 1), acc = step(step(acc, a[k1], b[k1]), a[k0], b[k0]), acc starting
// at +0, an odd K padded with +0.  One step: bf16 denormal inputs (and a denormal acc) read as zero;
// the product is exact (no overflow or underflow of its own); acc + product is rounded once to 24
// significand bits, nearest-even, with an unbounded exponent; a result below 2**-126 in magnitude
// flushes to a zero of its sign, one at or above 2**128 becomes Inf.  NaN: the first NaN among
// (a, b, acc) in that order, quieted; Inf * 0 and Inf - Inf give the default NaN 0xFFC00000.
// Independent of MXCSR.  Shared by the scalar path (gemm_bf16_ffi.cc) and the AVX-512 kernel TU.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#include "gemm_common.h"

namespace jdfp {

struct Bf16Problem {
  const void* a = nullptr;  // uint16 bf16 bits or float32 (a_f32)
  const void* b = nullptr;
  float* out = nullptr;
  bool a_f32 = false, b_f32 = false;
  int64_t M = 0, N = 0, K = 0;
  // Element (m, k) of batch t: a[a_off[t] + m * a_sm + k * a_sk]; (k, n): b[b_off[t] + k * b_sk + n * b_sn].
  int64_t a_sm = 0, a_sk = 0, b_sk = 0, b_sn = 0;
  const int64_t* a_off = nullptr;
  const int64_t* b_off = nullptr;
  uint64_t job_id = 0;  // unique per call: a worker may reuse its packed B panels within one call only
  // Implicit-GEMM convolution (one group) when non-null: the conv's patch matrix P[pixel, (tap, c)]
  // is gathered from the bfloat16 input while packing, as A (conv->on_b false, kConvRowsPixels:
  // forward and backward-data, A = P) or as B (on_b, kConvRowsTaps: weight-gradient, B = P with the
  // pixels as k and the (tap, c) as columns); taps that read padding or lhs-dilation holes read +0.
  // The other operand is read through its strides as usual.
  const ConvGeom* conv = nullptr;
  // The FP16 GEMM (f16_tile_amx) only: its operands packed once per call, shared by the workers
  // (f16_make_panels).
  void* f16_panels = nullptr;
  // f16_tile_amx on plain bfloat16 operands (isa amx_bf16): the same tiles without the float16 split.
  bool amx_plain = false;
};

// Element [pixel, (tap, c)] of a conv's patch matrix (Bf16Problem::conv), bfloat16 bits.
static inline uint16_t conv_patch_bf16(const uint16_t* x, const ConvGeom& g, int64_t pixel, int64_t tc) {
  int64_t n, o[3], t[3];
  conv_split_pixel(g, pixel, n, o);
  const int64_t tap = tc / g.cg;
  conv_split_tap(g, tap, t);
  const int64_t off = conv_pixel_offset(g, n, o, t);
  return off < 0 ? uint16_t(0) : x[off + tc - tap * g.cg];
}

// The INT16 conv kernel's AVX-512 gathers (kernel_avx512vnni.cc) on 16-bit payloads: rows [r0, r0 + rows)
// x k [k0, k0 + len) of the patch matrix (pixels14: rows = pixels, k = (tap, c), panels of 14 rows: A)
// or of its transpose (taps32: rows = (tap, c), k = pixels, panels of 32 rows: B) as
// [panel][pair][row] dwords, zero past `rows` / `len`.
void conv_gather16_pixels14_avx512(const uint16_t* x, const ConvGeom& g, int64_t r0, int64_t rows, int64_t k0,
                                   int32_t len, uint32_t* dst);
void conv_gather16_taps32_avx512(const uint16_t* x, const ConvGeom& g, int64_t r0, int64_t rows, int64_t k0,
                                 int32_t len, uint32_t* dst);

struct Bf16Tile {
  int64_t batch, m0, m1, n0, n1;
};

// float32 -> bfloat16 bits, round to nearest even; NaN stays NaN (quieted), Inf stays Inf.
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x0040u);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Operand element as bf16 bits.
static inline uint16_t bf16_at(const void* p, bool is_f32, int64_t i) {
  return is_f32 ? f32_to_bf16(static_cast<const float*>(p)[i]) : static_cast<const uint16_t*>(p)[i];
}

namespace bf16_detail {
static inline float bits_f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline uint32_t f_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static inline bool is_nan16(uint16_t h) { return (h & 0x7F80u) == 0x7F80u && (h & 0x7Fu); }
// bf16 -> double with denormals read as zero (exact).
static inline double daz16(uint16_t h) {
  if ((h & 0x7F80u) == 0) return (h & 0x8000u) ? -0.0 : 0.0;
  return double(bits_f(uint32_t(h) << 16));
}
}  // namespace bf16_detail

// One half of a vdpbf16ps lane: acc + a * b as described above.  The product of two bf16 values is
// exact in double, and double-then-float rounding of a sum of two 24-bit operands equals a single
// rounding (53 >= 2 * 24 + 2), so the double sum rounded to float is the 24-bit rounding; only the
// window just below 2**-126, where float's own denormal grid would round differently, is handled
// by hand (those values round to 2**-126 at 24 bits iff >= 2**-126 - 2**-151, else flush).
static inline float bf16_step(float acc, uint16_t a, uint16_t b) {
  using namespace bf16_detail;
  const uint32_t ab = f_bits(acc);
  if (bf16_detail::is_nan16(a)) return bits_f((uint32_t(a) << 16) | 0x00400000u);
  if (bf16_detail::is_nan16(b)) return bits_f((uint32_t(b) << 16) | 0x00400000u);
  if ((ab & 0x7FFFFFFFu) > 0x7F800000u) return bits_f(ab | 0x00400000u);
  const double c = (ab & 0x7F800000u) == 0 ? ((ab >> 31) ? -0.0 : 0.0) : double(acc);
  const double p = daz16(a) * daz16(b);
  if (std::isnan(p)) return bits_f(0xFFC00000u);
  const double s = c + p;
  if (std::isnan(s)) return bits_f(0xFFC00000u);
  const double m = std::fabs(s);
  if (m < 0x1p-126) {
    const float v = m >= 0x1p-126 - 0x1p-151 ? 0x1p-126f : 0.0f;
    return std::signbit(s) ? -v : v;
  }
  return float(s);
}

// Tile kernels: write out[batch, m0:m1, n0:n1].
void bf16_tile_scalar(const Bf16Problem& P, const Bf16Tile& t);
void bf16_tile_avx512(const Bf16Problem& P, const Bf16Tile& t);
// The FP16 GEMM (float16 bits in P.a / P.b) on AMX-BF16 tiles, kernel_amx_f16.cc; only where
// amx_bf16_ready().
void f16_tile_amx(const Bf16Problem& P, const Bf16Tile& t);
// The packed-operand state f16_tile_amx reads (P.f16_panels) for a call with `nbatch` batch entries;
// its memory returns to a small process-wide pool when the last owner drops it.
std::shared_ptr<void> f16_make_panels(const Bf16Problem& P, int64_t nbatch);

}  // namespace jdfp
