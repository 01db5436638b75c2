// BLIS-style macro kernel for one output tile, templated on a micro-kernel.
//
// Included by every per-ISA TU, so packing and the epilogue get that TU's -m flags too.  Everything
// lives in an anonymous namespace: each TU gets its own copy (no ODR merging across ISA flags).
//
// Loop nest for a tile (batch, [m0, m1) x [n0, n1)):
//   for kc block (groups of whole chains, in increasing K)             -- block order = K order
//     packm: B tile panel (pairs x NR micro-panels, k-pairs interleaved), A (pairs x MR)
//     macro-kernel: for NR micro-panel (B micro-panel stays in L1)
//       for MR micro-panel (A streamed from L2)
//         micro-kernel: int32 chains in registers, spilled exactly into int64 block sums (L1);
//         a closed block is rounded once to float32 (and for KB > 1 scaled and added to acc)
//   epilogue: KB == 1 scale2 (unless fused), NaN for NONFINITE exponents
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "gemm_common.h"

namespace jdfp {
namespace {

template <class T>
struct AlignedBuf {
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
  ~AlignedBuf() { std::free(p); }
};

struct Scratch {
  AlignedBuf<int16_t> apack, bpack;
  AlignedBuf<int32_t> eapack, ebpack;
  AlignedBuf<float> papack, pbpack;  // 2**e of eapack / ebpack (fast blocks)
  AlignedBuf<uint8_t> fast;          // per block of the kc block: the fast scale applies
  AlignedBuf<int32_t> uniform, amn, amx;  // per block: micro-tiles' rows alike; min / max of ea
  AlignedBuf<int64_t> acc64;  // exact block sums of the tile between kc blocks
  AlignedBuf<int64_t> wide;   // SIMD kernels: widened parts of blocks longer than kMaxWhPieces pieces
  AlignedBuf<float> cacc;     // FP32 accumulators of the tile between kc blocks (KB > 1)
  AlignedBuf<int64_t> sqa, sqb;  // per micro-panel and piece: the largest sum of squares of a row / column
  std::vector<int64_t> k0, k1;
  std::vector<int32_t> pblk;
};

// Packed B panels of one column range, reused across a worker's tiles (run_tile).
struct BCache {
  uint64_t job = 0;  // Problem::job_id of the valid contents, 0 = nothing valid
  int64_t batch = -1, n0 = -1, n1 = -1;
  AlignedBuf<int16_t> buf;
  AlignedBuf<int64_t> sq;  // the panels' sums of squares (PackArgs::sq), beside them (sq_of)
};
constexpr size_t kBCacheBytes = size_t(8) << 20;

// Packed A panels of several row ranges of one job and batch element, reused across a worker's tiles.
struct ACache {
  struct Entry {
    int64_t m0, m1;
    size_t off;  // elements into buf
  };
  uint64_t job = 0;  // Problem::job_id the entries belong to
  int64_t batch = -1;
  std::vector<Entry> ents;  // fully packed (and range-checked) ranges only
  AlignedBuf<int16_t> buf;
  AlignedBuf<int64_t> sq;  // the panels' sums of squares (PackArgs::sq), beside them (sq_of)
  size_t cap = 0, used = 0;  // elements
};
// Caps on the per-worker caches (allocated once per thread and kept; a job whose operand needs
// more simply packs per tile as before).  Only pages a worker actually packs become resident.
constexpr size_t kACacheBytes = size_t(16) << 20;

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Pair table of a kc block: packed pair p holds global k indices k0[p] and k1[p] (-1 = zero pad).
static inline void build_pairs(const Problem& P, const KcBlock& kb, Scratch& s) {
  s.k0.resize(kb.pairs);
  s.k1.resize(kb.pairs);
  s.pblk.resize(kb.pairs);
  int64_t p = 0;
  for (int32_t pi = kb.piece_begin; pi < kb.piece_end; ++pi) {
    const Piece& pc = P.pieces[pi];
    for (int32_t q = 0; q < pc.pairs; ++q, ++p) {
      int64_t k = pc.k_start + 2 * q;
      s.k0[p] = k;
      s.k1[p] = (2 * q + 1 < pc.len) ? k + 1 : -1;
      s.pblk[p] = pc.blk;
    }
  }
}

// Pack rows [r0, r0 + rows) of an operand viewed as X[r, k] = src[r*sr + k*sk] into micro-panels of
// width W: dst[((panel * pairs + p) * W + i) * 2 + {0, 1}] = X[r0 + panel*W + i, k0/k1[p]].
// Rows past `rows` and pad halves are zero.  Returns max |value| for the range check.
template <int W>
static inline int32_t pack_i16(const int16_t* src, int64_t sr, int64_t sk, int64_t r0, int64_t rows,
                               const Scratch& s, int32_t pairs, int16_t* dst) {
  int32_t vmin = 0, vmax = 0;
  const int64_t panels = (rows + W - 1) / W;
  auto one = [&](int64_t pn, int32_t p) {
    const int64_t rb = r0 + pn * W;
    const int nvalid = int(std::min<int64_t>(W, r0 + rows - rb));
    int16_t* d = dst + (pn * int64_t(pairs) + p) * W * 2;
    const int64_t k0 = s.k0[p], k1 = s.k1[p];
    const int16_t* c0 = src + rb * sr + k0 * sk;
    const int16_t* c1 = src + rb * sr + (k1 >= 0 ? k1 : k0) * sk;
    const int16_t m1 = k1 >= 0 ? int16_t(-1) : int16_t(0);  // zero the pad half without a branch
    for (int i = 0; i < nvalid; ++i) {
      const int16_t v0 = c0[i * sr], v1 = int16_t(c1[i * sr] & m1);
      d[2 * i] = v0;
      d[2 * i + 1] = v1;
      vmin = std::min<int32_t>(vmin, std::min(v0, v1));
      vmax = std::max<int32_t>(vmax, std::max(v0, v1));
    }
    for (int i = nvalid; i < W; ++i) d[2 * i] = d[2 * i + 1] = 0;
  };
  // Rows contiguous (sr == 1): pair-outer so each k row is read sequentially; otherwise panel-outer.
  if (sr == 1) {
    for (int32_t p = 0; p < pairs; ++p)
      for (int64_t pn = 0; pn < panels; ++pn) one(pn, p);
  } else {
    for (int64_t pn = 0; pn < panels; ++pn)
      for (int32_t p = 0; p < pairs; ++p) one(pn, p);
  }
  return std::max(-vmin, vmax);
}

// Same as pack_i16 from float32 with fused quantization; exponent of (row r, block j) is
// e[r*er + j*ej].  Cannot fail (values are clipped).
template <int W>
static inline void pack_f32(const float* src, int64_t sr, int64_t sk, int64_t r0, int64_t rows,
                            const int32_t* e, int64_t er, int64_t ej, int32_t qmax, const Scratch& s,
                            int32_t pairs, int16_t* dst) {
  const float qm = float(qmax);
  const int64_t panels = (rows + W - 1) / W;
  for (int64_t pn = 0; pn < panels; ++pn) {
    const int64_t rb = r0 + pn * W;
    const int nvalid = int(std::min<int64_t>(W, r0 + rows - rb));
    int16_t* d = dst + pn * int64_t(pairs) * W * 2;
    int32_t cur_blk = -1;
    float s1[W], s2[W];
    for (int32_t p = 0; p < pairs; ++p, d += 2 * W) {
      if (s.pblk[p] != cur_blk) {
        cur_blk = s.pblk[p];
        for (int i = 0; i < nvalid; ++i) {
          const int32_t ei = e[(rb + i) * er + int64_t(cur_blk) * ej];
          const int32_t ne = -eclamp(ei);
          const int32_t e1 = clamp_i32(ne, -126, 127);
          const int32_t e2 = clamp_i32(ne - e1, -126, 127);
          // A NONFINITE group quantizes to 0 (as quantize_array does); its output is NaN anyway.
          s1[i] = ei == kNonfiniteExponent ? 0.0f : pow2f(e1);
          s2[i] = pow2f(e2);
        }
      }
      const int64_t k0 = s.k0[p], k1 = s.k1[p];
      const float* c0 = src + rb * sr + k0 * sk;
      const float* c1 = src + rb * sr + (k1 >= 0 ? k1 : k0) * sk;
      const bool h1 = k1 >= 0;
      for (int i = 0; i < nvalid; ++i) {
        d[2 * i] = quantize1(c0[i * sr], s1[i], s2[i], qm);
        d[2 * i + 1] = h1 ? quantize1(c1[i * sr], s1[i], s2[i], qm) : int16_t(0);
      }
      for (int i = nvalid; i < W; ++i) d[2 * i] = d[2 * i + 1] = 0;
    }
  }
}

// Packing entry used by the driver: the ISA's vectorized packer when the micro-kernel class has one
// (UK::kFastPack), else the portable loops above.  Same output layout and checks either way.
struct PackArgs {
  int64_t sr, sk, r0, rows;       // X[r, k] = src[r*sr + k*sk], rows [r0, r0 + rows)
  const Piece* pcs;
  int npcs;
  int32_t pairs;
  const int32_t* e;               // float input: exponent of (row r, block j) = e[r*er + j*ej]
  int64_t er, ej;
  int32_t qmax;
  // Null, or where to write, per micro-panel and piece, the largest sum of squares of one of the
  // panel's rows (sq[panel * npcs + piece]; the SIMD kernels group pieces by them, UkArgs::sqa).
  int64_t* sq;
};
}  // namespace
}  // namespace jdfp

