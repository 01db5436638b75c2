// Register-blocked SIMD micro-kernel, shared by the AVX2 / AVX-VNNI / AVX-512 VNNI TUs through a
// small traits class V (vector type and the handful of operations used).  MR rows x NV vectors of
// int32 accumulators stay in registers for a whole chain; the FP32 accumulator tile lives in a
// contiguous buffer (L1) between chains and kc blocks -- the C rows themselves are N floats apart
// and would alias in L1 for power-of-two N.
#pragma once

#include <type_traits>
#include <utility>

#include "gemm_driver.h"

namespace jdfp {
namespace {

// Compile-time loop: every accumulator index is a constant before GCC's scalar replacement of
// aggregates runs, so the MR x NV accumulators are kept in registers (with `#pragma unroll` over a
// plain array GCC spilled them to the stack on every k-pair).
template <class F, int... I>
static inline __attribute__((always_inline)) void static_for_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
static inline __attribute__((always_inline)) void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

template <class V, class = void>
struct VFastPack : std::false_type {};
template <class V>
struct VFastPack<V, std::void_t<decltype(V::kFastPack)>> : std::bool_constant<V::kFastPack> {};

template <class V, class = void>
struct VConvPack : std::false_type {};
template <class V>
struct VConvPack<V, std::void_t<decltype(V::kConvPack)>> : std::bool_constant<V::kConvPack> {};

template <class V, int MR_, int NV>
struct UkSimd {
  static constexpr int MR = MR_, NR = V::kLanes * NV;
  static constexpr bool kFastPack = VFastPack<V>::value;
  template <int W, class T>
  static int32_t pack(const T* src, const PackArgs& a, int16_t* dst) { return V::template pack<W>(src, a, dst); }
  static constexpr bool kConvPack = VConvPack<V>::value;
  template <int W>
  static int32_t conv_pack(const int16_t* x, const ConvGeom& g, const PackArgs& a, int16_t* dst) {
    return V::template conv_pack<W>(x, g, a, dst);
  }
  using vi = typename V::vi;
  using vf = typename V::vf;

  static inline int32_t ld32(const int16_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return v;
  }

  // noinline: inlined into the driver, GCC ran out of zmm registers and spilled an accumulator.
  // The FP32 accumulators stay in `acc` (contiguous, L1) between chains; see gemm_driver.h for the
  // contract.
  __attribute__((noinline)) static void kernel(const int16_t* Ap, const int16_t* Bp, const Piece* pcs, int npcs,
                                               float* acc, bool first, float* C, int64_t ldc, bool scaled,
                                               const int32_t* eap, int64_t ea_ld, const int32_t* ebp, int64_t eb_ld,
                                               int32_t* carry, bool fuse, int32_t fuse_e) {
    float* const ct = acc;
    if (first) {
      static_for<MR>([&](auto i) __attribute__((always_inline)) {
        static_for<NV>([&](auto v) __attribute__((always_inline)) {
          V::storef(ct + i * NR + v * V::kLanes, V::zerof());
        });
      });
    }
    // The next micro-tile's accumulators follow this one (driver's call order): pull them into L1.
    for (int l = 0; l < MR * NR * 4; l += 64) __builtin_prefetch(reinterpret_cast<const char*>(ct + MR * NR) + l, 1, 3);
    vi acc_[MR][NV];
    auto& accv = acc_;
    for (int pi = 0; pi < npcs; ++pi) {
      const Piece& pc = pcs[pi];
      if (pc.cont_in) {
        static_for<MR>([&](auto i) __attribute__((always_inline)) {
          static_for<NV>([&](auto v) __attribute__((always_inline)) {
            accv[i][v] = V::load(carry + i * NR + v * V::kLanes);
          });
        });
      } else {
        static_for<MR>([&](auto i) __attribute__((always_inline)) {
          static_for<NV>([&](auto v) __attribute__((always_inline)) { accv[i][v] = V::zero(); });
        });
      }
      // The chain: int32 accumulators only, k-pair by k-pair.
      for (int32_t p = 0; p < pc.pairs; ++p) {
        vi b[NV];
        static_for<NV>([&](auto v) __attribute__((always_inline)) {
          b[v] = V::load(Bp + v * V::kLanes * 2);
        });
        static_for<MR>([&](auto i) __attribute__((always_inline)) {
          const vi a = V::bcast(ld32(Ap + 2 * i));
          static_for<NV>([&](auto v) __attribute__((always_inline)) {
            accv[i][v] = V::dp(accv[i][v], b[v], a);
          });
        });
        Ap += 2 * MR;
        Bp += 2 * NR;
      }
      if (pc.cont_out) {
        static_for<MR>([&](auto i) __attribute__((always_inline)) {
          static_for<NV>([&](auto v) __attribute__((always_inline)) {
            V::store(carry + i * NR + v * V::kLanes, accv[i][v]);
          });
        });
        continue;
      }
      if (!scaled) {
        // FP32 spill: ct += f(s), one rounding per add (compiled with -ffp-contract=off).
        static_for<MR>([&](auto i) __attribute__((always_inline)) {
          static_for<NV>([&](auto v) __attribute__((always_inline)) {
            float* d = ct + i * NR + v * V::kLanes;
            V::storef(d, V::addf(V::loadf(d), V::cvt(accv[i][v])));
          });
        });
      } else {
        const int32_t* er = eap + pc.bl * ea_ld;
        const int32_t* ec = ebp + pc.bl * eb_ld;
        vi eb[NV];
        static_for<NV>([&](auto v) __attribute__((always_inline)) { eb[v] = V::load(ec + v * V::kLanes); });
        static_for<MR>([&](auto i) __attribute__((always_inline)) {
          const vi ea = V::bcast(er[i]);
          static_for<NV>([&](auto v) __attribute__((always_inline)) {
            float* d = ct + i * NR + v * V::kLanes;
            V::storef(d, V::addf(V::loadf(d), V::scale2(V::cvt(accv[i][v]), V::add(ea, eb[v]))));
          });
        });
      }
    }
    if (!C) return;
    if (fuse) {  // the epilogue's KB == 1 scale2, fused into the last store (same two multiplies)
      const vi e = V::bcast(fuse_e);
      static_for<MR>([&](auto i) __attribute__((always_inline)) {
        static_for<NV>([&](auto v) __attribute__((always_inline)) {
          V::storef(C + i * ldc + v * V::kLanes, V::scale2(V::loadf(ct + i * NR + v * V::kLanes), e));
        });
      });
      return;
    }
    static_for<MR>([&](auto i) __attribute__((always_inline)) {
      static_for<NV>([&](auto v) __attribute__((always_inline)) {
        V::storef(C + i * ldc + v * V::kLanes, V::loadf(ct + i * NR + v * V::kLanes));
      });
    });
  }
};

}  // namespace
}  // namespace jdfp
