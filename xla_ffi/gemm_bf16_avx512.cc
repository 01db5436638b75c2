// AVX512_BF16 tile kernel of the BF16 GEMM (gemm_bf16.h): BLIS-style, kc blocks of k-pairs in
// increasing K; B packed as NR-column micro-panels with each k-pair interleaved in one dword (what
// vdpbf16ps reads: the even k in the low half, the odd k in the high half), A packed as MR-row
// micro-panels of the same dwords (broadcast); a 14 x 32 register block of float32 accumulators.
// Each output element sees exactly the contract's chain: its accumulator starts at +0 and is carried
// across kc blocks through memory (float32, exact), so tiling and thread count never change a bit.
// Convolutions (Bf16Problem::conv) pack their patch matrix with the INT16 conv kernel's gathers.
// Built with -mavx512f -mavx512bw -mavx512vl -mavx512bf16; called only after the cpuid check.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "gemm_bf16.h"

namespace jdfp {
namespace {

constexpr int kMr = 14, kNr = 32;
constexpr int64_t kKcPairs = 192;  // B micro-panel: 192 pairs x 128 bytes = 24 KiB, stays in L1
constexpr size_t kBCacheBytes = size_t(16) << 20;  // per worker

struct Buf {
  uint32_t* p = nullptr;
  size_t n = 0;
  uint32_t* get(size_t want) {
    if (want > n) {
      std::free(p);
      p = static_cast<uint32_t*>(std::aligned_alloc(64, ((want * 4 + 63) / 64) * 64));
      n = want;
    }
    return p;
  }
  ~Buf() { std::free(p); }
};

// Pair p of this kc block covers k = k0 + 2p and k0 + 2p + 1 (0 past K: the contract's +0 pad).
inline uint32_t pair_a(const Bf16Problem& P, int64_t base, int64_t m, int64_t k) {
  const uint32_t lo = bf16_at(P.a, P.a_f32, base + m * P.a_sm + k * P.a_sk);
  const uint32_t hi = k + 1 < P.K ? bf16_at(P.a, P.a_f32, base + m * P.a_sm + (k + 1) * P.a_sk) : 0u;
  return lo | (hi << 16);
}
inline uint32_t pair_b(const Bf16Problem& P, int64_t base, int64_t k, int64_t n) {
  const uint32_t lo = bf16_at(P.b, P.b_f32, base + k * P.b_sk + n * P.b_sn);
  const uint32_t hi = k + 1 < P.K ? bf16_at(P.b, P.b_f32, base + (k + 1) * P.b_sk + n * P.b_sn) : 0u;
  return lo | (hi << 16);
}

inline uint32_t load_u32(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// A rows [m0, m1) x pairs [p0, p0 + np) into MR-row panels [panel][pair][MR]; rows past m1 are 0.
void pack_a(const Bf16Problem& P, int64_t base, int64_t m0, int64_t m1, int64_t p0, int64_t np, uint32_t* dst) {
  if (P.conv && !P.conv->on_b) {  // a conv's patch matrix, gathered from x
    conv_gather16_pixels14_avx512(static_cast<const uint16_t*>(P.a) + base, *P.conv, m0, m1 - m0, 2 * p0,
                                  int32_t(std::min(2 * np, P.K - 2 * p0)), dst);
    return;
  }
  const bool fast = !P.a_f32 && P.a_sk == 1 && 2 * (p0 + np) <= P.K;  // a pair is one dword in memory
  const uint16_t* a16 = static_cast<const uint16_t*>(P.a) + base;
  for (int64_t mp = m0; mp < m1; mp += kMr) {
    const int64_t mr = std::min<int64_t>(kMr, m1 - mp);
    if (fast) {
      for (int64_t i = 0; i < mr; ++i) {
        const uint16_t* row = a16 + (mp + i) * P.a_sm + 2 * p0;
        for (int64_t p = 0; p < np; ++p) dst[p * kMr + i] = load_u32(row + 2 * p);
      }
      for (int64_t p = 0; p < np; ++p)
        for (int64_t i = mr; i < kMr; ++i) dst[p * kMr + i] = 0;
    } else if (!P.a_f32 && P.a_sm == 1 && 2 * (p0 + np) <= P.K) {  // transposed: rows k, k + 1 along m
      // (the weight-gradient's dy^T): per pair, the panel's mr values of both rows widened to dwords
      // and merged, rows past mr zero; one masked store of the panel's 14 dwords.
      const __mmask16 lm = __mmask16((1u << mr) - 1);
      for (int64_t p = 0; p < np; ++p) {
        const uint16_t* r0 = a16 + 2 * (p0 + p) * P.a_sk + mp;
        // (the maskz_ forms: GCC 12's unmasked ones read an `undefined` vector and warn)
        const __m512i lo = _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_maskz_loadu_epi16(lm, r0));
        const __m512i hi = _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_maskz_loadu_epi16(lm, r0 + P.a_sk));
        _mm512_mask_storeu_epi32(dst + p * kMr, __mmask16((1u << kMr) - 1),
                                 _mm512_or_si512(lo, _mm512_maskz_slli_epi32(0xFFFF, hi, 16)));
      }
    } else {
      for (int64_t p = 0; p < np; ++p) {
        uint32_t* d = dst + p * kMr;
        const int64_t k = 2 * (p0 + p);
        for (int64_t i = 0; i < mr; ++i) d[i] = pair_a(P, base, mp + i, k);
        for (int64_t i = mr; i < kMr; ++i) d[i] = 0;
      }
    }
    dst += np * kMr;
  }
}

// One B pair-row of 32 columns from rows k, k + 1 (bf16, unit column stride): interleave the halves.
inline void pack_b_row32(const uint16_t* r0, const uint16_t* r1, uint32_t* d) {
  static const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                             6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  static const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  const __m512i x0 = _mm512_loadu_si512(r0), x1 = _mm512_loadu_si512(r1);
  _mm512_store_si512(d, _mm512_permutex2var_epi16(x0, lo, x1));
  _mm512_store_si512(d + 16, _mm512_permutex2var_epi16(x0, hi, x1));
}

// B columns [n0, n1) x pairs into NR-column panels [panel][pair][NR]; columns past n1 are 0.
void pack_b(const Bf16Problem& P, int64_t base, int64_t n0, int64_t n1, int64_t p0, int64_t np, uint32_t* dst) {
  if (P.conv && P.conv->on_b) {  // the weight-gradient's patch matrix, gathered from x
    conv_gather16_taps32_avx512(static_cast<const uint16_t*>(P.b) + base, *P.conv, n0, n1 - n0, 2 * p0,
                                int32_t(std::min(2 * np, P.K - 2 * p0)), dst);
    return;
  }
  const bool whole = !P.b_f32 && 2 * (p0 + np) <= P.K;
  const uint16_t* b16 = static_cast<const uint16_t*>(P.b) + base;
  for (int64_t np0 = n0; np0 < n1; np0 += kNr) {
    const int64_t nr = std::min<int64_t>(kNr, n1 - np0);
    if (whole && P.b_sn == 1 && nr == kNr) {
      for (int64_t p = 0; p < np; ++p) {
        const uint16_t* r0 = b16 + 2 * (p0 + p) * P.b_sk + np0;
        pack_b_row32(r0, r0 + P.b_sk, dst + p * kNr);
      }
    } else if (whole && P.b_sk == 1) {  // transposed: a pair is one dword in memory
      for (int64_t j = 0; j < nr; ++j) {
        const uint16_t* col = b16 + (np0 + j) * P.b_sn + 2 * p0;
        for (int64_t p = 0; p < np; ++p) dst[p * kNr + j] = load_u32(col + 2 * p);
      }
      for (int64_t p = 0; p < np; ++p)
        for (int64_t j = nr; j < kNr; ++j) dst[p * kNr + j] = 0;
    } else {
      for (int64_t p = 0; p < np; ++p) {
        uint32_t* d = dst + p * kNr;
        const int64_t k = 2 * (p0 + p);
        for (int64_t j = 0; j < nr; ++j) d[j] = pair_b(P, base, k, np0 + j);
        for (int64_t j = nr; j < kNr; ++j) d[j] = 0;
      }
    }
    dst += np * kNr;
  }
}

// c[14 x 32] (row stride ldc) = (first ? 0 : c) + the np pairs of ap x bp.
void micro(int64_t np, const uint32_t* ap, const uint32_t* bp, float* c, int64_t ldc, bool first) {
  __m512 acc[kMr][2];
  for (int i = 0; i < kMr; ++i)
    for (int j = 0; j < 2; ++j) acc[i][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc + 16 * j);
  for (int64_t p = 0; p < np; ++p) {
    const __m512i b0 = _mm512_load_si512(bp + p * kNr), b1 = _mm512_load_si512(bp + p * kNr + 16);
    const uint32_t* a = ap + p * kMr;
#pragma GCC unroll 14
    for (int i = 0; i < kMr; ++i) {
      const __m512i ai = _mm512_set1_epi32(int(a[i]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)ai, (__m512bh)b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], (__m512bh)ai, (__m512bh)b1);
    }
  }
  for (int i = 0; i < kMr; ++i)
    for (int j = 0; j < 2; ++j) _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
}

}  // namespace