#include "conv_pack.h"

namespace jdfp {
namespace {

template <class UK, class = void>
struct HasFastPack : std::false_type {};
template <class UK>
struct HasFastPack<UK, std::void_t<decltype(UK::kFastPack)>> : std::bool_constant<UK::kFastPack> {};
// The micro-kernel groups pieces by their sums of squares (the SIMD kernels; UkArgs::sqa).
template <class UK, class = void>
struct HasPieceGroups : std::false_type {};
template <class UK>
struct HasPieceGroups<UK, std::void_t<decltype(UK::kPieceGroups)>> : std::bool_constant<UK::kPieceGroups> {};

// The largest sum of squares of one piece's rows in a W-row micro-panel ([pairs][W][2] int16): a
// pair's two squares are one vpmaddwd lane (each <= 32767**2, their sum fits int32), and the piece's
// sums stay in int32 because the caller checked len * qmax**2 < 2**31.
template <int W>
static inline int32_t piece_row_squares_max(const int16_t* p, int32_t pairs) {
#if defined(__AVX512BW__)
  if constexpr (W == 32) {
    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
    for (int32_t t = 0; t < pairs; ++t, p += 2 * W) {
      const __m512i v0 = _mm512_loadu_si512(p), v1 = _mm512_loadu_si512(p + 32);
      s0 = _mm512_add_epi32(s0, _mm512_madd_epi16(v0, v0));
      s1 = _mm512_add_epi32(s1, _mm512_madd_epi16(v1, v1));
    }
    return _mm512_reduce_max_epi32(_mm512_max_epi32(s0, s1));
  } else if constexpr (W == 12) {
    __m512i s0 = _mm512_setzero_si512();
    for (int32_t t = 0; t < pairs; ++t, p += 2 * W) {
      const __m512i v = _mm512_maskz_loadu_epi16(0x00FFFFFF, p);  // lanes 12..15 stay 0
      s0 = _mm512_add_epi32(s0, _mm512_madd_epi16(v, v));
    }
    return _mm512_reduce_max_epi32(s0);
  }
#endif
#if defined(__AVX2__)
  if constexpr (W == 16) {
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    for (int32_t t = 0; t < pairs; ++t, p += 2 * W) {
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
      s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(v0, v0));
      s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(v1, v1));
    }
    __m128i m = _mm_max_epi32(_mm256_castsi256_si128(_mm256_max_epi32(s0, s1)),
                              _mm256_extracti128_si256(_mm256_max_epi32(s0, s1), 1));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4E));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xB1));
    return _mm_cvtsi128_si32(m);
  }
