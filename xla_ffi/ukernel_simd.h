// Register-blocked SIMD micro-kernel, shared by the AVX2 / AVX-VNNI / AVX-512 VNNI TUs through a
// small traits class V (vector type and the handful of operations used).  MR rows x NV vectors of
// int32 accumulators stay in registers for a whole chain; each chain sum is then added exactly to
// the block's sum, kept as int32 pairs (see kernel) in a contiguous buffer (L1) between chains and
// kc blocks -- the C rows themselves are N floats apart and would alias in L1 for power-of-two N.
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

template <class V, class = void>
struct VPackSquares : std::false_type {};
template <class V>
struct VPackSquares<V, std::void_t<decltype(V::kPackSquares)>> : std::bool_constant<V::kPackSquares> {};

template <class V, int MR_, int NV>
struct UkSimd {
  static constexpr int MR = MR_, NR = V::kLanes * NV;
  static constexpr bool kFastPack = VFastPack<V>::value;
  static constexpr bool kPackSquares = VPackSquares<V>::value;  // pack() writes PackArgs::sq
  static constexpr bool kPieceGroups = true;  // reads UkArgs::sqa / sqb (gemm_driver.h, piece_squares)
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

  // The open block's exact sum T, per lane, is kept as two int32: W = T mod 2**32 -- the int32
  // accumulators themselves, which run on (wrapping) from piece to piece of a block instead of being
  // reset -- and F = floor(T / 2**16), updated after every piece from W alone:
  //   F' = F + sext16(((W' >> 16) - F) mod 2**16)            (V::f_next)
  // (or after every group of consecutive pieces whose sum Cauchy-Schwarz bounds the same way: x
  // below is then the group's sum; see the loop).
  // Why it is exact: every piece sum x has |x| <= 2**31 - 2**16 (kernel_chain_length), so with
  // r = T mod 2**16, F' - F = floor((r + x) / 2**16) lies in [-2**15 + 1, 2**15 - 1]; it is congruent
  // mod 2**16 to bits 16..31 of W' (= F' mod 2**16) minus F, so sign-extending that 16-bit difference
  // gives it exactly.  F stays in int32 while |T| < 2**47: at most kMaxWhPieces = 2**16 pieces, then
  // the driver has T widened into `wide` (u.spill).  At the close T = 2**16 * int64(F) + (W & 0xFFFF)
  // (V::cvt_wf), rounded once.  Per piece: three or four int32 ops, one load and one store per vector
  // (F, in the driver's acc64 block after W; a block's first update reads 0 instead of loading F),
  // issued while the next piece's dot products run.  Measured alternatives that were slower on Zen 5
  // (AVX-512): a ring of chain sums flushed every 8 chains into int64 (the burst does not overlap the
  // dot products), resetting the accumulators and keeping (W, sum of x >> 16) in memory (two
  // load/store streams), and deferring the updates to the next piece (GCC spills accumulators).
  // noinline: inlined into the driver, GCC ran out of zmm registers and spilled an accumulator.
  // See gemm_driver.h (UkArgs) for the contract.
  __attribute__((noinline)) static void kernel(const int16_t* Ap, const int16_t* Bp, const UkArgs& args) {
    UkArgs u;  // a local copy: the int32 / float stores below cannot alias its fields
    copy_kernel_args(u, args);
    if (u.scaled) begin_accf(u);
    // The next micro-tile's accumulators follow this one (driver's call order): pull them into L1,
    // one line per k-pair below (a burst of all of them here, 48 lines on AVX-512, stalled the
    // kernel's entry on the outstanding misses: ~3 % of a 2048^3 GEMM's samples).
    const char* pf = reinterpret_cast<const char*>(u.acc64 + MR * NR);
    const char* const pf_end = pf + MR * NR * 8 - 64;
    int32_t* const W = reinterpret_cast<int32_t*>(u.acc64);
    int32_t* const F = W + MR * NR;
    bool wide = u.wide_in;  // wide holds an earlier part of the open block
    bool fz = !u.wh_in;     // F is 0 (not stored: no zero stores per block)
    vi acc_[MR][NV];
    auto& accv = acc_;
    // W of the block continued from the last kc block, or a clean start (W, F) = (0, 0).
    static_for<MR>([&](auto i) __attribute__((always_inline)) {
      static_for<NV>([&](auto v) __attribute__((always_inline)) {
        accv[i][v] = u.wh_in ? V::load(W + i * NR + v * V::kLanes) : V::zero();
      });
    });
    int64_t run_a = 0, run_b = 0;  // sums of squares of the pieces since the last update (u.sqa / u.sqb)
    for (int pi = 0; pi < u.npcs; ++pi) {
      const Piece& pc = u.pcs[pi];
      // The piece: int32 accumulators only, k-pair by k-pair (0 at a block's first piece).
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
        __builtin_prefetch(pf, 1, 3);
        pf += pf < pf_end ? 64 : 0;
      }
      const bool opens = piece_opens_block(u, pi), closes = piece_closes_block(u, pi), last = pi + 1 == u.npcs;
      if (opens) wide = false;
      // Group this piece with the next (no update between them) while Cauchy-Schwarz keeps the
      // group's sum within kPieceLimit for every row and column: the update below then sees one sum
      // of at most kPieceLimit, exactly as for a single piece.
      bool group = false;
      if (u.sqa && !closes && !last) {
        run_a += u.sqa[pi], run_b += u.sqb[pi];
        group = within_piece_limit(run_a + u.sqa[pi + 1], run_b + u.sqb[pi + 1]);
      }
      if (group) continue;
      run_a = run_b = 0;
      if (closes && fz && !wide) {
        // No update since the block opened (in this call): its int32 sum is the block sum (one piece,
        // or one group within kPieceLimit), f() is one cvtdq2ps.
        close_block(u, pc, [&](auto i, auto v) __attribute__((always_inline)) { return V::cvt(accv[i][v]); });
      } else {
        const bool store_w = closes || last;
        auto upd = [&](auto i, auto v, auto zero_f) __attribute__((always_inline)) {
          const int off = i * NR + v * V::kLanes;
          vi w = accv[i][v];
          __asm__("" : "+v"(w));  // one use of the loop's value (two made GCC copy and spill the accumulators)
          V::store(F + off, V::f_next(zero_f ? V::zero() : V::load(F + off), w));
          if (store_w) V::store(W + off, w);
          accv[i][v] = w;
        };
        if (fz) {
          static_for<MR>([&](auto i) __attribute__((always_inline)) {
            static_for<NV>([&](auto v) __attribute__((always_inline)) { upd(i, v, std::true_type{}); });
          });
        } else {
          static_for<MR>([&](auto i) __attribute__((always_inline)) {
            static_for<NV>([&](auto v) __attribute__((always_inline)) { upd(i, v, std::false_type{}); });
          });
        }
        fz = false;
        if (closes) close_wf(u, pc, W, F, wide);
      }
      if (closes) {  // the next piece opens a block: (W, F) = (0, 0)
        static_for<MR>([&](auto i) __attribute__((always_inline)) {
          static_for<NV>([&](auto v) __attribute__((always_inline)) { accv[i][v] = V::zero(); });
        });
        fz = true;
      }
    }
    if (u.spill) spill_wf(W, F, u.wide, wide);
    if (!u.C || !u.scaled) return;  // KB == 1: close_block stored C
    static_for<MR>([&](auto i) __attribute__((always_inline)) {
      static_for<NV>([&](auto v) __attribute__((always_inline)) {
        V::storef(u.C + i * u.ldc + v * V::kLanes, V::loadf(u.accf + i * NR + v * V::kLanes));
      });
    });
  }

  // KB > 1: the first kc block starts the float accumulators at +0.0; the next micro-tile's follow
  // this one's (prefetched).
  static inline __attribute__((always_inline)) void begin_accf(const UkArgs& u) {
    if (u.first) {
      static_for<MR>([&](auto i) __attribute__((always_inline)) {
        static_for<NV>([&](auto v) __attribute__((always_inline)) {
          V::storef(u.accf + i * NR + v * V::kLanes, V::zerof());
        });
      });
    }
    for (int l = 0; l < MR * NR * 4; l += 64) __builtin_prefetch(reinterpret_cast<const char*>(u.accf + MR * NR) + l, 1, 3);
  }

  // The block closes: f(S) of T = (W, F) (+ wide), rounded once (V::cvt_wf).  noinline (as
  // spill_wf): once per block, and inlined its constants stayed live across the piece loop, which
  // then spilled accumulators.
  __attribute__((noinline)) static void close_wf(const UkArgs& u, const Piece& pc, const int32_t* W, const int32_t* F,
                                                 bool wide) {
    if (wide) {
      close_block(u, pc, [&](auto i, auto v) __attribute__((always_inline)) {
        const int off = i * NR + v * V::kLanes;
        return V::cvt_wf(W + off, F + off, u.wide + off);
      });
      return;
    }
    close_block(u, pc, [&](auto i, auto v) __attribute__((always_inline)) {
      const int off = i * NR + v * V::kLanes;
      return V::cvt_wf(W + off, F + off, nullptr);
    });
  }

  // wide (+)= T of (W, F): the open block continues past kMaxWhPieces pieces (driver's u.spill).
  __attribute__((noinline)) static void spill_wf(const int32_t* W, const int32_t* F, int64_t* wide, bool add) {
    static_for<MR>([&](auto i) __attribute__((always_inline)) {
      static_for<NV>([&](auto v) __attribute__((always_inline)) {
        const int off = i * NR + v * V::kLanes;
        V::spill_wf(W + off, F + off, wide + off, add);
      });
    });
  }

  // A block closes with f(S) = f_of(i, v) for every accumulator vector: KB > 1 adds
  // scale2(f, ea + eb) to acc (one rounding per add, compiled with -ffp-contract=off); KB == 1
  // closes only at the end of K and stores f, or scale2(f, fuse_e) when fused, to C.
  template <class F>
  static inline __attribute__((always_inline)) void close_block(const UkArgs& u, const Piece& pc, F&& f_of) {
    if (u.scaled && u.fast[pc.bl]) {
      // Every 2**ea, 2**eb and 2**(ea + eb) of the block is normal and ea + eb <= 63 (driver's
      // tile_exponents, fast_scale_block): scale2(f, ea + eb) is f * (2**ea * 2**eb), exact, so
      // acc + it is one multiply-add (V::fmaf).  Rows alike: one scale per column.
      const float* pr = u.pap + pc.bl;
      vf pb[NV];
      static_for<NV>([&](auto v) __attribute__((always_inline)) { pb[v] = V::loadf(u.pbp + pc.bl * u.eb_ld + v * V::kLanes); });
      auto add = [&](auto i, auto v, vf sc) __attribute__((always_inline)) {
        float* d = u.accf + i * NR + v * V::kLanes;
        V::storef(d, V::fmaf(f_of(i, v), sc, V::loadf(d)));
      };
      if (u.uniform[pc.bl]) {
        const vf pa = V::bcastf(pr[0]);
        static_for<NV>([&](auto v) __attribute__((always_inline)) { pb[v] = V::mulf(pa, pb[v]); });
        static_for<MR>([&](auto i) __attribute__((always_inline)) {
          static_for<NV>([&](auto v) __attribute__((always_inline)) { add(i, v, pb[v]); });
        });
        return;
      }
      static_for<MR>([&](auto i) __attribute__((always_inline)) {
        const vf pa = V::bcastf(pr[i * u.ea_ld]);
        static_for<NV>([&](auto v) __attribute__((always_inline)) { add(i, v, V::mulf(pa, pb[v])); });
      });
      return;
    }
    if (u.scaled) {
      const int32_t* er = u.eap + pc.bl;
      const int32_t* ec = u.ebp + pc.bl * u.eb_ld;
      vi eb[NV];
      static_for<NV>([&](auto v) __attribute__((always_inline)) { eb[v] = V::load(ec + v * V::kLanes); });
      static_for<MR>([&](auto i) __attribute__((always_inline)) {
        const vi ea = V::bcast(er[i * u.ea_ld]);
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
