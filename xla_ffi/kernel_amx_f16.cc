// FP16 GEMM on AMX-BF16 tiles (docs/arithmetic.md, "The FP16 GEMM on AMX-BF16 tiles"): the FP16
// recipe's dots, float16 operands, float32 accumulation.
//
// The tiles multiply bfloat16 pairs only (tdpbf16ps: 16 x 16 x 32 products into float32).  A float16
// value has 11 significand bits, a bfloat16 8, so each finite x is split exactly as x = hi + lo:
// hi = x rounded to bfloat16 (nearest even), lo = x - hi (a multiple of x's float16 ulp below half a
// bfloat16 ulp: at most 3 significant bits, exact in bfloat16; every split value is a normal bfloat16
// or zero, since |x| >= 2**-24).  Then a * b = ah bh + al bl + ah bl + al bh, four exact products,
// taken as two tdpbf16ps per 16 k: A' holds (ah, al) pairs, B' (bh, bl) pairs and B'' (bl, bh) pairs
// along k, so A'.B' + A'.B'' = sum over k of a * b with every product exact.  The sums are float32
// in the tile unit's own order (not the vdpbf16ps chain: measured, it matches no sequential-rounding
// model); the error bound is that of float32 sums (tests/ffi/test_gemm_f16_amx.py checks it).  An
// output whose row of A or column of B holds a NaN or Inf is recomputed as a float32 dot in k order
// (ieee_dot): Inf where IEEE says Inf, not the NaN of the split's Inf * 0 cross products.
//
// Convolutions (one group) never store their patch matrix: the forward gathers its rows while
// packing (from the input split once where taps re-read it: split_input), or, at stride 1, its A tiles
// read their rows in place from a zero-padded split copy (tile_direct); weight gradients pack both
// operands a K chunk at a time per worker.
//
// Plain bfloat16 operands (Bf16Problem::amx_plain: the BF16 recipe's convolutions, isa amx_bf16) take
// the same tiles, panels and K chunks without the split: one tdpbf16ps per 32 k, each 32-bit word a
// k pair (x[k] | x[k + 1] << 16) as the tiles read them.  Every product is exact; the float32 sums are
// the tile unit's, as above.  NaN and Inf follow IEEE in the tiles (no split: no spurious NaN), and
// subnormal bfloat16 inputs read as zero, as XLA:CPU's float32 conv reads them (DAZ).
//
// Layouts (bf16 pairs as 32-bit words, K padded with zeros to a multiple of 16 and rows / columns to
// multiples of 32):
//   A panel: [row block of 16][k step][16 rows][16 k words (hi | lo << 16)]
//   B panel: [col block of 16][k step][B' | B''][16 k][16 col words]
// Output blocks of 32 x 32 (four accumulator tiles), K in chunks.  Each 32-row pair of A and 32-column
// pair of B is packed once per call by the first worker that needs it, into a buffer all workers
// read (f16_make_panels): the split costs about as much per element as a few k steps of products, so
// packing per tile (A once per column tile, B once per worker) took a quarter of the time.
#include <immintrin.h>

#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

#include "amx_common.h"
#include "gemm_bf16.h"

namespace jdfp {
namespace {

using namespace amx;

constexpr int kWords = 256;           // one 16 x 16-word tile
constexpr int kBStep = 2 * kWords;    // B' and B'' of one 16-k step of one column block
constexpr int64_t kKcSteps = 32;      // k steps per K chunk (512 k)

// 16 float16 values (as float32) -> the words (hi | lo << 16) and (lo | hi << 16).
struct Split {
  __m512i hl, lh;
  __mmask16 bad;  // lanes holding NaN or Inf
};

static inline Split split16(__m512 x) {
  // hi = x rounded to bfloat16, nearest even (vcvtneps2bf16: the largest float16 rounds to 65536, no
  // overflow; a NaN comes out quiet; no float16 is a float32 subnormal, so its DAZ / FTZ never act).
  const __m512i hb = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x));  // hi's bits, zero-extended
  const __m512i hf = _mm512_slli_epi32(hb, 16);                               // hi as float32
  // lo = x - hi: exact, its low 16 bits 0 (so its float32 bits are its bfloat16 << 16); 0 where x is
  // NaN or Inf (hi is then x itself).
  const __mmask16 bad = _mm512_fpclass_ps_mask(x, 0x99);  // QNaN | SNaN | +Inf | -Inf
  const __m512i lo = _mm512_castps_si512(_mm512_maskz_sub_ps(__mmask16(~bad), x, _mm512_castsi512_ps(hf)));
  return {_mm512_or_si512(hb, lo), _mm512_or_si512(_mm512_srli_epi32(lo, 16), hf), bad};
}

// Up to 16 float16 values at p[i * stride], i < n (zeros past n), as float32.
static inline __m512 load16(const uint16_t* p, int64_t stride, int n) {
  if (n <= 0) return _mm512_setzero_ps();
  if (stride == 1) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(n), p));
  alignas(32) uint16_t t[16] = {};
  for (int i = 0; i < n; ++i) t[i] = p[i * stride];
  return _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(t)));
}

// 16 x 16 transpose of 32-bit words.
static inline void transpose_words(const uint32_t* src, uint32_t* dst) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) dst[c * 16 + r] = src[r * 16 + c];
}

// X[r, k] = src[r * sr + k * sk] for rows [0, rows), K columns: a float16 operand view.
struct View {
  const uint16_t* src;
  int64_t sr, sk, rows, K;
};

// The A panel of rows [0, rows) of x: per 16-row block and 16-k step, 16 rows of 16 (hi | lo) words.
// bad[r] |= 1 where row r holds a NaN or Inf.
static void pack_a(const View& x, uint32_t* dst, uint8_t* bad) {
  const int64_t nsteps = (x.K + 15) / 16, nblocks = (x.rows + 31) / 32 * 2;
  alignas(64) uint32_t tmp[kWords];
  for (int64_t rb = 0; rb < nblocks; ++rb) {
    const int rn = int(std::clamp<int64_t>(x.rows - rb * 16, 0, 16));
    uint32_t rows_bad = 0;
    for (int64_t s = 0; s < nsteps; ++s) {
      uint32_t* d = dst + (rb * nsteps + s) * kWords;
      const int kn = int(std::min<int64_t>(16, x.K - s * 16));
      if (x.sk == 1 || x.sr != 1) {  // along k per row
        for (int r = 0; r < 16; ++r) {
          const Split sp = split16(load16(x.src + (rb * 16 + r) * x.sr + s * 16 * x.sk, x.sk, r < rn ? kn : 0));
          _mm512_store_si512(d + r * 16, sp.hl);
          rows_bad |= uint32_t(sp.bad != 0) << r;
        }
      } else {  // rows contiguous: along the rows per k, then transposed
        for (int k = 0; k < 16; ++k) {
          const Split sp = split16(load16(x.src + rb * 16 + (s * 16 + k) * x.sk, 1, k < kn ? rn : 0));
          _mm512_store_si512(tmp + k * 16, sp.hl);
          rows_bad |= sp.bad;
        }
        transpose_words(tmp, d);
      }
    }
    for (int r = 0; r < rn; ++r) bad[rb * 16 + r] |= (rows_bad >> r) & 1;
  }
}