#endif
  int32_t acc[W] = {};
  for (int32_t t = 0; t < pairs; ++t, p += 2 * W)
    for (int i = 0; i < W; ++i) acc[i] += int32_t(p[2 * i]) * p[2 * i] + int32_t(p[2 * i + 1]) * p[2 * i + 1];
  return *std::max_element(acc, acc + W);
}

// -1 when a piece's rows' sums of squares fit int32 (len * qmax**2 < 2**31) and are to be taken,
// else that bound, which then stands in for them (only with unequal operand widths).
static inline int64_t piece_square_bound(int32_t piece_pairs, int32_t qmax) {
  const int64_t bound = int64_t(piece_pairs) * 2 * qmax * qmax;  // every row's sum is at most this
  return bound >= (int64_t(1) << 31) ? bound : -1;
}

// For every W-row micro-panel of a packed kc block (pieces back to back) and every piece: the
// largest sum of squares of one of its rows, into sq[panel * npieces + piece].  A piece with
// len * qmax**2 >= 2**31 (only with unequal operand widths) gets that upper bound instead.  A kc
// block holds at most 2**17 products, so the kernel's running sums stay below 2**47.
template <int W>
static inline void piece_squares(const int16_t* packed, int64_t panels, const Piece* pcs, int npcs, int32_t pairs,
                                 int32_t qmax, int64_t* sq) {
  for (int64_t pn = 0; pn < panels; ++pn) {
    const int16_t* p = packed + pn * int64_t(pairs) * W * 2;
    for (int pi = 0; pi < npcs; p += int64_t(pcs[pi].pairs) * W * 2, ++pi) {
      const int64_t bound = piece_square_bound(pcs[pi].pairs, qmax);
      sq[pn * npcs + pi] = bound >= 0 ? bound : piece_row_squares_max<W>(p, pcs[pi].pairs);
    }
  }
}

// Packers that write PackArgs::sq themselves (UK::kPackSquares); the others get piece_squares after
// packing.
template <class UK, class = void>
struct HasPackSquares : std::false_type {};
template <class UK>
struct HasPackSquares<UK, std::void_t<decltype(UK::kPackSquares)>> : std::bool_constant<UK::kPackSquares> {};

template <int W>
static inline void pack_squares_after(const int16_t* dst, const PackArgs& a) {
  if (a.sq) piece_squares<W>(dst, (a.rows + W - 1) / W, a.pcs, a.npcs, a.pairs, a.qmax, a.sq);
}

template <class UK, int W>
static inline int32_t pack_i16_any(const int16_t* src, const PackArgs& a, const Scratch& s, int16_t* dst) {
  int32_t mx;
  if constexpr (HasFastPack<UK>::value) {
    mx = UK::template pack<W>(src, a, dst);
    if constexpr (HasPackSquares<UK>::value) return mx;
  } else {
    mx = pack_i16<W>(src, a.sr, a.sk, a.r0, a.rows, s, a.pairs, dst);
  }
  if (mx <= a.qmax) pack_squares_after<W>(dst, a);
  return mx;
}

// Implicit-GEMM conv operand: the ISA's vectorized gather when it has one (UK::kConvPack).
template <class UK, class = void>
struct HasConvPack : std::false_type {};
template <class UK>
struct HasConvPack<UK, std::void_t<decltype(UK::kConvPack)>> : std::bool_constant<UK::kConvPack> {};

