// What the AMX paths (kernel_amx.cc: INT16 GEMM and DFP conv forward; kernel_amx_i8.cc: INT8 GEMM;
// kernel_amx_f16.cc: FP16 / BF16 GEMM and convs) share: the tile configuration, aligned per-thread
// buffers, the 4-byte-word transpose between the A and B tile layouts, the epilogue's exponent helpers,
// and a conv's patch-row gather.  Included only by TUs built with -mamx-* and AVX-512.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "gemm_common.h"

namespace jdfp {
namespace amx {

constexpr int kPlane = 1024;  // one 16-row x 64-byte tile

// ldtilecfg's 64-byte operand: palette 1, per tile its rows and bytes per row.
struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

static inline TileConfig uniform_config(int ntiles, int rows, int colsb) {
  TileConfig c;
  for (int t = 0; t < ntiles; ++t) c.colsb[t] = uint16_t(colsb), c.rows[t] = uint8_t(rows);
  return c;
}

// Running min / max of packed int8 or int16 values (the range check): max |value| at the end.
template <class T>
struct MinMax {
  static_assert(sizeof(T) == 1 || sizeof(T) == 2, "int8 or int16");
  __m512i mn = _mm512_setzero_si512(), mx = _mm512_setzero_si512();
  void add(__m512i v) {
    if constexpr (sizeof(T) == 1) {
      mn = _mm512_min_epi8(mn, v), mx = _mm512_max_epi8(mx, v);
    } else {
      mn = _mm512_min_epi16(mn, v), mx = _mm512_max_epi16(mx, v);
    }
  }
  int32_t absmax() const {
    alignas(64) T lo[64 / sizeof(T)], hi[64 / sizeof(T)];
    _mm512_store_si512(lo, mn), _mm512_store_si512(hi, mx);
    int32_t m = 0;
    for (size_t i = 0; i < 64 / sizeof(T); ++i) m = std::max({m, -int32_t(lo[i]), int32_t(hi[i])});
    return m;
  }
};

// Transpose of 4-byte words between the A tile layout (row r, k quad q at r * lda + q * 4) and the
// B layout (quad q, column r at q * 64 + r * 4), for 16 rows and nq quads.
static inline void a_to_b_layout(const uint8_t* src, int64_t lda, int nq, uint8_t* dst) {
  for (int q = 0; q < nq; ++q)
    for (int r = 0; r < 16; ++r) std::memcpy(dst + q * 64 + r * 4, src + r * lda + q * 4, 4);
}
static inline void b_to_a_layout(const uint8_t* src, int nq, int64_t lda, uint8_t* dst) {
  for (int r = 0; r < 16; ++r)
    for (int q = 0; q < nq; ++q) std::memcpy(dst + r * lda + q * 4, src + q * 64 + r * 4, 4);
}

// A growable 64-byte aligned buffer: a tile row that straddles two cache lines loads at half speed.
template <class T>
struct Aligned {
  T* p = nullptr;
  size_t n = 0;
  T* get(size_t want) {
    if (want > n) {
      std::free(p);
      p = static_cast<T*>(std::aligned_alloc(64, (want * sizeof(T) + 63) / 64 * 64));
      n = want;
    }
    return p;
  }
  ~Aligned() { std::free(p); }
};

struct PanelCache {
  uint64_t job = 0;
  int64_t batch = -1, n0 = -1, n1 = -1;
  Aligned<uint8_t> buf;
};

// 2**clamp(e, -126, 127) per lane, built from the bits.
static inline __m512 pow2v(__m512i e) {
  e = _mm512_min_epi32(_mm512_max_epi32(e, _mm512_set1_epi32(-126)), _mm512_set1_epi32(127));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(e, _mm512_set1_epi32(127)), 23));
}

// Column side of an epilogue for one 16-column block: clamped exponents and the NONFINITE mask.
struct ColExponents {
  __m512i e;
  __mmask16 bad;
};

static inline ColExponents col_exponents(const int32_t* eb, int64_t nstride, int64_t n0, int nv) {
  alignas(64) int32_t e[16] = {};
  __mmask16 bad = 0;
  for (int j = 0; j < nv; ++j) {
    const int32_t raw = eb[(n0 + j) * nstride];
    bad |= __mmask16(raw == kNonfiniteExponent) << j;
    e[j] = eclamp(raw);
  }
  return {_mm512_load_si512(e), bad};
}

