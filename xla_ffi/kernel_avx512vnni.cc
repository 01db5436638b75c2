// AVX-512 VNNI micro-kernel: vpdpwssd zmm (32 int16 MACs per instruction), A pairs broadcast from
// memory ({1to16} embedded broadcast), 12 x 32 tile (12 rows: with 14, GCC spilled one of the 28 accumulators).  Compiled with -mavx512f -mavx512bw
// -mavx512vnni (see CMakeLists.txt); only called after a cpuid + XCR0 check.
// GCC 12's AVX-512 headers build casts and broadcasts from _mm512_undefined_*(), which its
// -Wuninitialized flags at every inlined use (hundreds of false positives, none in this code).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "ukernel_simd.h"

namespace jdfp {
namespace {

// ---------------------------------------------------------------- vectorized packing
// Quantize 16 floats: clip(round_half_even(scale2(x, -e)), +-qmax) with NaN -> 0 (gemm_common.h's
// quantize1; vcvtps2dq rounds half-to-even under the MXCSR the workers set).
static inline __m512i quant16(__m512 x, __m512 s1, __m512 s2, __m512 qm) {
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(x, s1), s2);
  y = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y, y, _CMP_ORD_Q), y);
  y = _mm512_min_ps(_mm512_max_ps(y, _mm512_sub_ps(_mm512_setzero_ps(), qm)), qm);
  return _mm512_cvtps_epi32(y);
}

// 32 int16 of one operand row segment (lanes past `m` are zero).  For float input, lane l is
// quantized with scales s1[l], s2[l].
struct Load32 {
  static inline __m512i get(const int16_t* p, __mmask32 m, const __m512*, const __m512*, __m512) {
    return _mm512_maskz_loadu_epi16(m, p);
  }
  static inline __m512i get(const float* p, __mmask32 m, const __m512* s1, const __m512* s2, __m512 qm) {
    const __m512i lo = quant16(_mm512_maskz_loadu_ps(__mmask16(m), p), s1[0], s2[0], qm);
    const __m512i hi = quant16(_mm512_maskz_loadu_ps(__mmask16(m >> 16), p + 16), s1[1], s2[1], qm);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(lo)), _mm512_cvtepi32_epi16(hi), 1);
  }
};

// In-register transpose of a 16 x 16 int32 matrix.
static inline void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// |int16| max of the lanes seen (vmin / vmax of int16 lanes), for the range check: -32768 must read
// as 32768 (> any qmax), so widen before negating.
static inline int32_t reduce_absmax16(__m512i vmin, __m512i vmax) {
  const int32_t mn = _mm512_reduce_min_epi32(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(_mm512_min_epi16(
      vmin, _mm512_shuffle_i64x2(vmin, vmin, 0x4E)))));
  const int32_t mx = _mm512_reduce_max_epi32(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(_mm512_max_epi16(
      vmax, _mm512_shuffle_i64x2(vmax, vmax, 0x4E)))));
  return std::max(-mn, mx);
}

// Running int16 min / max of the packed values (int16 input only).
struct MinMax16 {
  __m512i vmin = _mm512_setzero_si512(), vmax = _mm512_setzero_si512();
  void add(__m512i v) {
    vmin = _mm512_min_epi16(vmin, v);
    vmax = _mm512_max_epi16(vmax, v);
  }
};

// The sums of squares of a piece's rows (PackArgs::sq): vpmaddwd of a packed vector with itself
// gives, per int32 lane, the two squares of one row's k pair (piece_square_bound says when a piece
// takes its bound instead).
static inline __m512i add_squares(__m512i acc, __m512i v) { return _mm512_add_epi32(acc, _mm512_madd_epi16(v, v)); }

