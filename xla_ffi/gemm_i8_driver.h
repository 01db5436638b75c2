// The exact INT8 GEMM's macro kernel and register-blocked micro-kernel, templated on a small traits
// class V (vector type, vpdpbusd or its emulation).  Included by every per-ISA INT8 TU, so packing
// and the epilogue get that TU's -m flags; everything lives in an anonymous namespace (no ODR merge
// across ISA flags).  The loop nest and caches follow gemm_driver.h (the INT16 kernel) with k-quads
// instead of k-pairs; what is duplicated from there is marked "as gemm_driver.h".
//
// Signed x signed on vpdpbusd (u8 x s8): B is packed shifted, b' = b + 128 (an XOR with 0x80), so
//   sum_k a_k * b'_k = sum_k a_k * b_k + 128 * sum_k a_k.
// The accumulators of a chain start at -128 * sum_k a_k (the row sums of A over the piece, computed
// while packing A), so they end at the true chain sum.  vpdpbusd wraps modulo 2**32 (no saturation)
// and every partial result is only used modulo 2**32: the final int32 is exact because the true
// chain sum fits int32 (|sum| <= L * qmax_a * qmax_b <= 2**31 - 1, the contract's chain bound).
// ISAs without vpdpbusd (V::kShiftB == false) pack B unshifted and need no compensation.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "gemm_i8_common.h"

namespace jdfp {
namespace {

// as gemm_driver.h
template <class T>
struct I8Buf {
  T* p = nullptr;
  size_t n = 0;
  T* get(size_t want) {
    if (want > n) {
      std::free(p);
      size_t bytes = ((want * sizeof(T) + 63) / 64) * 64;
      p = static_cast<T*>(std::aligned_alloc(64, bytes ? bytes : 64));
      n = want;
    }
    return p;
  }
  ~I8Buf() { std::free(p); }
};

static inline int64_t i8_round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

static inline uint32_t ld_u32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
static inline void st_u32(void* p, uint32_t v) { std::memcpy(p, &v, 4); }

// Running min / max of the operand values read while packing (the range check).
struct I8MinMax {
  int32_t mn = 0, mx = 0;
  void add(int32_t v) {
    mn = std::min(mn, v);
    mx = std::max(mx, v);
  }
  bool ok(int32_t qmax) const { return mn >= -qmax && mx <= qmax; }
};

// Min and max of n int8 values (one vectorizable pass), folded into mm.
static inline void minmax_i8(const int8_t* p, int64_t n, I8MinMax& mm) {
  int8_t mn = 0, mx = 0;
  for (int64_t k = 0; k < n; ++k) {
    mn = p[k] < mn ? p[k] : mn;
    mx = p[k] > mx ? p[k] : mx;
  }
  mm.add(mn);
  mm.add(mx);
}

#if defined(__SSE2__)
// The running min / max of biased bytes (v ^ 0x80: signed order as unsigned) folded into mm.
static inline void fold_biased_minmax(__m128i umin, __m128i umax, I8MinMax& mm) {
  alignas(16) uint8_t lo[16], hi[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(lo), umin);
  _mm_store_si128(reinterpret_cast<__m128i*>(hi), umax);
  for (int t = 0; t < 16; ++t) {
    mm.add(int32_t(lo[t]) - 128);
    mm.add(int32_t(hi[t]) - 128);
  }
}
#endif

// Sum of n int8 values: psadbw on the biased bytes (v + 128) 16 at a time, the tail one by one.
static inline int64_t sum_i8(const int8_t* p, int64_t n) {
  int64_t s = 0, k = 0;
#if defined(__SSE2__)
  const __m128i x = _mm_set1_epi8(int8_t(0x80)), z = _mm_setzero_si128();
  __m128i acc = z;
  for (; k + 16 <= n; k += 16)
    acc = _mm_add_epi64(acc, _mm_sad_epu8(_mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k)), x), z));
  if (k + 8 <= n) {  // the upper half of the biased load is 0 ^ 0x80 per byte: 8 * 128 more, taken off below
    acc = _mm_add_epi64(acc, _mm_sad_epu8(_mm_xor_si128(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + k)), x), z));
    s -= 8 * 128;
    k += 8;
  }
  alignas(16) int64_t two[2];
  _mm_store_si128(reinterpret_cast<__m128i*>(two), acc);
  s += two[0] + two[1] - 128 * k;
#endif
  for (; k < n; ++k) s += p[k];
  return s;
}

static inline bool pc_whole(const I8Piece& pc) { return pc.len % 4 == 0; }

#if defined(__SSE2__)
// W full rows (row i at src + i * sr), q quads each, into the packed panel dst[(q * W + i) * 4 + t]
// (XOR x on every byte): 4 x 4 dword transposes of 4 rows x 4 quads (16-byte loads and stores),
// rows past the last group of 4 and quads past the last group of 4 one dword at a time.
template <int W>
static inline void pack_rows_whole(const int8_t* src, int64_t sr, int32_t nq, uint32_t x, int8_t* dst) {
  const __m128i xv = _mm_set1_epi32(int32_t(x));
  constexpr int G = W / 4;
  int32_t q = 0;
  for (; q + 4 <= nq; q += 4) {
    for (int g = 0; g < G; ++g) {
      const int8_t* r = src + int64_t(4 * g) * sr + 4 * q;
      const __m128i a0 = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r)), xv);
      const __m128i a1 = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + sr)), xv);
      const __m128i a2 = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 2 * sr)), xv);
      const __m128i a3 = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 3 * sr)), xv);
      const __m128i t0 = _mm_unpacklo_epi32(a0, a1), t1 = _mm_unpackhi_epi32(a0, a1);
      const __m128i t2 = _mm_unpacklo_epi32(a2, a3), t3 = _mm_unpackhi_epi32(a2, a3);
      int8_t* d = dst + (int64_t(q) * W + 4 * g) * 4;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm_unpacklo_epi64(t0, t2));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + W * 4), _mm_unpackhi_epi64(t0, t2));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 2 * W * 4), _mm_unpacklo_epi64(t1, t3));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 3 * W * 4), _mm_unpackhi_epi64(t1, t3));
    }
    int i = 4 * G;
    if constexpr (W % 4 >= 2) {  // two more rows: 2 x 4 dwords, one 8-byte store per quad
      const int8_t* r = src + int64_t(i) * sr + 4 * q;
      const __m128i a0 = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r)), xv);
      const __m128i a1 = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + sr)), xv);
      const __m128i lo = _mm_unpacklo_epi32(a0, a1), hi = _mm_unpackhi_epi32(a0, a1);
      int8_t* d = dst + (int64_t(q) * W + i) * 4;
      _mm_storel_epi64(reinterpret_cast<__m128i*>(d), lo);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(d + W * 4), _mm_unpackhi_epi64(lo, lo));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(d + 2 * W * 4), hi);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(d + 3 * W * 4), _mm_unpackhi_epi64(hi, hi));
      i += 2;
    }
    for (; i < W; ++i)
      for (int t = 0; t < 4; ++t) st_u32(dst + (int64_t(q + t) * W + i) * 4, ld_u32(src + i * sr + 4 * (q + t)) ^ x);
  }
  for (; q < nq; ++q)
    for (int i = 0; i < W; ++i) st_u32(dst + (int64_t(q) * W + i) * 4, ld_u32(src + i * sr + 4 * q) ^ x);
}
#endif

