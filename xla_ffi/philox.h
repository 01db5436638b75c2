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
// mulhilo of 16 lanes by a constant: vpmuludq multiplies the even 32-bit lanes into 64-bit
// products; the odd lanes go through a 32-bit shift.  hi/lo are put back in place with two blends.
static inline void mulhilo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i pe = _mm512_mul_epu32(a, m);                          // lanes 2k: lo | hi << 32
  const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // lanes 2k+1
  lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
}

// Philox of 16 blocks at once: counters (lo[l], hi[l], 0, 0) -> the four word vectors x[0..3].
static inline void philox_avx512(__m512i lo, __m512i hi, PhiloxKey key, __m512i x[4]) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  __m512i c0 = lo, c1 = hi, c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < kPhiloxRounds; ++r) {
    if (r) k0 += kPhiloxW0, k1 += kPhiloxW1;
    __m512i hi0, lo0, hi1, lo1;
    mulhilo16(c0, m0, hi0, lo0);
    mulhilo16(c2, m1, hi1, lo1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(int(k0)));
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(int(k1)));
    c1 = lo1;
    c3 = lo0;
  }
  x[0] = c0, x[1] = c1, x[2] = c2, x[3] = c3;
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