// The B panel of columns [0, rows) of x (x[n, k] = B[k, n]): per 16-column block and 16-k step, B'
// then B'', each 16 k rows of 16 column words.  bad[c] = 1 where column c holds a NaN or Inf.
static void pack_b(const View& x, uint32_t* dst, uint8_t* bad) {
  const int64_t nsteps = (x.K + 15) / 16, nblocks = (x.rows + 31) / 32 * 2;
  alignas(64) uint32_t t1[kWords], t2[kWords];
  for (int64_t cb = 0; cb < nblocks; ++cb) {
    const int cn = int(std::clamp<int64_t>(x.rows - cb * 16, 0, 16));
    uint32_t cols_bad = 0;
    for (int64_t s = 0; s < nsteps; ++s) {
      uint32_t* d = dst + (cb * nsteps + s) * kBStep;
      const int kn = int(std::min<int64_t>(16, x.K - s * 16));
      if (x.sr == 1 || x.sk != 1) {  // columns contiguous along a k row
        for (int k = 0; k < 16; ++k) {
          const Split sp = split16(load16(x.src + cb * 16 * x.sr + (s * 16 + k) * x.sk, x.sr, k < kn ? cn : 0));
          _mm512_store_si512(d + k * 16, sp.hl);
          _mm512_store_si512(d + kWords + k * 16, sp.lh);
          cols_bad |= sp.bad;
        }
      } else {  // k contiguous per column: per column, then transposed
        for (int c = 0; c < 16; ++c) {
          const Split sp = split16(load16(x.src + (cb * 16 + c) * x.sr + s * 16, 1, c < cn ? kn : 0));
          _mm512_store_si512(t1 + c * 16, sp.hl);
          _mm512_store_si512(t2 + c * 16, sp.lh);
          cols_bad |= uint32_t(sp.bad != 0) << c;
        }
        transpose_words(t1, d);
        transpose_words(t2, d + kWords);
      }
    }
    for (int c = 0; c < cn; ++c) bad[cb * 16 + c] = (cols_bad >> c) & 1;
  }
}

// Convolutions (Bf16Problem::conv, one group): the patch matrix gathered from the float16 input x by
// patch_row (amx_common.h).

// One element [pixel, c0] of the patch matrix (the IEEE re-computation's reads).
static inline uint16_t patch_at(const uint16_t* x, const ConvGeom& g, int64_t pixel, int64_t c0) {
  uint16_t v;
  patch_row(x, g, PixCursor(g, pixel), patch_col(g, c0), 1, &v);
  return v;
}

// The A panel of pixels [r0, r0 + rows) of the patch matrix (forward, backward-data): as pack_a.
static void pack_a_patches(const uint16_t* x, const ConvGeom& g, int64_t r0, int64_t rows, int64_t K,
                           uint32_t* dst, uint8_t* bad) {
  const int64_t nsteps = (K + 15) / 16;
  thread_local Aligned<uint16_t> rowbuf;
  uint16_t* row = rowbuf.get(size_t(nsteps * 16));
  PixCursor px(g, r0);  // consecutive pixels: one set of divisions per panel
  const PatchCol first = patch_col(g, 0);
  for (int r = 0; r < 32; ++r) {
    if (r < rows) {
      patch_row(x, g, px, first, K, row);
      px.next(g);
      std::memset(row + K, 0, size_t(nsteps * 16 - K) * 2);
    } else {
      std::memset(row, 0, size_t(nsteps * 16) * 2);
    }
    uint32_t* d = dst + (r / 16) * nsteps * kWords + (r % 16) * 16;
    __mmask16 any = 0;
    for (int64_t s = 0; s < nsteps; ++s) {
      const Split sp = split16(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(row + s * 16))));
      _mm512_store_si512(d + s * kWords, sp.hl);
      any |= sp.bad;
    }
    if (r < rows) bad[r] = any != 0;
  }
}

// The A panel of pixels [r0, r0 + rows) of the patch matrix from xw, the input already split into
// (hi | lo << 16) words (split_input): each row's words gathered whole, then its 16-k steps moved as
// they lie.  A word whose hi is NaN or Inf (bfloat16 exponent all ones) marks its row bad.
static void pack_a_patches_words(const uint32_t* xw, const ConvGeom& g, int64_t r0, int64_t rows, int64_t K,
                                 uint32_t* dst, uint8_t* bad) {
  const int64_t nsteps = (K + 15) / 16;
  thread_local Aligned<uint32_t> rowbuf;
  uint32_t* row = rowbuf.get(size_t(nsteps * 16));
  PixCursor px(g, r0);
  const PatchCol first = patch_col(g, 0);
  const __m512i expo = _mm512_set1_epi32(0x7F80);
  // Taps whose channel runs are whole 16-k steps (cg a multiple of 16): each step moved straight from
  // xw into the panel, no row buffer.
  const bool whole_steps = g.cg % 16 == 0, no_ldil = g.ldil[0] == 1 && g.ldil[1] == 1 && g.ldil[2] == 1;
  for (int r = 0; r < 32; ++r) {
    uint32_t* d = dst + (r / 16) * nsteps * kWords + (r % 16) * 16;
    if (r >= rows) {
      for (int64_t s = 0; s < nsteps; ++s) _mm512_store_si512(d + s * kWords, _mm512_setzero_si512());
      continue;
    }
    if (whole_steps) {
      __mmask16 any = 0;
      int64_t s = 0;
      auto put = [&](int64_t off) {  // one tap's channel run (off < 0: padding)
        for (int64_t c = 0; c < g.cg; c += 16, ++s) {
          const __m512i w = off < 0 ? _mm512_setzero_si512() : _mm512_loadu_si512(xw + off + c);
          any |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(w, expo), expo);
          _mm512_store_si512(d + s * kWords, w);
        }
      };
      if (no_ldil) {  // positions stepped per tap instead of conv_pixel_offset's per-dim divisions
        int64_t base[3];
        for (int k = 0; k < 3; ++k) base[k] = px.o[k] * g.stride[k] - g.pad[k];
        for (int64_t t0 = 0; t0 < g.ks[0]; ++t0) {
          const int64_t p0 = base[0] + t0 * g.rdil[0];
          const bool in0 = p0 >= 0 && p0 < g.in[0];
          for (int64_t t1 = 0; t1 < g.ks[1]; ++t1) {
            const int64_t p1 = base[1] + t1 * g.rdil[1];
            const bool in1 = in0 && p1 >= 0 && p1 < g.in[1];
            const int64_t row01 = ((px.n * g.in[0] + p0) * g.in[1] + p1) * g.in[2];
            for (int64_t t2 = 0; t2 < g.ks[2]; ++t2) {
              const int64_t p2 = base[2] + t2 * g.rdil[2];
              put(in1 && p2 >= 0 && p2 < g.in[2] ? (row01 + p2) * g.C : -1);
            }
          }
        }
      } else {
        int64_t t[3] = {0, 0, 0};
        for (int64_t tap = 0; tap < g.ntaps; ++tap) {
          put(conv_pixel_offset(g, px.n, px.o, t));
          if (++t[2] == g.ks[2]) {
            t[2] = 0;
            if (++t[1] == g.ks[1]) t[1] = 0, ++t[0];
          }
        }
      }
      px.next(g);
      bad[r] |= any != 0;
      continue;
    }
    patch_row(xw, g, px, first, K, row);
    px.next(g);
    std::memset(row + K, 0, size_t(nsteps * 16 - K) * 4);
    __mmask16 any = 0;
    for (int64_t s = 0; s < nsteps; ++s) {
      const __m512i w = _mm512_load_si512(row + s * 16);
      any |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(w, expo), expo);
      _mm512_store_si512(d + s * kWords, w);
    }
    bad[r] |= any != 0;
  }
}