// One row of a KB == 1 epilogue: scale2(f, ea_row + eb_j) per column, NaN where an exponent is
// NONFINITE, stored to the row's first nv columns.
static inline void store_row(__m512 f, int32_t ea_raw, const ColExponents& ce, __mmask16 store, float* dst) {
  const __m512i e = _mm512_add_epi32(ce.e, _mm512_set1_epi32(eclamp(ea_raw)));
  const __m512i e1 = _mm512_min_epi32(_mm512_max_epi32(e, _mm512_set1_epi32(-126)), _mm512_set1_epi32(127));
  __m512 v = _mm512_mul_ps(_mm512_mul_ps(f, pow2v(e1)), pow2v(_mm512_sub_epi32(e, e1)));
  v = _mm512_mask_mov_ps(v, ea_raw == kNonfiniteExponent ? __mmask16(0xFFFF) : ce.bad,
                         _mm512_set1_ps(__builtin_nanf("")));
  _mm512_mask_storeu_ps(dst, store, v);
}

static inline __mmask16 first_lanes(int64_t n) { return __mmask16(n >= 16 ? 0xFFFF : (1u << n) - 1); }

// Convolutions: the patch matrix P[pixel, (tap, c)] gathered from a 16-bit input x (float16, bfloat16
// or int16 bits), +0 where a tap reads padding or a hole of the lhs dilation.

// n 16-bit values from src (zeros when src is null) to dst: one masked 64-byte move for runs of <= 32.
static inline void copy_run(uint16_t* dst, const uint16_t* src, int64_t n) {
  if (n <= 32) {
    const __mmask32 m = n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1;
    _mm512_mask_storeu_epi16(dst, m, src ? _mm512_maskz_loadu_epi16(m, src) : _mm512_setzero_si512());
  } else if (src) {
    std::memcpy(dst, src, size_t(n) * 2);
  } else {
    std::memset(dst, 0, size_t(n) * 2);
  }
}

// The same for 32-bit words (a float16 input already split into bfloat16 pairs).
static inline void copy_run(uint32_t* dst, const uint32_t* src, int64_t n) {
  if (n <= 16) {
    const __mmask16 m = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
    _mm512_mask_storeu_epi32(dst, m, src ? _mm512_maskz_loadu_epi32(m, src) : _mm512_setzero_si512());
  } else if (src) {
    std::memcpy(dst, src, size_t(n) * 4);
  } else {
    std::memset(dst, 0, size_t(n) * 4);
  }
}

// Where column c0 of the patch matrix starts: its tap's coordinates and channel.
struct PatchCol {
  int64_t t[3], c;
};
static inline PatchCol patch_col(const ConvGeom& g, int64_t c0) {
  PatchCol pc;
  const int64_t tap = c0 / g.cg;
  pc.c = c0 - tap * g.cg;
  conv_split_tap(g, tap, pc.t);
  return pc;
}

// Columns [c0, c0 + n) (from `at`, patch_col(c0)) of the patch row of pixel `px` into dst: one run of a
// tap's channels at a time, the tap's coordinates stepped rather than divided out.
// (Not inlined: GCC would then see the small fixed-size buffers of some callers and warn about the
// memcpy branch that only runs longer than 32.)
template <class T>
static inline __attribute__((noinline)) void patch_row(const T* x, const ConvGeom& g, const PixCursor& px,
                                                     PatchCol at, int64_t n, T* dst) {
  for (int64_t j = 0; j < n;) {
    const int64_t run = std::min(n - j, g.cg - at.c);
    const int64_t off = conv_pixel_offset(g, px.n, px.o, at.t);
    copy_run(dst + j, off < 0 ? nullptr : x + off + at.c, run);
    j += run, at.c = 0;
    if (++at.t[2] == g.ks[2]) {
      at.t[2] = 0;
      if (++at.t[1] == g.ks[1]) at.t[1] = 0, ++at.t[0];
    }
  }
}

}  // namespace amx
}  // namespace jdfp