template <class UK, int W>
static inline int32_t pack_conv_any(const int16_t* x, const ConvGeom& g, const PackArgs& a, int16_t* dst) {
  int32_t mx;
  if constexpr (HasConvPack<UK>::value) {
    mx = UK::template conv_pack<W>(x, g, a, dst);
  } else {
    mx = conv_pack_generic<W>(x, g, a, dst);
  }
  if (mx <= a.qmax) pack_squares_after<W>(dst, a);
  return mx;
}

template <class UK, int W>
static inline void pack_f32_any(const float* src, const PackArgs& a, const Scratch& s, int16_t* dst) {
  if constexpr (HasFastPack<UK>::value) {
    UK::template pack<W>(src, a, dst);
    if constexpr (HasPackSquares<UK>::value) return;
  } else {
    pack_f32<W>(src, a.sr, a.sk, a.r0, a.rows, a.e, a.er, a.ej, a.qmax, s, a.pairs, dst);
  }
  pack_squares_after<W>(dst, a);
}

// Micro-kernel contract: UK::kernel(Ap, Bp, const UkArgs&) runs one kc block of one MR x NR
// micro-tile.  Ap: [pairs][MR][2] int16, Bp: [pairs][NR][2] int16 (pieces back to back).  For every
// piece it sums the products into int32 registers (a piece is never longer than a chain: no wrap),
// then adds that sum exactly into the open block's sum (acc64: int64 in the scalar kernel, int32
// pairs plus `wide` in the SIMD kernels, see ukernel_simd.h).  When a block closes, its exact sum
// is rounded once to float32 (f) and either added, scaled, to the float32 accumulators (KB > 1, in
// block order) or, for KB == 1 (the block is the whole of K), stored to C.
struct UkArgs {
  const Piece* pcs;
  int npcs;
  int64_t* acc64;  // MR x NR x 8 bytes: the open block's exact sum, carried between kc blocks
  int64_t* wide;   // MR x NR int64 (SIMD kernels): the part of a long block widened out of acc64
  float* accf;     // MR x NR float32 (KB > 1 only): the contract's acc, carried between kc blocks
  bool blk_in;     // the first piece continues a block opened in an earlier kc block (acc64 holds it)
  bool blk_out;    // the last piece's block continues in the next kc block (leave its sum in acc64)
  // SIMD kernels only (the scalar kernel's int64 acc64 needs no widening): acc64's int32 pairs hold
  // earlier pieces of the continued block (else it continues from `wide` alone); wide holds a part
  // of it; at the end, widen the pairs of the block left open into wide (kMaxWhPieces is near).
  bool wh_in, wide_in, spill;
  bool first;      // first kc block: accf starts at +0.0
  float* C;        // null, or the last kc block's destination (MR x NR floats, row stride ldc)
  int64_t ldc;
  bool scaled;     // KB > 1: acc += scale2(f(S_j), ea_j + eb_j)
  const int32_t* eap;  // eap[i * ea_ld + bl], ebp[bl * eb_ld + j]: clamped exponents (KB > 1)
  int64_t ea_ld;
  const int32_t* ebp;
  int64_t eb_ld;
  const float* pap;     // 2**eap, 2**ebp (same layouts), read for blocks with fast[bl] set
  const float* pbp;
  const uint8_t* fast;
  const int32_t* uniform;  // per block: the micro-tile's rows share one exponent (one scale per column)
  bool fuse;       // KB == 1 with one exponent pair for the tile: store scale2(f(S), fuse_e)
  int32_t fuse_e;
  // Per piece, the largest sum of squares over the micro-tile's A rows / B columns (null: none, every
  // piece is summed into the block on its own).  SIMD kernels: consecutive pieces of one block whose
  // sums of squares multiply to at most kPieceLimit**2 share one running-sum update (Cauchy-Schwarz,
  // ukernel_simd.h); the scalar kernel adds each piece into an int64 and ignores them.
  const int64_t* sqa;
  const int64_t* sqb;
};

// The largest |piece sum| the SIMD kernels' running sums take in one update (kernel_chain_length).
constexpr int64_t kPieceLimit = (int64_t(1) << 31) - (int64_t(1) << 16);

// Whether the pieces since the last update, whose sums of squares add up to sa and sb, stay within
// kPieceLimit for every row and column: |sum a*b| <= sqrt(sum a**2 * sum b**2) <= kPieceLimit.
static inline bool within_piece_limit(int64_t sa, int64_t sb) {
  return static_cast<unsigned __int128>(sa) * static_cast<unsigned __int128>(sb) <=
         static_cast<unsigned __int128>(kPieceLimit) * static_cast<unsigned __int128>(kPieceLimit);
}

// Piece pi of a kc block opens / closes its exponent block.
static inline bool piece_opens_block(const UkArgs& u, int pi) {
  return pi == 0 ? !u.blk_in : u.pcs[pi - 1].blk != u.pcs[pi].blk;
}
static inline bool piece_closes_block(const UkArgs& u, int pi) {
  return pi == u.npcs - 1 ? !u.blk_out : u.pcs[pi + 1].blk != u.pcs[pi].blk;
}