// The B panel of columns [n0, n0 + cols) of the patch matrix with pixels [k0, k0 + K) as k (the
// weight-gradient's K chunk): as pack_b.  bad[c] |= 1 where column c holds a NaN or Inf.
static void pack_b_patches(const uint16_t* x, const ConvGeom& g, int64_t n0, int64_t cols, int64_t k0, int64_t K,
                           uint32_t* dst, uint8_t* bad) {
  const int64_t nsteps = (K + 15) / 16;
  alignas(64) uint16_t row[32];
  uint32_t cols_bad = 0;
  PixCursor px(g, k0);  // then the pixels in order: no divisions per pixel
  const PatchCol first = patch_col(g, n0);
  for (int64_t k = 0; k < nsteps * 16; ++k) {
    _mm512_store_si512(row, _mm512_setzero_si512());
    if (k < K) {
      patch_row(x, g, px, first, cols, row);
      px.next(g);
    }
    const int64_t s = k / 16, kr = k % 16;
    for (int cb = 0; cb < 2; ++cb) {
      const Split sp = split16(_mm512_cvtph_ps(_mm256_load_si256((const __m256i*)(row + 16 * cb))));
      uint32_t* d = dst + (cb * nsteps + s) * kBStep + kr * 16;
      _mm512_store_si512(d, sp.hl);
      _mm512_store_si512(d + kWords, sp.lh);
      cols_bad |= uint32_t(sp.bad) << (16 * cb);
    }
  }
  for (int c = 0; c < cols; ++c) bad[c] |= (cols_bad >> c) & 1;
}

// ---- plain bfloat16 (amx_plain): a step is 32 k, a word a k pair; B has one tile per step.

// Word l of 16 = (lo[l] | hi[l] << 16) from two rows of 16 bfloat16.
static inline __m512i pair_words(__m256i lo, __m256i hi) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
}

static inline __mmask32 first_halves(int64_t n) {
  return n >= 32 ? ~__mmask32(0) : n <= 0 ? __mmask32(0) : (__mmask32(1) << n) - 1;
}

// Up to 16 bfloat16 at p[i * stride], i < n (zeros past n).
static inline __m256i load16_bf(const uint16_t* p, int64_t stride, int n) {
  if (n <= 0) return _mm256_setzero_si256();
  if (stride == 1) return _mm256_maskz_loadu_epi16(first_lanes(n), p);
  alignas(32) uint16_t t[16] = {};
  for (int i = 0; i < n; ++i) t[i] = p[i * stride];
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
}

// One 16-line block (lines [l0, l0 + ln) of x, zeros past ln) and 32-k step s of x as 16 x 16 words,
// each a k pair: line-major ([line][pair]: an A tile) or pair-major ([pair][line]: a B tile).  Lines
// along k (sk == 1) load line-major, others a pair at a time across the lines; a transpose where the
// load's orientation is not the tile's.
static void plain_step(const View& x, int64_t l0, int ln, int64_t s, bool line_major, uint32_t* d, uint32_t* tmp) {
  const bool along_k = x.sk == 1;
  uint32_t* w = along_k == line_major ? d : tmp;
  if (along_k) {  // a line's 32 k are its 16 words as they lie
    const __mmask32 m = first_halves(x.K - s * 32);
    for (int l = 0; l < 16; ++l)
      _mm512_store_si512(w + l * 16, l < ln ? _mm512_maskz_loadu_epi16(m, x.src + (l0 + l) * x.sr + s * 32)
                                            : _mm512_setzero_si512());
  } else {
    for (int p = 0; p < 16; ++p) {
      const int64_t k0 = s * 32 + 2 * p;
      const __m256i lo = load16_bf(x.src + l0 * x.sr + k0 * x.sk, x.sr, k0 < x.K ? ln : 0);
      const __m256i hi = load16_bf(x.src + l0 * x.sr + (k0 + 1) * x.sk, x.sr, k0 + 1 < x.K ? ln : 0);
      _mm512_store_si512(w + p * 16, pair_words(lo, hi));
    }
  }
  if (w == tmp) transpose_words(tmp, d);
}

// The A panel (line_major: rows of A) or B panel (columns of B, x[n, k] = B[k, n]) of lines [0, rows)
// of x: per 16-line block and 32-k step, one tile of k-pair words.
static void pack_plain(const View& x, uint32_t* dst, bool line_major) {
  const int64_t nsteps = (x.K + 31) / 32, nblocks = (x.rows + 31) / 32 * 2;
  alignas(64) uint32_t tmp[kWords];
  for (int64_t lb = 0; lb < nblocks; ++lb) {
    const int ln = int(std::clamp<int64_t>(x.rows - lb * 16, 0, 16));
    for (int64_t s = 0; s < nsteps; ++s) plain_step(x, lb * 16, ln, s, line_major, dst + (lb * nsteps + s) * kWords, tmp);
  }
}