// pack_i16 / pack_f32 of gemm_driver.h for rows contiguous (sr == 1: b [K, N], a^T [K, M]): two k
// rows interleaved with vpermt2w.  Pair-outer, panel-inner: each k row is read sequentially
// (panel-outer strides through kc rows N apart per cache line and thrashes the TLB and the
// prefetchers).
template <int W, class T>
static void pack512_rows(const T* src, const PackArgs& a, int16_t* dst, MinMax16& mm) {
  constexpr bool kF32 = std::is_same<T, float>::value;
  const __m512 qm = _mm512_set1_ps(float(a.qmax));
  const int64_t panels = (a.rows + W - 1) / W;
  const __m512i ilo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                       39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i ihi = _mm512_add_epi16(ilo, _mm512_set1_epi16(16));
  // Float input: per-panel scale vectors [pn][s1 lo, s1 hi, s2 lo, s2 hi], rebuilt when the
  // piece's block changes (once per kc block when KB == 1).
  thread_local AlignedBuf<float> scbuf;
  float* sc = kF32 ? scbuf.get(size_t(panels) * 64) : nullptr;
  int32_t sc_blk = -1;
  // Sums of squares (a.sq): per panel, 32 int32 lanes (rows), reset at every piece.
  thread_local AlignedBuf<int32_t> sqbuf;
  int32_t* sqacc = a.sq ? sqbuf.get(size_t(panels) * 32) : nullptr;
  int64_t poff = 0;  // pair offset of the piece inside the kc block
  // The k rows are far apart (N elements): the hardware prefetchers see short runs and the loads
  // wait on L3.  Prefetch the rows kPfRows ahead (inside this kc block's K range: no stray reads).
  constexpr int64_t kPfRows = 8;
  const int64_t k_end = a.npcs ? a.pcs[a.npcs - 1].k_start + a.pcs[a.npcs - 1].len : 0;
  for (int pi = 0; pi < a.npcs; ++pi) {
    const Piece& pc = a.pcs[pi];
    if constexpr (kF32) {
      if (pc.blk != sc_blk) {
        sc_blk = pc.blk;
        for (int64_t pn = 0; pn < panels; ++pn)
          for (int i = 0; i < 32; ++i) {
            const int64_t r = pn * W + i;
            float f1 = 0.0f, f2 = 0.0f;
            if (i < W && r < a.rows) scales_of(a.e[(a.r0 + r) * a.er + int64_t(pc.blk) * a.ej], f1, f2);
            sc[pn * 64 + i] = f1;
            sc[pn * 64 + 32 + i] = f2;
          }
      }
    }
    const int64_t sq_bound = a.sq ? piece_square_bound(pc.pairs, a.qmax) : 0;
    const bool squares = a.sq && sq_bound < 0;
    if (squares) std::memset(sqacc, 0, size_t(panels) * 32 * sizeof(int32_t));
    for (int32_t q = 0; q < pc.pairs; ++q) {
      const int64_t k0 = pc.k_start + 2 * q;
      const bool has1 = 2 * q + 1 < pc.len;
      const T* row0 = src + k0 * a.sk;
      const T* row1 = src + (k0 + 1) * a.sk;
      const bool pf0 = k0 + kPfRows < k_end, pf1 = k0 + 1 + kPfRows < k_end;
      for (int64_t pn = 0; pn < panels; ++pn) {
        const int64_t rb = a.r0 + pn * W;
        for (int64_t l = 0; l < int64_t(W * sizeof(T)); l += 64) {  // the panel's cache lines
          if (pf0) _mm_prefetch(reinterpret_cast<const char*>(row0 + kPfRows * a.sk + rb) + l, _MM_HINT_T0);
          if (pf1) _mm_prefetch(reinterpret_cast<const char*>(row1 + kPfRows * a.sk + rb) + l, _MM_HINT_T0);
        }
        const int nvalid = int(std::min<int64_t>(W, a.r0 + a.rows - rb));
        const __mmask32 rmask = __mmask32((uint64_t(1) << nvalid) - 1);
        __m512 s1[2], s2[2];
        if constexpr (kF32) {
          const float* f = sc + pn * 64;
          s1[0] = _mm512_load_ps(f); s1[1] = _mm512_load_ps(f + 16);
          s2[0] = _mm512_load_ps(f + 32); s2[1] = _mm512_load_ps(f + 48);
        }
        const __m512i v0 = Load32::get(row0 + rb, rmask, s1, s2, qm);
        const __m512i v1 = has1 ? Load32::get(row1 + rb, rmask, s1, s2, qm) : _mm512_setzero_si512();
        if constexpr (!kF32) {
          mm.add(_mm512_min_epi16(v0, v1));
          mm.add(_mm512_max_epi16(v0, v1));
        }
        int16_t* d = dst + (pn * int64_t(a.pairs) + poff + q) * W * 2;
        const __m512i lo = _mm512_permutex2var_epi16(v0, ilo, v1);
        if (squares) {  // lanes past the panel's rows are zero (rmask)
          int32_t* sa = sqacc + pn * 32;
          _mm512_store_si512(sa, add_squares(_mm512_load_si512(sa), lo));
          if constexpr (W > 16)
            _mm512_store_si512(sa + 16, add_squares(_mm512_load_si512(sa + 16), _mm512_permutex2var_epi16(v0, ihi, v1)));
        }
        if constexpr (W == 32) {
          _mm512_storeu_si512(d, lo);
          _mm512_storeu_si512(d + 32, _mm512_permutex2var_epi16(v0, ihi, v1));
        } else if constexpr (W <= 16) {
          _mm512_mask_storeu_epi16(d, __mmask32((uint64_t(1) << (2 * W)) - 1), lo);
        } else {
          _mm512_storeu_si512(d, lo);
          _mm512_mask_storeu_epi16(d + 32, __mmask32((uint64_t(1) << (2 * W - 32)) - 1),
                                   _mm512_permutex2var_epi16(v0, ihi, v1));
        }
      }
    }
    if (a.sq)
      for (int64_t pn = 0; pn < panels; ++pn) {
        int64_t& out = a.sq[pn * a.npcs + pi];
        if (!squares) {
          out = sq_bound;
          continue;
        }
        __m512i m = _mm512_load_si512(sqacc + pn * 32);
        if constexpr (W > 16) m = _mm512_max_epi32(m, _mm512_load_si512(sqacc + pn * 32 + 16));
        out = _mm512_reduce_max_epi32(m);
      }
    poff += pc.pairs;
  }
}