void bf16_tile_avx512(const Bf16Problem& P, const Bf16Tile& t) {
  static thread_local Buf abuf, bbuf;
  // Packed B of the tile's column range over all of K, kept for the worker's next tiles of the same
  // call and column range (tiles are ordered columns-outer).  Likewise packed A when the tile holds
  // every row and the call has several column ranges (a conv's weight-gradient: dy^T's O rows
  // against the taps): A is then packed once per worker instead of once per tile.
  static thread_local uint64_t a_job = 0, b_job = 0;
  static thread_local int64_t a_batch = -1, b_batch = -1, b_n0 = -1, b_n1 = -1;
  const int64_t N = P.N, pairs = (P.K + 1) / 2;
  float* out = P.out + t.batch * P.M * N;
  const int64_t mt = t.m1 - t.m0, nt = t.n1 - t.n0;
  const int64_t mpad = (mt + kMr - 1) / kMr * kMr, npad = (nt + kNr - 1) / kNr * kNr;
  if (pairs == 0) {  // K == 0: the empty sum is +0
    for (int64_t m = t.m0; m < t.m1; ++m) std::fill(out + m * N + t.n0, out + m * N + t.n1, 0.0f);
    return;
  }
  const int64_t kcp = std::min(kKcPairs, pairs);
  const int64_t nkc = (pairs + kcp - 1) / kcp;
  const bool keep_a = P.job_id != 0 && mt == P.M && N > 2 * nt && size_t(mpad * kcp * nkc) * 4 <= kBCacheBytes;
  uint32_t* ap = abuf.get(size_t(mpad * kcp * (keep_a ? nkc : 1)));
  const bool a_cached = keep_a && a_job == P.job_id && a_batch == t.batch;
  a_job = keep_a ? P.job_id : 0; a_batch = t.batch;
  // Beyond kBCacheBytes (very long K) B is packed per kc block into one block's buffer instead.
  const bool keep = size_t(npad * kcp * nkc) * 4 <= kBCacheBytes;
  uint32_t* bp = bbuf.get(size_t(npad * kcp * (keep ? nkc : 1)));
  const bool b_cached = keep && b_job == P.job_id && b_batch == t.batch && b_n0 == t.n0 && b_n1 == t.n1;
  b_job = keep ? P.job_id : 0; b_batch = t.batch; b_n0 = t.n0; b_n1 = t.n1;
  alignas(64) float tmp[kMr * kNr];
  for (int64_t p0 = 0; p0 < pairs; p0 += kcp) {
    const int64_t np = std::min(kcp, pairs - p0);
    const bool first = p0 == 0;
    uint32_t* bk = keep ? bp + p0 * npad : bp;  // earlier kc blocks are full (kcp pairs each)
    if (!b_cached) pack_b(P, P.b_off[t.batch], t.n0, t.n1, p0, np, bk);
    uint32_t* ak = keep_a ? ap + p0 * mpad : ap;  // earlier kc blocks are full (kcp pairs each)
    if (!a_cached) pack_a(P, P.a_off[t.batch], t.m0, t.m1, p0, np, ak);
    for (int64_t j0 = 0; j0 < nt; j0 += kNr) {
      const uint32_t* bpanel = bk + (j0 / kNr) * np * kNr;
      const int64_t nr = std::min<int64_t>(kNr, nt - j0);
      for (int64_t i0 = 0; i0 < mt; i0 += kMr) {
        const uint32_t* apanel = ak + (i0 / kMr) * np * kMr;
        const int64_t mr = std::min<int64_t>(kMr, mt - i0);
        float* c = out + (t.m0 + i0) * N + t.n0 + j0;
        if (mr == kMr && nr == kNr) {
          micro(np, apanel, bpanel, c, N, first);
          continue;
        }
        // Edge block: through a full-size buffer (padded rows/columns compute 0 and are dropped).
        if (!first)
          for (int64_t i = 0; i < mr; ++i) std::copy(c + i * N, c + i * N + nr, tmp + i * kNr);
        micro(np, apanel, bpanel, tmp, kNr, first);
        for (int64_t i = 0; i < mr; ++i) std::copy(tmp + i * kNr, tmp + i * kNr + nr, c + i * N);
      }
    }
  }
}

}  // namespace jdfp