// The A panel of pixels [r0, r0 + rows) of the patch matrix: each row gathered whole, its 32-k steps
// copied as they lie.
static void pack_a_patches_plain(const uint16_t* x, const ConvGeom& g, int64_t r0, int64_t rows, int64_t K,
                                 uint32_t* dst) {
  const int64_t nsteps = (K + 31) / 32;
  thread_local Aligned<uint16_t> rowbuf;
  uint16_t* row = rowbuf.get(size_t(nsteps * 32));
  PixCursor px(g, r0);
  const PatchCol first = patch_col(g, 0);
  for (int r = 0; r < 32; ++r) {
    uint32_t* d = dst + (r / 16) * nsteps * kWords + (r % 16) * 16;
    if (r >= rows) {
      for (int64_t s = 0; s < nsteps; ++s) _mm512_store_si512(d + s * kWords, _mm512_setzero_si512());
      continue;
    }
    patch_row(x, g, px, first, K, row);
    px.next(g);
    std::memset(row + K, 0, size_t(nsteps * 32 - K) * 2);
    for (int64_t s = 0; s < nsteps; ++s) _mm512_store_si512(d + s * kWords, _mm512_load_si512(row + s * 32));
  }
}

// The B panel of columns [n0, n0 + cols) of the patch matrix with pixels [k0, k0 + K) as k (the
// weight-gradient's K chunk): two pixels' rows per k pair.
static void pack_b_patches_plain(const uint16_t* x, const ConvGeom& g, int64_t n0, int64_t cols, int64_t k0,
                                 int64_t K, uint32_t* dst) {
  const int64_t nsteps = (K + 31) / 32;
  alignas(64) uint16_t row[2][32];
  PixCursor px(g, k0);
  const PatchCol first = patch_col(g, n0);
  for (int64_t k = 0; k < nsteps * 32; k += 2) {
    for (int h = 0; h < 2; ++h) {
      _mm512_store_si512(row[h], _mm512_setzero_si512());
      if (k + h < K) {
        patch_row(x, g, px, first, cols, row[h]);
        px.next(g);
      }
    }
    const int64_t s = k / 32, p = (k % 32) / 2;
    for (int cb = 0; cb < 2; ++cb) {
      const __m256i lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(row[0] + 16 * cb));
      const __m256i hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(row[1] + 16 * cb));
      _mm512_store_si512(dst + (cb * nsteps + s) * kWords + p * 16, pair_words(lo, hi));
    }
  }
}

// acc[32 x 32] (+)= row blocks (a0, a1) x column blocks (b0, b1) over nsteps k steps: from zero when
// `first`, else from acc (float32 in memory between K chunks: exact, so chunking changes no bit).
// Step s's A tiles are at a0 + astep(s) and a1 + astep(s), their rows lda bytes apart (a packed panel:
// s * kWords and 64; tile_direct: the padded input in place).
// Split: float16 pieces (B' and B'' per step, kBStep words); else plain bfloat16 (one B tile a step).
template <bool Split, class AStep>
static inline void block32(const uint32_t* a0, const uint32_t* a1, int64_t lda, AStep astep, const uint32_t* b0,
                           const uint32_t* b1, int64_t nsteps, bool first, float* acc) {
  constexpr int64_t bstep = Split ? kBStep : kWords;
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, acc, 128);
    _tile_loadd(1, acc + 16, 128);
    _tile_loadd(2, acc + 512, 128);
    _tile_loadd(3, acc + 528, 128);
  }
  for (int64_t s = 0; s < nsteps; ++s, b0 += bstep, b1 += bstep) {
    // B' of both column blocks, then B'': four products between two into one accumulator, which
    // covers tdpbf16ps's latency (back to back into one tile ran ~1.3x slower).
    _tile_loadd(4, a0 + astep(s), lda);
    _tile_loadd(5, a1 + astep(s), lda);
    _tile_loadd(6, b0, 64);
    _tile_loadd(7, b1, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
    if constexpr (!Split) continue;
    _tile_loadd(6, b0 + kWords, 64);
    _tile_loadd(7, b1 + kWords, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, acc, 128);
  _tile_stored(1, acc + 16, 128);
  _tile_stored(2, acc + 512, 128);
  _tile_stored(3, acc + 528, 128);
}

// A packed panel's steps: kWords apart, rows 64 bytes apart.
static inline int64_t panel_step(int64_t s) { return s * kWords; }

}  // namespace

namespace {

// Packed-operand buffers kept for the next call (a few, so that a step's GEMMs of different sizes
// do not fault fresh pages in every time).
class BufferPool {
 public:
  static BufferPool& get() {
    static BufferPool* pool = new BufferPool;  // never destroyed: workers may return buffers late
    return *pool;
  }
  uint32_t* take(size_t words, size_t& got) {
    std::lock_guard<std::mutex> lock(mu_);
    size_t best = free_.size();
    for (size_t i = 0; i < free_.size(); ++i)
      if (free_[i].second >= words && (best == free_.size() || free_[i].second < free_[best].second)) best = i;
    if (best < free_.size()) {
      auto [p, n] = free_[best];
      free_.erase(free_.begin() + std::ptrdiff_t(best));
      got = n;
      return p;
    }
    got = words;
    return static_cast<uint32_t*>(std::aligned_alloc(64, (words * 4 + 63) / 64 * 64));
  }
  void give(uint32_t* p, size_t words) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.emplace_back(p, words);
    if (free_.size() > kKeep) {  // drop the smallest
      auto it = std::min_element(free_.begin(), free_.end(), [](auto& x, auto& y) { return x.second < y.second; });
      std::free(it->first);
      free_.erase(it);
    }
  }

 private:
  static constexpr size_t kKeep = 4;
  std::mutex mu_;
  std::vector<std::pair<uint32_t*, size_t>> free_;
};

struct Panels {
  int64_t nsteps = 0, mpairs = 0, npairs = 0;
  bool streamed = false;  // a conv's weight gradient: no shared panels (tile_amx packs per K chunk)
  size_t a_pair = 0, b_pair = 0;  // words per packed row pair / column pair
  uint32_t* a = nullptr;
  uint32_t* b = nullptr;
  size_t words = 0;
  std::unique_ptr<std::atomic<uint8_t>[]> a_state, b_state;  // 0 not packed, 1 packing, 2 ready
  std::unique_ptr<uint8_t[]> a_bad, b_bad;  // per row of A / column of B: holds a NaN or Inf
  // A float16 conv that reads each input element several times (3x3 stride 1: 9) splits its input
  // once into xw, by parts that the workers claim (split_input), and gathers patch rows of words.
  uint32_t* xw = nullptr;
  size_t xw_words = 0;
  int64_t xs_parts = 0;
  std::atomic<int64_t> xs_next{0}, xs_done{0};
  // The direct forward (tile_direct): xw is the input zero padded to pe[] pixels per spatial dim
  // (vrows padded pixels, then `tail` rows of zeros that the last blocks' taps read), and the tiles'
  // A rows are read from it in place.  x_bad: the input holds a NaN or Inf (set by split_padded).
  bool direct = false;
  int64_t pe[3] = {1, 1, 1}, vrows = 0, tail = 0, rows_per_part = 0;
  std::atomic<uint8_t> x_bad{0};
  ~Panels() {
    if (a) BufferPool::get().give(a, words);
    if (xw) BufferPool::get().give(xw, xw_words);
  }
};