// Pack rows [r0, r0 + rows) of X[r, k] = src[r*sr + k] (k contiguous) into micro-panels of width W:
// dst[((panel * quads + q) * W + i) * 4 + t] = X[r0 + panel*W + i, k of quad q, byte t], 0 for
// padding (rows past `rows`, k past a piece's end), XOR 0x80 on real values when kShift.  With
// `rowsum`, also rowsum[(panel * npcs + piece) * W + i] = 128 * (sum of the piece's values of the
// row) modulo 2**32 (the vpdpbusd compensation).  Row by row: each row's k range of the kc block
// (its pieces are consecutive in k) is read once, in order.  dst == nullptr only scans (the range
// check and the row sums) rows the micro-kernel reads in place (prepare_a_i8's in-place panels).
template <int W, bool kShift>
static inline void pack_kcontig(const int8_t* src, int64_t sr, int64_t r0, int64_t rows, const I8Piece* pcs,
                                int npcs, int32_t quads, int8_t* dst, uint32_t* rowsum, I8MinMax& mm) {
  const int64_t panels = (rows + W - 1) / W;
  const uint32_t x = kShift ? 0x80808080u : 0u;
  const int64_t k_lo = pcs[0].k_start, k_hi = pcs[npcs - 1].k_start + pcs[npcs - 1].len;
  // Pieces of whole quads (block_k and K multiples of 4): the kc range packs as one run of quads.
  bool whole = true;
  for (int pi = 0; pi < npcs; ++pi) whole = whole && pc_whole(pcs[pi]);
  for (int64_t pn = 0; pn < panels; ++pn) {
    const int64_t rb = r0 + pn * W;
    const int nvalid = int(std::min<int64_t>(W, r0 + rows - rb));
    int8_t* dp = dst ? dst + pn * int64_t(quads) * W * 4 : nullptr;
    uint32_t* rs = rowsum ? rowsum + pn * npcs * W : nullptr;
#if defined(__SSE2__)
    const bool whole_panel = whole && nvalid == W;  // pack_rows_whole's case
#else
    const bool whole_panel = false;
#endif
    if (!dp || whole_panel) {
#if defined(__SSE2__)
      if (dp) pack_rows_whole<W>(src + rb * sr + k_lo, sr, quads, x, dp);
#endif
      // The range check and the row sums, row by row (the rows are in cache now, or read in place).
      for (int i = 0; i < nvalid; ++i) {
        const int8_t* row = src + (rb + i) * sr;
        minmax_i8(row + k_lo, k_hi - k_lo, mm);
        if (rs)
          for (int pi = 0; pi < npcs; ++pi) rs[pi * W + i] = uint32_t(sum_i8(row + pcs[pi].k_start, pcs[pi].len)) * 128u;
      }
      continue;
    }
    for (int i = 0; i < W; ++i) {
      if (i >= nvalid) {
        for (int32_t q = 0; q < quads; ++q) st_u32(dp + (int64_t(q) * W + i) * 4, 0);
        if (rs)
          for (int pi = 0; pi < npcs; ++pi) rs[pi * W + i] = 0;
        continue;
      }
      const int8_t* row = src + (rb + i) * sr;
      minmax_i8(row + k_lo, k_hi - k_lo, mm);
      int8_t* d = dp + i * 4;
      for (int pi = 0; pi < npcs; ++pi) {
        const I8Piece& pc = pcs[pi];
        const int8_t* sp = row + pc.k_start;
        const int32_t full = pc.len / 4, rem = pc.len % 4;
        for (int32_t q = 0; q < full; ++q) st_u32(d + int64_t(q) * W * 4, ld_u32(sp + 4 * q) ^ x);
        if (rem) {
          uint8_t t4[4] = {0, 0, 0, 0};
          for (int t = 0; t < rem; ++t) t4[t] = uint8_t(sp[4 * full + t]) ^ uint8_t(x);
          std::memcpy(d + int64_t(full) * W * 4, t4, 4);
        }
        const int64_t sum = rs ? sum_i8(sp, pc.len) : 0;
        if (rs) rs[pi * W + i] = uint32_t(sum) * 128u;
        d += int64_t(pc.quads) * W * 4;
      }
    }
  }
}

#if defined(__SSE2__)
// 16 rows x 4 k of a row-contiguous operand (c[t] points at k row t) -> 16 packed quads (64 bytes).
template <bool kShift>
static inline void interleave16(const int8_t* const* c, int8_t* d, __m128i& umin, __m128i& umax) {
  const __m128i x = _mm_set1_epi8(int8_t(0x80));
  __m128i r[4];
  for (int t = 0; t < 4; ++t) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c[t]));
    const __m128i u = _mm_xor_si128(v, x);  // biased: signed order becomes unsigned order
    umin = _mm_min_epu8(umin, u);
    umax = _mm_max_epu8(umax, u);
    r[t] = kShift ? u : v;
  }
  const __m128i t0 = _mm_unpacklo_epi8(r[0], r[1]), t1 = _mm_unpackhi_epi8(r[0], r[1]);
  const __m128i t2 = _mm_unpacklo_epi8(r[2], r[3]), t3 = _mm_unpackhi_epi8(r[2], r[3]);
  __m128i* o = reinterpret_cast<__m128i*>(d);
  _mm_storeu_si128(o + 0, _mm_unpacklo_epi16(t0, t2));
  _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(t0, t2));
  _mm_storeu_si128(o + 2, _mm_unpacklo_epi16(t1, t3));
  _mm_storeu_si128(o + 3, _mm_unpackhi_epi16(t1, t3));
}
#endif