// The same for k contiguous (sk == 1: a [M, K], b^T [N, K]): k-pairs are int32s, 16 x 16 transposes.
template <int W, class T>
static void pack512_kcont(const T* src, const PackArgs& a, int16_t* dst, MinMax16& mm) {
  constexpr bool kF32 = std::is_same<T, float>::value;
  const __m512 qm = _mm512_set1_ps(float(a.qmax));
  const int64_t panels = (a.rows + W - 1) / W;
  // Rows are K elements apart and read 32 k at a time: prefetch each row kPfK elements ahead when
  // that start is inside this kc block's K range (a prefetch is only a hint and never faults).
  constexpr int64_t kPfK = 2 * 32;
  const int64_t k_end = a.npcs ? a.pcs[a.npcs - 1].k_start + a.pcs[a.npcs - 1].len : 0;
  for (int64_t pn = 0; pn < panels; ++pn) {
    const int64_t rb = a.r0 + pn * W;
    const int nvalid = int(std::min<int64_t>(W, a.r0 + a.rows - rb));
    int16_t* d = dst + pn * int64_t(a.pairs) * W * 2;
    // k contiguous: rows are rb + i, a k-pair of row i is the int32 at src + (rb+i)*sr + k0.
    for (int pi = 0; pi < a.npcs; ++pi) {
      const Piece& pc = a.pcs[pi];
      const int32_t full = pc.len / 2;
      float f1[W], f2[W];
      if constexpr (kF32) {
        for (int i = 0; i < W; ++i) {
          if (i < nvalid) scales_of(a.e[(rb + i) * a.er + int64_t(pc.blk) * a.ej], f1[i], f2[i]);
          else f1[i] = f2[i] = 0.0f;
        }
      }
      const int64_t sq_bound = a.sq ? piece_square_bound(pc.pairs, a.qmax) : 0;
      const bool squares = a.sq && sq_bound < 0;
      __m512i sqv[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};  // rows g = 0 / 16 of the panel
      for (int32_t q0 = 0; q0 < full; q0 += 16) {
        const int cnt = std::min<int32_t>(16, full - q0);
        const __mmask32 wmask = cnt == 16 ? ~__mmask32(0) : ((__mmask32(1) << (2 * cnt)) - 1);
        const bool pf = pc.k_start + 2 * q0 + kPfK < k_end;
        for (int g = 0; g < W; g += 16) {
          __m512i r[16];
          for (int i = 0; i < 16; ++i) {
            const int row = g + i;
            if (row < nvalid) {
              const T* p = src + (rb + row) * a.sr + pc.k_start + 2 * q0;
              if (pf)
                for (int64_t l = 0; l < int64_t(32 * sizeof(T)); l += 64)
                  _mm_prefetch(reinterpret_cast<const char*>(p + kPfK) + l, _MM_HINT_T0);
              __m512 t1[2], t2[2];
              if constexpr (kF32) {
                t1[0] = t1[1] = _mm512_set1_ps(f1[row]);
                t2[0] = t2[1] = _mm512_set1_ps(f2[row]);
              }
              r[i] = Load32::get(p, wmask, t1, t2, qm);
              if constexpr (!kF32) {
                mm.add(r[i]);
              }
            } else {
              r[i] = _mm512_setzero_si512();
            }
          }
          transpose16(r);
          if (squares)  // r[t], t >= cnt, are zero (wmask)
            for (int t = 0; t < cnt; ++t) sqv[g / 16] = add_squares(sqv[g / 16], r[t]);
          const int wcols = std::min(16, W - g);
          const __mmask16 smask = wcols == 16 ? __mmask16(0xFFFF) : __mmask16((1u << wcols) - 1);
          for (int t = 0; t < cnt; ++t)
            _mm512_mask_storeu_epi32(d + (int64_t(q0 + t) * W + g) * 2, smask, r[t]);
        }
      }
      alignas(64) int32_t rowsq[32];
      if (squares) {
        _mm512_store_si512(rowsq, sqv[0]);
        _mm512_store_si512(rowsq + 16, sqv[1]);
      }
      if (pc.len & 1) {  // trailing half pair: (x, 0)
        int16_t* dd = d + int64_t(full) * W * 2;
        const int64_t k0 = pc.k_start + 2 * full;
        for (int i = 0; i < W; ++i) {
          int16_t v = 0;
          if (i < nvalid) {
            if constexpr (kF32) {
              v = quantize1(src[(rb + i) * a.sr + k0], f1[i], f2[i], float(a.qmax));
            } else {
              v = src[(rb + i) * a.sr + k0];
              mm.add(_mm512_set1_epi16(v));
            }
          }
          dd[2 * i] = v;
          dd[2 * i + 1] = 0;
          if (squares) rowsq[i] += int32_t(v) * v;
        }
      }
      if (a.sq) {
        int64_t& out = a.sq[pn * a.npcs + pi];
        out = squares ? *std::max_element(rowsq, rowsq + W) : sq_bound;
      }
      d += int64_t(pc.pairs) * W * 2;
    }
  }
}

// pack_i16 / pack_f32 of gemm_driver.h, vectorized for the two layouts that occur (one of the two
// strides is always 1).  Returns max |value| seen (int16 input) for the range check.
template <int W, class T>
static int32_t pack512(const T* src, const PackArgs& a, int16_t* dst) {
  static_assert(W <= 32, "panel width");
  MinMax16 mm;
  if (a.sr == 1) {
    pack512_rows<W>(src, a, dst, mm);
  } else {
    pack512_kcont<W>(src, a, dst, mm);
  }
  if constexpr (std::is_same<T, float>::value) return 0;
  return reduce_absmax16(mm.vmin, mm.vmax);
}


// ---------------------------------------------------------------- implicit-GEMM conv packing
// Vectorized versions of conv_pack_pixels / conv_pack_taps (conv_pack.h): same layout, same checks.