// Per-tile state shared by run_tile's packing, macro-kernel and epilogue helpers.
struct TileState {
  int64_t mb, nb, mbp, nbp;
  float* C;             // the tile's batch element of the output
  bool fused;           // KB == 1, one exponent pair for the batch element: scale in the kernel
  int32_t fuse_e;
  bool scaled;          // KB > 1
  bool one_kc;          // a single kc block: one L1-resident accumulator block serves every micro-tile
  int16_t* ap = nullptr;  // packed A / B of the current kc block
  int16_t* bp = nullptr;
  int32_t* eap = nullptr;  // clamped exponents of the kc block's blocks (KB > 1)
  int32_t* ebp = nullptr;
  float* pap = nullptr;    // 2**eap, 2**ebp
  float* pbp = nullptr;
  uint8_t* fast = nullptr;  // per block of the kc block (tile_exponents)
  int32_t* uniform = nullptr;
  int32_t* amn = nullptr;
  int32_t* amx = nullptr;
  bool nonfinite = false;  // KB > 1: a NONFINITE exponent among the tile's (tile_exponents)
  int64_t* acc64 = nullptr;
  int64_t* wide = nullptr;
  float* accf = nullptr;
  int64_t* sqa = nullptr;  // piece_squares of the kc block's A / B micro-panels (null: not needed)
  int64_t* sqb = nullptr;
  // Where the sums of squares of packed panels live: those of A panels at ap are at
  // sq_of<MR>(ap, abuf, asq), in the buffer that matches the one ap points into (scratch or cache).
  const int16_t* abuf = nullptr;
  const int16_t* bbuf = nullptr;
  int64_t* asq = nullptr;
  int64_t* bsq = nullptr;
  // The block left open by the last kc block: its pieces in acc64's int32 pairs (SIMD kernels), and
  // whether part of it was widened into `wide`.
  int64_t wh_pieces = 0;
  bool wide_open = false;
  const int32_t* ea;
  const int32_t* eb;
  int64_t eb_j;         // eb is [KB, N] or [KB, 1]
  // Packed-operand reuse across a worker's tiles (see tile_caches).
  bool bcache = false, bhit = false;
  size_t boff = 0;
  int16_t* acached = nullptr;
  bool ahit = false;
  size_t aoff = 0, atotal = 0;
};

static inline BCache& bcache_of_thread() {
  thread_local BCache c;
  return c;
}
static inline ACache& acache_of_thread() {
  thread_local ACache c;
  return c;
}

// Packed B of the whole column range, kept for this worker's next tile of the same job, batch and
// columns (tiles are ordered columns-outer, so a worker usually gets several in a row): B is then
// packed once per worker and column range instead of once per tile.  Packed A of the tile's rows
// (all kc blocks), kept per worker for the job's later column ranges: a worker usually meets the same
// row ranges again, so A is packed about once per worker and row range instead of once per tile.
template <int MR, int NR>
static inline void tile_caches(const Problem& P, const Tile& T, TileState& st) {
  size_t btotal = 0;
  for (int64_t kbi = 0; kbi < P.nkcb; ++kbi) btotal += size_t(st.nbp) * P.kcb[kbi].pairs * 2;
  BCache& bc = bcache_of_thread();
  st.bcache = P.job_id != 0 && st.mb < P.M && btotal * sizeof(int16_t) <= kBCacheBytes;
  st.bhit = st.bcache && bc.job == P.job_id && bc.batch == T.batch && bc.n0 == T.n0 && bc.n1 == T.n1;
  if (st.bcache && !st.bhit) {
    bc.job = 0;  // invalid until every kc block is packed (and range-checked)
    bc.buf.get(btotal);
    bc.sq.get(btotal / (2 * NR));
  }
  if (st.bcache) st.bbuf = bc.buf.p, st.bsq = bc.sq.p;
  ACache& ac = acache_of_thread();
  st.atotal = btotal / size_t(st.nbp) * size_t(st.mbp);
  // Worth it from three column ranges on: with two, a row range comes back at most once (often to
  // the other worker), and the extra L2 footprint cost more than it saved (measured at 1024^3).  Also
  // when one tile holds every row (a conv's weight-gradient: dy^T's O rows against the taps' columns).
  if (!(P.job_id != 0 && P.N > 2 * st.nb)) return;
  if (ac.job != P.job_id || ac.batch != T.batch) {
    ac.job = P.job_id;
    ac.batch = T.batch;
    ac.ents.clear();
    ac.used = 0;
    // Every row range of the batch element, with up to MR - 1 rows of padding per range.
    const size_t need = (size_t(P.M) + size_t(MR) * size_t((P.M + st.mb - 1) / st.mb)) * (st.atotal / size_t(st.mbp));
    ac.cap = need * sizeof(int16_t) <= kACacheBytes ? need : 0;
    if (ac.cap) ac.buf.get(ac.cap), ac.sq.get(ac.cap / (2 * MR));
  }
  for (const auto& e : ac.ents)
    if (e.m0 == T.m0 && e.m1 == T.m1) {
      st.acached = ac.buf.p + e.off;
      st.abuf = ac.buf.p, st.asq = ac.sq.p;
      st.ahit = true;
      return;
    }
  if (ac.used + st.atotal <= ac.cap) st.acached = ac.buf.p + ac.used, st.abuf = ac.buf.p, st.asq = ac.sq.p;
}

