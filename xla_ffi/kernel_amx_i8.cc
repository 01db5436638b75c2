// AMX-INT8 tiles for the exact INT8 GEMM (docs/arithmetic.md, "The INT8 GEMM on AMX-INT8 tiles"):
// s8 x s8 is tdpbssd itself, exact in its int32 lanes for every chain the contract allows.
//
//   KB == 1 (per-tensor, per-row, per-column exponents), K <= kAmxI8MaxK: the int32 tile sum over
//     all of K is S (|S| <= K * 127**2 < 2**31), cvtdq2ps is f(S), then scale2 as every kernel.
//     32 x 32 output blocks: four accumulator tiles, two A and two B tiles per 64-k step.
//   KB > 1 (HBFP tiles, 1-D blocks) with block_k <= 64 and a multiple of 4, when every exponent
//     pair scales exactly (fast_scale_block over the whole problem, no NONFINITE): one tile step per
//     block; its int32 tile (the block's exact sum, < 2**24 so cvtdq2ps is exact) is stored and
//     added to 16 float32 row accumulators in block order as acc + f * (2**ea * 2**eb), one fused
//     multiply-add with an exact product: the contract's scale2-then-add, bit for bit.
//
// Layouts (bytes; K padded with zeros to whole steps, rows and columns to multiples of 16), a step
// being 64 k (KB == 1) or one block:
//   A panel: [row block][step][16 rows][step k]             (tile rows are m)
//   B panel: [col block][step][step / 4 k-quads][16 cols x 4 k]
#include "amx_common.h"
#include "gemm_i8_common.h"