// Row (output pixel) geometry for the linear offset formula: with no lhs dilation, input pixel
// (n, p + t*rdil) is at base + delta(t), where p = o*stride - pad and delta(t) = the tap's offset.
struct PixInfo {
  int64_t p[3];
  int64_t base;
};
static inline PixInfo pix_info_at(const ConvGeom& g, int64_t n, const int64_t* o) {
  PixInfo pi;
  int64_t off = n;
  for (int d = 0; d < 3; ++d) {
    pi.p[d] = o[d] * g.stride[d] - g.pad[d];
    off = off * g.in[d] + pi.p[d];
  }
  pi.base = off * g.C;
  return pi;
}
struct TapInfo {
  int64_t tr[3];  // t[d] * rdil[d]
  int64_t delta;
};
static inline TapInfo tap_info(const ConvGeom& g, int64_t tap) {
  int64_t t[3];
  conv_split_tap(g, tap, t);
  TapInfo ti;
  int64_t off = 0;
  for (int d = 0; d < 3; ++d) {
    ti.tr[d] = t[d] * g.rdil[d];
    off = off * g.in[d] + ti.tr[d];
  }
  ti.delta = off * g.C;
  return ti;
}
static inline bool pix_tap_valid(const ConvGeom& g, const PixInfo& p, const TapInfo& t) {
  bool ok = true;
  for (int d = 0; d < 3; ++d) {
    const int64_t pos = p.p[d] + t.tr[d];
    ok &= (pos >= 0) & (pos < g.in[d]);
  }
  return ok;
}
// Every tap of pixel p inside the input (no padding read): p + t * rdil in [0, in) for all taps t.
static inline bool pix_interior(const ConvGeom& g, const PixInfo& p) {
  bool ok = true;
  for (int d = 0; d < 3; ++d) ok &= (p.p[d] >= 0) & (p.p[d] + (g.ks[d] - 1) * g.rdil[d] < g.in[d]);
  return ok;
}
static inline bool conv_linear(const ConvGeom& g) { return g.ldil[0] == 1 && g.ldil[1] == 1 && g.ldil[2] == 1; }

// conv_pack_pixels (conv_pack.h) for an odd channel count (an image's first layer) without lhs
// dilation: the same element copies, with each pixel's offsets from PixCursor / PixInfo (no
// divisions) and no padding checks for pixels whose every tap is inside the input.
template <int W>
static int32_t conv_pack_pixels_odd(const int16_t* x, const ConvGeom& g, const PackArgs& a, int16_t* dst) {
  int32_t vmin = 0, vmax = 0;
  const int64_t panels = (a.rows + W - 1) / W;
  for (int64_t pn = 0; pn < panels; ++pn) {
    const int64_t rb = a.r0 + pn * W;
    const int nvalid = int(std::min<int64_t>(W, a.r0 + a.rows - rb));
    PixInfo pinfo[W];
    bool inner[W];
    PixCursor cur(g, rb);
    for (int i = 0; i < nvalid; ++i, cur.next(g)) {
      pinfo[i] = pix_info_at(g, cur.n, cur.o);
      inner[i] = pix_interior(g, pinfo[i]);
    }
    auto tap_offsets = [&](int64_t tap, int64_t* off) {
      const TapInfo ti = tap_info(g, tap);
      for (int i = 0; i < nvalid; ++i)
        off[i] = inner[i] || pix_tap_valid(g, pinfo[i], ti) ? pinfo[i].base + ti.delta : -1;
    };
    conv_pixel_panel<W>(x, g, a, nvalid, tap_offsets, dst + pn * int64_t(a.pairs) * W * 2, vmin, vmax);
  }
  return std::max(-vmin, vmax);
}

// A[r = pixel, k = (tap, c)]: per panel of W pixels and per run of <= 32 channels inside one tap,
// 16 masked row loads + a 16 x 16 int32 transpose give 16 k-pairs of the panel.
template <int W>
static int32_t conv_pack_pixels512(const int16_t* x, const ConvGeom& g, const PackArgs& a, int16_t* dst) {
  static_assert(W <= 16, "panel width");
  bool even = (g.cg & 1) == 0;
  for (int pi = 0; pi < a.npcs; ++pi) even &= (a.pcs[pi].k_start & 1) == 0;
  const bool linear = conv_linear(g);
  if (!even) {  // a k-pair would straddle two taps: element copies
    if (!linear) return conv_pack_pixels<W>(x, g, a, dst);
    return conv_pack_pixels_odd<W>(x, g, a, dst);
  }
  __m512i vmin = _mm512_setzero_si512(), vmax = _mm512_setzero_si512();
  const int64_t panels = (a.rows + W - 1) / W;
  const __mmask16 smask = __mmask16((1u << W) - 1);
  for (int64_t pn = 0; pn < panels; ++pn) {
    const int64_t rb = a.r0 + pn * W;
    const int nvalid = int(std::min<int64_t>(W, a.r0 + a.rows - rb));
    PixInfo pinfo[W];
    int64_t rn[W], ro[W][3];
    PixCursor pc_row(g, rb);  // consecutive pixels: one division set per panel
    for (int i = 0; i < nvalid; ++i, pc_row.next(g)) {
      if (linear) {
        pinfo[i] = pix_info_at(g, pc_row.n, pc_row.o);
      } else {
        rn[i] = pc_row.n;
        for (int d = 0; d < 3; ++d) ro[i][d] = pc_row.o[d];
      }
    }
    int64_t off[W];
    int64_t cur_tap = -1;
    int16_t* d = dst + pn * int64_t(a.pairs) * W * 2;
    for (int pi = 0; pi < a.npcs; ++pi) {
      const Piece& pc = a.pcs[pi];
      int64_t k = pc.k_start;
      const int64_t ke = k + pc.len;
      while (k < ke) {
        const int64_t tap = k / g.cg, c = k - tap * g.cg;
        const int run = int(std::min<int64_t>(std::min<int64_t>(ke - k, g.cg - c), 32));
        if (tap != cur_tap) {
          cur_tap = tap;
          if (linear) {
            const TapInfo ti = tap_info(g, tap);
            for (int i = 0; i < nvalid; ++i) off[i] = pix_tap_valid(g, pinfo[i], ti) ? pinfo[i].base + ti.delta : -1;
          } else {
            int64_t td[3];
            conv_split_tap(g, tap, td);
            for (int i = 0; i < nvalid; ++i) off[i] = conv_pixel_offset(g, rn[i], ro[i], td);
          }
        }
        const __mmask32 lm = run >= 32 ? ~__mmask32(0) : __mmask32((1u << run) - 1);
        __m512i r[16];
        for (int i = 0; i < 16; ++i) {
          if (i < nvalid && off[i] >= 0) {
            r[i] = _mm512_maskz_loadu_epi16(lm, x + off[i] + c);
            vmin = _mm512_min_epi16(vmin, r[i]);
            vmax = _mm512_max_epi16(vmax, r[i]);
          } else {
            r[i] = _mm512_setzero_si512();
          }
        }
        transpose16(r);
        const int np = (run + 1) / 2;
        for (int t = 0; t < np; ++t) _mm512_mask_storeu_epi32(d + t * W * 2, smask, r[t]);
        d += int64_t(np) * W * 2;
        k += run;
      }
    }
  }
  return reduce_absmax16(vmin, vmax);
}

