// AMX-INT8 tiles for the exact INT16 GEMM with one exponent pair per output element (KB == 1:
// per-tensor, per-row and per-column exponents; docs/arithmetic.md, "The INT16 GEMM on AMX-INT8
// tiles").
//
// AMX multiplies bytes only, so each int16 value is split into a signed high byte and an unsigned
// low byte, v = 256 * h + l (h = v >> 8 in [-128, 127], l = v & 255), and the contract's exact sum
// over K is assembled from four byte GEMMs on the tiles:
//   S = 2**16 * sum(ha * hb) + 2**8 * (sum(ha * lb) + sum(la * hb)) + sum(la * lb)
//       (tdpbssd)                (tdpbsud)      (tdpbusd)            (tdpbuud)
// For K <= kAmxMaxK = 16384 each of the three int32 tile sums is exact (|hh| <= K * 2**14,
// |mid| <= K * 2 * 128 * 255, 0 <= ll <= K * 255**2, all < 2**31), S is exact in int64 and in
// float64 (|S| <= K * 32767**2 < 2**44), so float(double(S)) is the contract's one rounding f(S);
// then scale2(f(S), ea + eb) as every kernel does.  Bit-identical to the other paths.
//
// Layouts (bytes, K padded with zeros to a multiple of 64, rows / columns to multiples of 16):
//   A panel: [row block][k step][plane h|l][16 rows][64 k]            (the tile's rows are m)
//   B panel: [col block][k step][plane h|l][16 k quads][16 cols x 4 k] (tdp*'s "VNNI" B layout)
// The per-thread tile state (ldtilecfg) is loaded per tile and released after it.
#include "amx_common.h"

namespace jdfp {
namespace {

using namespace amx;

constexpr int kStep = 2 * kPlane;     // the h and l planes of one 16-row, 64-k block
constexpr int64_t kKcSteps = 8;      // k steps per K chunk (512 k)

// Splits 32 int16 into their high (signed) and low (unsigned) bytes.
static inline void split32(__m512i v, uint8_t* hi, uint8_t* lo) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), _mm512_cvtepi16_epi8(_mm512_srai_epi16(v, 8)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo), _mm512_cvtepi16_epi8(v));
}

// Operand view X[r, k] = src[r * sr + k * sk], rows [r0, r0 + rows), K columns.  A float32 view
// (fsrc) is quantized while packing with row r's exponent e[r * es], as quantize1 does.  A conv view
// gathers X from the int16 input at src instead (the convolution's patch matrix, never stored): rows
// are output pixels, k their (tap, channel) columns, row 0 of the view is pixel `row0`.
struct View {
  const int16_t* src;
  int64_t sr, sk, rows, K;
  const float* fsrc = nullptr;
  const int32_t* e = nullptr;
  int64_t es = 0;
  int32_t qmax = 0;
  const ConvGeom* conv = nullptr;
  int64_t row0 = 0;
};

// clip(round_half_even(scale2(x, -e)), +-qmax) of 16 floats (quantize1; vcvtps2dq rounds half to
// even under the workers' MXCSR), NaN -> 0.
static inline __m256i quantize16(__m512 x, __m512 s1, __m512 s2, __m512 qm) {
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(x, s1), s2);
  y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), _mm512_setzero_ps());
  y = _mm512_min_ps(_mm512_max_ps(y, _mm512_sub_ps(_mm512_setzero_ps(), qm)), qm);
  return _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(y));
}

// The two power-of-two factors of scale2(x, -e) for rows [r0, r0 + 16) (0 past the view's rows and
// for a NONFINITE row, which quantizes to zeros; its outputs are NaN anyway).
static inline void row_scales(const View& x, int64_t r0, float* s1, float* s2) {
  for (int r = 0; r < 16; ++r) {
    const int32_t ei = r0 + r < x.rows ? x.e[(r0 + r) * x.es] : kNonfiniteExponent;
    const int32_t ne = -eclamp(ei);
    const int32_t e1 = clamp_i32(ne, -126, 127);
    s1[r] = ei == kNonfiniteExponent ? 0.0f : pow2f(e1);
    s2[r] = pow2f(clamp_i32(ne - e1, -126, 127));
  }
}

