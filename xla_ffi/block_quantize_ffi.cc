// XLA FFI handler: float32 -> int16 conversion of a block format (DFP or BFP with one exponent per
// block or tile), exponents included.
//
//   JdfpBlockQuantize : float32 x [B, R, C], uint32 key [2] -> int16 out [B, R, C], int32 e [GB, GR, GC]
//                     (out may be int8 for formats of <= 8 bits, DFP bits <= 8 / BFP mantissa <= 7:
//                     |q| <= 127, exact; what the INT8 GEMM reads, with no int16 tensor for XLA to
//                     narrow in a second pass)
//   attrs: block (int64 [3]: bb, br, bc; G* = ceil(n / b)), kind (0 DFP, 1 BFP), bits (DFP: bits
//          with sign; BFP: mantissa bits), rounding (0 nearest, 1 stochastic, 2 biased: as the
//          per-tensor conversions, the key being the Philox key of stochastic rounding), isa
//
// Every block's exponent comes from its max |x| (numerics/quantize.py group_exponent: DFP
// floor(log2 m) + 1 - (bits - 1), BFP ceil(log2 m) - mantissa_bits; 0 for an all-zero block, the
// NONFINITE sentinel and all-zero values for a block holding NaN/Inf; subnormals read as zero, as
// XLA:CPU's DAZ), and its values are clip(round(scale2(x, -e)), +-qmax): bit for bit the pure-JAX
// `quantize_blocks` for every rounding: stochastic rounding draws element i's bits from its row-major
// index in x (the Philox stream of docs/arithmetic.md).  AVX-512: stochastic rounding and the
// statistics run a whole row segment per call with each column's scale expanded once per unit
// (quantize_kernels.h *_cols); other ISAs call the per-tensor kernels block by block.
//
//   JdfpBlockQuantizeStats : the same plus int32 counts [4] (saturated, underflow, nonfinite,
//                     nonzero: JdfpQuantStats's counters, each element against its block's exponent)
//                     and int32 erange [2] (max, min exponent over the blocks holding a nonzero
//                     finite value; 0, 0 if none): the Flax "dfp" statistics, counted while converting
//
//   JdfpBlockQuantizePatches(Stats) : the same two for the patch matrix [1, rows, taps * C] of a conv
//                     input x [N, D, H, W, C] (conv_geometry.h; attrs as above plus the conv's
//                     window_strides, padding_lo / _hi, lhs / rhs_dilation, kernel_spatial), bit for
//                     bit the call on the stored matrix: each unit gathers its rows from x, so HBFP
//                     convolutions never store that matrix in float32
//
//   JdfpBlockFakeQuantize : float32 x [B, R, C], key -> float32 y [B, R, C] (the values dequantized:
//                     scale2(q, e), NaN for a NONFINITE block, as numerics/quantize.py dequantize),
//                     int32 e: the optimizer's per-step re-quantization of the params onto their grid,
//                     with no int16 tensor and no exponent expansion in XLA
//
// Work unit: the rows of one block band (bb x br rows) times a range of whole column blocks, so a
// unit owns its blocks outright: it reads its rows once for the maxima and once more to convert
// (while they are still in L2, ~32 Ki elements per unit), with no cross-thread reduction.  Units
// are grabbed by the calling thread and XLA's pool threads from an atomic counter.
#include <algorithm>
#include <climits>
#include <cstring>
#include <limits>
#include <atomic>
#include <memory>
#include <vector>

#include "block_quantize_kernels.h"
#include "conv_geometry.h"
#include "ffi_helpers.h"
#include "ffi_runtime.h"