// A run of consecutive channels of one tap inside a weight-gradient panel (conv_pack_taps512).
struct TapRun {
  TapInfo ti;
  int64_t c0;
  __mmask32 mask;  // lanes of the run
  __m512i idx;     // lane l takes loaded element l - lane0
  bool whole;      // the run is lanes 0..31 in order: a plain load, no permute
};
#define JDFP_AI_PACK __attribute__((always_inline))

// The runs of every W-row panel of the tile: panel pn's are runs[run_begin[pn] .. run_begin[pn + 1]).
template <int W>
static void tap_runs(const ConvGeom& g, const PackArgs& a, int64_t panels, std::vector<TapRun>& runs,
                     std::vector<int>& run_begin) {
  runs.clear();
  run_begin.assign(size_t(panels) + 1, 0);
  for (int64_t pn = 0; pn < panels; ++pn) {
    run_begin[size_t(pn)] = int(runs.size());
    const int64_t rb = a.r0 + pn * W;
    const int nvalid = int(std::min<int64_t>(W, a.r0 + a.rows - rb));
    int i = 0;
    while (i < nvalid) {
      const int64_t r = rb + i, tap = r / g.cg, c = r - tap * g.cg;
      const int len = int(std::min<int64_t>(nvalid - i, g.cg - c));
      alignas(64) int16_t id[32];
      for (int l = 0; l < 32; ++l) id[l] = int16_t((l - i) & 31);
      runs.push_back(TapRun{tap_info(g, tap), c, __mmask32(((uint64_t(1) << len) - 1) << i),
                            _mm512_load_si512(id), i == 0 && len == 32});
      i += len;
    }
  }
  run_begin[size_t(panels)] = int(runs.size());
}

// One pixel pair (p0, p1) into every panel's pair row (panel pn's at d + pn * dstep), three ways.
struct TapPair {
  PixInfo p0, p1;
  bool has1;
  int16_t* d;
  int64_t dstep;
};

// Every panel one whole run (W = 32 and a multiple of 32 channels: a panel is 32 channels of one
// tap): one plain load per pixel, no run loop, and the vectors stay in registers.
static inline JDFP_AI_PACK void taps_pair_whole(const int16_t* x, const ConvGeom& g, const TapRun* runs,
                                                const int* run_begin, int64_t panels, const TapPair& t,
                                                __m512i ilo, __m512i ihi, __m512i& vmin, __m512i& vmax) {
  int16_t* d = t.d;
  for (int64_t pn = 0; pn < panels; ++pn, d += t.dstep) {
    const TapRun& rn = runs[run_begin[pn]];
    const __m512i v0 = pix_tap_valid(g, t.p0, rn.ti) ? _mm512_loadu_si512(x + t.p0.base + rn.ti.delta + rn.c0)
                                                     : _mm512_setzero_si512();
    const __m512i v1 = t.has1 && pix_tap_valid(g, t.p1, rn.ti)
                           ? _mm512_loadu_si512(x + t.p1.base + rn.ti.delta + rn.c0)
                           : _mm512_setzero_si512();
    vmin = _mm512_min_epi16(vmin, _mm512_min_epi16(v0, v1));
    vmax = _mm512_max_epi16(vmax, _mm512_max_epi16(v0, v1));
    _mm512_storeu_si512(d, _mm512_permutex2var_epi16(v0, ilo, v1));
    _mm512_storeu_si512(d + 32, _mm512_permutex2var_epi16(v0, ihi, v1));
  }
}

// Every run at most a few channels (an image's first layer: a panel is many taps of 1-3 channels):
// element copies into a zeroed row cost less than a masked load and a permute per run, and a pixel
// whose every tap lies inside the input (most of them) skips the per-run checks.
template <int W>
static inline JDFP_AI_PACK void taps_pair_short(const int16_t* x, const ConvGeom& g, const TapRun* runs,
                                                const int* run_begin, int64_t panels, const TapPair& t,
                                                __mmask32 smask, int16_t& smin, int16_t& smax) {
  const bool in0 = pix_interior(g, t.p0), in1 = t.has1 && pix_interior(g, t.p1);
  int16_t* d = t.d;
  for (int64_t pn = 0; pn < panels; ++pn, d += t.dstep) {
    for (int i = 0; i < W; i += 16)
      _mm512_mask_storeu_epi16(d + 2 * i, i + 16 <= W ? ~__mmask32(0) : smask, _mm512_setzero_si512());
    for (int ri = run_begin[pn]; ri < run_begin[pn + 1]; ++ri) {
      const TapRun& rn = runs[ri];
      const int lane0 = __builtin_ctz(rn.mask), len = __builtin_popcount(rn.mask);
      const bool ok0 = in0 || pix_tap_valid(g, t.p0, rn.ti);
      const bool ok1 = in1 || (t.has1 && pix_tap_valid(g, t.p1, rn.ti));
      const int64_t o0 = t.p0.base + rn.ti.delta + rn.c0, o1 = t.p1.base + rn.ti.delta + rn.c0;
      int16_t* dl = d + 2 * lane0;
      for (int l = 0; l < len; ++l) {
        const int16_t u = ok0 ? x[o0 + l] : int16_t(0), v = ok1 ? x[o1 + l] : int16_t(0);
        smin = std::min(smin, std::min(u, v));
        smax = std::max(smax, std::max(u, v));
        dl[2 * l] = u;
        dl[2 * l + 1] = v;
      }
    }
  }
}