// Quantizes a 16-row, 64-k block of a float32 view into int16, zero padded, in the source's
// orientation: rows ([16][64], returns a view with sk == 1) or, when rows are contiguous,
// columns ([64][16], sr == 1), so that block_rows / block_quads take their fast paths.
static inline View stage_f32(const View& x, int64_t r0, int64_t k0, int16_t* t) {
  alignas(64) float s1[16], s2[16];
  row_scales(x, r0, s1, s2);
  const __m512 qm = _mm512_set1_ps(float(x.qmax));
  const int64_t rn = std::min<int64_t>(16, x.rows - r0), kn = std::min<int64_t>(64, x.K - k0);
  const float* src = x.fsrc + r0 * x.sr + k0 * x.sk;
  if (x.sr == 1 && x.sk != 1) {
    const __mmask16 rm = first_lanes(rn);
    const __m512 v1 = _mm512_load_ps(s1), v2 = _mm512_load_ps(s2);
    for (int k = 0; k < 64; ++k) {
      const __m512 v = k < kn ? _mm512_maskz_loadu_ps(rm, src + k * x.sk) : _mm512_setzero_ps();
      _mm256_store_si256(reinterpret_cast<__m256i*>(t + k * 16), quantize16(v, v1, v2, qm));
    }
    return View{t, 1, 16, 16, 64};
  }
  for (int r = 0; r < 16; ++r) {
    const __m512 v1 = _mm512_set1_ps(s1[r]), v2 = _mm512_set1_ps(s2[r]);
    for (int c = 0; c < 4; ++c) {
      const int64_t n = r < rn ? std::min<int64_t>(16, kn - 16 * c) : 0;
      __m512 v = _mm512_setzero_ps();
      if (n > 0 && x.sk == 1) {
        v = _mm512_maskz_loadu_ps(first_lanes(n), src + r * x.sr + 16 * c);
      } else if (n > 0) {
        alignas(64) float tmp[16] = {};
        for (int64_t k = 0; k < n; ++k) tmp[k] = src[r * x.sr + (16 * c + k) * x.sk];
        v = _mm512_load_ps(tmp);
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(t + r * 64 + 16 * c), quantize16(v, v1, v2, qm));
    }
  }
  return View{t, 64, 1, 16, 64};
}

// Gathers pixel rows [r0, r0 + 16) of a conv view whole (all K) into int16, rows ld values apart:
// each pixel's patch row is read once per panel, a tap's channels at a time.
static void gather_conv(const View& x, int64_t r0, int64_t ld, int16_t* t) {
  const ConvGeom& g = *x.conv;
  const int64_t rn = std::min<int64_t>(16, x.rows - r0);
  PixCursor px(g, x.row0 + r0);
  const PatchCol first = patch_col(g, 0);
  for (int r = 0; r < rn; ++r, px.next(g))
    patch_row(reinterpret_cast<const uint16_t*>(x.src), g, px, first, x.K, reinterpret_cast<uint16_t*>(t + r * ld));
}

// One 16-row, 64-k block in the A layout (h plane at dst, l plane at dst + kPlane), zero padded.
static inline void block_rows(const View& x, int64_t r0, int64_t k0, uint8_t* dst, MinMax<int16_t>& mm) {
  const int64_t kn = std::min<int64_t>(64, x.K - k0);
  for (int r = 0; r < 16; ++r) {
    uint8_t* h = dst + r * 64;
    uint8_t* l = dst + kPlane + r * 64;
    if (r0 + r >= x.rows) {
      std::memset(h, 0, 64), std::memset(l, 0, 64);
      continue;
    }
    const int16_t* s = x.src + (r0 + r) * x.sr + k0 * x.sk;
    for (int half = 0; half < 2; ++half) {
      const int64_t n = std::min<int64_t>(32, kn - 32 * half);
      __m512i v = _mm512_setzero_si512();
      if (x.sk == 1) {
        if (n > 0) v = _mm512_maskz_loadu_epi16(__mmask32(n >= 32 ? ~0u : (1u << n) - 1), s + 32 * half);
      } else {
        alignas(64) int16_t tmp[32] = {};
        for (int64_t k = 0; k < n; ++k) tmp[k] = s[(32 * half + k) * x.sk];
        v = _mm512_load_si512(tmp);
      }
      mm.add(v);
      split32(v, h + 32 * half, l + 32 * half);
    }
  }
}