namespace jdfp {
namespace {

struct BlockKernels {
  BlockAmaxFn amax;
  BlockAmaxRowsFn amax_rows;  // null: amax row by row
  BlockConvertFn convert;
  StochasticColsFn stochastic_cols;  // null: the per-tensor kernels, called block by block
  StatsColsFn stats_cols;
  ConvertColsI8Fn convert_cols_i8;  // null: int16 row, statistics pass, narrowing (convert_rows_i8)
  ConvertColsI16Fn convert_cols_i16;  // null: block-by-block conversion, then the statistics pass
  StochasticColsI8Fn stochastic_cols_i8;  // null: int16 row, statistics pass, narrowing
};

#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
#define JDFP_BLOCK_AVX512(fn) fn
#else
#define JDFP_BLOCK_AVX512(fn) nullptr  // never selected: isa_mask() leaves AVX-512 out
#endif

// Indexed by Isa (as isa_table.cc's table); AVX2 / AVX-VNNI run the scalar kernels.
const BlockKernels kBlockTable[] = {
    /* kIsaAuto */ {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr},
    /* kIsaScalar */ {block_amax_scalar, nullptr, block_convert_scalar, nullptr, nullptr, nullptr, nullptr, nullptr},
    /* kIsaAvx2 */ {block_amax_scalar, nullptr, block_convert_scalar, nullptr, nullptr, nullptr, nullptr, nullptr},
    /* kIsaAvxVnni */ {block_amax_scalar, nullptr, block_convert_scalar, nullptr, nullptr, nullptr, nullptr, nullptr},
    /* kIsaAvx512Vnni */ {JDFP_BLOCK_AVX512(block_amax_avx512), JDFP_BLOCK_AVX512(block_amax_rows_avx512),
                          JDFP_BLOCK_AVX512(block_convert_avx512),
                          JDFP_BLOCK_AVX512(convert_stochastic_cols_avx512), JDFP_BLOCK_AVX512(stats_cols_avx512),
                          JDFP_BLOCK_AVX512(convert_cols_i8_avx512), JDFP_BLOCK_AVX512(convert_cols_i16_avx512),
                          JDFP_BLOCK_AVX512(convert_stochastic_cols_i8_avx512)},
};
static_assert(sizeof(kBlockTable) / sizeof(kBlockTable[0]) == kIsaAvx512Vnni + 1, "one entry per Isa value");

constexpr int64_t kUnitElems = int64_t(1) << 15;
constexpr int64_t kMaxUnitBlocks = 1024;  // bounds a unit's accumulators (64 KiB)
// Tensors below this many elements convert on the calling thread alone: waking a pool thread for
// them cost more than it saved (a 64 x 128 tile-blocked conversion: 8-13 us pooled, 3-5 us inline).
constexpr int64_t kInlineElems = int64_t(1) << 16;

// The exponent of a block from its max |x| bits (group_exponent).
int32_t block_exponent(uint32_t amax_bits, bool bfp, int bits) {
  if (amax_bits >= kInfBits) return kNonfiniteExponent;
  if (amax_bits == 0) return 0;
  const int32_t k = int32_t(amax_bits >> 23) - 126;  // m = f * 2**k, f in [0.5, 1); m is normal here
  if (!bfp) return k - (bits - 1);
  const bool pow2 = (amax_bits & 0x007FFFFFu) == 0;  // m = 2**(k-1) exactly
  return (pow2 ? k - 1 : k) - bits;
}

// Counters of the statistics variant: every worker adds its own; whoever brings the finished units
// to the total writes them out (before its CountDown, so they are in place when the future resolves).
struct BlockTotals {
  std::atomic<int64_t> finished{0}, sat{0}, under{0}, nonfin{0}, ok{0};
  std::atomic<int32_t> emax{INT32_MIN}, emin{INT32_MAX};
  void add(const Counts& c, int32_t lo, int32_t hi, int64_t done, int64_t nunits, int32_t* counts, int32_t* erange) {
    sat.fetch_add(c.sat, std::memory_order_relaxed);
    under.fetch_add(c.under, std::memory_order_relaxed);
    nonfin.fetch_add(c.nonfin, std::memory_order_relaxed);
    ok.fetch_add(c.ok, std::memory_order_relaxed);
    int32_t cur = emax.load(std::memory_order_relaxed);
    while (hi > cur && !emax.compare_exchange_weak(cur, hi, std::memory_order_relaxed)) {
    }
    cur = emin.load(std::memory_order_relaxed);
    while (lo < cur && !emin.compare_exchange_weak(cur, lo, std::memory_order_relaxed)) {
    }
    if (finished.fetch_add(done, std::memory_order_acq_rel) + done != nunits) return;
    counts[0] = int32_t(sat.load()), counts[1] = int32_t(under.load());
    counts[2] = int32_t(nonfin.load()), counts[3] = int32_t(ok.load());
    const bool any = ok.load() > 0;
    erange[0] = any ? emax.load() : 0, erange[1] = any ? emin.load() : 0;
  }
};

struct BlockJob {
  BlockKernels k{};
  StatsFn stats = nullptr;
  int32_t* counts_out = nullptr;  // statistics variant only (else null)
  int32_t* erange_out = nullptr;
  BlockTotals totals;
  const float* x = nullptr;
  // JdfpBlockQuantizePatches*: x is a conv's input image and the tensor converted is its patch matrix
  // [1, rows, taps * C] (conv_geometry.h), gathered a band segment at a time into the unit's scratch.
  bool patches = false;
  PatchGeom geom;
  int16_t* out = nullptr;
  int8_t* out8 = nullptr;  // int8 result (then `out` is null): convert_rows_i8
  bool i8 = false;         // the values are int8 (out8, or the fused patch GEMM's int8 rows)
  float* deq = nullptr;  // JdfpBlockFakeQuantize: dequantized output (then `out` is null)
  int32_t* e = nullptr;
  int64_t B = 0, R = 0, C = 0, bb = 0, br = 0, bc = 0, GB = 0, GR = 0, GC = 0;
  int64_t cb_per_unit = 1, units_per_band = 1, nunits = 0;
  bool bfp = false, biased = false;
  int bits = 0;
  ConvertFn stochastic = nullptr;  // rounding 1: the ISA's per-tensor stochastic kernel (else null)
  PhiloxKey key{};
  float qm = 0.0f;
  std::atomic<int64_t> next{0};
  ffi::CountDownPromise done;
};

// Scratch of one worker: the lane accumulators, per-block scales and exponents of a unit, and the
// worker's statistics (counts; exponent range of the blocks with a nonzero finite value).
struct UnitScratch {
  std::vector<uint32_t> acc;
  std::vector<float> s1, s2;
  std::vector<int32_t> e;
  std::vector<uint8_t> block_ok;  // the block holds a nonzero finite value (its max |x| says so)
  std::vector<float> s1c, s2c;  // per-column scales of the unit's row segment (the *_cols kernels)
  // > 0: the unit's rows lie back to back from element seg_off on, and the *_cols kernels take them as
  // one segment of seg_len elements (s1c / s2c repeated per row): `cols_band`.
  int64_t seg_off = 0, seg_len = 0;
  std::vector<int16_t> row;  // fake-quantize and int8 results: one row segment's int16 values
  std::vector<float> band;   // patch mode: the unit's rows of the patch matrix, band_n columns each
  int64_t band_row0 = 0, band_n = 0;
  // Where int16 element i of the tensor goes: out[i].  The job's output, or (the fused patch GEMM)
  // the worker's buffer of its current rows, offset so that the same global indices land in it.
  int16_t* out = nullptr;
  int8_t* out8 = nullptr;  // the same for int8 values
  Counts counts;
  int32_t emin = INT32_MAX, emax = INT32_MIN;
};

// The float32 row segment [c0, c0 + n) of the tensor row at element offset `off` (b * R + r) * C: in x,
// or in patch mode the unit's gathered copy.
const float* xseg(const BlockJob& j, const UnitScratch& s, int64_t off, int64_t c0) {
  if (!j.patches) return j.x + off + c0;
  return s.band.data() + (off / j.C - s.band_row0) * s.band_n;
}

// The statistics of one converted row segment: in one call with per-column scales, else block by
// block (stats kernels of quantize_kernels.h).
void count_row(const BlockJob& j, const float* x, const int16_t* q, int64_t n, UnitScratch& s) {
  if (j.k.stats_cols) {
    j.k.stats_cols(x, q, n, s.s1c.data(), s.s2c.data(), j.qm, s.counts);
    return;
  }
  for (int64_t c0 = 0, b = 0; c0 < n; c0 += j.bc, ++b) {
    const int32_t ne = -eclamp(s.e[b]), e1 = clamp_i32(ne, -126, 127), e2 = clamp_i32(ne - e1, -126, 127);
    const StatsArgs args{x, q, pow2f(e1), pow2f(e2), j.qm, s.e[b] != kNonfiniteExponent};
    j.stats(args, c0, std::min(n, c0 + j.bc), s.counts);
  }
}

// Calls f(row pointer offset) for every row of block band `band` (batch-major, then row).
template <class F>
void for_band_rows(const BlockJob& j, int64_t band, F&& f) {
  const int64_t gb = band / j.GR, gr = band % j.GR;
  const int64_t b1 = std::min(j.B, (gb + 1) * j.bb), r1 = std::min(j.R, (gr + 1) * j.br);
  for (int64_t b = gb * j.bb; b < b1; ++b)
    for (int64_t r = gr * j.br; r < r1; ++r) f((b * j.R + r) * j.C);
}

// Rows narrower than this, whole in the unit and back to back in memory (the rows of one batch
// element, or every row of each), go to the per-column kernels as one segment of at most
// kUnitElems elements.  Element i draws Philox block i / 4 either way, so the bits are the same;
// what goes is a call per row and, for stochastic rounding, the unused part of each row's last
// 64-element Philox step: the same 590 K elements converted (stochastic, with statistics) in
// 0.4-0.7 ms as 9216 x 64 but 1.0-1.2 ms as 18432 x 32 and 1.9-2.1 ms as 36864 x 16.
constexpr int64_t kBandCols = 256;
void cols_band(const BlockJob& j, int64_t band, int64_t c0, int64_t n, UnitScratch& s) {
  s.seg_len = 0;
  if (j.patches || c0 != 0 || n != j.C || n >= kBandCols) return;
  const int64_t gb = band / j.GR, gr = band % j.GR;
  const int64_t b0 = gb * j.bb, b1 = std::min(j.B, b0 + j.bb), r0 = gr * j.br, r1 = std::min(j.R, r0 + j.br);
  const int64_t len = (b1 - b0) * (r1 - r0) * n;
  if ((b1 - b0 > 1 && (r0 != 0 || r1 != j.R)) || (r1 - r0) * (b1 - b0) < 2 || len > kUnitElems) return;
  if (s.s1c.size() < size_t(len)) s.s1c.resize(size_t(len)), s.s2c.resize(size_t(len));
  for (int64_t i = n; i < len; ++i) s.s1c[size_t(i)] = s.s1c[size_t(i - n)], s.s2c[size_t(i)] = s.s2c[size_t(i - n)];
  s.seg_off = (b0 * j.R + r0) * j.C;
  s.seg_len = len;
}

// Calls f(offset, length) for the segments the per-column kernels take: the band at once where
// cols_band found it contiguous, else each row (length n).
template <class F>
void for_cols_segments(const BlockJob& j, const UnitScratch& s, int64_t band, int64_t n, F&& f) {
  if (s.seg_len > 0) {
    f(s.seg_off, s.seg_len);
    return;
  }
  for_band_rows(j, band, [&](int64_t off) { f(off, n); });
}

// y = scale2(q, e) block by block (two exact power-of-two multiplies; FTZ as XLA:CPU), NaN for a
// NONFINITE block: numerics/quantize.py dequantize.  Plain loops: GCC vectorizes them.
void dequantize_row(const BlockJob& j, const int16_t* q, float* y, int64_t n, const UnitScratch& s) {
  for (int64_t c0 = 0, b = 0; c0 < n; c0 += j.bc, ++b) {
    const int64_t c1 = std::min(n, c0 + j.bc);
    if (s.e[b] == kNonfiniteExponent) {
      std::fill(y + c0, y + c1, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    const int32_t e = eclamp(s.e[b]), e1 = clamp_i32(e, -126, 127), e2 = clamp_i32(e - e1, -126, 127);
    const float d1 = pow2f(e1), d2 = pow2f(e2);
    for (int64_t i = c0; i < c1; ++i) y[i] = (float(q[i]) * d1) * d2;
  }
}

// Stochastic rounding of a unit's rows: the per-tensor kernel on each block's index range of the whole
// tensor (so element i draws the bits of its global index), with that block's scales.
void convert_stochastic_rows(const BlockJob& j, int64_t band, int64_t c0, int64_t n, const UnitScratch& s) {
  for_cols_segments(j, s, band, n, [&](int64_t off, int64_t len) {
    const float* x = xseg(j, s, off, c0);
    if (j.k.stochastic_cols) {
      j.k.stochastic_cols(x, s.out + off + c0, len, off + c0, j.key, s.s1c.data(), s.s2c.data(), j.qm);
      return;
    }
    for (int64_t b0 = 0, b = 0; b0 < n; b0 += j.bc, ++b) {
      ConvertArgs a{x, s.out, s.s1[b], s.s2[b], j.qm, j.key};
      a.x_index0 = off + c0;
      j.stochastic(a, off + c0 + b0, off + c0 + std::min(n, b0 + j.bc));
    }
  });
}

// int8 result: each row segment converts into the worker's int16 row scratch (the stochastic kernel
// writing element i at row[i - segment start]), is counted from there and narrowed while in L2.
void convert_rows_i8(const BlockJob& j, int64_t band, int64_t c0, int64_t n, const BlockConvertArgs& args,
                     UnitScratch& s) {
  int16_t* q = s.row.data();
  for_cols_segments(j, s, band, n, [&](int64_t off, int64_t len) {
    const float* x = xseg(j, s, off, c0);
    if (!j.stochastic && j.k.convert_cols_i8) {
      j.k.convert_cols_i8(x, s.out8 + off + c0, len, s.s1c.data(), s.s2c.data(), j.qm, j.biased,
                          j.counts_out ? &s.counts : nullptr);
      return;
    }
    if (j.stochastic && j.k.stochastic_cols_i8) {
      j.k.stochastic_cols_i8(x, s.out8 + off + c0, len, off + c0, j.key, s.s1c.data(), s.s2c.data(), j.qm,
                             j.counts_out ? &s.counts : nullptr);
      return;
    }
    if (j.stochastic && j.k.stochastic_cols) {
      j.k.stochastic_cols(x, q, n, off + c0, j.key, s.s1c.data(), s.s2c.data(), j.qm);
    } else if (j.stochastic) {
      for (int64_t b0 = 0, b = 0; b0 < n; b0 += j.bc, ++b) {
        ConvertArgs a{x, q, s.s1[b], s.s2[b], j.qm, j.key};
        a.out_index0 = a.x_index0 = off + c0;
        j.stochastic(a, off + c0 + b0, off + c0 + std::min(n, b0 + j.bc));
      }
    } else {
      j.k.convert(x, q, n, j.bc, args);
    }
    if (j.counts_out) count_row(j, x, q, n, s);
    narrow_to_i8(q, s.out8 + off + c0, n);
  });
}

void run_unit(const BlockJob& j, int64_t u, UnitScratch& s) {
  const int64_t band = u / j.units_per_band;
  const int64_t cb0 = (u % j.units_per_band) * j.cb_per_unit, cb1 = std::min(j.GC, cb0 + j.cb_per_unit);
  const int64_t nb = cb1 - cb0, c0 = cb0 * j.bc, n = std::min(j.C, cb1 * j.bc) - c0;
  std::fill(s.acc.begin(), s.acc.begin() + nb * kAmaxLanes, 0u);
  s.seg_len = 0;  // cols_band sets it where the *_cols kernels run
  if (j.patches) {  // gather the unit's rows once: they are read for the maxima and again to convert
    s.band_row0 = (band % j.GR) * j.br, s.band_n = n;
    // Patch mode's tensor is [1, rows, taps * C] (bb = 1): the band is br consecutive rows.
    j.geom.gather_rows(j.x, s.band_row0, std::min(j.R, s.band_row0 + j.br) - s.band_row0, c0, n, s.band.data());
  }
  // The band's rows at one stride (the gathered patch rows; a tensor blocked along rows alone or with
  // whole rows per band): one call for all of them.
  const int64_t gb = band / j.GR, gr = band % j.GR;
  const int64_t b0 = gb * j.bb, r0 = gr * j.br;
  const int64_t nrows = (std::min(j.B, b0 + j.bb) - b0) * (std::min(j.R, r0 + j.br) - r0);
  if (j.k.amax_rows && (j.patches || j.bb == 1 || j.br >= j.R)) {
    j.k.amax_rows(xseg(j, s, (b0 * j.R + r0) * j.C, c0), nrows, j.patches ? n : j.C, n, j.bc, s.acc.data());
  } else {
    for_band_rows(j, band, [&](int64_t off) { j.k.amax(xseg(j, s, off, c0), n, j.bc, s.acc.data()); });
  }
  int32_t* e_out = j.e + band * j.GC + cb0;
  for (int64_t b = 0; b < nb; ++b) {
    const uint32_t* lanes = s.acc.data() + b * kAmaxLanes;
    const uint32_t amax = *std::max_element(lanes, lanes + kAmaxLanes);
    const int32_t ei = block_exponent(amax, j.bfp, j.bits);
    // An ok element (finite, normal, in a finite block) exists iff the block's max is one.
    s.block_ok[b] = amax >= kMinNormalBits && amax < kInfBits;
    e_out[b] = ei;
    s.e[b] = ei;
    const int32_t ne = -eclamp(ei), e1 = clamp_i32(ne, -126, 127), e2 = clamp_i32(ne - e1, -126, 127);
    s.s1[b] = ei == kNonfiniteExponent ? 0.0f : pow2f(e1);  // NaN/Inf blocks: all products NaN or 0 -> 0
    s.s2[b] = pow2f(e2);
  }
  const BlockConvertArgs args{s.s1.data(), s.s2.data(), j.qm, j.biased};
  if (j.deq) {
    for_band_rows(j, band, [&](int64_t off) {
      j.k.convert(xseg(j, s, off, c0), s.row.data(), n, j.bc, args);
      dequantize_row(j, s.row.data(), j.deq + off + c0, n, s);
    });
    return;
  }
  const bool cols_i16 = s.out && !j.stochastic && j.k.convert_cols_i16;  // one pass, counts included
  if ((j.stochastic && j.k.stochastic_cols) || (j.counts_out && j.k.stats_cols) || (j.i8 && j.k.convert_cols_i8) ||
      cols_i16) {
    for (int64_t b = 0, c = 0; b < nb; ++b)
      for (const int64_t c1 = std::min(n, c + j.bc); c < c1; ++c) s.s1c[size_t(c)] = s.s1[size_t(b)], s.s2c[size_t(c)] = s.s2[size_t(b)];
    if (j.k.stochastic_cols) cols_band(j, band, c0, n, s);  // AVX-512: every *_cols kernel is there
  }
  if (j.i8) {
    convert_rows_i8(j, band, c0, n, args, s);  // counts as it goes
  } else {
    if (cols_i16) {
      for_cols_segments(j, s, band, n, [&](int64_t off, int64_t len) {
        j.k.convert_cols_i16(xseg(j, s, off, c0), s.out + off + c0, len, s.s1c.data(), s.s2c.data(), j.qm, j.biased,
                             j.counts_out ? &s.counts : nullptr);
      });
    } else if (j.stochastic) {
      convert_stochastic_rows(j, band, c0, n, s);
    } else {
      for_band_rows(j, band, [&](int64_t off) { j.k.convert(xseg(j, s, off, c0), s.out + off + c0, n, j.bc, args); });
    }
    if (j.counts_out && !cols_i16)
      for_cols_segments(j, s, band, n, [&](int64_t off, int64_t len) {
        count_row(j, xseg(j, s, off, c0), s.out + off + c0, len, s);
      });
  }
  if (!j.counts_out) return;
  for (int64_t b = 0; b < nb; ++b)
    if (s.block_ok[b]) s.emin = std::min(s.emin, s.e[b]), s.emax = std::max(s.emax, s.e[b]);
}

void init_scratch(const BlockJob& j, UnitScratch& s) {
  s.acc.resize(size_t(j.cb_per_unit * kAmaxLanes));
  s.s1.resize(size_t(j.cb_per_unit));
  s.s2.resize(size_t(j.cb_per_unit));
  s.e.resize(size_t(j.cb_per_unit));
  s.block_ok.resize(size_t(j.cb_per_unit));
  if (j.deq || j.i8) s.row.resize(size_t(std::min(j.C, j.cb_per_unit * j.bc)));
  if (j.patches) s.band.resize(size_t(std::min(j.br, j.R) * std::min(j.C, j.cb_per_unit * j.bc)));
  s.s1c.resize(size_t(std::min(j.C, j.cb_per_unit * j.bc)));
  s.s2c.resize(s.s1c.size());
  s.out = j.out;
  s.out8 = j.out8;
}

void block_worker(const std::shared_ptr<BlockJob>& job) {
  BlockJob& j = *job;
  UnitScratch s;
  init_scratch(j, s);
  int64_t done = 0;
  {
    const WorkerFpEnv fp_env;  // RNE + DAZ/FTZ, as XLA:CPU
    for (;;) {
      const int64_t u = j.next.fetch_add(1, std::memory_order_relaxed);
      if (u >= j.nunits) break;
      run_unit(j, u, s);
      ++done;
    }
  }
  if (!done) return;
  if (j.counts_out) j.totals.add(s.counts, s.emin, s.emax, done, j.nunits, j.counts_out, j.erange_out);
  j.done.CountDown(size_t(done));
}

// Shapes, block attribute and the format attributes, checked; fills the job's geometry.
// `out` is int16 (or int8 for formats of <= 8 bits), or float32 for JdfpBlockFakeQuantize (`fake`).
// `out` null: the fused patch GEMM's int16 values, written to its workers' buffers (j.out stays null).
ffi::Error set_up(BlockJob& j, ffi::AnyBuffer x, ffi::AnyBuffer* out, ffi::AnyBuffer e, bool fake,
                  ffi::Span<const int64_t> block, int32_t kind, int32_t bits, int32_t rounding) {
  auto bad = [](const std::string& m) { return invalid_as("block_quantize", m); };
  if (x.element_type() != ffi::F32) return bad("x must be float32");
  const bool i8 = out && !fake && out->element_type() == ffi::S8;
  if (fake && out->element_type() != ffi::F32) return bad("y must be float32");
  if (out && !fake && !i8 && out->element_type() != ffi::S16) return bad("out must be int16 or int8");
  if (e.element_type() != ffi::S32) return bad("e must be int32");
  // Patch mode: the tensor converted is the patch matrix [1, rows, taps * C] of the image x.
  const int64_t patch_dims[3] = {1, j.geom.rows, j.geom.cols};
  const auto dx = j.patches ? ffi::Span<const int64_t>(patch_dims, 3) : x.dimensions();
  const auto dout = out ? out->dimensions() : dx, de = e.dimensions();
  if (dx.size() != 3) return bad("x must be 3-D [B, R, C], got " + dims_str(dx));
  if (dout.size() != 3 || !std::equal(dx.begin(), dx.end(), dout.begin()))
    return bad(std::string(j.patches ? "out must be the patch matrix [1, rows, taps * C] " : "out must have x's shape ") +
               dims_str(dx) + ", got " + dims_str(dout));
  if (block.size() != 3 || block[0] < 1 || block[1] < 1 || block[2] < 1)
    return bad("block must be three ints >= 1 (bb, br, bc)");
  if (kind != 0 && kind != 1) return bad("kind must be 0 (DFP) or 1 (BFP), got " + std::to_string(kind));
  if (kind == 0 && (bits < 2 || bits > 16)) return bad("bits must be in [2, 16] for DFP, got " + std::to_string(bits));
  if (kind == 1 && (bits < 1 || bits > 15)) return bad("bits (mantissa) must be in [1, 15] for BFP, got " + std::to_string(bits));
  if (rounding < kRoundNearest || rounding > kRoundBiased)
    return bad("rounding must be 0 (nearest), 1 (stochastic) or 2 (biased), got " + std::to_string(rounding));
  if (fake && rounding == kRoundStochastic) return bad("the fake-quantize call takes nearest or biased rounding");
  if (i8 && bits > (kind == 1 ? 7 : 8))
    return bad(std::string("out may be int8 only for formats of <= 8 bits (|q| <= 127): ") +
               (kind == 1 ? "BFP mantissa bits <= 7" : "DFP bits <= 8") + ", got bits " + std::to_string(bits));
  j.B = dx[0], j.R = dx[1], j.C = dx[2];
  j.bb = std::min(block[0], std::max<int64_t>(j.B, 1));
  j.br = std::min(block[1], std::max<int64_t>(j.R, 1));
  j.bc = std::min(block[2], std::max<int64_t>(j.C, 1));
  j.GB = (j.B + j.bb - 1) / j.bb, j.GR = (j.R + j.br - 1) / j.br, j.GC = (j.C + j.bc - 1) / j.bc;
  if (de.size() != 3 || de[0] != j.GB || de[1] != j.GR || de[2] != j.GC)
    return bad("e must be the block grid [" + std::to_string(j.GB) + ", " + std::to_string(j.GR) + ", " +
               std::to_string(j.GC) + "], got " + dims_str(de));
  j.bfp = kind == 1, j.biased = rounding == kRoundBiased, j.bits = bits;
  j.qm = float(j.bfp ? (int32_t(1) << bits) - 1 : qmax_of(bits));
  const int64_t band_rows = std::min(j.bb, j.B) * std::min(j.br, j.R);
  j.cb_per_unit = std::clamp<int64_t>(kUnitElems / std::max<int64_t>(1, band_rows * j.bc), 1,
                                      std::min(kMaxUnitBlocks, std::max<int64_t>(j.GC, 1)));
  j.units_per_band = (j.GC + j.cb_per_unit - 1) / j.cb_per_unit;
  j.nunits = j.GB * j.GR * j.units_per_band;
  j.x = static_cast<const float*>(x.untyped_data());
  if (fake) j.deq = static_cast<float*>(out->untyped_data());
  else if (i8) j.out8 = static_cast<int8_t*>(out->untyped_data()), j.i8 = true;
  else if (out) j.out = static_cast<int16_t*>(out->untyped_data());
  j.e = static_cast<int32_t*>(e.untyped_data());
  return ffi::Error::Success();
}

// counts / erange: the statistics variant's results (null: plain conversion).
ffi::Error set_up_stats(BlockJob& j, ffi::AnyBuffer* counts, ffi::AnyBuffer* erange, const IsaKernels& kernels) {
  if (!counts) return ffi::Error::Success();
  auto bad = [](const std::string& m) { return invalid_as("block_quantize", m); };
  if (counts->element_type() != ffi::S32 || counts->element_count() != 4) return bad("counts (result) must be int32 [4]");
  if (erange->element_type() != ffi::S32 || erange->element_count() != 2) return bad("erange (result) must be int32 [2]");
  if (j.B * j.R * j.C > int64_t(2147483647)) return bad("x has more than 2**31 - 1 elements (int32 counts)");
  j.stats = kernels.stats;
  j.counts_out = static_cast<int32_t*>(counts->untyped_data());
  j.erange_out = static_cast<int32_t*>(erange->untyped_data());
  return ffi::Error::Success();
}

// fake: `out` is JdfpBlockFakeQuantize's float32 y.
// The key operand (uint32 [2], the Philox key) and, for stochastic rounding, the ISA's kernel.
ffi::Error set_up_key(BlockJob& j, ffi::AnyBuffer key, int32_t rounding, const IsaKernels& kernels) {
  if (key.element_type() != ffi::U32 || key.element_count() != 2)
    return invalid_as("block_quantize", "key must be uint32 [2] (the Philox key), got " + dims_str(key.dimensions()));
  uint32_t words[2];
  std::memcpy(words, key.untyped_data(), 8);
  j.key = PhiloxKey{words[0], words[1]};
  if (rounding == kRoundStochastic) j.stochastic = kernels.convert_stochastic;
  return ffi::Error::Success();
}

// The conv attributes of the patch-matrix handlers (conv_geometry.h).
struct PatchAttrs {
  ffi::Span<const int64_t> strides, plo, phi, ldil, rdil, kernel_spatial;
};

// Patch mode: the tensor converted is the patch matrix of the conv input x (`who` names the handler
// in errors).
ffi::Error set_up_patches(BlockJob& j, ffi::AnyBuffer x, const PatchAttrs& patch, const char* who) {
  ConvAttrs at{};
  std::string err;
  if (x.element_type() != ffi::F32) return invalid_as(who, "x must be float32");
  if (!read_attrs(patch.strides, patch.plo, patch.phi, patch.ldil, patch.rdil, 1, at, err) ||
      !j.geom.init(x.dimensions(), patch.kernel_spatial, at, err))
    return invalid_as(who, err);
  j.patches = true;
  return ffi::Error::Success();
}

ffi::Future block_quantize_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer key, ffi::Result<ffi::AnyBuffer> out,
                                ffi::Result<ffi::AnyBuffer> e, bool fake, ffi::AnyBuffer* counts, ffi::AnyBuffer* erange,
                                ffi::Span<const int64_t> block, int32_t kind, int32_t bits, int32_t rounding,
                                int32_t isa, const PatchAttrs* patch = nullptr) {
  const IsaKernels* kernels = nullptr;
  if (ffi::Error err = select_isa("block_quantize", isa, kernels); err.failure()) return error_future(std::move(err));
  auto job = std::make_shared<BlockJob>();
  if (patch) {
    if (ffi::Error err = set_up_patches(*job, x, *patch, "block_quantize"); err.failure())
      return error_future(std::move(err));
  }
  if (ffi::Error err = set_up(*job, x, &*out, *e, fake, block, kind, bits, rounding); err.failure())
    return error_future(std::move(err));
  if (ffi::Error err = set_up_stats(*job, counts, erange, *kernels); err.failure()) return error_future(std::move(err));
  if (ffi::Error err = set_up_key(*job, key, rounding, *kernels); err.failure()) return error_future(std::move(err));
  job->k = kBlockTable[kernels - &isa_kernels(0)];
  if (job->nunits == 0) {  // an empty tensor: nothing to convert, no exponents (nor counts)
    if (counts) std::fill_n(job->counts_out, 4, 0), std::fill_n(job->erange_out, 2, 0);
    ffi::Promise p;
    ffi::Future f(p);
    p.SetAvailable();
    return f;
  }
  // Pool threads only when there is more than one unit's worth of work for them (and not for small tensors).
  const int64_t elems = job->B * job->R * job->C;
  const int64_t nthreads = elems < kInlineElems ? 1 : std::min(pool_workers(pool), job->nunits);
  job->done = ffi::CountDownPromise(size_t(job->nunits));
  ffi::Future fut(job->done);
  for (int64_t w = 1; w < nthreads; ++w) pool.Schedule([job]() { block_worker(job); });
  block_worker(job);  // the calling thread finishes every unit if nobody else shows up
  return fut;
}

// ---------------------------------------------------------------- patch conversion + GEMM
// JdfpBlockPatchGemm(Stats): the forward product of a block-format conv whose converted patch matrix
// nobody keeps (deterministic forward rounding: the backward converts x again).  A work item is a
// run of row bands: converted (run_unit, as JdfpBlockQuantizePatches) into the worker's buffer, then
// multiplied by b on the spot (RowGemm: the INT16 kernel, or the INT8 kernel for int8 b and formats
// of <= 8 bits, on those rows and every column).  The matrix is never stored whole and its rows are
// still in L2 when the GEMM packs them; bit for bit the conversion call followed by JdfpGemmI16 /
// JdfpGemmI8 on its result.
struct PatchGemmJob : BlockJob {
  std::unique_ptr<RowGemm> gemm;
  int32_t bits_b = 0;
  int64_t bands_per_item = 1, nitems = 0;
};

// The rows of a work item: 8 bands (192 rows at HBFP's 24) unless that leaves under four items per
// worker; one band at least.
constexpr int64_t kItemRows = 192;

void patch_gemm_worker(const std::shared_ptr<PatchGemmJob>& job) {
  PatchGemmJob& j = *job;
  UnitScratch s;
  init_scratch(j, s);
  // Kept per thread: a fresh buffer per call would be page-faulted in again every step.
  thread_local std::vector<int16_t> a;
  thread_local std::vector<int32_t> ea;
  const int64_t item_rows = j.bands_per_item * j.br;
  if (a.size() < size_t(item_rows * j.C)) a.resize(size_t(item_rows * j.C));
  if (ea.size() < size_t(item_rows * j.GC)) ea.resize(size_t(item_rows * j.GC));
  int16_t* a16 = a.data();
  int8_t* a8 = reinterpret_cast<int8_t*>(a.data());
  int64_t done = 0, units = 0;
  int bad = 0;
  {
    const WorkerFpEnv fp_env;  // RNE + DAZ/FTZ, as XLA:CPU
    for (;;) {
      const int64_t it = j.next.fetch_add(1, std::memory_order_relaxed);
      if (it >= j.nitems) break;
      ++done;
      const int64_t band0 = it * j.bands_per_item, band1 = std::min(j.GR, band0 + j.bands_per_item);
      const int64_t r0 = band0 * j.br, r1 = std::min(j.R, band1 * j.br);
      units += (band1 - band0) * j.units_per_band;
      if (bad) continue;  // keep counting so the promise completes; the result is an error anyway
      // Element (r, c) of the patch matrix (global index r * C + c) lands at a[(r - r0) * C + c].
      if (j.i8) s.out8 = a8 - r0 * j.C;
      else s.out = a16 - r0 * j.C;
      for (int64_t u = band0 * j.units_per_band; u < band1 * j.units_per_band; ++u) run_unit(j, u, s);
      for (int64_t r = r0; r < r1; ++r) std::copy_n(j.e + (r / j.br) * j.GC, j.GC, ea.data() + (r - r0) * j.GC);
      bad = j.gemm->run(r0, r1, j.i8 ? static_cast<const void*>(a8) : a16, ea.data());
    }
  }
  if (!done) return;
  if (j.counts_out) j.totals.add(s.counts, s.emin, s.emax, units, j.nunits, j.counts_out, j.erange_out);
  if (bad) {
    // Converted values are clipped to the format, so only b can be out of range.
    j.done.CountDown(size_t(done), invalid_as("block_patch_gemm", std::string(j.i8 ? "int8" : "int16") +
                                              " operand b has a value outside [-qmax, qmax] for bits_b=" +
                                              std::to_string(j.bits_b)));
  } else {
    j.done.CountDown(size_t(done));
  }
}

ffi::Future block_patch_gemm_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer key, ffi::AnyBuffer b,
                                  ffi::Buffer<ffi::S32> eb, ffi::Result<ffi::Buffer<ffi::F32>> y,
                                  ffi::Result<ffi::AnyBuffer> e, ffi::AnyBuffer* counts, ffi::AnyBuffer* erange,
                                  ffi::Span<const int64_t> block, int32_t kind, int32_t bits, int32_t rounding,
                                  int32_t bits_b, int32_t isa, const PatchAttrs& patch) {
  auto bad = [](const std::string& m) { return error_future(invalid_as("block_patch_gemm", m)); };
  const IsaKernels* kernels = nullptr;
  if (ffi::Error err = select_isa("block_patch_gemm", isa, kernels); err.failure()) return error_future(std::move(err));
  const bool i8 = b.element_type() == ffi::S8;
  if (!i8 && b.element_type() != ffi::S16) return bad("b must be int16 (INT16 kernel) or int8 (INT8 kernel)");
  auto job = std::make_shared<PatchGemmJob>();
  PatchGemmJob& j = *job;
  if (ffi::Error err = set_up_patches(j, x, patch, "block_patch_gemm"); err.failure()) return error_future(std::move(err));
  if (ffi::Error err = set_up(j, x, nullptr, *e, false, block, kind, bits, rounding); err.failure())
    return error_future(std::move(err));
  if (ffi::Error err = set_up_stats(j, counts, erange, *kernels); err.failure()) return error_future(std::move(err));
  if (ffi::Error err = set_up_key(j, key, rounding, *kernels); err.failure()) return error_future(std::move(err));
  if (rounding == kRoundStochastic) return bad("the fused patch GEMM takes nearest or biased rounding");
  const int32_t bits_a = j.bfp ? j.bits + 1 : j.bits;
  if (i8 && bits_a > 8)
    return bad("int8 b (the INT8 kernel) needs a format of <= 8 bits (|q| <= 127), got bits " + std::to_string(bits_a));
  j.i8 = i8;
  j.bits_b = bits_b;
  j.k = kBlockTable[kernels - &isa_kernels(0)];
  // The GEMM: a = the patch matrix [1, rows, K] on the conversion's column blocks (KB = GC).
  const int64_t a_dims[3] = {1, j.R, j.C}, ea_dims[3] = {1, j.R, j.GC};
  GemmShape gs;
  gs.da = ffi::Span<const int64_t>(a_dims, 3);
  gs.dea = ffi::Span<const int64_t>(ea_dims, 3);
  gs.db = b.dimensions(), gs.deb = eb.dimensions(), gs.dout = y->dimensions();
  if (gs.db.size() != 3 || gs.deb.size() != 3 || gs.dout.size() != 3 || gs.db[0] != 1 || gs.deb[0] != 1 ||
      gs.dout[0] != 1)
    return bad("b, eb and y must be 3-D with batch 1: b [1, K, N], eb [1, KB, N or 1], y [1, rows, N]; got b " +
               dims_str(gs.db) + " eb " + dims_str(gs.deb) + " y " + dims_str(gs.dout));
  const int64_t block_k = j.GC == 1 ? -1 : j.bc;
  auto make = i8 ? make_row_gemm_i8 : make_row_gemm_i16;
  if (ffi::Error err = make(gs, block_k, b.untyped_data(), eb.typed_data(), y->typed_data(), bits_a, bits_b, isa, j.gemm);
      err.failure())
    return error_future(std::move(err));
  if (gs.N == 0) return bad("b has no columns (N = 0): nothing to multiply");
  if (j.nunits == 0) {  // no rows (an empty batch): y and e are empty, the counts zero
    if (counts) std::fill_n(j.counts_out, 4, 0), std::fill_n(j.erange_out, 2, 0);
    ffi::Promise p;
    ffi::Future f(p);
    p.SetAvailable();
    return f;
  }
  const int64_t nthreads = std::min(pool_workers(pool), j.GR);
  j.bands_per_item = std::max<int64_t>(1, std::min(kItemRows / std::max<int64_t>(j.br, 1),
                                                   j.GR / std::max<int64_t>(1, 4 * nthreads)));
  j.nitems = (j.GR + j.bands_per_item - 1) / j.bands_per_item;
  j.done = ffi::CountDownPromise(size_t(j.nitems));
  ffi::Future fut(j.done);
  for (int64_t w = 1; w < std::min(nthreads, j.nitems); ++w) pool.Schedule([job]() { patch_gemm_worker(job); });
  patch_gemm_worker(job);
  return fut;
}

}  // namespace
}  // namespace jdfp