// The general case: each run a masked load and a permute into the pair's two vectors.
template <int W>
static inline JDFP_AI_PACK void taps_pair_runs(const int16_t* x, const ConvGeom& g, const TapRun* runs,
                                               const int* run_begin, int64_t panels, const TapPair& t,
                                               __m512i ilo, __m512i ihi, __m512i& vmin, __m512i& vmax) {
  const __mmask32 smask = W >= 16 ? ~__mmask32(0) : __mmask32((uint64_t(1) << (2 * W)) - 1);
  const __mmask32 smask_hi = W <= 16 ? 0 : W >= 32 ? ~__mmask32(0) : __mmask32((uint64_t(1) << (2 * W - 32)) - 1);
  int16_t* d = t.d;
  for (int64_t pn = 0; pn < panels; ++pn, d += t.dstep) {
    __m512i v0 = _mm512_setzero_si512(), v1 = _mm512_setzero_si512();
    for (int ri = run_begin[pn]; ri < run_begin[pn + 1]; ++ri) {
      const TapRun& rn = runs[ri];
      if (rn.whole) {
        if (pix_tap_valid(g, t.p0, rn.ti)) v0 = _mm512_loadu_si512(x + t.p0.base + rn.ti.delta + rn.c0);
        if (t.has1 && pix_tap_valid(g, t.p1, rn.ti)) v1 = _mm512_loadu_si512(x + t.p1.base + rn.ti.delta + rn.c0);
        continue;
      }
      const int cnt = __builtin_popcount(rn.mask);
      const __mmask32 lm = __mmask32((uint64_t(1) << cnt) - 1);
      if (pix_tap_valid(g, t.p0, rn.ti))
        v0 = _mm512_mask_permutexvar_epi16(v0, rn.mask, rn.idx,
                                           _mm512_maskz_loadu_epi16(lm, x + t.p0.base + rn.ti.delta + rn.c0));
      if (t.has1 && pix_tap_valid(g, t.p1, rn.ti))
        v1 = _mm512_mask_permutexvar_epi16(v1, rn.mask, rn.idx,
                                           _mm512_maskz_loadu_epi16(lm, x + t.p1.base + rn.ti.delta + rn.c0));
    }
    vmin = _mm512_min_epi16(vmin, _mm512_min_epi16(v0, v1));
    vmax = _mm512_max_epi16(vmax, _mm512_max_epi16(v0, v1));
    _mm512_mask_storeu_epi16(d, smask, _mm512_permutex2var_epi16(v0, ilo, v1));
    if constexpr (W > 16) _mm512_mask_storeu_epi16(d + 32, smask_hi, _mm512_permutex2var_epi16(v0, ihi, v1));
  }
}

// A[r = (tap, c), k = pixel] (weight-gradient): pair-outer, panel-inner; a panel's W rows are a few
// runs of consecutive channels of one tap each, gathered into two vectors (pixel k0 and k0 + 1) and
// interleaved with vpermt2w (taps_pair_runs), or by the whole-run / short-run cases above.
template <int W>
static int32_t conv_pack_taps512(const int16_t* x, const ConvGeom& g, const PackArgs& a, int16_t* dst) {
  static_assert(W <= 32, "panel width");
  if (!conv_linear(g)) return conv_pack_taps<W>(x, g, a, dst);
  const int64_t panels = (a.rows + W - 1) / W;
  // Per-thread scratch, read through plain pointers below: each access to a thread_local of a
  // shared library is a __tls_get_addr call, which the inner loops must not make.
  thread_local std::vector<TapRun> runs_tls;
  thread_local std::vector<int> run_begin_tls;
  tap_runs<W>(g, a, panels, runs_tls, run_begin_tls);
  const TapRun* runs = runs_tls.data();
  const int* run_begin = run_begin_tls.data();
  bool whole = W == 32, short_runs = true;
  for (int64_t pn = 0; pn < panels && whole; ++pn)
    whole = run_begin[pn + 1] == run_begin[pn] + 1 && runs[run_begin[pn]].whole;
  for (int ri = 0; ri < run_begin[panels]; ++ri) short_runs = short_runs && __builtin_popcount(runs[ri].mask) <= 4;
  const __m512i ilo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                       39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i ihi = _mm512_add_epi16(ilo, _mm512_set1_epi16(16));
  const __mmask32 smask = W >= 16 ? ~__mmask32(0) : __mmask32((uint64_t(1) << (2 * W)) - 1);
  __m512i vmin = _mm512_setzero_si512(), vmax = _mm512_setzero_si512();
  int16_t smin = 0, smax = 0;
  int64_t poff = 0;
  for (int pi = 0; pi < a.npcs; ++pi) {
    const Piece& pc = a.pcs[pi];
    PixCursor cur(g, pc.k_start);
    for (int32_t q = 0; q < pc.pairs; ++q) {
      TapPair t;
      t.has1 = 2 * q + 1 < pc.len;
      t.p0 = pix_info_at(g, cur.n, cur.o);
      cur.next(g);
      t.p1 = t.has1 ? pix_info_at(g, cur.n, cur.o) : t.p0;
      if (t.has1) cur.next(g);
      t.d = dst + (poff + q) * W * 2;
      t.dstep = int64_t(a.pairs) * W * 2;
      if (whole) {
        taps_pair_whole(x, g, runs, run_begin, panels, t, ilo, ihi, vmin, vmax);
      } else if (short_runs) {
        taps_pair_short<W>(x, g, runs, run_begin, panels, t, smask, smin, smax);
      } else {
        taps_pair_runs<W>(x, g, runs, run_begin, panels, t, ilo, ihi, vmin, vmax);
      }
    }
    poff += pc.pairs;
  }
  vmin = _mm512_min_epi16(vmin, _mm512_set1_epi16(smin));
  vmax = _mm512_max_epi16(vmax, _mm512_set1_epi16(smax));
  return reduce_absmax16(vmin, vmax);
}