// After the last kc block: publish what tile_caches set out to keep.
static inline void tile_caches_commit(const Problem& P, const Tile& T, const TileState& st) {
  if (st.acached && !st.ahit) {
    ACache& ac = acache_of_thread();
    ac.ents.push_back(ACache::Entry{T.m0, T.m1, ac.used});
    ac.used += st.atotal;
  }
  if (st.bcache && !st.bhit) {
    BCache& bc = bcache_of_thread();
    bc.job = P.job_id;
    bc.batch = T.batch;
    bc.n0 = T.n0;
    bc.n1 = T.n1;
  }
}

// The squares of panels packed at p in a buffer starting at buf: one int64 per packed pair of a
// W-wide panel (a piece has at least one pair, so panels * npcs always fits), at the same offset.
template <int W>
static inline int64_t* sq_of(const int16_t* p, const int16_t* buf, int64_t* sq) {
  return sq + (p - buf) / (2 * W);
}

// packm of one kc block: B and A micro-panels (from the cache, an int16 / float32 operand or a conv
// gather) and, for KB > 1, the clamped exponents of the blocks it touches.  0 = ok, 1 / 2 = an A / B
// value out of [-qmax, qmax].
template <class UK>
static inline int pack_kc_block(const Problem& P, const Tile& T, const KcBlock& kb, Scratch& s, TileState& st) {
  constexpr int MR = UK::MR, NR = UK::NR;
  const int32_t pairs = kb.pairs;
  const Piece* kpcs = P.pieces + kb.piece_begin;
  const int knp = kb.piece_end - kb.piece_begin;
  if (st.bcache) {
    st.bp = bcache_of_thread().buf.p + st.boff;
    st.boff += size_t(st.nbp) * pairs * 2;
  }
  if (st.acached) {
    st.ap = st.acached + st.aoff;
    st.aoff += size_t(st.mbp) * pairs * 2;
  }
  // Sums of squares when a block of this kc block spans more than one piece (else every piece closes
  // its block and nothing is grouped), kept beside the panels (a cached panel keeps its squares).
  const bool squares = HasPieceGroups<UK>::value && knp > kb.nblk;
  st.sqa = squares ? sq_of<MR>(st.ap, st.abuf, st.asq) : nullptr;
  st.sqb = squares ? sq_of<NR>(st.bp, st.bbuf, st.bsq) : nullptr;
  const PackArgs pb{P.b_sr, P.b_sk, T.n0, st.nb, kpcs, knp, pairs, st.eb, P.eb_nstride, st.eb_j, P.qmax_b, st.sqb};
  const PackArgs pa{P.a_sr, P.a_sk, T.m0, st.mb, kpcs, knp, pairs, st.ea, P.ea_mstride, 1, P.qmax_a, st.sqa};
  if (st.bhit) {
    // packed by this worker for an earlier tile of this job
  } else if (P.conv && P.conv->on_b) {
    if (pack_conv_any<UK, NR>(static_cast<const int16_t*>(P.b) + P.b_off[T.batch], *P.conv, pb, st.bp) > P.qmax_b)
      return 2;
  } else if (P.b_f32) {
    pack_f32_any<UK, NR>(static_cast<const float*>(P.b) + P.b_off[T.batch], pb, s, st.bp);
  } else if (pack_i16_any<UK, NR>(static_cast<const int16_t*>(P.b) + P.b_off[T.batch], pb, s, st.bp) > P.qmax_b) {
    return 2;
  }
  if (st.ahit) {
    // packed by this worker for an earlier tile of this job
  } else if (P.conv && !P.conv->on_b) {
    if (pack_conv_any<UK, MR>(static_cast<const int16_t*>(P.a) + P.a_off[T.batch], *P.conv, pa, st.ap) > P.qmax_a)
      return 1;
  } else if (P.a_src) {
    const Piece& last = P.pieces[kb.piece_end - 1];
    PackArgs pas = pa;
    const int16_t* src = P.a_src->rows(T, kpcs[0].k_start, last.k_start + last.len, pas.sr, pas.sk);
    if (pack_i16_any<UK, MR>(src, pas, s, st.ap) > P.qmax_a) return 1;
  } else if (P.a_f32) {
    pack_f32_any<UK, MR>(static_cast<const float*>(P.a) + P.a_off[T.batch], pa, s, st.ap);
  } else if (pack_i16_any<UK, MR>(static_cast<const int16_t*>(P.a) + P.a_off[T.batch], pa, s, st.ap) > P.qmax_a) {
    return 1;
  }
  if (st.scaled)  // KB > 1: the epilogue has nothing to do unless a NONFINITE exponent was seen here
    st.nonfinite |= tile_exponents(st.ea, P.ea_mstride, T.m0, st.mb, st.mbp, st.eb, st.eb_j, P.eb_nstride, T.n0,
                                   st.nb, st.nbp, kb.blk_first, kb.nblk, UK::MR,
                                   {st.eap, st.pap, st.ebp, st.pbp, st.fast, st.uniform, st.amn, st.amx});
  return 0;
}