namespace jdfp {
namespace {

using namespace amx;

struct View8 {
  const int8_t* src;
  int64_t sr, sk, rows, K;
};

static inline __mmask64 first_bytes(int64_t n) { return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1; }

// One 16-row block of `step` k in the A layout (row stride step), zero padded.
static inline void block_rows8(const View8& x, int64_t r0, int64_t k0, int step, uint8_t* dst, MinMax<int8_t>& mm) {
  const int64_t kn = std::min<int64_t>(step, x.K - k0);
  for (int r = 0; r < 16; ++r) {
    __m512i v = _mm512_setzero_si512();
    if (r0 + r < x.rows && kn > 0) {
      const int8_t* s = x.src + (r0 + r) * x.sr + k0 * x.sk;
      if (x.sk == 1) {
        v = _mm512_maskz_loadu_epi8(first_bytes(kn), s);
      } else {
        alignas(64) int8_t tmp[64] = {};
        for (int64_t k = 0; k < kn; ++k) tmp[k] = s[k * x.sk];
        v = _mm512_load_si512(tmp);
      }
    }
    mm.add(v);
    _mm512_mask_storeu_epi8(dst + r * step, first_bytes(step), v);
  }
}

// One block in the B layout from rows that are contiguous (sr == 1): per quad, 16 rows of 4
// consecutive k interleaved.
static inline void block_quads8(const View8& x, int64_t r0, int64_t k0, int step, uint8_t* dst, MinMax<int8_t>& mm) {
  const __mmask16 rmask = first_lanes(x.rows - r0);
  for (int q = 0; q < step / 4; ++q) {
    __m128i y[4];
    for (int t = 0; t < 4; ++t) {
      const int64_t k = k0 + 4 * q + t;
      y[t] = k < x.K ? _mm_maskz_loadu_epi8(rmask, x.src + r0 + k * x.sk) : _mm_setzero_si128();
      mm.add(_mm512_zextsi128_si512(y[t]));
    }
    const __m128i t0 = _mm_unpacklo_epi8(y[0], y[1]), t1 = _mm_unpackhi_epi8(y[0], y[1]);
    const __m128i t2 = _mm_unpacklo_epi8(y[2], y[3]), t3 = _mm_unpackhi_epi8(y[2], y[3]);
    __m128i* d = reinterpret_cast<__m128i*>(dst + q * 64);
    _mm_storeu_si128(d + 0, _mm_unpacklo_epi16(t0, t2));
    _mm_storeu_si128(d + 1, _mm_unpackhi_epi16(t0, t2));
    _mm_storeu_si128(d + 2, _mm_unpacklo_epi16(t1, t3));
    _mm_storeu_si128(d + 3, _mm_unpackhi_epi16(t1, t3));
  }
}

// Packs the view's rows as a panel of 16-row blocks, `step` k per block, in the A or B layout.
// Returns max |value| for the range check.
static int32_t pack_panel8(const View8& x, bool b_layout, int step, uint8_t* dst) {
  const int64_t nsteps = (x.K + step - 1) / step, nblocks = (x.rows + 15) / 16, blk = 16 * step;
  MinMax<int8_t> mm;
  alignas(64) uint8_t tmp[kPlane];
  // A source whose rows are contiguous (sr == 1: each k a row of the source, as a transposed operand
  // or a patch matrix read as B) is walked k step by k step across all row blocks, so that each source
  // row is read whole while in L1 (16 bytes per row block; row block by row block it was fetched
  // again for each: the demo's weight gradient P^T . dy, 288 x 18432 x 32, took 2.19 ms, now 1.89).
  const bool by_step = x.sr == 1 && x.sk != 1;
  for (int64_t i = 0; i < nblocks * nsteps; ++i) {
    const int64_t rb = by_step ? i % nblocks : i / nsteps, s = by_step ? i / nblocks : i % nsteps;
    uint8_t* d = dst + (rb * nsteps + s) * blk;
    if (by_step) {
      block_quads8(x, rb * 16, s * step, step, b_layout ? d : tmp, mm);
      if (!b_layout) b_to_a_layout(tmp, step / 4, step, d);
    } else {
      block_rows8(x, rb * 16, s * step, step, b_layout ? tmp : d, mm);
      if (b_layout) a_to_b_layout(tmp, step, step / 4, d);
    }
  }
  return mm.absmax();
}

// The four int32 tiles of a 32 x 32 output block (quarters: rows a0 / a1 x columns b0 / b1) summed
// over `nsteps` steps `blk` bytes apart (A tile rows `lda` bytes), stored to out[4][256].
static inline void quad_products(const uint8_t* a0, const uint8_t* a1, const uint8_t* b0, const uint8_t* b1,
                                 int64_t lda, int64_t nsteps, int64_t blk, int32_t (*out)[256]) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < nsteps; ++s) {
    _tile_loadd(4, a0 + s * blk, lda);
    _tile_loadd(5, a1 + s * blk, lda);
    _tile_loadd(6, b0 + s * blk, 64);
    _tile_loadd(7, b1 + s * blk, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  _tile_stored(0, out[0], 64);
  _tile_stored(1, out[1], 64);
  _tile_stored(2, out[2], 64);
  _tile_stored(3, out[3], 64);
}

// KB == 1: 32 x 32 output blocks (four 16 x 16 quarters), the int32 sums over all steps.
static void run_per_tensor(const ProblemI8& P, const Tile& T, const uint8_t* ap, const uint8_t* bp, int64_t nsteps,
                           float* C, const int32_t* ea, const int32_t* eb) {
  const int64_t mb = T.m1 - T.m0, nb = T.n1 - T.n0, blk = 16 * 64;
  alignas(64) int32_t acc[4][256];
  for (int64_t c0 = 0; c0 < nb; c0 += 32)
    for (int64_t r0 = 0; r0 < mb; r0 += 32) {
      const uint8_t* a0 = ap + (r0 / 16) * nsteps * blk;
      const uint8_t* a1 = r0 + 16 < mb ? a0 + nsteps * blk : a0;  // a last lone row block reuses its own
      const uint8_t* b0 = bp + (c0 / 16) * nsteps * blk;
      const uint8_t* b1 = c0 + 16 < nb ? b0 + nsteps * blk : b0;
      quad_products(a0, a1, b0, b1, 64, nsteps, blk, acc);
      for (int q = 0; q < 4; ++q) {
        const int64_t m0 = T.m0 + r0 + (q / 2) * 16, n0 = T.n0 + c0 + (q % 2) * 16;
        if (m0 >= T.m1 || n0 >= T.n1) continue;
        const int nv = int(std::min<int64_t>(16, T.n1 - n0));
        const ColExponents ce = col_exponents(eb, P.eb_nstride, n0, nv);
        for (int64_t i = 0; i < std::min<int64_t>(16, T.m1 - m0); ++i)
          store_row(_mm512_cvtepi32_ps(_mm512_load_si512(acc[q] + i * 16)), ea[(m0 + i) * P.ea_mstride], ce,
                    first_lanes(nv), C + (m0 + i) * P.ldc + n0);
      }
    }
}

// KB > 1 (every exponent pair exact, amx_i8_fits): acc += f(S_j) * (2**ea * 2**eb) block by block in
// K order.
static void run_blocked(const ProblemI8& P, const Tile& T, const uint8_t* ap, const uint8_t* bp, int64_t step,
                        float* C, const int32_t* ea, const int32_t* eb) {
  const int64_t mb = T.m1 - T.m0, nb = T.n1 - T.n0, blk = 16 * step, nsteps = P.KB;
  const int64_t eb_j = P.eb_nstride ? P.N : 1, mbp = (mb + 15) / 16 * 16;
  // 2**ea per row and block, 2**eb per column block, block and column (every exponent is in
  // [-126, 127] here), vectorized along the exponents' contiguous axis.
  thread_local Aligned<float> pa_buf, pb_buf;
  float* pa = pa_buf.get(size_t(mbp * nsteps + 16));
  float* pb = pb_buf.get(size_t((nb + 15) / 16 * nsteps * 16));
  for (int64_t i = 0; i < mbp; ++i)
    for (int64_t j = 0; j < nsteps; j += 16) {
      const __mmask16 m = first_lanes(nsteps - j);
      const int64_t row = T.m0 + std::min(i, mb - 1);  // padding rows: any finite scale (their sums are 0)
      _mm512_mask_storeu_ps(pa + i * nsteps + j, m, pow2v(_mm512_maskz_loadu_epi32(m, ea + row * P.ea_mstride + j)));
    }
  for (int64_t c0 = 0; c0 < nb; c0 += 16) {
    const __mmask16 m = first_lanes(nb - c0);
    for (int64_t j = 0; j < nsteps; ++j) {
      const int32_t* e = eb + j * eb_j + (T.n0 + c0) * P.eb_nstride;
      const __m512i v = P.eb_nstride ? _mm512_maskz_loadu_epi32(m, e) : _mm512_set1_epi32(e[0]);
      _mm512_store_ps(pb + ((c0 / 16) * nsteps + j) * 16, pow2v(v));
    }
  }
  // 32 x 32 output blocks: per exponent block, four tile products (two A and two B tiles), then
  // their sums added to the float32 accumulators (in L1: 64 rows of 16).
  alignas(64) int32_t s32[4][256];
  alignas(64) float acc[4][256];
  for (int64_t c0 = 0; c0 < nb; c0 += 32)
    for (int64_t r0 = 0; r0 < mb; r0 += 32) {
      const bool two_r = r0 + 16 < mb, two_c = c0 + 16 < nb;
      const uint8_t* a0 = ap + (r0 / 16) * nsteps * blk;
      const uint8_t* a1 = two_r ? a0 + nsteps * blk : a0;
      const uint8_t* b0 = bp + (c0 / 16) * nsteps * blk;
      const uint8_t* b1 = two_c ? b0 + nsteps * blk : b0;
      std::memset(acc, 0, sizeof(acc));
      for (int64_t j = 0; j < nsteps; ++j) {
        quad_products(a0 + j * blk, a1 + j * blk, b0 + j * blk, b1 + j * blk, step, 1, blk, s32);
        for (int q = 0; q < 4; ++q) {
          // (a lone last row or column block computes its quarter twice; the copy is dropped)
          const __m512 pbj = _mm512_load_ps(pb + ((c0 / 16 + (two_c ? q % 2 : 0)) * nsteps + j) * 16);
          const float* paj = pa + (r0 + (two_r ? q / 2 : 0) * 16) * nsteps + j;
          for (int i = 0; i < 16; ++i) {
            const __m512 sc = _mm512_mul_ps(pbj, _mm512_set1_ps(paj[i * nsteps]));
            const __m512 f = _mm512_cvtepi32_ps(_mm512_load_si512(s32[q] + i * 16));
            _mm512_store_ps(acc[q] + i * 16, _mm512_fmadd_ps(f, sc, _mm512_load_ps(acc[q] + i * 16)));
          }
        }
      }
      for (int q = 0; q < 4; ++q) {
        const int64_t m0 = r0 + (q / 2) * 16, n0 = c0 + (q % 2) * 16;
        if (m0 >= mb || n0 >= nb) continue;
        for (int64_t i = 0; i < std::min<int64_t>(16, mb - m0); ++i)
          _mm512_mask_storeu_ps(C + (T.m0 + m0 + i) * P.ldc + T.n0 + n0, first_lanes(nb - n0),
                                _mm512_load_ps(acc[q] + i * 16));
      }
    }
}


}  // namespace

// The handler's rule (gemm_i8_ffi.cc): which INT8 problems the tiles take.  `exact_scales`: every
// exponent of ea and eb is finite and the pairs scale exactly (fast_scale_block over all of them).
bool amx_i8_fits(const ProblemI8& P, bool exact_scales) {
  if (P.a_src || P.K < kAmxMinK || P.M < 1 || P.N < 1) return false;
  if (P.KB == 1) return P.K <= kAmxI8MaxK;
  return P.block_k <= 64 && P.block_k % 4 == 0 && exact_scales;
}

// One output tile of a problem amx_i8_fits accepts.  Returns 0, or 1 / 2 for an A / B value out of
// [-qmax, qmax].
int tile_amx_i8(const ProblemI8& P, const Tile& T) {
  const int64_t mb = T.m1 - T.m0, nb = T.n1 - T.n0;
  if (mb <= 0 || nb <= 0) return 0;
  const int step = P.KB == 1 ? 64 : int(P.block_k);
  const int64_t nsteps = (P.K + step - 1) / step;
  const int64_t mblocks = (mb + 15) / 16, nblocks = (nb + 15) / 16, blk = 16 * step;
  thread_local Aligned<uint8_t> apanel_buf;
  thread_local PanelCache bcache;
  if (!(bcache.job == P.job_id && P.job_id && bcache.batch == T.batch && bcache.n0 == T.n0 && bcache.n1 == T.n1)) {
    bcache.job = 0;
    const View8 vb{P.b + P.b_off[T.batch] + T.n0 * P.b_sr, P.b_sr, P.b_sk, nb, P.K};
    if (pack_panel8(vb, true, step, bcache.buf.get(size_t(nblocks * nsteps * blk))) > P.qmax_b) return 2;
    bcache.job = P.job_id, bcache.batch = T.batch, bcache.n0 = T.n0, bcache.n1 = T.n1;
  }
  uint8_t* apanel = apanel_buf.get(size_t(mblocks * nsteps * blk));
  const View8 va{P.a + P.a_off[T.batch] + T.m0 * P.a_sr, P.a_sr, P.a_sk, mb, P.K};
  if (pack_panel8(va, false, step, apanel) > P.qmax_a) return 1;

  TileConfig cfg = uniform_config(8, 16, 64);
  cfg.colsb[4] = cfg.colsb[5] = uint16_t(step);  // A: 16 rows x step k
  cfg.rows[6] = cfg.rows[7] = uint8_t(step / 4);  // B: step / 4 quads x 16 columns
  _tile_loadconfig(&cfg);
  float* C = P.out + T.batch * P.M * P.N;
  const int32_t* ea = P.ea + P.ea_off[T.batch];
  const int32_t* eb = P.eb + P.eb_off[T.batch];
  if (P.KB == 1) {
    run_per_tensor(P, T, apanel, bcache.buf.p, nsteps, C, ea, eb);
  } else {
    run_blocked(P, T, apanel, bcache.buf.p, step, C, ea, eb);
  }
  _tile_release();
  return 0;
}

}  // namespace jdfp