#if defined(__SSE2__)
// R = 8 or 4 rows x 4 k (c[t] points at k row t) -> R packed quads, unshifted (A), with the rows'
// sums of the 4 values times 128 added to rs[0..R) (modulo 2**32) and the biased min / max updated.
template <int R>
static inline void interleave_rows_sum(const int8_t* const* c, int8_t* d, uint32_t* rs, __m128i& umin,
                                       __m128i& umax) {
  const __m128i x = _mm_set1_epi8(int8_t(0x80));
  __m128i v[4], sum = _mm_setzero_si128();
  for (int t = 0; t < 4; ++t) {
    if constexpr (R == 8) {
      v[t] = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c[t]));
    } else {
      v[t] = _mm_cvtsi32_si128(int32_t(ld_u32(c[t])));
    }
    const __m128i u = _mm_xor_si128(v[t], x);  // lanes past R read as 0: harmless for min / max
    umin = _mm_min_epu8(umin, u);
    umax = _mm_max_epu8(umax, u);
    sum = _mm_add_epi16(sum, _mm_srai_epi16(_mm_unpacklo_epi8(v[t], v[t]), 8));  // int16 per row
  }
  const __m128i t0 = _mm_unpacklo_epi8(v[0], v[1]), t2 = _mm_unpacklo_epi8(v[2], v[3]);
  __m128i* o = reinterpret_cast<__m128i*>(d);
  _mm_storeu_si128(o, _mm_unpacklo_epi16(t0, t2));
  const __m128i lo = _mm_slli_epi32(_mm_srai_epi32(_mm_unpacklo_epi16(sum, sum), 16), 7);
  __m128i* r = reinterpret_cast<__m128i*>(rs);
  _mm_storeu_si128(r, _mm_add_epi32(_mm_loadu_si128(r), lo));
  if constexpr (R == 8) {
    _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(t0, t2));
    const __m128i hi = _mm_slli_epi32(_mm_srai_epi32(_mm_unpackhi_epi16(sum, sum), 16), 7);
    _mm_storeu_si128(r + 1, _mm_add_epi32(_mm_loadu_si128(r + 1), hi));
  }
}
#endif

// The same packing from X[r, k] = src[r + k*sk] (rows contiguous: b [K, N], or a transposed).
// Full quads go through the SSE2 interleaves: 16 rows at a time for B (shifted, no sums), 8 / 4
// rows with their sums for A; the rest element by element.
template <int W, bool kShift>
static inline void pack_rcontig(const int8_t* src, int64_t sk, int64_t r0, int64_t rows, const I8Piece* pcs,
                                int npcs, int32_t quads, int8_t* dst, uint32_t* rowsum, I8MinMax& mm) {
  const int64_t panels = (rows + W - 1) / W;
  const uint8_t x = kShift ? 0x80 : 0;
#if defined(__SSE2__)
  __m128i umin = _mm_set1_epi8(int8_t(0x80)), umax = umin;  // biased 0
#endif
  int64_t qoff = 0;
  for (int pi = 0; pi < npcs; ++pi) {
    const I8Piece& pc = pcs[pi];
    if (rowsum)
      for (int64_t pn = 0; pn < panels; ++pn)
        for (int i = 0; i < W; ++i) rowsum[(pn * npcs + pi) * W + i] = 0;
    for (int32_t q = 0; q < pc.quads; ++q) {
      const int nk = std::min<int32_t>(4, pc.len - 4 * q);
      const int8_t* c[4];
      for (int t = 0; t < 4; ++t) c[t] = src + (pc.k_start + 4 * q + std::min(t, nk - 1)) * sk + r0;
      for (int64_t pn = 0; pn < panels; ++pn) {
        int8_t* d = dst + (pn * quads + qoff + q) * W * 4;
        uint32_t* rs = rowsum ? rowsum + (pn * npcs + pi) * W : nullptr;
        const int64_t rb = pn * W;
        const int nvalid = int(std::min<int64_t>(W, rows - rb));
        int i = 0;
#if defined(__SSE2__)
        if (nk == 4) {
          if (!rs) {
            for (; i + 16 <= nvalid; i += 16) {
              const int8_t* cc[4] = {c[0] + rb + i, c[1] + rb + i, c[2] + rb + i, c[3] + rb + i};
              interleave16<kShift>(cc, d + i * 4, umin, umax);
            }
          } else if constexpr (!kShift) {
            for (; i + 8 <= nvalid; i += 8) {
              const int8_t* cc[4] = {c[0] + rb + i, c[1] + rb + i, c[2] + rb + i, c[3] + rb + i};
              interleave_rows_sum<8>(cc, d + i * 4, rs + i, umin, umax);
            }
            for (; i + 4 <= nvalid; i += 4) {
              const int8_t* cc[4] = {c[0] + rb + i, c[1] + rb + i, c[2] + rb + i, c[3] + rb + i};
              interleave_rows_sum<4>(cc, d + i * 4, rs + i, umin, umax);
            }
          }
        }
#endif
        for (; i < W; ++i) {
          uint8_t t4[4] = {0, 0, 0, 0};
          int32_t s = 0;
          if (i < nvalid)
            for (int t = 0; t < nk; ++t) {
              const int8_t v = c[t][rb + i];
              mm.add(v);
              s += v;
              t4[t] = uint8_t(v) ^ x;
            }
          std::memcpy(d + i * 4, t4, 4);
          if (rs) rs[i] += uint32_t(s) * 128u;
        }
      }
    }
    qoff += pc.quads;
  }
#if defined(__SSE2__)
  fold_biased_minmax(umin, umax, mm);
#endif
}