struct V512 {
  static constexpr int kLanes = 16;
  static constexpr bool kFastPack = true;
  static constexpr bool kPackSquares = true;
  template <int W, class T>
  static int32_t pack(const T* src, const PackArgs& a, int16_t* dst) {
    if (a.sr == 1 || a.sk == 1) return pack512<W>(src, a, dst);
    return 0;  // not reached: one of the two strides is always 1
  }
  static constexpr bool kConvPack = true;
  template <int W>
  static int32_t conv_pack(const int16_t* x, const ConvGeom& g, const PackArgs& a, int16_t* dst) {
    if (g.mode == kConvRowsTaps) return conv_pack_taps512<W>(x, g, a, dst);
    if constexpr (W <= 16) return conv_pack_pixels512<W>(x, g, a, dst);
    return conv_pack_pixels<W>(x, g, a, dst);  // not used: the pixel gather is always A (W = MR)
  }
  using vi = __m512i;
  using vf = __m512;
  template <class T>
  static inline vi load(const T* p) { return _mm512_loadu_si512(static_cast<const void*>(p)); }
  template <class T>
  static inline void store(T* p, vi v) { _mm512_storeu_si512(static_cast<void*>(p), v); }
  static inline vf loadf(const float* p) { return _mm512_loadu_ps(p); }
  static inline void storef(float* p, vf v) { _mm512_storeu_ps(p, v); }
  static inline vi zero() { return _mm512_setzero_si512(); }
  static inline vf zerof() { return _mm512_setzero_ps(); }
  static inline vi bcast(int32_t x) { return _mm512_set1_epi32(x); }
  static inline vi dp(vi acc, vi b, vi a) { return _mm512_dpwssd_epi32(acc, b, a); }
  static inline vf cvt(vi x) { return _mm512_cvtepi32_ps(x); }
  static inline vf addf(vf a, vf b) { return _mm512_add_ps(a, b); }
  static inline vf mulf(vf a, vf b) { return _mm512_mul_ps(a, b); }
  static inline vf fmaf(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
  static inline vf bcastf(float x) { return _mm512_set1_ps(x); }
  static inline vi add(vi a, vi b) { return _mm512_add_epi32(a, b); }
  // F' = F + sext16(((w >> 16) - F) mod 2**16), the update of ukernel_simd.h, as
  // F + ((w - (F << 16)) >> 16) (arithmetic shift): four plain int32 ops.  The three-op form with a
  // vpdpwssd for the sign-extending add was slower: it competes with the dot products for their ports.
  static inline vi f_next(vi f, vi w) {
    __asm__("" : "+v"(f));  // one load of F for both uses (GCC would fold it into each op: two loads)
    return _mm512_add_epi32(f, _mm512_srai_epi32(_mm512_sub_epi32(w, _mm512_slli_epi32(f, 16)), 16));
  }
  // T = 2**16 * F + (W & 0xFFFF) of 16 lanes (see UkSimd::kernel), lanes 0..7 in l and 8..15 in u.
  static inline void wf64(const int32_t* pw, const int32_t* pf, __m512i& l, __m512i& u) {
    const vi f = _mm512_loadu_si512(pf);
    const vi lo = _mm512_and_si512(_mm512_loadu_si512(pw), _mm512_set1_epi32(0xFFFF));
    l = _mm512_add_epi64(_mm512_slli_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(f)), 16),
                         _mm512_cvtepu32_epi64(_mm512_castsi512_si256(lo)));
    u = _mm512_add_epi64(_mm512_slli_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(f, 1)), 16),
                         _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(lo, 1)));
  }
  // wide[0..16) (+)= T of (W, F).
  static inline void spill_wf(const int32_t* pw, const int32_t* pf, int64_t* wide, bool add) {
    __m512i l, u;
    wf64(pw, pf, l, u);
    if (add) {
      l = _mm512_add_epi64(_mm512_loadu_si512(wide), l);
      u = _mm512_add_epi64(_mm512_loadu_si512(wide + 8), u);
    }
    _mm512_storeu_si512(wide, l);
    _mm512_storeu_si512(wide + 8, u);
  }
  // f() of 8 exact int64 block sums, rounded once (half to even), AVX-512F only (vcvtqq2ps needs DQ,
  // which the ISA check does not require).  |s| < 2**51: s + bits(1.5 * 2**52) is the double
  // 1.5 * 2**52 + s exactly, so subtracting 1.5 * 2**52 gives s as an exact double and vcvtpd2ps
  // rounds it once.  Larger sums take the scalar 64-bit convert.
  static inline __m256 cvt64x8(__m512i s) {
    const __m512i off = _mm512_add_epi64(s, _mm512_set1_epi64(int64_t(1) << 51));
    if (_mm512_cmpge_epu64_mask(off, _mm512_set1_epi64(int64_t(1) << 52))) {
      alignas(64) int64_t v[8];
      alignas(32) float f[8];
      _mm512_store_si512(v, s);
      for (int l = 0; l < 8; ++l) f[l] = i64_to_f32(v[l]);
      return _mm256_load_ps(f);
    }
    const __m512d d = _mm512_sub_pd(_mm512_castsi512_pd(_mm512_add_epi64(s, _mm512_set1_epi64(0x4338000000000000))),
                                    _mm512_set1_pd(6755399441055744.0));
    return _mm512_cvtpd_ps(d);
  }
  // f(S) of 16 lanes: S = T of (W, F) (+ wide[0..16) when the block spilled), rounded once.  Without
  // wide, 2**16 * F + (W & 0xFFFF) is computed exactly in double (|F| < 2**31, |T| < 2**47 < 2**53)
  // and vcvtpd2ps rounds it once; with wide, the int64 path of cvt64x8.
  static inline vf cvt_wf(const int32_t* pw, const int32_t* pf, const int64_t* wide) {
    __m256 lo8, hi8;
    if (wide) {
      __m512i l, u;
      wf64(pw, pf, l, u);
      lo8 = cvt64x8(_mm512_add_epi64(_mm512_loadu_si512(wide), l));
      hi8 = cvt64x8(_mm512_add_epi64(_mm512_loadu_si512(wide + 8), u));
    } else {
      const vi f = _mm512_loadu_si512(pf);
      const vi lo = _mm512_and_si512(_mm512_loadu_si512(pw), _mm512_set1_epi32(0xFFFF));
      const __m512d s = _mm512_set1_pd(65536.0);
      lo8 = _mm512_cvtpd_ps(_mm512_add_pd(_mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(f)), s),
                                          _mm512_cvtepi32_pd(_mm512_castsi512_si256(lo))));
      hi8 = _mm512_cvtpd_ps(_mm512_add_pd(_mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(f, 1)), s),
                                          _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(lo, 1))));
    }
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo8)), _mm256_castps_pd(hi8), 1));
  }
  static inline vf pow2(vi e) {  // e in [-126, 127]
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(e, _mm512_set1_epi32(127)), 23));
  }
  static inline vf scale2(vf x, vi e) {
    const vi lo = _mm512_set1_epi32(-126), hi = _mm512_set1_epi32(127);
    const vi e1 = _mm512_min_epi32(_mm512_max_epi32(e, lo), hi);
    const vi e2 = _mm512_min_epi32(_mm512_max_epi32(_mm512_sub_epi32(e, e1), lo), hi);
    return _mm512_mul_ps(_mm512_mul_ps(x, pow2(e1)), pow2(e2));
  }
};

}  // namespace