// The panel at p once it is packed: packed here by the first caller, waited for by the others.
template <class Pack>
const uint32_t* ready(std::atomic<uint8_t>& state, uint32_t* p, Pack&& pack) {
  if (state.load(std::memory_order_acquire) == 2) return p;
  uint8_t none = 0;
  if (state.compare_exchange_strong(none, 1, std::memory_order_acq_rel)) {
    pack(p);
    state.store(2, std::memory_order_release);
    return p;
  }
  for (int spins = 0; state.load(std::memory_order_acquire) != 2; ++spins) {
    if (spins < 256) _mm_pause();
    else std::this_thread::yield();
  }
  return p;
}

}  // namespace

namespace {

// Whether any of the n <= 32 flags at p is set.
inline bool any_set(const uint8_t* p, int n) {
  return _mm256_test_epi8_mask(_mm256_maskz_loadu_epi8(first_halves(n), p), _mm256_set1_epi8(1)) != 0;
}

float h2f(uint16_t h) { return _mm512_cvtss_f32(_mm512_cvtph_ps(_mm256_set1_epi16(short(h)))); }

// out[m, n] where row m of A or column n of B holds a NaN or Inf: the float32 dot in k order, whose
// IEEE rules say Inf (Inf times a nonzero finite) or NaN (a NaN, Inf * 0, Inf - Inf), as XLA's FP32
// dot of the widened operands does.  The split would read Inf * x as Inf * hi + Inf * lo, NaN where
// lo is 0.  Rare (a loss-scale overflow), so element by element.
float ieee_dot(const Bf16Problem& P, const uint16_t* a, const uint16_t* b, int64_t m, int64_t n) {
  float acc = 0.0f;
  for (int64_t k = 0; k < P.K; ++k) {
    const uint16_t x = P.conv && !P.conv->on_b ? patch_at(a, *P.conv, m, k) : a[m * P.a_sm + k * P.a_sk];
    const uint16_t y = P.conv && P.conv->on_b ? patch_at(b, *P.conv, k, n) : b[k * P.b_sk + n * P.b_sn];
    acc += h2f(x) * h2f(y);
  }
  return acc;
}

}  // namespace

namespace {

constexpr int64_t kSplitPart = 16384;  // elements per claimed part of split_input

// Until every part of the input's split is done (by this worker or the others).
void wait_parts(const Panels& S) {
  for (int spins = 0; S.xs_done.load(std::memory_order_acquire) < S.xs_parts; ++spins) {
    if (spins < 256) _mm_pause();
    else std::this_thread::yield();
  }
}

// xw = the split words (hi | lo << 16) of every element of the conv input x: parts claimed by whichever
// workers arrive, then each waits until all are done.
void split_input(Panels& S, const uint16_t* x, int64_t nelem) {
  for (int64_t p; (p = S.xs_next.fetch_add(1, std::memory_order_relaxed)) < S.xs_parts;) {
    const int64_t e1 = std::min(nelem, (p + 1) * kSplitPart);
    for (int64_t e = p * kSplitPart; e < e1; e += 16) {
      const int n = int(std::min<int64_t>(16, e1 - e));
      _mm512_mask_storeu_epi32(S.xw + e, first_lanes(n), split16(load16(x + e, 1, n)).hl);
    }
    S.xs_done.fetch_add(1, std::memory_order_release);
  }
  wait_parts(S);
}

int64_t input_elements(const ConvGeom& g) { return g.n * g.in[0] * g.in[1] * g.in[2] * g.C; }

// Word offset (in pixels) of tap `tap` in the padded input, relative to the output's padded pixel.
int64_t tap_delta(const ConvGeom& g, const int64_t* pe, int64_t tap) {
  int64_t t[3];
  conv_split_tap(g, tap, t);
  return (t[0] * g.rdil[0] * pe[1] + t[1] * g.rdil[1]) * pe[2] + t[2] * g.rdil[2];
}

// Whether the forward can read its A tiles in place from the padded split input: stride 1, no lhs
// dilation, no cropping, one group of whole 16-k steps per tap, and no more than 1.5x the output
// pixels on the padded grid (the junk columns between rows are computed and dropped).
bool direct_fits(const ConvGeom& g, int64_t* pe) {
  if (g.cg != g.C || g.C % 16 != 0) return false;
  int64_t vpix = g.n;
  for (int d = 0; d < 3; ++d) {
    if (g.stride[d] != 1 || g.ldil[d] != 1 || g.pad[d] < 0) return false;
    pe[d] = g.out[d] + (g.ks[d] - 1) * g.rdil[d];
    vpix *= pe[d];
  }
  return 2 * vpix <= 3 * g.npix;
}

// xw = the padded input's split words, a part (rows_per_part padded rows of pe[2] pixels, or the
// zero tail) per claim, as split_input.
void split_padded(Panels& S, const uint16_t* x, const ConvGeom& g) {
  const int64_t C = g.C, nrows = g.n * S.pe[0] * S.pe[1], rowlen = S.pe[2] * C;
  for (int64_t p; (p = S.xs_next.fetch_add(1, std::memory_order_relaxed)) < S.xs_parts;) {
    if (p == S.xs_parts - 1) {  // the tail
      std::memset(S.xw + S.vrows * C, 0, size_t(S.tail * C) * 4);
    } else {
      __mmask16 bad = 0;
      for (int64_t row = p * S.rows_per_part; row < std::min(nrows, (p + 1) * S.rows_per_part); ++row) {
        uint32_t* d = S.xw + row * rowlen;
        const int64_t p1 = row % S.pe[1], p0 = (row / S.pe[1]) % S.pe[0], n = row / (S.pe[1] * S.pe[0]);
        const int64_t i0 = p0 - g.pad[0], i1 = p1 - g.pad[1];
        if (i0 < 0 || i0 >= g.in[0] || i1 < 0 || i1 >= g.in[1]) {
          std::memset(d, 0, size_t(rowlen) * 4);
          continue;
        }
        const int64_t lo = g.pad[2], cnt = std::clamp<int64_t>(S.pe[2] - lo, 0, g.in[2]);
        std::memset(d, 0, size_t(lo * C) * 4);
        const uint16_t* src = x + ((n * g.in[0] + i0) * g.in[1] + i1) * g.in[2] * C;
        for (int64_t e = 0; e < cnt * C; e += 16) {  // C is a multiple of 16
          const Split sp = split16(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + e))));
          _mm512_storeu_si512(d + lo * C + e, sp.hl);
          bad |= sp.bad;
        }
        std::memset(d + (lo + cnt) * C, 0, size_t((S.pe[2] - lo - cnt) * C) * 4);
      }
      if (bad) S.x_bad.store(1, std::memory_order_relaxed);
    }
    S.xs_done.fetch_add(1, std::memory_order_release);
  }
  wait_parts(S);
}

}  // namespace

