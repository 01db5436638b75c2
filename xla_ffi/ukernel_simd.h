// Register-blocked SIMD micro-kernel, shared by the AVX2 / AVX-VNNI / AVX-512 VNNI TUs through a
// small traits class V (vector type and the handful of operations used).  MR rows x NV vectors of
// int32 accumulators stay in registers for a whole chain; each chain sum is then added exactly to
// the block's int64 sums, which live in a contiguous buffer (L1) between chains and kc blocks -- the
// C rows themselves are N floats apart and would alias in L1 for power-of-two N.
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
  // See gemm_driver.h (UkArgs) for the contract.
  __attribute__((noinline)) static void kernel(const int16_t* Ap, const int16_t* Bp, const UkArgs& args) {
    const UkArgs u = args;  // a local copy: the int64 / float stores below cannot alias its fields
    if (u.scaled && u.first) {
      static_for<MR>([&](auto i) __attribute__((always_inline)) {
        static_for<NV>([&](auto v) __attribute__((always_inline)) {
          V::storef(u.accf + i * NR + v * V::kLanes, V::zerof());
        });
      });
    }
    // The next micro-tile's accumulators follow this one (driver's call order): pull them into L1.
    for (int l = 0; l < MR * NR * 8; l += 64) __builtin_prefetch(reinterpret_cast<const char*>(u.acc64 + MR * NR) + l, 1, 3);
    if (u.scaled)
      for (int l = 0; l < MR * NR * 4; l += 64) __builtin_prefetch(reinterpret_cast<const char*>(u.accf + MR * NR) + l, 1, 3);
    vi acc_[MR][NV];
    auto& accv = acc_;
    // Chain sums of the open block wait in `ring` (int32, one store each, like the old FP32 spill);
    // every kRing pieces, and when the block closes or the call ends, flush() adds them exactly into
    // the int64 sums acc64 (two int64 stores per vector per flush, not per chain).  The ring only
    // ever holds pieces of one block.
    alignas(64) int32_t ring[kRing * MR * NR];
    int slots = 0;
    bool fresh = false;  // acc64 holds nothing of the open block yet (flush stores instead of adding)
    for (int pi = 0; pi < u.npcs; ++pi) {
      const Piece& pc = u.pcs[pi];
      static_for<MR>([&](auto i) __attribute__((always_inline)) {
        static_for<NV>([&](auto v) __attribute__((always_inline)) { accv[i][v] = V::zero(); });
      });
      // The chain piece: int32 accumulators only, k-pair by k-pair.
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
      const bool opens = piece_opens_block(u, pi), closes = piece_closes_block(u, pi);
      if (opens && closes) {
        // The piece is the whole block: its int32 sum is the block sum, f() is one cvtdq2ps.
        close_block(u, pc, [&](auto i, auto v) __attribute__((always_inline)) { return V::cvt(accv[i][v]); });
        continue;
      }
      fresh |= opens;
      int32_t* slot = ring + slots * (MR * NR);
      static_for<MR>([&](auto i) __attribute__((always_inline)) {
        static_for<NV>([&](auto v) __attribute__((always_inline)) {
          V::store(slot + i * NR + v * V::kLanes, accv[i][v]);
        });
      });
      if (++slots < kRing && !closes && pi + 1 < u.npcs) continue;
      flush(ring, slots, fresh, u.acc64);
      slots = 0;
      fresh = false;
      if (closes)
        close_block(u, pc, [&](auto i, auto v) __attribute__((always_inline)) {
          return V::cvt64(u.acc64 + i * NR + v * V::kLanes);
        });
    }
    if (!u.C || !u.scaled) return;  // KB == 1: close_block stored C
    static_for<MR>([&](auto i) __attribute__((always_inline)) {
      static_for<NV>([&](auto v) __attribute__((always_inline)) {
        V::storef(u.C + i * u.ldc + v * V::kLanes, V::loadf(u.accf + i * NR + v * V::kLanes));
      });
    });
  }

  static constexpr int kRing = 8;

  // acc64 (+)= the exact sum of the `slots` int32 chain sums in ring, per lane.  Each sum x is split
  // as x = (x >> 16) * 2**16 + (x & 0xFFFF); both parts add up in int32 without wrapping
  // (kRing * 2**16 << 2**31): a shift, an AND and two adds per sum, all lane-local.  put64 widens the
  // two partial sums once per flush and adds them to the int64 sums exactly.
  static inline void flush(const int32_t* ring, int slots, bool fresh, int64_t* acc64) {
    if (slots == kRing) {  // the common case, unrolled: no loop branches per accumulator vector
      flush_n<kRing>(ring, fresh, acc64);
      return;
    }
    static_for<MR>([&](auto i) __attribute__((always_inline)) {
      static_for<NV>([&](auto v) __attribute__((always_inline)) {
        const int off = i * NR + v * V::kLanes;
        vi ih = V::zero(), il = V::zero();
        for (int t = 0; t < slots; ++t) V::split_add(ring + t * (MR * NR) + off, ih, il);
        V::put64(acc64 + off, ih, il, fresh);
      });
    });
  }
  template <int S>
  static inline __attribute__((always_inline)) void flush_n(const int32_t* ring, bool fresh, int64_t* acc64) {
    static_for<MR>([&](auto i) __attribute__((always_inline)) {
      static_for<NV>([&](auto v) __attribute__((always_inline)) {
        const int off = i * NR + v * V::kLanes;
        vi ih = V::zero(), il = V::zero();
        static_for<S>([&](auto t) __attribute__((always_inline)) { V::split_add(ring + t * (MR * NR) + off, ih, il); });
        V::put64(acc64 + off, ih, il, fresh);
      });
    });
  }

  // A block closes with f(S) = f_of(i, v) for every accumulator vector: KB > 1 adds
  // scale2(f, ea + eb) to acc (one rounding per add, compiled with -ffp-contract=off); KB == 1
  // closes only at the end of K and stores f, or scale2(f, fuse_e) when fused, to C.
  template <class F>
  static inline __attribute__((always_inline)) void close_block(const UkArgs& u, const Piece& pc, F&& f_of) {
    if (u.scaled) {
      const int32_t* er = u.eap + pc.bl * u.ea_ld;
      const int32_t* ec = u.ebp + pc.bl * u.eb_ld;
      vi eb[NV];
      static_for<NV>([&](auto v) __attribute__((always_inline)) { eb[v] = V::load(ec + v * V::kLanes); });
      static_for<MR>([&](auto i) __attribute__((always_inline)) {
        const vi ea = V::bcast(er[i]);
        static_for<NV>([&](auto v) __attribute__((always_inline)) {
          float* d = u.accf + i * NR + v * V::kLanes;
          V::storef(d, V::addf(V::loadf(d), V::scale2(f_of(i, v), V::add(ea, eb[v]))));
        });
      });
      return;
    }
    const vi e = V::bcast(u.fuse_e);
    static_for<MR>([&](auto i) __attribute__((always_inline)) {
      static_for<NV>([&](auto v) __attribute__((always_inline)) {
        const vf f = f_of(i, v);
        V::storef(u.C + i * u.ldc + v * V::kLanes, u.fuse ? V::scale2(f, e) : f);
      });
    });
  }
};

}  // namespace
}  // namespace jdfp
