// BLIS-style macro kernel for one output tile, templated on a micro-kernel.
//
// Included by every per-ISA TU, so packing and the epilogue get that TU's -m flags too.  Everything
// lives in an anonymous namespace: each TU gets its own copy (no ODR merging across ISA flags).
//
// Loop nest for a tile (batch, [m0, m1) x [n0, n1)):
//   for kc block (groups of whole chains, in increasing K)     -- FP32 spill order = K order
//     pack B tile panel (pairs x NR micro-panels, k-pairs interleaved), pack A (pairs x MR)
//     for NR micro-panel (B micro-panel stays in L1)
//       for MR micro-panel (A streamed from L2)
//         micro-kernel: int32 chains in registers, FP32 accumulator tile in L1
//   epilogue: KB == 1 scale2, NaN for NONFINITE exponents
#pragma once

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
  AlignedBuf<int32_t> eapack, ebpack, carry;
  AlignedBuf<float> cacc;  // FP32 accumulators of the tile between kc blocks
  std::vector<int64_t> k0, k1;
  std::vector<int32_t> pblk;
};

// Packed B panels of one column range, reused across a worker's tiles (run_tile).
struct BCache {
  uint64_t job = 0;  // Problem::job_id of the valid contents, 0 = nothing valid
  int64_t batch = -1, n0 = -1, n1 = -1;
  AlignedBuf<int16_t> buf;
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

template <class UK, int W>
static inline int32_t pack_i16_any(const int16_t* src, const PackArgs& a, const Scratch& s, int16_t* dst) {
  if constexpr (HasFastPack<UK>::value) {
    return UK::template pack<W>(src, a, dst);
  } else {
    return pack_i16<W>(src, a.sr, a.sk, a.r0, a.rows, s, a.pairs, dst);
  }
}

// Implicit-GEMM conv operand: the ISA's vectorized gather when it has one (UK::kConvPack).
template <class UK, class = void>
struct HasConvPack : std::false_type {};
template <class UK>
struct HasConvPack<UK, std::void_t<decltype(UK::kConvPack)>> : std::bool_constant<UK::kConvPack> {};

template <class UK, int W>
static inline int32_t pack_conv_any(const int16_t* x, const ConvGeom& g, const PackArgs& a, int16_t* dst) {
  if constexpr (HasConvPack<UK>::value) {
    return UK::template conv_pack<W>(x, g, a, dst);
  } else {
    return conv_pack_generic<W>(x, g, a, dst);
  }
}

template <class UK, int W>
static inline void pack_f32_any(const float* src, const PackArgs& a, const Scratch& s, int16_t* dst) {
  if constexpr (HasFastPack<UK>::value) {
    UK::template pack<W>(src, a, dst);
  } else {
    pack_f32<W>(src, a.sr, a.sk, a.r0, a.rows, a.e, a.er, a.ej, a.qmax, s, a.pairs, dst);
  }
}

// Micro-kernel contract (UK::kernel):
//   Ap: [pairs][MR][2] int16, Bp: [pairs][NR][2] int16 (pieces back to back),
//   acc: MR x NR contiguous floats, the FP32 accumulators carried between kc blocks,
//   first: start the FP32 accumulators at +0.0 instead of loading acc,
//   C: null (store the accumulators back to acc) or the last kc block's destination, MR x NR floats
//     with row stride ldc (always a full tile; the driver handles edges),
//   scaled: KB > 1, multiply each chain by scale2(., ea + eb) before adding,
//   eap[bl * ea_ld + i], ebp[bl * eb_ld + j]: clamped exponents of the tile's rows / columns,
//   carry: MR x NR int32 for chains split across kc blocks,
//   fuse: last kc block with one exponent pair for the whole tile: store scale2(acc, fuse_e) (the
//     epilogue's KB == 1 scale, the same two float32 multiplies).
template <class UK>
int run_tile(const Problem& P, const Tile& T) {
  constexpr int MR = UK::MR, NR = UK::NR;
  thread_local Scratch s;
  const int64_t mb = T.m1 - T.m0, nb = T.n1 - T.n0;
  if (mb <= 0 || nb <= 0) return 0;
  const int64_t mbp = round_up(mb, MR), nbp = round_up(nb, NR);
  const int64_t M = P.M, N = P.N, K = P.K, KB = P.KB;
  const int64_t ldc = P.ldc;
  float* C = P.out + (P.c_off ? P.c_off[T.batch] : T.batch * M * N);

  // One exponent pair for the whole batch element (KB == 1, both broadcast): the scale is applied by
  // the micro-kernel's last store instead of a second pass over C.
  const bool fused = K > 0 && KB == 1 && P.ea_mstride == 0 && P.eb_nstride == 0;
  const int32_t fuse_e = fused ? eclamp(P.ea[P.ea_off[T.batch]]) + eclamp(P.eb[P.eb_off[T.batch]]) : 0;
  if (K > 0) {
    int16_t* ap = s.apack.get(size_t(mbp) * P.max_pairs * 2);
    int16_t* bp = s.bpack.get(size_t(nbp) * P.max_pairs * 2);
    // Packed B of the whole column range, kept for this worker's next tile of the same job, batch
    // and columns (tiles are ordered columns-outer, so a worker usually gets several in a row):
    // B is then packed once per worker and column range instead of once per tile.
    thread_local BCache bc;
    size_t btotal = 0;
    for (int64_t kbi = 0; kbi < P.nkcb; ++kbi) btotal += size_t(nbp) * P.kcb[kbi].pairs * 2;
    const bool bcache = P.job_id != 0 && mb < M && btotal * sizeof(int16_t) <= kBCacheBytes;
    const bool bhit = bcache && bc.job == P.job_id && bc.batch == T.batch && bc.n0 == T.n0 && bc.n1 == T.n1;
    if (bcache && !bhit) {
      bc.job = 0;  // invalid until every kc block is packed (and range-checked)
      bc.buf.get(btotal);
    }
    size_t boff = 0;
    // Packed A of the tile's rows (all kc blocks), kept per worker for the job's later column ranges:
    // a worker usually meets the same row ranges again, so A is packed about once per worker and
    // row range instead of once per tile.  Entries are appended to one buffer sized for the job.
    thread_local ACache ac;
    const size_t atotal = btotal / size_t(nbp) * size_t(mbp);
    int16_t* acached = nullptr;
    bool ahit = false;
    // Worth it from three column ranges on: with two, a row range comes back at most once (often to
    // the other worker), and the extra L2 footprint cost more than it saved (measured at 1024^3).
    if (P.job_id != 0 && mb < M && N > 2 * nb) {
      if (ac.job != P.job_id || ac.batch != T.batch) {
        ac.job = P.job_id;
        ac.batch = T.batch;
        ac.ents.clear();
        ac.used = 0;
        // Every row range of the batch element, with up to MR - 1 rows of padding per range.
        const size_t need = (size_t(M) + size_t(MR) * size_t((M + mb - 1) / mb)) * (atotal / size_t(mbp));
        ac.cap = need * sizeof(int16_t) <= kACacheBytes ? need : 0;
        if (ac.cap) ac.buf.get(ac.cap);
      }
      for (const auto& e : ac.ents)
        if (e.m0 == T.m0 && e.m1 == T.m1) {
          acached = ac.buf.p + e.off;
          ahit = true;
          break;
        }
      if (!ahit && ac.used + atotal <= ac.cap) acached = ac.buf.p + ac.used;
    }
    size_t aoff = 0;
    const bool scaled = KB > 1;
    int32_t* eap = scaled ? s.eapack.get(size_t(mbp) * P.max_nblk) : nullptr;
    int32_t* ebp = scaled ? s.ebpack.get(size_t(nbp) * P.max_nblk) : nullptr;
    int32_t* carry = P.has_carry ? s.carry.get(size_t(mbp) * nbp) : nullptr;
    // One kc block: a single L1-resident accumulator block serves every micro-tile.
    const bool one_kc = P.nkcb == 1;
    float* cacc = s.cacc.get(one_kc ? size_t(MR * NR) : size_t(mbp) * nbp);
    const int32_t* ea = P.ea + P.ea_off[T.batch];
    const int32_t* eb = P.eb + P.eb_off[T.batch];
    const int64_t eb_j = P.eb_nstride ? N : 1;  // eb is [KB, N] or [KB, 1]

    // Operand views X[r, k]: A rows are m, B "rows" are n.
    const int64_t a_sr = P.a_sr, a_sk = P.a_sk, b_sr = P.b_sr, b_sk = P.b_sk;

    for (int64_t kbi = 0; kbi < P.nkcb; ++kbi) {
      const KcBlock& kb = P.kcb[kbi];
      const int32_t pairs = kb.pairs;
      build_pairs(P, kb, s);

      // ---- pack B and A (and their exponents for KB > 1)
      const Piece* kpcs = P.pieces + kb.piece_begin;
      const int knp = kb.piece_end - kb.piece_begin;
      const PackArgs pb{b_sr, b_sk, T.n0, nb, kpcs, knp, pairs, eb, P.eb_nstride, eb_j, P.qmax_b};
      const PackArgs pa{a_sr, a_sk, T.m0, mb, kpcs, knp, pairs, ea, P.ea_mstride, 1, P.qmax_a};
      if (bcache) {
        bp = bc.buf.p + boff;
        boff += size_t(nbp) * pairs * 2;
      }
      if (bhit) {
        // packed by this worker for an earlier tile of this job
      } else if (P.conv && P.conv->on_b) {
        if (pack_conv_any<UK, NR>(static_cast<const int16_t*>(P.b) + P.b_off[T.batch], *P.conv, pb, bp) > P.qmax_b)
          return 2;
      } else if (P.b_f32) {
        pack_f32_any<UK, NR>(static_cast<const float*>(P.b) + P.b_off[T.batch], pb, s, bp);
      } else {
        if (pack_i16_any<UK, NR>(static_cast<const int16_t*>(P.b) + P.b_off[T.batch], pb, s, bp) > P.qmax_b)
          return 2;
      }
      if (acached) {
        ap = acached + aoff;
        aoff += size_t(mbp) * pairs * 2;
      }
      if (ahit) {
        // packed by this worker for an earlier tile of this job
      } else if (P.conv && !P.conv->on_b) {
        if (pack_conv_any<UK, MR>(static_cast<const int16_t*>(P.a) + P.a_off[T.batch], *P.conv, pa, ap) > P.qmax_a)
          return 1;
      } else if (P.a_f32) {
        pack_f32_any<UK, MR>(static_cast<const float*>(P.a) + P.a_off[T.batch], pa, s, ap);
      } else {
        if (pack_i16_any<UK, MR>(static_cast<const int16_t*>(P.a) + P.a_off[T.batch], pa, s, ap) > P.qmax_a)
          return 1;
      }
      if (scaled) {
        for (int32_t bl = 0; bl < kb.nblk; ++bl) {
          const int64_t j = kb.blk_first + bl;
          int32_t* er = eap + bl * mbp;
          for (int64_t i = 0; i < mbp; ++i)
            er[i] = (i < mb) ? eclamp(ea[(T.m0 + i) * P.ea_mstride + j]) : 0;
          int32_t* ec = ebp + bl * nbp;
          for (int64_t i = 0; i < nbp; ++i)
            ec[i] = (i < nb) ? eclamp(eb[j * eb_j + (T.n0 + i) * P.eb_nstride]) : 0;
        }
      }

      // ---- micro-kernels
      // FP32 accumulators of the tile live in `cacc`, one contiguous MR x NR block per micro-tile in
      // call order (C rows are N floats apart: re-reading them every kc block missed L1 on the
      // aliased sets and was not prefetched).  The last kc block writes C itself.
      const bool first = kbi == 0;
      const bool last = kbi == P.nkcb - 1;
      const bool fuse = fused && last;
      const Piece* pcs = P.pieces + kb.piece_begin;
      const int npcs = kb.piece_end - kb.piece_begin;
      float* accb = cacc;
      for (int64_t jr = 0; jr < nbp; jr += NR) {
        const int16_t* bpanel = bp + jr * pairs * 2;
        const int nv = int(std::min<int64_t>(NR, nb - jr));
        for (int64_t ir = 0; ir < mbp; ir += MR, accb += one_kc ? 0 : MR * NR) {
          const int16_t* apanel = ap + ir * pairs * 2;
          const int mv = int(std::min<int64_t>(MR, mb - ir));
          int32_t* cr = carry ? carry + (ir / MR * (nbp / NR) + jr / NR) * (MR * NR) : nullptr;
          float* cdst = C + (T.m0 + ir) * ldc + T.n0 + jr;
          if (!last || (mv == MR && nv == NR)) {
            UK::kernel(apanel, bpanel, pcs, npcs, accb, first, last ? cdst : nullptr, ldc, scaled,
                       eap ? eap + ir : nullptr, mbp, ebp ? ebp + jr : nullptr, nbp, cr, fuse, fuse_e);
          } else {
            alignas(64) float edge[MR * NR];
            UK::kernel(apanel, bpanel, pcs, npcs, accb, first, edge, NR, scaled, eap ? eap + ir : nullptr,
                       mbp, ebp ? ebp + jr : nullptr, nbp, cr, fuse, fuse_e);
            for (int i = 0; i < mv; ++i)
              for (int j = 0; j < nv; ++j) cdst[i * ldc + j] = edge[i * NR + j];
          }
        }
      }
    }
    if (acached && !ahit) {
      ac.ents.push_back(ACache::Entry{T.m0, T.m1, ac.used});
      ac.used += atotal;
    }
    if (bcache && !bhit) {
      bc.job = P.job_id;
      bc.batch = T.batch;
      bc.n0 = T.n0;
      bc.n1 = T.n1;
    }
  }

  // ---- epilogue: KB == 1 scale, K == 0 zeros, NaN for NONFINITE exponents
  const int32_t* ea = P.ea + P.ea_off[T.batch];
  const int32_t* eb = P.eb + P.eb_off[T.batch];
  if (fused && ea[0] != kNonfiniteExponent && eb[0] != kNonfiniteExponent) return 0;  // nothing left to do
  const int64_t eb_j = P.eb_nstride ? N : 1;
  const float qnan = __builtin_nanf("");
  bool any_col_bad = false;
  thread_local std::vector<uint8_t> colbad;
  colbad.assign(size_t(nb), 0);
  for (int64_t j = 0; j < KB; ++j)
    for (int64_t n = 0; n < nb; ++n)
      if (eb[j * eb_j + (T.n0 + n) * P.eb_nstride] == kNonfiniteExponent) colbad[n] = 1, any_col_bad = true;
  for (int64_t m = T.m0; m < T.m1; ++m) {
    float* row = C + m * ldc + T.n0;
    const int32_t* er = ea + m * P.ea_mstride;
    bool bad = false;
    for (int64_t j = 0; j < KB; ++j) bad |= er[j] == kNonfiniteExponent;
    if (K == 0) {
      for (int64_t n = 0; n < nb; ++n) row[n] = 0.0f;
    } else if (KB == 1 && !fused) {
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
  return 0;
}

}  // namespace
}  // namespace jdfp