#if defined(__AVX512BW__)
// pack_rcontig_narrow for AVX-512 and W dividing 48: 48 rows (48 / W panels) per step, one masked
// 64-byte load per k row, the quads interleaved in-register (byte and word unpacks, then a 4 x 4
// transpose of 128-bit lanes into row order) and copied panel by panel; the rows' sums of a piece
// by vpmaddubsw / vpmaddwd on the quads (int32 per row), the min / max on the loaded bytes.
template <int W>
static inline void pack_rcontig_narrow512(const int8_t* src, int64_t sk, int64_t r0, int64_t rows, const I8Piece* pcs,
                                          int npcs, int32_t quads, int8_t* dst, uint32_t* rowsum, I8MinMax& mm) {
  static_assert(48 % W == 0, "whole panels per 48 rows");
  constexpr int PG = 48 / W;  // panels per group
  const int64_t panels = (rows + W - 1) / W;
  const __m512i ones8 = _mm512_set1_epi8(1), ones16 = _mm512_set1_epi16(1);
  __m512i vmin = _mm512_setzero_si512(), vmax = vmin;
  int64_t qoff = 0;
  for (int pi = 0; pi < npcs; ++pi) {
    const I8Piece& pc = pcs[pi];
    for (int64_t g0 = 0; g0 < rows; g0 += 48) {
      const int64_t nrow = std::min<int64_t>(48, rows - g0);
      const __mmask64 lm = (uint64_t(1) << nrow) - 1;
      const int64_t pn0 = g0 / W, npn = std::min<int64_t>(PG, panels - pn0);
      __m512i s[3] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
      for (int32_t q = 0; q < pc.quads; ++q) {
        const int nk = std::min<int32_t>(4, pc.len - 4 * q);
        const int8_t* c0 = src + (pc.k_start + 4 * q) * sk + r0 + g0;
        __m512i v[4];
        for (int t = 0; t < 4; ++t) {
          v[t] = t < nk ? _mm512_maskz_loadu_epi8(lm, c0 + t * sk) : _mm512_setzero_si512();
          vmin = _mm512_min_epi8(vmin, v[t]);
          vmax = _mm512_max_epi8(vmax, v[t]);
        }
        const __m512i a = _mm512_unpacklo_epi8(v[0], v[1]), b = _mm512_unpackhi_epi8(v[0], v[1]);
        const __m512i c = _mm512_unpacklo_epi8(v[2], v[3]), d = _mm512_unpackhi_epi8(v[2], v[3]);
        // lane L of q_j: the quads of rows 16L + 4j .. 16L + 4j + 3
        const __m512i q0 = _mm512_unpacklo_epi16(a, c), q1 = _mm512_unpackhi_epi16(a, c);
        const __m512i q2 = _mm512_unpacklo_epi16(b, d), q3 = _mm512_unpackhi_epi16(b, d);
        const __m512i e0 = _mm512_shuffle_i32x4(q0, q1, 0x44), e1 = _mm512_shuffle_i32x4(q2, q3, 0x44);  // lanes 0, 1
        const __m512i f0 = _mm512_shuffle_i32x4(q0, q1, 0xEE), f1 = _mm512_shuffle_i32x4(q2, q3, 0xEE);  // lanes 2, 3
        const __m512i o[3] = {_mm512_shuffle_i32x4(e0, e1, 0x88), _mm512_shuffle_i32x4(e0, e1, 0xDD),
                              _mm512_shuffle_i32x4(f0, f1, 0x88)};  // rows 0-15, 16-31, 32-47
        alignas(64) int8_t out[192];
        for (int j = 0; j < 3; ++j) {
          _mm512_store_si512(out + 64 * j, o[j]);
          if (rowsum) s[j] = _mm512_add_epi32(s[j], _mm512_madd_epi16(_mm512_maddubs_epi16(ones8, o[j]), ones16));
        }
        for (int64_t p = 0; p < npn; ++p)
          std::memcpy(dst + ((pn0 + p) * quads + qoff + q) * W * 4, out + p * W * 4, size_t(W) * 4);
      }
      if (rowsum) {
        alignas(64) uint32_t sums[48];
        for (int j = 0; j < 3; ++j) _mm512_store_si512(sums + 16 * j, _mm512_slli_epi32(s[j], 7));
        for (int64_t p = 0; p < npn; ++p) std::memcpy(rowsum + ((pn0 + p) * npcs + pi) * W, sums + p * W, size_t(W) * 4);
      }
    }
    qoff += pc.quads;
  }
  alignas(64) int8_t lo[64], hi[64];
  _mm512_store_si512(lo, vmin);
  _mm512_store_si512(hi, vmax);
  for (int t = 0; t < 64; ++t) {
    mm.add(lo[t]);
    mm.add(hi[t]);
  }
}
#endif