// One block in the B layout from rows that are contiguous (sr == 1): 16 rows of 4 consecutive k
// interleaved per quad.
static inline void block_quads(const View& x, int64_t r0, int64_t k0, uint8_t* dst, MinMax<int16_t>& mm) {
  const int64_t rn = std::min<int64_t>(16, x.rows - r0);
  const __mmask16 rmask = first_lanes(rn);
  for (int q = 0; q < 16; ++q) {
    __m128i h[4], l[4];
    for (int t = 0; t < 4; ++t) {
      const int64_t k = k0 + 4 * q + t;
      const __m256i v = k < x.K ? _mm256_maskz_loadu_epi16(rmask, x.src + r0 + k * x.sk) : _mm256_setzero_si256();
      mm.add(_mm512_zextsi256_si512(v));
      h[t] = _mm256_cvtepi16_epi8(_mm256_srai_epi16(v, 8));
      l[t] = _mm256_cvtepi16_epi8(v);
    }
    for (int plane = 0; plane < 2; ++plane) {
      const __m128i* y = plane ? l : h;
      const __m128i t0 = _mm_unpacklo_epi8(y[0], y[1]), t1 = _mm_unpackhi_epi8(y[0], y[1]);
      const __m128i t2 = _mm_unpacklo_epi8(y[2], y[3]), t3 = _mm_unpackhi_epi8(y[2], y[3]);
      __m128i* d = reinterpret_cast<__m128i*>(dst + plane * kPlane + q * 64);
      _mm_storeu_si128(d + 0, _mm_unpacklo_epi16(t0, t2));
      _mm_storeu_si128(d + 1, _mm_unpackhi_epi16(t0, t2));
      _mm_storeu_si128(d + 2, _mm_unpacklo_epi16(t1, t3));
      _mm_storeu_si128(d + 3, _mm_unpackhi_epi16(t1, t3));
    }
  }
}

// Packs rows [r0, r0 + rows) of the view as a panel in the A (b_layout false) or B layout.
// Returns max |value| for the range check.
static int32_t pack_panel(const View& x, bool b_layout, uint8_t* dst) {
  const int64_t nsteps = (x.K + 63) / 64, nblocks = (x.rows + 15) / 16;
  MinMax<int16_t> mm;
  alignas(64) uint8_t tmp[kStep];
  alignas(64) int16_t staged[16 * 64];
  if (x.conv) {  // the patch matrix's pixel rows (forward, backward-data: A), a row block at a time
    thread_local Aligned<int16_t> gathered;
    const int64_t ld = nsteps * 64;
    int16_t* t = gathered.get(size_t(16 * ld));
    for (int64_t rb = 0; rb < nblocks; ++rb) {
      gather_conv(x, rb * 16, ld, t);
      const View v{t, ld, 1, std::min<int64_t>(16, x.rows - rb * 16), x.K};
      for (int64_t s = 0; s < nsteps; ++s) block_rows(v, 0, s * 64, dst + (rb * nsteps + s) * kStep, mm);
    }
    return mm.absmax();
  }
  for (int64_t rb = 0; rb < nblocks; ++rb)
    for (int64_t s = 0; s < nsteps; ++s) {
      uint8_t* d = dst + (rb * nsteps + s) * kStep;
      const View v = x.fsrc ? stage_f32(x, rb * 16, s * 64, staged) : x;
      const int64_t r0 = x.fsrc ? 0 : rb * 16, k0 = x.fsrc ? 0 : s * 64;
      if (v.sr == 1 && v.sk != 1) {
        block_quads(v, r0, k0, b_layout ? d : tmp, mm);
        if (!b_layout) b_to_a_layout(tmp, 16, 64, d), b_to_a_layout(tmp + kPlane, 16, 64, d + kPlane);
      } else {
        block_rows(v, r0, k0, b_layout ? tmp : d, mm);
        if (b_layout) a_to_b_layout(tmp, 64, 16, d), a_to_b_layout(tmp + kPlane, 64, 16, d + kPlane);
      }
    }
  return mm.absmax();
}