// Outputs at most 16 wide (a 16-channel conv, a 10-class head), or 13-16 tall (a 16-channel conv's
// weight gradient, a batch of 16), on a 16 x 16 micro-tile: the 12 x 32 one would spend up to half
// its dot products on padding.  Not for a weight gradient whose taps gather as whole 32-channel
// runs (conv_pack_taps512): with so few rows per packed column, packing dominates, and the 32-wide
// panels pack faster (measured: 16 x 576 x 32768 10 % slower on 16 x 16, 16 x 144 x 4096 13 % faster).
int tile_avx512vnni(const Problem& P, const Tile& T) {
  const bool whole_taps = P.conv && P.conv->on_b && P.conv->cg % 32 == 0;
  if (P.N <= 16 || (P.M > 12 && P.M <= 16 && !whole_taps)) return run_tile<UkSimd<V512, 16, 1>>(P, T);
  return run_tile<UkSimd<V512, 12, 2>>(P, T);
}

// The conv gathers above move 16-bit payloads without reading them (the INT16 range check aside), so
// the BF16 conv (gemm_bf16_avx512.cc) packs its bfloat16 operands with them: one piece of `len`
// elements from k0, ceil(len / 2) pairs.
namespace {
PackArgs gather_args(int64_t r0, int64_t rows, const Piece& pc) {
  PackArgs a{};
  a.r0 = r0;
  a.rows = rows;
  a.pcs = &pc;
  a.npcs = 1;
  a.pairs = pc.pairs;
  return a;
}
}  // namespace

void conv_gather16_pixels14_avx512(const uint16_t* x, const ConvGeom& g, int64_t r0, int64_t rows, int64_t k0,
                                   int32_t len, uint32_t* dst) {
  const Piece pc{k0, len, (len + 1) / 2, 0, 0};
  conv_pack_pixels512<14>(reinterpret_cast<const int16_t*>(x), g, gather_args(r0, rows, pc),
                          reinterpret_cast<int16_t*>(dst));
}

void conv_gather16_taps32_avx512(const uint16_t* x, const ConvGeom& g, int64_t r0, int64_t rows, int64_t k0,
                                 int32_t len, uint32_t* dst) {
  const Piece pc{k0, len, (len + 1) / 2, 0, 0};
  conv_pack_taps512<32>(reinterpret_cast<const int16_t*>(x), g, gather_args(r0, rows, pc),
                        reinterpret_cast<int16_t*>(dst));
}

}  // namespace jdfp