#if defined(__SSE2__)
// pack_rcontig for narrow unshifted panels (A: W = MR <= 16 rows), panel by panel: per quad, one
// 8- or 16-byte load from each of the 4 k rows gives the panel's W values of that k (zero past
// `rows` or the piece's end), four unpacks make the W quads, and the rows' sums collect in int16
// lanes (flushed to int32 every 32 quads: |sum| <= 32 * 4 * 128).  One pass, no per-element code
// (the 4- and 8-row interleaves of pack_rcontig left W = 6 or 12 rows partly element by element).
template <int W>
static inline void pack_rcontig_narrow(const int8_t* src, int64_t sk, int64_t r0, int64_t rows, const I8Piece* pcs,
                                       int npcs, int32_t quads, int8_t* dst, uint32_t* rowsum, I8MinMax& mm) {
  static_assert(W >= 1 && W <= 16, "one xmm of rows");
  constexpr int LB = W <= 8 ? 8 : 16;  // bytes loaded per k row
  const int64_t panels = (rows + W - 1) / W;
  const __m128i x = _mm_set1_epi8(int8_t(0x80)), z = _mm_setzero_si128();
  __m128i umin = x, umax = x;  // biased 0
  auto load = [&](const int8_t* p, int n, bool full) {
    if (full) {
      if constexpr (LB == 8) return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      else return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    }
    alignas(16) int8_t t[16] = {};
    std::memcpy(t, p, size_t(n));
    return _mm_load_si128(reinterpret_cast<const __m128i*>(t));
  };
  int64_t qoff = 0;
  for (int pi = 0; pi < npcs; ++pi) {
    const I8Piece& pc = pcs[pi];
    for (int64_t pn = 0; pn < panels; ++pn) {
      const int64_t rb = pn * W;
      const int nvalid = int(std::min<int64_t>(W, rows - rb));
      const bool full = rb + LB <= rows;  // the wide load stays inside the tile's rows
      int8_t* d = dst + (pn * quads + qoff) * W * 4;
      alignas(16) int32_t sum[16] = {};
      __m128i slo = z, shi = z;
      auto flush = [&]() {
        alignas(16) int16_t h[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(h), slo);
        _mm_store_si128(reinterpret_cast<__m128i*>(h + 8), shi);
        for (int i = 0; i < W; ++i) sum[i] += h[i];
        slo = shi = z;
      };
      for (int32_t q = 0; q < pc.quads; ++q) {
        const int nk = std::min<int32_t>(4, pc.len - 4 * q);
        const int8_t* c0 = src + (pc.k_start + 4 * q) * sk + r0 + rb;
        __m128i v[4];
        for (int t = 0; t < 4; ++t) {
          v[t] = t < nk ? load(c0 + t * sk, nvalid, full) : z;
          const __m128i u = _mm_xor_si128(v[t], x);
          umin = _mm_min_epu8(umin, u);
          umax = _mm_max_epu8(umax, u);
          if (rowsum) {
            slo = _mm_add_epi16(slo, _mm_srai_epi16(_mm_unpacklo_epi8(v[t], v[t]), 8));
            if constexpr (W > 8) shi = _mm_add_epi16(shi, _mm_srai_epi16(_mm_unpackhi_epi8(v[t], v[t]), 8));
          }
        }
        const __m128i t0 = _mm_unpacklo_epi8(v[0], v[1]), t2 = _mm_unpacklo_epi8(v[2], v[3]);
        alignas(16) int8_t out[64];
        __m128i* o = reinterpret_cast<__m128i*>(out);
        _mm_store_si128(o + 0, _mm_unpacklo_epi16(t0, t2));
        _mm_store_si128(o + 1, _mm_unpackhi_epi16(t0, t2));
        if constexpr (W > 8) {
          const __m128i t1 = _mm_unpackhi_epi8(v[0], v[1]), t3 = _mm_unpackhi_epi8(v[2], v[3]);
          _mm_store_si128(o + 2, _mm_unpacklo_epi16(t1, t3));
          _mm_store_si128(o + 3, _mm_unpackhi_epi16(t1, t3));
        }
        std::memcpy(d + int64_t(q) * W * 4, out, size_t(W) * 4);
        if (rowsum && (q & 31) == 31) flush();
      }
      if (rowsum) {
        flush();
        uint32_t* rs = rowsum + (pn * npcs + pi) * W;
        for (int i = 0; i < W; ++i) rs[i] = i < nvalid ? uint32_t(sum[i]) * 128u : 0u;
      }
    }
    qoff += pc.quads;
  }
  fold_biased_minmax(umin, umax, mm);
}
#endif

template <int W, bool kShift>
static inline void pack_any(const int8_t* src, int64_t sr, int64_t sk, int64_t r0, int64_t rows, const I8Piece* pcs,
                            int npcs, int32_t quads, int8_t* dst, uint32_t* rowsum, I8MinMax& mm) {
  if (sk == 1) {
    pack_kcontig<W, kShift>(src, sr, r0, rows, pcs, npcs, quads, dst, rowsum, mm);
  } else {
#if defined(__SSE2__)
#if defined(__AVX512BW__)
    if constexpr (!kShift && 48 % W == 0) {
      pack_rcontig_narrow512<W>(src, sk, r0, rows, pcs, npcs, quads, dst, rowsum, mm);
      return;
    }
#endif
    if constexpr (!kShift && W <= 16) {
      pack_rcontig_narrow<W>(src, sk, r0, rows, pcs, npcs, quads, dst, rowsum, mm);
      return;
    }
#endif
    pack_rcontig<W, kShift>(src, sk, r0, rows, pcs, npcs, quads, dst, rowsum, mm);
  }
}

// as ukernel_simd.h: a compile-time loop keeps every accumulator index constant, so GCC keeps the
// MR x NV accumulators in registers.
template <class F, int... I>
static inline __attribute__((always_inline)) void i8_static_for_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
static inline __attribute__((always_inline)) void i8_static_for(F&& f) {
  i8_static_for_impl(f, std::make_integer_sequence<int, N>{});
}
#define JDFP_AI __attribute__((always_inline))

// Exponents of the blocks a kc block touches, for the tile's rows / columns (clamped), and per
// block whether the fast scale applies (fast_scale_block, gemm_common.h), and whether each
// micro-tile's rows share one exponent in it (uniform: HBFP's tiles; one scale per column then).
struct I8Exps {
  const int32_t* ea;  // [mbp][nblk] (row-major: the rows' exponents are contiguous in ea too)
  const int32_t* eb;  // [nblk][nbp]
  const float* pa;    // 2**ea, [mbp][nblk] (fast blocks)
  const float* pb;    // 2**eb, [nblk][nbp]
  const uint8_t* fast;
  const int32_t* uniform;
  int64_t ea_ld, eb_ld;  // nblk, nbp
};

// Micro-kernel arguments (one kc block of one MR x NR micro-tile).
struct UkI8Args {
  const I8Piece* pcs;
  int npcs;
  const uint32_t* comp;  // [npcs][MR]: 128 * row sums of A per piece (kShiftB only)
  int32_t* acc32;        // MR x NR: running int32 chain sums carried between kc blocks
  int64_t* acc64;        // MR x NR: int64 sums of blocks longer than one chain (rare)
  float* accf;           // MR x NR: the contract's acc carried between kc blocks (scaled kernel)
  bool first;            // first kc block: acc starts at +0.0
  float* C;              // null, or the last kc block's destination (row stride ldc)
  int64_t ldc;
  I8Exps ex;             // offset to this micro-tile's rows / columns
};

// kScaled: KB > 1 (acc += scale2(f(S_j), ea + eb), the float accumulators stay in registers for the
// kc block); otherwise KB == 1 (out = scale2(f(S), ea + eb), stored when the one block closes).
template <class V, int MR_, int NV, bool kScaled>
struct UkI8 {
  static constexpr int MR = MR_, L = V::kLanes, NR = L * NV;
  static constexpr bool kScaledKernel = kScaled;
  using vi = typename V::vi;
  using vf = typename V::vf;