// JDFP_F16_DIRECT=0: the forward gathers patch rows into panels even where tile_direct fits (A/B).
static bool direct_off() {
  static const bool off = [] {
    const char* e = std::getenv("JDFP_F16_DIRECT");
    return e && std::string(e) == "0";
  }();
  return off;
}

std::shared_ptr<void> f16_make_panels(const Bf16Problem& P, int64_t nbatch) {
  auto s = std::make_shared<Panels>();
  s->nsteps = P.amx_plain ? (P.K + 31) / 32 : (P.K + 15) / 16, s->mpairs = (P.M + 31) / 32, s->npairs = (P.N + 31) / 32;
  s->a_pair = size_t(2 * s->nsteps * kWords), s->b_pair = size_t(2 * s->nsteps * (P.amx_plain ? kWords : kBStep));
  const size_t na = size_t(nbatch * s->mpairs), nb = size_t(nbatch * s->npairs);
  s->streamed = P.conv && P.conv->on_b;
  if (!s->streamed) {
    size_t got = 0;
    s->a = BufferPool::get().take(na * s->a_pair + nb * s->b_pair, got);
    s->words = got;
    s->b = s->a + na * s->a_pair;
  }
  s->a_state.reset(new std::atomic<uint8_t>[na]);
  s->b_state.reset(new std::atomic<uint8_t>[nb]);
  for (size_t i = 0; i < na; ++i) s->a_state[i].store(0, std::memory_order_relaxed);
  for (size_t i = 0; i < nb; ++i) s->b_state[i].store(0, std::memory_order_relaxed);
  s->a_bad.reset(new uint8_t[na * 32]());
  s->b_bad.reset(new uint8_t[nb * 32]());
  // Pre-split where the patch matrix reads the input at least twice over (splitting each element
  // once, not once per tap: with the whole-step gather, the demo's 3x3 conv 128x12x12x32 -> 32 went
  // 1.57 -> 1.35-1.39 ms).
  if (!P.amx_plain && P.conv && !P.conv->on_b && !direct_off() && direct_fits(*P.conv, s->pe)) {
    const ConvGeom& g = *P.conv;
    s->direct = true;
    s->vrows = g.n * s->pe[0] * s->pe[1] * s->pe[2];
    s->tail = tap_delta(g, s->pe, g.ntaps - 1) + 32;
    s->xw = BufferPool::get().take(size_t((s->vrows + s->tail) * g.C), s->xw_words);
    s->rows_per_part = std::max<int64_t>(1, kSplitPart / (s->pe[2] * g.C));
    s->xs_parts = (g.n * s->pe[0] * s->pe[1] + s->rows_per_part - 1) / s->rows_per_part + 1;
  } else if (!P.amx_plain && P.conv && !P.conv->on_b) {
    const int64_t nelem = input_elements(*P.conv);
    if (P.M * P.K >= 2 * nelem && nelem > 0) {
      s->xw = BufferPool::get().take(size_t(nelem), s->xw_words);
      s->xs_parts = (nelem + kSplitPart - 1) / kSplitPart;
    }
  }
  return s;
}