// The SIMD kernels' int32-pair block sums (ukernel_simd.h) hold at most kMaxWhPieces pieces: set
// wh_in / wide_in / spill of kc block kbi (the same for every micro-tile) and carry the state of the
// block it leaves open.  Invariant: the pairs hold at most kMaxWhPieces minus the next kc block's
// piece count (a kc block has at most kMaxWhPieces pieces, ffi_runtime.cc).
static inline void wh_plan(const Problem& P, int64_t kbi, UkArgs& u, TileState& st) {
  const KcBlock& kb = P.kcb[kbi];
  u.wh_in = u.blk_in && st.wh_pieces > 0;
  u.wide_in = u.blk_in && st.wide_open;
  u.spill = false;
  if (!u.blk_out) {
    st.wh_pieces = 0;
    st.wide_open = false;
    return;
  }
  const bool same = u.blk_in && kb.nblk == 1;  // the block left open is the one continued
  int64_t open = same ? st.wh_pieces : 0;
  for (int32_t pi = kb.piece_end; pi > kb.piece_begin && P.pieces[pi - 1].blk == P.pieces[kb.piece_end - 1].blk; --pi)
    ++open;
  const KcBlock& next = P.kcb[kbi + 1];
  u.spill = open + (next.piece_end - next.piece_begin) > kMaxWhPieces;
  st.wide_open = u.spill || (same && u.wide_in);
  st.wh_pieces = u.spill ? 0 : open;
}

// Macro-kernel of one kc block: every MR x NR micro-tile of the tile, NR panels outer (the B
// micro-panel stays in L1), MR panels inner.  The accumulators of the tile live in acc64 / accf, one
// contiguous MR x NR block per micro-tile in call order (C rows are N floats apart: re-reading them
// every kc block missed L1 on the aliased sets).  The last kc block writes C itself.
template <class UK>
static inline void macro_kernel(const Problem& P, const Tile& T, int64_t kbi, TileState& st) {
  constexpr int MR = UK::MR, NR = UK::NR;
  const KcBlock& kb = P.kcb[kbi];
  const bool last = kbi == P.nkcb - 1;
  UkArgs u{};
  u.pcs = P.pieces + kb.piece_begin;
  u.npcs = kb.piece_end - kb.piece_begin;
  u.blk_in = kbi > 0 && P.pieces[kb.piece_begin - 1].blk == P.pieces[kb.piece_begin].blk;
  u.blk_out = !last && P.pieces[kb.piece_end].blk == P.pieces[kb.piece_end - 1].blk;
  u.first = kbi == 0;
  u.scaled = st.scaled;
  u.ea_ld = kb.nblk;
  u.eb_ld = st.nbp;
  u.fuse = st.fused && last;
  u.fuse_e = st.fuse_e;
  wh_plan(P, kbi, u, st);
  const int64_t step = st.one_kc ? 0 : MR * NR;
  int64_t* a64 = st.acc64;
  int64_t* w64 = st.wide;
  float* af = st.accf;
  for (int64_t jr = 0; jr < st.nbp; jr += NR) {
    const int16_t* bpanel = st.bp + jr * kb.pairs * 2;
    const int nv = int(std::min<int64_t>(NR, st.nb - jr));
    for (int64_t ir = 0; ir < st.mbp; ir += MR, a64 += step, w64 += step, af += st.scaled ? step : 0) {
      const int16_t* apanel = st.ap + ir * kb.pairs * 2;
      const int mv = int(std::min<int64_t>(MR, st.mb - ir));
      float* cdst = st.C + (T.m0 + ir) * P.ldc + T.n0 + jr;
      u.acc64 = a64;
      u.wide = w64;
      u.accf = af;
      u.eap = st.eap ? st.eap + ir * kb.nblk : nullptr;
      u.ebp = st.ebp ? st.ebp + jr : nullptr;
      u.pap = st.pap ? st.pap + ir * kb.nblk : nullptr;
      u.pbp = st.pbp ? st.pbp + jr : nullptr;
      u.fast = st.fast;
      u.uniform = st.uniform;
      u.sqa = st.sqa ? st.sqa + (ir / MR) * u.npcs : nullptr;
      u.sqb = st.sqb ? st.sqb + (jr / NR) * u.npcs : nullptr;
      if (!last || (mv == MR && nv == NR)) {
        u.C = last ? cdst : nullptr;
        u.ldc = P.ldc;
        UK::kernel(apanel, bpanel, u);
      } else {
        alignas(64) float edge[MR * NR];
        u.C = edge;
        u.ldc = NR;
        UK::kernel(apanel, bpanel, u);
        for (int i = 0; i < mv; ++i)
          for (int j = 0; j < nv; ++j) cdst[i * P.ldc + j] = edge[i * NR + j];
      }
    }
  }
}

