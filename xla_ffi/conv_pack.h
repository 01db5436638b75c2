// Implicit-GEMM packing of a convolution operand (see ConvGeom in gemm_common.h): the portable
// gathers, used by every ISA without a vectorized one.  They write exactly the layout of pack_i16
// (gemm_driver.h): dst[((panel * pairs + p) * W + i) * 2 + {0, 1}] = X[r0 + panel*W + i, k0/k1(p)],
// with X the im2col matrix (kConvRowsPixels) or its transpose (kConvRowsTaps); padding, rows past
// `rows` and pad halves are zero.  Return max |value| read, for the range check.
#pragma once

#include <algorithm>
#include <cstdint>

#include "gemm_common.h"

namespace jdfp {
namespace {

// PackArgs (gemm_driver.h) is declared before this header is included.

// One W-row panel of the pixel gathers (this one and the AVX-512 kernel's odd-channel one): the
// pieces' k-pairs of rows [0, nvalid), each row's input offset for a tap from offs(tap) (-1 =
// padding), rows past nvalid zero.  Input offsets of every row for two taps are cached by tap parity:
// a pair spans at most two consecutive taps, so a 2-slot cache never evicts a live one.
template <int W, class TapOffsets>
static inline void conv_pixel_panel(const int16_t* x, const ConvGeom& g, const PackArgs& a, int nvalid,
                                    TapOffsets&& tap_offsets, int16_t* d, int32_t& vmin, int32_t& vmax) {
  int64_t ctap[2] = {-1, -1};
  int64_t coff[2][W];
  auto offs = [&](int64_t tap) -> const int64_t* {
    const int sl = int(tap & 1);
    if (ctap[sl] != tap) {
      ctap[sl] = tap;
      tap_offsets(tap, coff[sl]);
    }
    return coff[sl];
  };
  for (int pi = 0; pi < a.npcs; ++pi) {
    const Piece& pc = a.pcs[pi];
    int64_t t0 = pc.k_start / g.cg, c0 = pc.k_start - t0 * g.cg;
    for (int32_t q = 0; q < pc.pairs; ++q, d += 2 * W) {
      const bool h1 = 2 * q + 1 < pc.len;
      int64_t t1 = t0, c1 = c0 + 1;
      if (c1 == g.cg) t1 = t0 + 1, c1 = 0;
      const int64_t* o0 = offs(t0);
      const int64_t* o1 = h1 ? offs(t1) : o0;
      for (int i = 0; i < nvalid; ++i) {
        const int16_t v0 = o0[i] >= 0 ? x[o0[i] + c0] : int16_t(0);
        const int16_t v1 = (h1 && o1[i] >= 0) ? x[o1[i] + c1] : int16_t(0);
        d[2 * i] = v0;
        d[2 * i + 1] = v1;
        vmin = std::min<int32_t>(vmin, std::min(v0, v1));
        vmax = std::max<int32_t>(vmax, std::max(v0, v1));
      }
      for (int i = nvalid; i < W; ++i) d[2 * i] = d[2 * i + 1] = 0;
      t0 = t1, c0 = c1 + 1;  // the next pair starts at k0 + 2
      if (c0 == g.cg) t0 = t1 + 1, c0 = 0;
    }
  }
}

// A[r = pixel, k = (tap, c)]: each row is one output pixel; k runs over the taps' channel runs.
template <int W>
static inline int32_t conv_pack_pixels(const int16_t* x, const ConvGeom& g, const PackArgs& a, int16_t* dst) {
  int32_t vmin = 0, vmax = 0;
  const int64_t panels = (a.rows + W - 1) / W;
  for (int64_t pn = 0; pn < panels; ++pn) {
    const int64_t rb = a.r0 + pn * W;
    const int nvalid = int(std::min<int64_t>(W, a.r0 + a.rows - rb));
    int64_t rn[W], ro[W][3];
    for (int i = 0; i < nvalid; ++i) conv_split_pixel(g, rb + i, rn[i], ro[i]);
    auto tap_offsets = [&](int64_t tap, int64_t* off) {
      int64_t td[3];
      conv_split_tap(g, tap, td);
      for (int i = 0; i < nvalid; ++i) off[i] = conv_pixel_offset(g, rn[i], ro[i], td);
    };
    conv_pixel_panel<W>(x, g, a, nvalid, tap_offsets, dst + pn * int64_t(a.pairs) * W * 2, vmin, vmax);
  }
  return std::max(-vmin, vmax);
}

// A[r = (tap, c), k = pixel]: the transposed im2col matrix of the weight-gradient GEMM.
template <int W>
static inline int32_t conv_pack_taps(const int16_t* x, const ConvGeom& g, const PackArgs& a, int16_t* dst) {
  int32_t vmin = 0, vmax = 0;
  const int64_t panels = (a.rows + W - 1) / W;
  for (int64_t pn = 0; pn < panels; ++pn) {
    const int64_t rb = a.r0 + pn * W;
    const int nvalid = int(std::min<int64_t>(W, a.r0 + a.rows - rb));
    int64_t rt[W], rc[W], td[W][3];
    for (int i = 0; i < nvalid; ++i) {
      rt[i] = (rb + i) / g.cg;
      rc[i] = (rb + i) - rt[i] * g.cg;
      conv_split_tap(g, rt[i], td[i]);
    }
    int16_t* d = dst + pn * int64_t(a.pairs) * W * 2;
    for (int pi = 0; pi < a.npcs; ++pi) {
      const Piece& pc = a.pcs[pi];
      for (int32_t q = 0; q < pc.pairs; ++q, d += 2 * W) {
        const int64_t k0 = pc.k_start + 2 * q;
        const bool h1 = 2 * q + 1 < pc.len;
        int64_t n0, o0[3], n1 = 0, o1[3] = {0, 0, 0};
        conv_split_pixel(g, k0, n0, o0);
        if (h1) conv_split_pixel(g, k0 + 1, n1, o1);
        int64_t prev = -1, f0 = -1, f1 = -1;
        for (int i = 0; i < nvalid; ++i) {
          if (rt[i] != prev) {
            prev = rt[i];
            f0 = conv_pixel_offset(g, n0, o0, td[i]);
            f1 = h1 ? conv_pixel_offset(g, n1, o1, td[i]) : -1;
          }
          const int16_t v0 = f0 >= 0 ? x[f0 + rc[i]] : int16_t(0);
          const int16_t v1 = f1 >= 0 ? x[f1 + rc[i]] : int16_t(0);
          d[2 * i] = v0;
          d[2 * i + 1] = v1;
          vmin = std::min<int32_t>(vmin, std::min(v0, v1));
          vmax = std::max<int32_t>(vmax, std::max(v0, v1));
        }
        for (int i = nvalid; i < W; ++i) d[2 * i] = d[2 * i + 1] = 0;
      }
    }
  }
  return std::max(-vmin, vmax);
}

template <int W>
static inline int32_t conv_pack_generic(const int16_t* x, const ConvGeom& g, const PackArgs& a, int16_t* dst) {
  return g.mode == kConvRowsPixels ? conv_pack_pixels<W>(x, g, a, dst) : conv_pack_taps<W>(x, g, a, dst);
}

}  // namespace
}  // namespace jdfp
