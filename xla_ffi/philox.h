// Philox-4x32-10 (Salmon et al., SC'11; the Random123 definition): the random bits of stochastic
// rounding, scalar here and 8 / 16 lanes in the AVX2 / AVX-512 TUs (philox_avx2 / philox_avx512
// below, compiled only where the TU's -m flags allow).  Bit-identical with jdfp/_src/numerics/philox.py.
//
// Stream contract (docs/arithmetic.md): element i of a tensor uses word i % 4 of block j = i / 4,
// counter (uint32(j), uint32(j >> 32), 0, 0), key (k0, k1) = the JAX key's two words.  So a chunk
// [begin, end) of the tensor draws the same bits whichever thread converts it.
//
// `static inline` throughout, as quantize_kernels.h: each TU keeps its own copy (ODR).
#pragma once

#include <cstdint>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace jdfp {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

struct PhiloxKey {
  uint32_t k0, k1;
};

// The four words of block j.
static inline void philox_block(uint64_t j, PhiloxKey key, uint32_t out[4]) {
  uint32_t c0 = uint32_t(j), c1 = uint32_t(j >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < kPhiloxRounds; ++r) {
    if (r) k0 += kPhiloxW0, k1 += kPhiloxW1;
    const uint64_t p0 = uint64_t(kPhiloxM0) * c0, p1 = uint64_t(kPhiloxM1) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0, n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
  }
  out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

#if defined(__AVX512F__)
// One round on 8 blocks held one 32-bit word per 64-bit lane (low half; the high half is junk):
// vpmuludq reads only the low halves, so each product is the round's hi:lo pair as is, and a
// round is two multiplies, two shifts and two 3-way xors.  (A 32-bit-lane layout needs two extra
// shifts and two blends per multiply to split even and odd lanes: ~1.4x the work per block.)
static inline void philox_round8(__m512i& c0, __m512i& c1, __m512i& c2, __m512i& c3, __m512i m0, __m512i m1,
                                 __m512i k0, __m512i k1) {
  const __m512i p0 = _mm512_mul_epu32(c0, m0), p1 = _mm512_mul_epu32(c2, m1);
  c0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), c1, k0, 0x96);  // hi1 ^ c1 ^ k0
  c2 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), c3, k1, 0x96);  // hi0 ^ c3 ^ k1
  c1 = p1;
  c3 = p0;
}

// Philox of 16 blocks at once: counters (lo[l], hi[l], 0, 0) -> the four word vectors x[0..3], lane
// l of x[w] being word w of block l.  The blocks run as two interleaved groups of 8 in 64-bit lanes
// (philox_round8); round 0 has c2 = c3 = 0, so its second product is 0.
static inline void philox_avx512(__m512i lo, __m512i hi, PhiloxKey key, __m512i x[4]) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i a_lo = _mm512_cvtepu32_epi64(_mm512_castsi512_si256(lo));
  const __m512i b_lo = _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(lo, 1));
  const __m512i a_hi = _mm512_cvtepu32_epi64(_mm512_castsi512_si256(hi));
  const __m512i b_hi = _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(hi, 1));
  uint32_t k0 = key.k0, k1 = key.k1;
  __m512i vk0 = _mm512_set1_epi32(int(k0)), vk1 = _mm512_set1_epi32(int(k1));
  // Round 0: c0' = c1 ^ k0, c2' = hi(c0 * M0) ^ k1, c1' = 0, c3' = lo(c0 * M0).
  const __m512i pa = _mm512_mul_epu32(a_lo, m0), pb = _mm512_mul_epu32(b_lo, m0);
  __m512i a0 = _mm512_xor_si512(a_hi, vk0), b0 = _mm512_xor_si512(b_hi, vk0);
  __m512i a2 = _mm512_xor_si512(_mm512_srli_epi64(pa, 32), vk1), b2 = _mm512_xor_si512(_mm512_srli_epi64(pb, 32), vk1);
  __m512i a1 = _mm512_setzero_si512(), b1 = _mm512_setzero_si512(), a3 = pa, b3 = pb;
  for (int r = 1; r < kPhiloxRounds; ++r) {
    k0 += kPhiloxW0, k1 += kPhiloxW1;
    vk0 = _mm512_set1_epi32(int(k0)), vk1 = _mm512_set1_epi32(int(k1));
    philox_round8(a0, a1, a2, a3, m0, m1, vk0, vk1);
    philox_round8(b0, b1, b2, b3, m0, m1, vk0, vk1);
  }
  // The low halves of a's and b's 64-bit lanes, in order: lanes 0-7 from a, 8-15 from b.
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  x[0] = _mm512_permutex2var_epi32(a0, even, b0);
  x[1] = _mm512_permutex2var_epi32(a1, even, b1);
  x[2] = _mm512_permutex2var_epi32(a2, even, b2);
  x[3] = _mm512_permutex2var_epi32(a3, even, b3);
}
#endif

#if defined(__AVX2__)
static inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i pe = _mm256_mul_epu32(a, m);
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}

// Philox of 8 blocks at once, as philox_avx512.
static inline void philox_avx2(__m256i lo, __m256i hi, PhiloxKey key, __m256i x[4]) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  __m256i c0 = lo, c1 = hi, c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < kPhiloxRounds; ++r) {
    if (r) k0 += kPhiloxW0, k1 += kPhiloxW1;
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(c0, m0, hi0, lo0);
    mulhilo8(c2, m1, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(int(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(int(k1)));
    c1 = lo1;
    c3 = lo0;
  }
  x[0] = c0, x[1] = c1, x[2] = c2, x[3] = c3;
}
#endif

}  // namespace jdfp