namespace {

// One output tile of an FP16 conv forward that S.direct takes: the A tiles read in place from the
// padded split input.  Output pixel (n, o) is padded pixel q = ((n * pe0 + o0) * pe1 + o1) * pe2 + o2,
// and tap t reads padded pixel q + tap_delta(t): for a run of consecutive q the rows of an A tile
// are C words apart, whatever image row they fall in.  So the tile's rows [m0, m1) are computed as
// the q range from q(m0) to q(m1 - 1), in 32-row blocks; the q that are no output pixel (past the
// row's or the image's last output) are computed and dropped.  The products and the K order are the
// packed path's (the same words, steps and tile products), so the same sums, bit for bit.
void tile_direct(const Bf16Problem& P, const Bf16Tile& T, Panels& S) {
  const ConvGeom& g = *P.conv;
  const int64_t C = g.C, nsteps = S.nsteps, nb = T.n1 - T.n0, npairs = (nb + 31) / 32;
  const uint16_t* a = static_cast<const uint16_t*>(P.a) + P.a_off[T.batch];
  const uint16_t* b = static_cast<const uint16_t*>(P.b) + P.b_off[T.batch];
  float* Cout = P.out + T.batch * P.M * P.N;
  split_padded(S, a, g);
  auto qof = [&](int64_t r) {
    int64_t n, o[3];
    conv_split_pixel(g, r, n, o);
    return ((n * S.pe[0] + o[0]) * S.pe[1] + o[1]) * S.pe[2] + o[2];
  };
  const int64_t qb = qof(T.m0), qe = qof(T.m1 - 1) + 1, nvb = (qe - qb + 31) / 32;
  thread_local std::vector<int64_t> offs;
  offs.resize(size_t(nsteps));
  for (int64_t s = 0; s < nsteps; ++s) {
    const int64_t k = s * 16, tap = k / g.cg;
    offs[size_t(s)] = tap_delta(g, S.pe, tap) * C + (k - tap * g.cg);
  }
  const int64_t rb = T.batch * S.npairs + T.n0 / 32;
  const TileConfig cfg = uniform_config(8, 16, 64);
  _tile_loadconfig(&cfg);
  thread_local Aligned<float> accbuf;
  float* accs = accbuf.get(size_t(nvb * npairs * 1024));
  const bool x_bad = S.x_bad.load(std::memory_order_relaxed);  // split_padded's last acquire orders it
  for (int64_t s0 = 0; s0 < nsteps; s0 += kKcSteps) {
    const int64_t ns = std::min(kKcSteps, nsteps - s0);
    const bool last = s0 + ns >= nsteps;
    for (int64_t cp = 0; cp < npairs; ++cp) {
      const int64_t n0 = T.n0 + cp * 32;
      const uint32_t* bpanel = ready(S.b_state[size_t(rb + cp)], S.b + size_t(rb + cp) * S.b_pair, [&](uint32_t* d) {
        pack_b(View{b + n0 * P.b_sn, P.b_sn, P.b_sk, std::min<int64_t>(32, P.N - n0), P.K}, d,
               S.b_bad.get() + size_t(rb + cp) * 32);
      });
      const uint32_t* b0 = bpanel + s0 * kBStep;
      const int nv = int(std::min<int64_t>(32, T.n1 - n0));
      const __mmask16 lo = first_lanes(nv), hi = first_lanes(std::max(0, nv - 16));
      const uint8_t* cbad = S.b_bad.get() + size_t(rb + cp) * 32;
      for (int64_t vb = 0; vb < nvb; ++vb) {
        const int64_t q0 = qb + vb * 32;
        float* acc = accs + (cp * nvb + vb) * 1024;
        const int64_t* off = offs.data() + s0;
        block32<true>(S.xw + q0 * C, S.xw + (q0 + 16) * C, 4 * C, [off](int64_t s) { return off[s]; }, b0,
                      b0 + nsteps * kBStep, ns, s0 == 0, acc);
        if (!last) continue;
        for (int i = 0; i < 32 && q0 + i < qe; ++i) {
          int64_t q = q0 + i, o[3], r;
          o[2] = q % S.pe[2], q /= S.pe[2];
          o[1] = q % S.pe[1], q /= S.pe[1];
          o[0] = q % S.pe[0];
          if (o[0] >= g.out[0] || o[1] >= g.out[1] || o[2] >= g.out[2]) continue;  // no output pixel
          r = ((q / S.pe[0] * g.out[0] + o[0]) * g.out[1] + o[1]) * g.out[2] + o[2];
          if (r < T.m0 || r >= T.m1) continue;  // a neighbouring tile's
          float* dst = Cout + r * P.N + n0;
          _mm512_mask_storeu_ps(dst, lo, _mm512_load_ps(acc + i * 32));
          if (hi) _mm512_mask_storeu_ps(dst + 16, hi, _mm512_load_ps(acc + i * 32 + 16));
          // NaN / Inf: as the packed path, the float32 dot in k order where the row or column has one
          bool rbad = false;
          if (x_bad) {
            const __m512i expo = _mm512_set1_epi32(0x7F80);
            for (int64_t t = 0; t < g.ntaps && !rbad; ++t) {
              const uint32_t* w = S.xw + (q0 + i + tap_delta(g, S.pe, t)) * C;
              for (int64_t c = 0; c < C && !rbad; c += 16)
                rbad = _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_loadu_si512(w + c), expo), expo) != 0;
            }
          }
          if (!rbad && !any_set(cbad, nv)) continue;
          for (int j = 0; j < nv; ++j)
            if (rbad || cbad[j]) dst[j] = ieee_dot(P, a, b, r, n0 + j);
        }
      }
    }
  }
  _tile_release();
}

// Rows [r0, r0 + 32) of A over k [k0, k0 + kn) (zero padded to whole steps) packed into d.
template <bool Split>
void pack_rows(const Bf16Problem& P, const Panels& S, const uint16_t* a, int64_t r0, int64_t k0, int64_t kn,
               uint32_t* d, uint8_t* bad) {
  const int64_t rows = std::min<int64_t>(32, P.M - r0);
  if constexpr (Split) {
    if (S.xw) pack_a_patches_words(S.xw, *P.conv, r0, rows, P.K, d, bad);
    else if (P.conv && !P.conv->on_b) pack_a_patches(a, *P.conv, r0, rows, P.K, d, bad);
    else pack_a(View{a + r0 * P.a_sm + k0 * P.a_sk, P.a_sm, P.a_sk, rows, kn}, d, bad);
  } else {
    if (P.conv && !P.conv->on_b) pack_a_patches_plain(a, *P.conv, r0, rows, P.K, d);
    else pack_plain(View{a + r0 * P.a_sm + k0 * P.a_sk, P.a_sm, P.a_sk, rows, kn}, d, true);
  }
}

// Columns [n0, n0 + 32) of B over k [k0, k0 + kn) packed into d.
template <bool Split>
void pack_cols(const Bf16Problem& P, const uint16_t* b, int64_t n0, int64_t k0, int64_t kn, uint32_t* d,
               uint8_t* bad) {
  const int64_t cols = std::min<int64_t>(32, P.N - n0);
  if constexpr (Split) {
    if (P.conv && P.conv->on_b) pack_b_patches(b, *P.conv, n0, cols, k0, kn, d, bad);
    else pack_b(View{b + n0 * P.b_sn + k0 * P.b_sk, P.b_sn, P.b_sk, cols, kn}, d, bad);
  } else {
    if (P.conv && P.conv->on_b) pack_b_patches_plain(b, *P.conv, n0, cols, k0, kn, d);
    else pack_plain(View{b + n0 * P.b_sn + k0 * P.b_sk, P.b_sn, P.b_sk, cols, kn}, d, false);
  }
}

// A 32 x 32 block's float32 sums (acc, rows of 32) into C rows [m0, m0 + mv), columns [n0, n0 + nv);
// with the split, outputs whose row or column holds a NaN or Inf recomputed as IEEE float32 dots.
template <bool Split>
void store_block(const Bf16Problem& P, const uint16_t* a, const uint16_t* b, const float* acc, float* C, int64_t m0,
                 int mv, int64_t n0, int nv, const uint8_t* rbad, const uint8_t* cbad) {
  const __mmask16 lo = first_lanes(nv), hi = first_lanes(std::max(0, nv - 16));
  for (int i = 0; i < mv; ++i) {
    float* dst = C + (m0 + i) * P.N + n0;
    _mm512_mask_storeu_ps(dst, lo, _mm512_load_ps(acc + i * 32));
    if (hi) _mm512_mask_storeu_ps(dst + 16, hi, _mm512_load_ps(acc + i * 32 + 16));
  }
  if constexpr (!Split) return;  // no split, no spurious NaN: the tiles' IEEE results stand
  if (!any_set(rbad, mv) && !any_set(cbad, nv)) return;  // the usual case, without a loop per output
  for (int i = 0; i < mv; ++i)
    for (int j = 0; j < nv; ++j)
      if (rbad[i] | cbad[j]) C[(m0 + i) * P.N + n0 + j] = ieee_dot(P, a, b, m0 + i, n0 + j);
}

