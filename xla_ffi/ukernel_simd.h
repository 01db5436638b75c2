// Register-blocked SIMD micro-kernel, shared by the AVX2 / AVX-VNNI / AVX-512 VNNI TUs through a
// small traits class V (vector type and the handful of operations used).  MR rows x NV vectors of
// int32 accumulators stay in registers for a whole chain; the FP32 accumulator tile lives in a
// contiguous stack buffer (L1) between chains -- the C rows themselves are N floats apart and
// would alias in L1 for power-of-two N.
#pragma once

#include "gemm_driver.h"

namespace jdfp {
namespace {

template <class V, int MR_, int NV>
struct UkSimd {
  static constexpr int MR = MR_, NR = V::kLanes * NV;
  using vi = typename V::vi;
  using vf = typename V::vf;

  static inline int32_t ld32(const int16_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return v;
  }

  // acc += one chain piece (pairs k-pairs).
  static inline __attribute__((always_inline)) void chain(vi (&acc)[MR][NV], const int16_t*& Ap,
                                                          const int16_t*& Bp, int32_t pairs) {
    for (int32_t p = 0; p < pairs; ++p) {
      vi b[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) b[v] = V::load(Bp + v * V::kLanes * 2);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const vi a = V::bcast(ld32(Ap + 2 * i));
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[i][v] = V::dp(acc[i][v], b[v], a);
      }
      Ap += 2 * MR;
      Bp += 2 * NR;
    }
  }

  static void kernel(const int16_t* Ap, const int16_t* Bp, const Piece* pcs, int npcs, float* C,
                     int64_t ldc, bool first, bool scaled, const int32_t* eap, int64_t ea_ld,
                     const int32_t* ebp, int64_t eb_ld, int32_t* carry) {
    alignas(64) float ct[MR * NR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        V::storef(ct + i * NR + v * V::kLanes,
                  first ? V::zerof() : V::loadf(C + i * ldc + v * V::kLanes));
    vi acc[MR][NV];
    for (int pi = 0; pi < npcs; ++pi) {
      const Piece& pc = pcs[pi];
      if (pc.cont_in) {
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) acc[i][v] = V::load(carry + i * NR + v * V::kLanes);
      } else {
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) acc[i][v] = V::zero();
      }
      chain(acc, Ap, Bp, pc.pairs);
      if (pc.cont_out) {
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) V::store(carry + i * NR + v * V::kLanes, acc[i][v]);
        continue;
      }
      if (!scaled) {
        // FP32 spill: ct += f(s), one rounding per add (compiled with -ffp-contract=off).
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) {
            float* d = ct + i * NR + v * V::kLanes;
            V::storef(d, V::addf(V::loadf(d), V::cvt(acc[i][v])));
          }
      } else {
        const int32_t* er = eap + pc.bl * ea_ld;
        const int32_t* ec = ebp + pc.bl * eb_ld;
        vi eb[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) eb[v] = V::load(ec + v * V::kLanes);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
          const vi ea = V::bcast(er[i]);
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) {
            float* d = ct + i * NR + v * V::kLanes;
            V::storef(d, V::addf(V::loadf(d), V::scale2(V::cvt(acc[i][v]), V::add(ea, eb[v]))));
          }
        }
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        V::storef(C + i * ldc + v * V::kLanes, V::loadf(ct + i * NR + v * V::kLanes));
  }
};

}  // namespace
}  // namespace jdfp