// The three int32 sums (hh, mid, ll) of one 16 x 16 output block over `nsteps` k steps, added to
// the sums in acc (or from zero when `first`), stored back to acc.
static inline void block_sums(const uint8_t* a, const uint8_t* b, int64_t nsteps, bool first, int32_t* acc) {
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
  } else {
    _tile_loadd(0, acc, 64);
    _tile_loadd(1, acc + 256, 64);
    _tile_loadd(2, acc + 512, 64);
  }
  for (int64_t s = 0; s < nsteps; ++s, a += kStep, b += kStep) {
    _tile_loadd(3, a, 64);
    _tile_loadd(4, a + kPlane, 64);
    _tile_loadd(5, b, 64);
    _tile_loadd(6, b + kPlane, 64);
    _tile_dpbssd(0, 3, 5);
    _tile_dpbsud(1, 3, 6);
    _tile_dpbusd(1, 4, 5);
    _tile_dpbuud(2, 4, 6);
  }
  _tile_stored(0, acc, 64);
  _tile_stored(1, acc + 256, 64);
  _tile_stored(2, acc + 512, 64);
}

// 8 exact sums 2**16 * hh + 2**8 * mid + ll as float32 (through an exact float64).
static inline __m256 sums8(__m256i hh, __m256i mid, __m256i ll) {
  __m512i s = _mm512_slli_epi64(_mm512_cvtepi32_epi64(hh), 16);
  s = _mm512_add_epi64(s, _mm512_slli_epi64(_mm512_cvtepi32_epi64(mid), 8));
  s = _mm512_add_epi64(s, _mm512_cvtepi32_epi64(ll));
  return _mm512_cvtpd_ps(_mm512_cvtepi64_pd(s));
}

// out[i, j] = scale2(f(S[i, j]), ea_i + eb_j), NaN where either exponent is NONFINITE.
static inline void block_store(const int32_t* acc, const int32_t* ea_rows, int64_t ea_stride, const ColExponents& ce,
                               int mv, int nv, float* C, int64_t ldc) {
  const __mmask16 store = first_lanes(nv);
  for (int i = 0; i < mv; ++i) {
    const int32_t* r = acc + i * 16;
    const __m256 lo = sums8(_mm256_loadu_si256((const __m256i*)r), _mm256_loadu_si256((const __m256i*)(r + 256)),
                            _mm256_loadu_si256((const __m256i*)(r + 512)));
    const __m256 hi = sums8(_mm256_loadu_si256((const __m256i*)(r + 8)),
                            _mm256_loadu_si256((const __m256i*)(r + 264)),
                            _mm256_loadu_si256((const __m256i*)(r + 520)));
    store_row(_mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1), ea_rows[i * ea_stride], ce, store, C + i * ldc);
  }
}

}  // namespace

bool amx_i16_fits(const Problem& P) {
  if (P.KB != 1 || P.a_src || P.K < kAmxMinK || P.M < 1 || P.N < 1) return false;
  // A conv takes the tiles where it gathers A (forward, backward-data); its weight gradient gathers B
  // pixel by pixel, which ran slower here than the AVX-512 kernel's vector gathers.
  if (P.conv && (P.conv->on_b || P.a_f32 || P.b_f32)) return false;
  return P.K <= kAmxMaxK;
}