  // kDirect false: Ap is the packed micro-panel (quad q of row i at Ap + (q * MR + i) * 4).
  // kDirect true: Ap is row 0 of k-contiguous A itself at the kc block's first k (quad q of row i at
  // Ap + i * rs + 4 * q): whole quads only, so every byte read is the operand's own; the
  // broadcast reads the quad where it is, which the packed panel only copied.
  template <bool kDirect>
  __attribute__((noinline)) static void kernel(const int8_t* Ap, const int8_t* Bp, const UkI8Args& args, int64_t rs_) {
    UkI8Args u;  // a local copy: the stores below cannot alias its fields
    copy_kernel_args(u, args);
    const int64_t rs = kDirect ? rs_ : 4;
    vf accf[MR][NV];
    if constexpr (kScaled) {
      i8_static_for<MR>([&](auto i) JDFP_AI {
        i8_static_for<NV>([&](auto v) JDFP_AI {
          accf[i][v] = u.first ? V::zerof() : V::loadf(u.accf + i * NR + v * L);
        });
      });
    }
    vi acc[MR][NV];
    for (int pi = 0; pi < u.npcs; ++pi) {
      const I8Piece& pc = u.pcs[pi];
      const uint8_t fl = pc.flags;
      i8_static_for<MR>([&](auto i) JDFP_AI {
        vi c0 = V::zero();
        if constexpr (V::kShiftB) c0 = V::bcast(int32_t(0u - u.comp[pi * MR + i]));
        i8_static_for<NV>([&](auto v) JDFP_AI {
          acc[i][v] = (fl & kI8ChainOpen) ? c0 : V::add(c0, V::load(u.acc32 + i * NR + v * L));
        });
      });
      for (int32_t q = 0; q < pc.quads; ++q) {
        vi b[NV];
        i8_static_for<NV>([&](auto v) JDFP_AI { b[v] = V::load(Bp + v * L * 4); });
        i8_static_for<MR>([&](auto i) JDFP_AI {
          const vi a = V::bcast(int32_t(ld_u32(Ap + i * rs)));
          i8_static_for<NV>([&](auto v) JDFP_AI { acc[i][v] = V::dp(acc[i][v], b[v], a); });
        });
        Ap += kDirect ? 4 : 4 * MR;
        Bp += 4 * NR;
      }
      if (!(fl & kI8ChainClose)) {  // the chain goes on in the next kc block
        i8_static_for<MR>([&](auto i) JDFP_AI {
          i8_static_for<NV>([&](auto v) JDFP_AI { V::store(u.acc32 + i * NR + v * L, acc[i][v]); });
        });
        continue;
      }
      if ((fl & kI8FirstChain) && (fl & kI8LastChain)) {
        // The chain is the whole block: its int32 sum is the block sum, f() is one cvtdq2ps.
        close_block(u, pc.bl, accf, [&](auto i, auto v) JDFP_AI { return V::cvt(acc[i][v]); });
      } else {
        long_block(u, pc, accf, acc);
      }
    }
    if constexpr (kScaled) {
      float* dst = u.C ? u.C : u.accf;
      const int64_t ld = u.C ? u.ldc : NR;
      i8_static_for<MR>([&](auto i) JDFP_AI {
        i8_static_for<NV>([&](auto v) JDFP_AI { V::storef(dst + i * ld + v * L, accf[i][v]); });
      });
    }
  }

  // A block of several chains (block_k > L, so only for K beyond ~133k at 8 bits): each chain's
  // exact int32 sum is added to the block's int64 sum; the closed block is rounded once.  Scalar:
  // it runs once per ~L products.
  // Inlined into both kernels: a call would take the accumulators' addresses and keep them in memory.
  static inline JDFP_AI void long_block(const UkI8Args& u, const I8Piece& pc, vf (&accf)[MR][NV], vi (&acc)[MR][NV]) {
    alignas(64) int32_t s32[MR * NR];
    alignas(64) float f[MR * NR];
    i8_static_for<MR>([&](auto i) JDFP_AI {
      i8_static_for<NV>([&](auto v) JDFP_AI { V::store(s32 + i * NR + v * L, acc[i][v]); });
    });
    const bool first = pc.flags & kI8FirstChain, last = pc.flags & kI8LastChain;
    for (int e = 0; e < MR * NR; ++e) {
      u.acc64[e] = (first ? 0 : u.acc64[e]) + s32[e];
      f[e] = i64_to_f32(u.acc64[e]);
    }
    if (last) close_block(u, pc.bl, accf, [&](auto i, auto v) JDFP_AI { return V::loadf(f + i * NR + v * L); });
  }

  // A block closes with f(S) = f_of(i, v): s = scale2(f, ea + eb); KB > 1 adds s to acc (one
  // rounding per add; -ffp-contract=off keeps the multiply and the add apart), KB == 1 stores it.
  template <class F>
  static inline JDFP_AI void close_block(const UkI8Args& u, int bl, vf (&accf)[MR][NV], F&& f_of) {
    const I8Exps& ex = u.ex;
    auto put = [&](auto i, auto v, vf s) JDFP_AI {
      if constexpr (kScaled) {
        accf[i][v] = V::addf(accf[i][v], s);
      } else {
        V::storef(u.C + i * u.ldc + v * L, s);
      }
    };
    if (ex.fast[bl]) {
      // f * s is exact here (fast_scale_block), so acc + f * s may be one fused multiply-add.
      auto put_fast = [&](auto i, auto v, vf f, vf sc) JDFP_AI {
        if constexpr (kScaled) {
          accf[i][v] = V::fmaf(f, sc, accf[i][v]);
        } else {
          V::storef(u.C + i * u.ldc + v * L, V::mulf(f, sc));
        }
      };
      vf pb[NV];
      i8_static_for<NV>([&](auto v) JDFP_AI { pb[v] = V::loadf(ex.pb + bl * ex.eb_ld + v * L); });
      if (ex.uniform[bl]) {
        const vf pa = V::bcastf(ex.pa[bl]);
        i8_static_for<NV>([&](auto v) JDFP_AI { pb[v] = V::mulf(pa, pb[v]); });
        i8_static_for<MR>([&](auto i) JDFP_AI {
          i8_static_for<NV>([&](auto v) JDFP_AI { put_fast(i, v, f_of(i, v), pb[v]); });
        });
        return;
      }
      i8_static_for<MR>([&](auto i) JDFP_AI {
        const vf pa = V::bcastf(ex.pa[i * ex.ea_ld + bl]);
        i8_static_for<NV>([&](auto v) JDFP_AI { put_fast(i, v, f_of(i, v), V::mulf(pa, pb[v])); });
      });
      return;
    }
    vi eb[NV];
    i8_static_for<NV>([&](auto v) JDFP_AI { eb[v] = V::load(ex.eb + bl * ex.eb_ld + v * L); });
    i8_static_for<MR>([&](auto i) JDFP_AI {
      const vi ea = V::bcast(ex.ea[i * ex.ea_ld + bl]);
      i8_static_for<NV>([&](auto v) JDFP_AI { put(i, v, V::scale2(f_of(i, v), V::add(ea, eb[v]))); });
    });
  }
};