// Epilogue of a tile: the KB == 1 scale when it was not fused into the kernel, zeros for K == 0,
// NaN for NONFINITE exponents.
static inline void tile_epilogue(const Problem& P, const Tile& T, const TileState& st) {
  const int32_t* ea = st.ea;
  const int32_t* eb = st.eb;
  if (st.fused && ea[0] != kNonfiniteExponent && eb[0] != kNonfiniteExponent) return;  // nothing left to do
  // KB > 1: tile_exponents saw every exponent of the tile (a scan here cost O((M + N) * KB) a tile).
  if (st.scaled && P.K > 0 && !st.nonfinite) return;
  const int64_t nb = st.nb;
  const float qnan = __builtin_nanf("");
  bool any_col_bad = false;
  thread_local std::vector<uint8_t> colbad;
  colbad.assign(size_t(nb), 0);
  for (int64_t j = 0; j < P.KB; ++j)
    for (int64_t n = 0; n < nb; ++n)
      if (eb[j * st.eb_j + (T.n0 + n) * P.eb_nstride] == kNonfiniteExponent) colbad[n] = 1, any_col_bad = true;
  for (int64_t m = T.m0; m < T.m1; ++m) {
    float* row = st.C + m * P.ldc + T.n0;
    const int32_t* er = ea + m * P.ea_mstride;
    bool bad = false;
    for (int64_t j = 0; j < P.KB; ++j) bad |= er[j] == kNonfiniteExponent;
    if (P.K == 0) {
      for (int64_t n = 0; n < nb; ++n) row[n] = 0.0f;
    } else if (P.KB == 1 && !st.fused) {
      const int32_t e0 = eclamp(er[0]);
      const int32_t* ec = eb + T.n0 * P.eb_nstride;
      if (P.eb_nstride) {
        for (int64_t n = 0; n < nb; ++n) row[n] = scale2(row[n], e0 + eclamp(ec[n]));
      } else {
        const int32_t e = e0 + eclamp(ec[0]);
        for (int64_t n = 0; n < nb; ++n) row[n] = scale2(row[n], e);
      }
    }
    if (bad) {
      for (int64_t n = 0; n < nb; ++n) row[n] = qnan;
    } else if (any_col_bad) {
      for (int64_t n = 0; n < nb; ++n)
        if (colbad[n]) row[n] = qnan;
    }
  }
}

// One output tile (batch, [m0, m1) x [n0, n1)): for each kc block (increasing K), packm then the
// macro-kernel; then the epilogue.  Returns 0, or 1 / 2 for an A / B value out of range.
template <class UK>
int run_tile(const Problem& P, const Tile& T) {
  constexpr int MR = UK::MR, NR = UK::NR;
  thread_local Scratch s;
  TileState st;
  st.mb = T.m1 - T.m0;
  st.nb = T.n1 - T.n0;
  if (st.mb <= 0 || st.nb <= 0) return 0;
  st.mbp = round_up(st.mb, MR);
  st.nbp = round_up(st.nb, NR);
  st.C = P.out + (P.c_off ? P.c_off[T.batch] : T.batch * P.M * P.N);
  st.ea = P.a_src ? P.a_src->exponents(T) : P.ea + P.ea_off[T.batch];
  st.eb = P.eb + P.eb_off[T.batch];
  st.eb_j = P.eb_nstride ? P.N : 1;
  // One exponent pair for the whole batch element (KB == 1, both broadcast): the scale is applied by
  // the micro-kernel's last store instead of a second pass over C.
  st.fused = P.K > 0 && P.KB == 1 && P.ea_mstride == 0 && P.eb_nstride == 0;
  st.fuse_e = st.fused ? eclamp(st.ea[0]) + eclamp(st.eb[0]) : 0;
  st.scaled = P.KB > 1;
  st.one_kc = P.nkcb == 1;
  if (P.K > 0) {
    st.ap = s.apack.get(size_t(st.mbp) * P.max_pairs * 2);
    st.bp = s.bpack.get(size_t(st.nbp) * P.max_pairs * 2);
    st.abuf = st.ap, st.asq = s.sqa.get(size_t(st.mbp) * P.max_pairs / MR);
    st.bbuf = st.bp, st.bsq = s.sqb.get(size_t(st.nbp) * P.max_pairs / NR);
    tile_caches<MR, NR>(P, T, st);
    if (st.scaled) {
      st.eap = s.eapack.get(size_t(st.mbp) * P.max_nblk);
      st.ebp = s.ebpack.get(size_t(st.nbp) * P.max_nblk);
      st.pap = s.papack.get(size_t(st.mbp) * P.max_nblk);
      st.pbp = s.pbpack.get(size_t(st.nbp) * P.max_nblk);
      st.fast = s.fast.get(size_t(P.max_nblk));
      st.uniform = s.uniform.get(size_t(P.max_nblk));
      st.amn = s.amn.get(size_t(P.max_nblk));
      st.amx = s.amx.get(size_t(P.max_nblk));
    }
    const size_t nacc = st.one_kc ? size_t(MR * NR) : size_t(st.mbp) * st.nbp;
    st.acc64 = s.acc64.get(nacc);
    st.wide = s.wide.get(nacc);  // touched only by blocks longer than kMaxWhPieces pieces
    st.accf = st.scaled ? s.cacc.get(nacc) : nullptr;
    for (int64_t kbi = 0; kbi < P.nkcb; ++kbi) {
      build_pairs(P, P.kcb[kbi], s);
      if (const int bad = pack_kc_block<UK>(P, T, P.kcb[kbi], s, st)) return bad;
      macro_kernel<UK>(P, T, kbi, st);
    }
    tile_caches_commit(P, T, st);
  }
  tile_epilogue(P, T, st);
  return 0;
}

}  // namespace
}  // namespace jdfp