// One output tile (batch, [m0, m1) x [n0, n1)) of the FP16 GEMM (float16 bits in P.a and P.b; Split)
// or of the plain BF16 one (bfloat16 bits, amx_plain); m0 and n0 are multiples of 32 (launch_bf16
// with 32-row units).
template <bool Split>
void tile_amx(const Bf16Problem& P, const Bf16Tile& T) {
  constexpr int64_t bstep = Split ? kBStep : kWords;
  constexpr int64_t step_k = Split ? 16 : 32;
  const int64_t mb = T.m1 - T.m0, nb = T.n1 - T.n0;
  if (mb <= 0 || nb <= 0) return;
  float* C = P.out + T.batch * P.M * P.N;
  if (P.K == 0) {  // an empty sum (e.g. the weight-gradient of a conv with no output pixels)
    for (int64_t m = T.m0; m < T.m1; ++m) std::fill(C + m * P.N + T.n0, C + m * P.N + T.n1, 0.0f);
    return;
  }
  Panels& S = *static_cast<Panels*>(P.f16_panels);
  if (Split && S.direct) return tile_direct(P, T, S);
  const int64_t nsteps = S.nsteps, mpairs = (mb + 31) / 32, npairs = (nb + 31) / 32;
  const uint16_t* a = static_cast<const uint16_t*>(P.a) + P.a_off[T.batch];
  const uint16_t* b = static_cast<const uint16_t*>(P.b) + P.b_off[T.batch];
  const int64_t ra = T.batch * S.mpairs + T.m0 / 32, rb = T.batch * S.npairs + T.n0 / 32;
  // A conv's weight gradient (S.streamed: O x pixels x (tap, c), deep) packs both operands a K chunk at
  // a time into this worker's buffers, consumed while in L2: packed whole, its split B (16 bytes per
  // element, 85 MB for the demo's 32 x 18432 x 288) went through memory once written and once read,
  // and its A was packed by one worker while the other waited.  (A chunk is packed by each worker
  // whose tile needs it: the rows are few.)  Elsewhere the panels are packed once per call and shared.
  const bool streamed = S.streamed;
  thread_local std::vector<uint8_t> rows_bad_buf, cols_bad_buf;
  uint8_t* rows_bad = S.a_bad.get() + size_t(ra) * 32;
  uint8_t* cols_bad = S.b_bad.get() + size_t(rb) * 32;
  if (streamed) {
    rows_bad_buf.assign(size_t(mpairs * 32), 0);
    cols_bad_buf.assign(size_t(npairs * 32), 0);
    rows_bad = rows_bad_buf.data(), cols_bad = cols_bad_buf.data();
  }
  if (Split && S.xw) split_input(S, a, input_elements(*P.conv));
  thread_local Aligned<uint32_t> achunk, bchunk;
  thread_local std::vector<const uint32_t*> arows;
  arows.resize(size_t(mpairs));
  if (!streamed)
    for (int64_t rp = 0; rp < mpairs; ++rp)
      arows[size_t(rp)] = ready(S.a_state[size_t(ra + rp)], S.a + size_t(ra + rp) * S.a_pair, [&](uint32_t* d) {
        pack_rows<Split>(P, S, a, T.m0 + rp * 32, 0, P.K, d, rows_bad + rp * 32);
      });

  const TileConfig cfg = uniform_config(8, 16, 64);
  _tile_loadconfig(&cfg);
  // K in chunks of kKcSteps steps, outermost: the tile's A chunks (row pairs x 512 k) stay in L2
  // while each column pair's B chunk streams through once per chunk; every 32 x 32 block's float32
  // sums wait in acc between chunks.  (Column pairs outermost re-read the tile's whole A panel per
  // pair: at K = 2048 that is 1.5 MiB with B's 0.5 MiB beside it, more than L2 keeps.)
  thread_local Aligned<float> accbuf;
  float* accs = accbuf.get(size_t(mpairs * npairs * 1024));
  thread_local std::vector<const uint32_t*> bcols;
  bcols.assign(size_t(npairs), nullptr);
  for (int64_t s0 = 0; s0 < nsteps; s0 += kKcSteps) {
    const int64_t ns = std::min(kKcSteps, nsteps - s0);
    const bool last = s0 + ns >= nsteps;
    const int64_t k0 = s0 * step_k, kn = std::min(ns * step_k, P.K - k0);
    // A row pair's two 16-row blocks lie `astride` words apart, a column pair's `bstride`.
    int64_t astride = nsteps * kWords, bstride = nsteps * bstep, aoff = s0 * kWords, boff = s0 * bstep;
    uint32_t* bbuf = nullptr;
    if (streamed) {
      astride = ns * kWords, bstride = ns * bstep, aoff = boff = 0;
      uint32_t* abuf = achunk.get(size_t(mpairs * 2 * astride));
      for (int64_t rp = 0; rp < mpairs; ++rp) {
        arows[size_t(rp)] = abuf + rp * 2 * astride;
        pack_rows<Split>(P, S, a, T.m0 + rp * 32, k0, kn, abuf + rp * 2 * astride, rows_bad + rp * 32);
      }
      bbuf = bchunk.get(size_t(2 * bstride));
    }
    for (int64_t cp = 0; cp < npairs; ++cp) {
      const int64_t n0 = T.n0 + cp * 32;
      if (streamed) {
        pack_cols<Split>(P, b, n0, k0, kn, bbuf, cols_bad + cp * 32);
        bcols[size_t(cp)] = bbuf;
      } else if (!bcols[size_t(cp)]) {
        bcols[size_t(cp)] = ready(S.b_state[size_t(rb + cp)], S.b + size_t(rb + cp) * S.b_pair,
                                  [&](uint32_t* d) { pack_cols<Split>(P, b, n0, 0, P.K, d, cols_bad + cp * 32); });
      }
      const uint32_t* b0 = bcols[size_t(cp)] + boff;
      const int nv = int(std::min<int64_t>(32, T.n1 - n0));
      for (int64_t rp = 0; rp < mpairs; ++rp) {
        const uint32_t* a0 = arows[size_t(rp)] + aoff;
        float* acc = accs + (cp * mpairs + rp) * 1024;
        block32<Split>(a0, a0 + astride, 64, panel_step, b0, b0 + bstride, ns, s0 == 0, acc);
        if (last)
          store_block<Split>(P, a, b, acc, C, T.m0 + rp * 32, int(std::min<int64_t>(32, T.m1 - T.m0 - rp * 32)), n0,
                             nv, rows_bad + rp * 32, cols_bad + cp * 32);
      }
    }
  }
  _tile_release();
}

}  // namespace

void f16_tile_amx(const Bf16Problem& P, const Bf16Tile& T) {
  if (P.amx_plain) tile_amx<false>(P, T);
  else tile_amx<true>(P, T);
}

}  // namespace jdfp