// Per-thread scratch of run_tile_i8.
struct I8Scratch {
  I8Buf<int8_t> apack, bpack;
  I8Buf<uint32_t> comp;
  I8Buf<int32_t> ea, eb, acc32;
  I8Buf<float> pa, pb, accf;
  I8Buf<int64_t> acc64;
  I8Buf<uint8_t> fast;
  I8Buf<int32_t> uniform;
  std::vector<int32_t> amn, amx;  // per block of a kc block: min / max of the tile's A exponents
};

// Packed B of the tile's column range (all kc blocks), kept for the worker's next tile of the same
// call, batch element and columns (tiles run columns-outer): as gemm_driver.h's BCache.
struct I8BCache {
  uint64_t job = 0;
  int64_t batch = -1, n0 = -1, n1 = -1;
  I8Buf<int8_t> buf;
};
constexpr size_t kI8BCacheBytes = size_t(8) << 20;

// Packing A costs a pass over it for every tile; reading it in place costs strided loads from 12 rows
// in every B panel.  The pass wins above this many B panels per tile (measured on Zen 4 with
// 12 x 32 tiles: N = 64 / 128 ran 15-25 % faster in place, N = 512 some 10 % slower).
constexpr int64_t kI8DirectPanels = 4;

// A's part of one kc block of a tile (rows [m0, m0 + mb)): k-contiguous A in whole quads, used by at
// most kI8DirectPanels B panels, has its full micro-panels read in place (only scanned here for the
// range check and the row sums); the rest, or all of a transposed A, is packed into apk.  Returns the
// number of rows read in place, or -1 for a value outside [-qmax_a, qmax_a].
// A supplied by P.a_src (sr, sk: its view) is always packed.
template <int MR, int NR>
static inline int64_t prepare_a_i8(const ProblemI8& P, const int8_t* asrc, int64_t sr, int64_t sk, int64_t m0,
                                   int64_t mb, int64_t nbp, const I8Piece* pcs, int npcs, int32_t quads, int8_t* apk,
                                   uint32_t* comp) {
  bool in_place = sk == 1 && !P.a_src && nbp <= kI8DirectPanels * NR;
  for (int pi = 0; pi < npcs && in_place; ++pi) in_place = pc_whole(pcs[pi]);
  const int64_t mdir = in_place ? mb / MR * MR : 0;
  I8MinMax mm;
  if (mdir > 0) pack_kcontig<MR, false>(asrc, sr, m0, mdir, pcs, npcs, quads, nullptr, comp, mm);
  if (mdir < mb)
    pack_any<MR, false>(asrc, sr, sk, m0 + mdir, mb - mdir, pcs, npcs, quads, apk,
                        comp ? comp + mdir / MR * npcs * MR : nullptr, mm);
  return mm.ok(P.qmax_a) ? mdir : -1;
}

// NaN for NONFINITE exponents, zeros for K == 0 (as gemm_driver.h's tile_epilogue).
static inline void tile_epilogue_i8(const ProblemI8& P, const Tile& T, float* C, const int32_t* ea, const int32_t* eb,
                                    int64_t eb_j) {
  const int64_t nb = T.n1 - T.n0;
  const float qnan = __builtin_nanf("");
  thread_local std::vector<uint8_t> colbad;
  colbad.assign(size_t(nb), 0);
  for (int64_t j = 0; j < P.KB; ++j)
    for (int64_t n = 0; n < nb; ++n)
      if (eb[j * eb_j + (T.n0 + n) * P.eb_nstride] == kNonfiniteExponent) colbad[size_t(n)] = 1;
  for (int64_t m = T.m0; m < T.m1; ++m) {
    float* row = C + m * P.ldc + T.n0;
    bool bad = false;
    for (int64_t j = 0; j < P.KB; ++j) bad |= ea[m * P.ea_mstride + j] == kNonfiniteExponent;
    for (int64_t n = 0; n < nb; ++n) {
      if (P.K == 0) row[n] = 0.0f;
      if (bad || colbad[size_t(n)]) row[n] = qnan;
    }
  }
}

// The per-block exponent scratch of a tile with mbp x nbp padded rows and columns (tile_exponents').
static inline void size_exponent_scratch(const ProblemI8& P, int64_t mbp, int64_t nbp, I8Scratch& s) {
  s.ea.get(size_t(mbp) * P.max_nblk);
  s.pa.get(size_t(mbp) * P.max_nblk);
  s.eb.get(size_t(nbp) * P.max_nblk);
  s.pb.get(size_t(nbp) * P.max_nblk);
  s.fast.get(size_t(P.max_nblk));
  s.uniform.get(size_t(P.max_nblk));
  if (s.amn.size() < size_t(P.max_nblk)) s.amn.resize(size_t(P.max_nblk)), s.amx.resize(size_t(P.max_nblk));
}