JDFP_EXPORT XLA_FFI_Error* JdfpBlockQuantize(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpBlockQuantizeStats(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpBlockFakeQuantize(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpBlockQuantizePatches(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpBlockQuantizePatchesStats(XLA_FFI_CallFrame*);

static ffi::Future block_quantize(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer key,
    ffi::Result<ffi::AnyBuffer> out,
                                  ffi::Result<ffi::AnyBuffer> e, ffi::Span<const int64_t> block, int32_t kind,
                                  int32_t bits, int32_t rounding, int32_t isa) {
  return jdfp::block_quantize_impl(pool, x, key, out, e, false, nullptr, nullptr, block, kind, bits, rounding, isa);
}

static ffi::Future block_quantize_stats(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer key,
    ffi::Result<ffi::AnyBuffer> out,
                                        ffi::Result<ffi::AnyBuffer> e, ffi::Result<ffi::AnyBuffer> counts,
                                        ffi::Result<ffi::AnyBuffer> erange, ffi::Span<const int64_t> block,
                                        int32_t kind, int32_t bits, int32_t rounding, int32_t isa) {
  return jdfp::block_quantize_impl(pool, x, key, out, e, false, &*counts, &*erange, block, kind, bits, rounding, isa);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpBlockQuantizeStats, block_quantize_stats,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("block")
                                  .Attr<int32_t>("kind")
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("rounding")
                                  .Attr<int32_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpBlockQuantize, block_quantize,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("block")
                                  .Attr<int32_t>("kind")
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("rounding")
                                  .Attr<int32_t>("isa"));

static ffi::Future block_fake_quantize(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer key,
    ffi::Result<ffi::AnyBuffer> y,
                                       ffi::Result<ffi::AnyBuffer> e, ffi::Span<const int64_t> block, int32_t kind,
                                       int32_t bits, int32_t rounding, int32_t isa) {
  return jdfp::block_quantize_impl(pool, x, key, y, e, true, nullptr, nullptr, block, kind, bits, rounding, isa);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpBlockFakeQuantize, block_fake_quantize,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("block")
                                  .Attr<int32_t>("kind")
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("rounding")
                                  .Attr<int32_t>("isa"));

// The patch matrix of a convolution (conv_geometry.h) converted by tiles without being stored: x is
// the conv's input [N, D, H, W, C]; out, e (and counts, erange) as above for the [1, rows, taps * C] matrix.
using Span64 = ffi::Span<const int64_t>;

static ffi::Future block_quantize_patches(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer key,
                                          ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> e, Span64 block,
                                          int32_t kind, int32_t bits, int32_t rounding, int32_t isa, Span64 strides,
                                          Span64 plo, Span64 phi, Span64 ldil, Span64 rdil, Span64 ks) {
  const jdfp::PatchAttrs pa{strides, plo, phi, ldil, rdil, ks};
  return jdfp::block_quantize_impl(pool, x, key, out, e, false, nullptr, nullptr, block, kind, bits, rounding, isa, &pa);
}

static ffi::Future block_quantize_patches_stats(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer key,
                                                ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> e,
                                                ffi::Result<ffi::AnyBuffer> counts, ffi::Result<ffi::AnyBuffer> erange,
                                                Span64 block, int32_t kind, int32_t bits, int32_t rounding, int32_t isa,
                                                Span64 strides, Span64 plo, Span64 phi, Span64 ldil, Span64 rdil,
                                                Span64 ks) {
  const jdfp::PatchAttrs pa{strides, plo, phi, ldil, rdil, ks};
  return jdfp::block_quantize_impl(pool, x, key, out, e, false, &*counts, &*erange, block, kind, bits, rounding, isa,
                                   &pa);
}

#define JDFP_PATCH_ATTRS                   \
  .Attr<Span64>("block")                   \
      .Attr<int32_t>("kind")               \
      .Attr<int32_t>("bits")               \
      .Attr<int32_t>("rounding")           \
      .Attr<int32_t>("isa")                \
      JDFP_CONV_SPATIAL_ATTRS              \
      .Attr<Span64>("kernel_spatial")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpBlockQuantizePatches, block_quantize_patches,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() JDFP_PATCH_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpBlockQuantizePatchesStats, block_quantize_patches_stats,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() JDFP_PATCH_ATTRS);

// The patch matrix's conversion and its GEMM with b in one call (PatchGemmJob): x and key as above; b
// int16 [1, K, N] (INT16 kernel) or int8 (INT8 kernel, formats of <= 8 bits), eb int32 [1, KB, N or 1]
// (KB: the conversion's column blocks) -> y float32 [1, rows, N], e (and counts, erange) as
// JdfpBlockQuantizePatches(Stats).  attrs: the patch attrs plus bits_b.
JDFP_EXPORT XLA_FFI_Error* JdfpBlockPatchGemm(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpBlockPatchGemmStats(XLA_FFI_CallFrame*);

static ffi::Future block_patch_gemm(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer key, ffi::AnyBuffer b,
                                    ffi::Buffer<ffi::S32> eb, ffi::Result<ffi::Buffer<ffi::F32>> y,
                                    ffi::Result<ffi::AnyBuffer> e, Span64 block, int32_t kind, int32_t bits,
                                    int32_t rounding, int32_t isa, Span64 strides, Span64 plo, Span64 phi,
                                    Span64 ldil, Span64 rdil, Span64 ks, int32_t bits_b) {
  const jdfp::PatchAttrs pa{strides, plo, phi, ldil, rdil, ks};
  return jdfp::block_patch_gemm_impl(pool, x, key, b, eb, y, e, nullptr, nullptr, block, kind, bits, rounding, bits_b,
                                     isa, pa);
}

static ffi::Future block_patch_gemm_stats(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer key,
                                          ffi::AnyBuffer b, ffi::Buffer<ffi::S32> eb,
                                          ffi::Result<ffi::Buffer<ffi::F32>> y, ffi::Result<ffi::AnyBuffer> e,
                                          ffi::Result<ffi::AnyBuffer> counts, ffi::Result<ffi::AnyBuffer> erange,
                                          Span64 block, int32_t kind, int32_t bits, int32_t rounding, int32_t isa,
                                          Span64 strides, Span64 plo, Span64 phi, Span64 ldil, Span64 rdil, Span64 ks,
                                          int32_t bits_b) {
  const jdfp::PatchAttrs pa{strides, plo, phi, ldil, rdil, ks};
  return jdfp::block_patch_gemm_impl(pool, x, key, b, eb, y, e, &*counts, &*erange, block, kind, bits, rounding,
                                     bits_b, isa, pa);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpBlockPatchGemm, block_patch_gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>() JDFP_PATCH_ATTRS
                                  .Attr<int32_t>("bits_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpBlockPatchGemmStats, block_patch_gemm_stats,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() JDFP_PATCH_ATTRS
                                  .Attr<int32_t>("bits_b"));