// One output tile (batch, [m0, m1) x [n0, n1)) of a problem amx_i16_fits accepts.  Returns 0, or 1 / 2
// for an A / B value out of [-qmax, qmax].
int tile_amx_i16(const Problem& P, const Tile& T) {
  const int64_t mb = T.m1 - T.m0, nb = T.n1 - T.n0;
  if (mb <= 0 || nb <= 0) return 0;
  const int64_t nsteps = (P.K + 63) / 64, mblocks = (mb + 15) / 16, nblocks = (nb + 15) / 16;
  thread_local Aligned<uint8_t> apanel_buf;
  thread_local PanelCache bcache;
  const int32_t* ea = P.ea + P.ea_off[T.batch];
  const int32_t* eb = P.eb + P.eb_off[T.batch];
  const int16_t* a = static_cast<const int16_t*>(P.a) + P.a_off[T.batch];
  const int16_t* b = static_cast<const int16_t*>(P.b) + P.b_off[T.batch];
  if (!(bcache.job == P.job_id && P.job_id && bcache.batch == T.batch && bcache.n0 == T.n0 && bcache.n1 == T.n1)) {
    bcache.job = 0;
    bcache.buf.get(size_t(nblocks * nsteps * kStep));
    View vb{b + T.n0 * P.b_sr, P.b_sr, P.b_sk, nb, P.K};
    if (P.b_f32)
      vb.fsrc = static_cast<const float*>(P.b) + P.b_off[T.batch] + T.n0 * P.b_sr, vb.e = eb + T.n0 * P.eb_nstride,
      vb.es = P.eb_nstride, vb.qmax = P.qmax_b;
    if (pack_panel(vb, true, bcache.buf.p) > P.qmax_b) return 2;
    bcache.job = P.job_id, bcache.batch = T.batch, bcache.n0 = T.n0, bcache.n1 = T.n1;
  }
  uint8_t* apanel = apanel_buf.get(size_t(mblocks * nsteps * kStep));
  View va{a + T.m0 * P.a_sr, P.a_sr, P.a_sk, mb, P.K};
  if (P.conv) va.src = a, va.conv = P.conv, va.row0 = T.m0;  // A gathered from the conv input
  if (P.a_f32)
    va.fsrc = static_cast<const float*>(P.a) + P.a_off[T.batch] + T.m0 * P.a_sr, va.e = ea + T.m0 * P.ea_mstride,
    va.es = P.ea_mstride, va.qmax = P.qmax_a;
  if (pack_panel(va, false, apanel) > P.qmax_a) return 1;

  const TileConfig cfg = uniform_config(7, 16, 64);
  _tile_loadconfig(&cfg);
  float* C = P.out + (P.c_off ? P.c_off[T.batch] : T.batch * P.M * P.N);
  // Column block by column block; K in chunks of kKcSteps k steps, so that the chunk's B block
  // (16 KiB) stays in L1 while the row blocks' A blocks stream from L2; each row block's int32 sums
  // (3 KiB) wait in acc between chunks.  (Measured at 2048^3: all column blocks per chunk, or K
  // whole per block, ran 10-20 % slower.)
  thread_local Aligned<int32_t> accbuf;
  int32_t* accs = accbuf.get(size_t(mblocks * 768));
  for (int64_t cb = 0; cb < nblocks; ++cb) {
    const int64_t n0 = T.n0 + cb * 16;
    const int nv = int(std::min<int64_t>(16, T.n1 - n0));
    const ColExponents ce = col_exponents(eb, P.eb_nstride, n0, nv);
    for (int64_t s0 = 0; s0 < nsteps; s0 += kKcSteps) {
      const int64_t ns = std::min(kKcSteps, nsteps - s0);
      const uint8_t* bp = bcache.buf.p + (cb * nsteps + s0) * kStep;
      for (int64_t rb = 0; rb < mblocks; ++rb) {
        const int64_t m0 = T.m0 + rb * 16;
        int32_t* acc = accs + rb * 768;
        block_sums(apanel + (rb * nsteps + s0) * kStep, bp, ns, s0 == 0, acc);
        if (s0 + ns >= nsteps)
          block_store(acc, ea + m0 * P.ea_mstride, P.ea_mstride, ce, int(std::min<int64_t>(16, T.m1 - m0)), nv,
                      C + m0 * P.ldc + n0, P.ldc);
      }
    }
  }
  _tile_release();
  return 0;
}

}  // namespace jdfp