// One output tile: for each kc block (increasing K) pack B (or reuse it) and A, then every micro-tile
// (NR panels outer: the B micro-panel stays in L1).  Returns 0, or 1 / 2 for an A / B value out of range.
template <class V, class UK>
int run_tile_i8(const ProblemI8& P, const Tile& T) {
  constexpr int MR = UK::MR, NR = UK::NR;
  constexpr bool kScaled = UK::kScaledKernel;
  thread_local I8Scratch s;
  thread_local I8BCache bc;
  const int64_t mb = T.m1 - T.m0, nb = T.n1 - T.n0;
  if (mb <= 0 || nb <= 0) return 0;
  const int64_t mbp = i8_round_up(mb, MR), nbp = i8_round_up(nb, NR);
  float* C = P.out + T.batch * P.M * P.N;
  const int32_t* ea = P.a_src ? P.a_src->exponents(T) : P.ea + P.ea_off[T.batch];
  const int32_t* eb = P.eb + P.eb_off[T.batch];
  const int64_t eb_j = P.eb_nstride ? P.N : 1;
  bool nonfinite = false;  // a NONFINITE exponent in the tile's rows / columns (checked while preparing them)
  if (P.K > 0) {
    const size_t btotal = size_t(nbp) * size_t(P.total_quads) * 4;
    const bool cache = P.job_id != 0 && mb < P.M && btotal <= kI8BCacheBytes;
    const bool hit = cache && bc.job == P.job_id && bc.batch == T.batch && bc.n0 == T.n0 && bc.n1 == T.n1;
    if (cache && !hit) {
      bc.job = 0;  // invalid until every kc block is packed and range-checked
      bc.buf.get(btotal);
    }
    int8_t* bpk = cache ? bc.buf.p : s.bpack.get(size_t(nbp) * P.max_quads * 4);
    int8_t* apk = s.apack.get(size_t(mbp) * P.max_quads * 4);
    uint32_t* comp = s.comp.get(size_t(mbp) * P.max_pieces);
    const size_t nacc = size_t(mbp) * size_t(nbp);
    int32_t* acc32 = s.acc32.get(nacc);
    int64_t* acc64 = s.acc64.get(nacc);
    float* accf = kScaled ? s.accf.get(nacc) : nullptr;
    size_exponent_scratch(P, mbp, nbp, s);
    const int8_t* asrc = P.a_src ? nullptr : P.a + P.a_off[T.batch];
    const int8_t* bsrc = P.b + P.b_off[T.batch];
    for (int64_t kbi = 0; kbi < P.nkcb; ++kbi) {
      const I8KcBlock& kb = P.kcb[kbi];
      const I8Piece* pcs = P.pieces + kb.piece_begin;
      const int npcs = kb.piece_end - kb.piece_begin;
      if (!hit) {
        I8MinMax mm;
        pack_any<NR, V::kShiftB>(bsrc, P.b_sr, P.b_sk, T.n0, nb, pcs, npcs, kb.quads, bpk, nullptr, mm);
        if (!mm.ok(P.qmax_b)) return 2;
      }
      int64_t a_sr = P.a_sr, a_sk = P.a_sk;
      if (P.a_src) {
        const I8Piece& last = pcs[npcs - 1];
        asrc = P.a_src->rows(T, pcs[0].k_start, last.k_start + last.len, a_sr, a_sk);
      }
      const int64_t mdir = prepare_a_i8<MR, NR>(P, asrc, a_sr, a_sk, T.m0, mb, nbp, pcs, npcs, kb.quads, apk,
                                               V::kShiftB ? comp : nullptr);
      if (mdir < 0) return 1;
      const int8_t* adir = asrc + T.m0 * P.a_sr + pcs[0].k_start;
      nonfinite |= tile_exponents(ea, P.ea_mstride, T.m0, mb, mbp, eb, eb_j, P.eb_nstride, T.n0, nb, nbp,
                                  kb.blk_first, kb.nblk, MR,
                                  {s.ea.p, s.pa.p, s.eb.p, s.pb.p, s.fast.p, s.uniform.p, s.amn.data(), s.amx.data()});
      const bool last = kbi == P.nkcb - 1;
      UkI8Args u{};
      u.pcs = pcs;
      u.npcs = npcs;
      u.first = kbi == 0;
      int64_t t = 0;
      for (int64_t jr = 0; jr < nbp; jr += NR) {
        const int8_t* bpanel = bpk + jr * kb.quads * 4;
        const int nv = int(std::min<int64_t>(NR, nb - jr));
        for (int64_t ir = 0; ir < mbp; ir += MR, t += MR * NR) {
          const int mv = int(std::min<int64_t>(MR, mb - ir));
          float* cdst = C + (T.m0 + ir) * P.ldc + T.n0 + jr;
          u.comp = comp + (ir / MR) * npcs * MR;
          u.acc32 = acc32 + t;
          u.acc64 = acc64 + t;
          u.accf = kScaled ? accf + t : nullptr;
          u.ex = I8Exps{s.ea.p + ir * kb.nblk, s.eb.p + jr, s.pa.p + ir * kb.nblk, s.pb.p + jr, s.fast.p, s.uniform.p,
                        kb.nblk, nbp};
          alignas(64) float edge[MR * NR];
          const bool direct = mv == MR && nv == NR;
          u.C = last ? (direct ? cdst : edge) : nullptr;
          u.ldc = direct ? P.ldc : NR;
          if (ir < mdir) {
            UK::template kernel<true>(adir + ir * P.a_sr, bpanel, u, P.a_sr);
          } else {
            UK::template kernel<false>(apk + (ir - mdir) * kb.quads * 4, bpanel, u, 4);
          }
          if (last && !direct)
            for (int i = 0; i < mv; ++i)
              for (int j = 0; j < nv; ++j) cdst[i * P.ldc + j] = edge[i * NR + j];
        }
      }
      if (cache) bpk += size_t(nbp) * kb.quads * 4;
    }
    if (cache && !hit) {
      bc.job = P.job_id;
      bc.batch = T.batch;
      bc.n0 = T.n0;
      bc.n1 = T.n1;
    }
  }
  if (P.K == 0 || nonfinite) tile_epilogue_i8(P, T, C, ea, eb, eb_j);
  return 0;
}

// The ISA's tile function: the KB == 1 kernel (UK1) or the KB > 1 one (UKS, same NR; its MR
// divides UK1's, so the tiles' row ranges, multiples of UK1::MR, suit both).
template <class V, class UK1, class UKS>
int tile_i8(const ProblemI8& P, const Tile& T) {
  static_assert(UK1::NR == UKS::NR && UK1::MR % UKS::MR == 0, "micro-tiles");
  return P.KB == 1 ? run_tile_i8<V, UK1>(P, T) : run_tile_i8<V, UKS>(P, T);
}

}  // namespace
}  // namespace jdfp
