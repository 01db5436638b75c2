// Portable scalar micro-kernel (no -m flags): the reference path for every other ISA and the
// fallback on CPUs without AVX2.  Same packing and chain order as the SIMD kernels.
#include "gemm_driver.h"

namespace jdfp {
namespace {

struct UkScalar {
  static constexpr int MR = 4, NR = 8;

  // One piece: its int32 sum per output element (a piece is never longer than a chain: no wrap).
  static void piece_sums(const int16_t* Ap, const int16_t* Bp, int32_t pairs, int32_t (&ia)[MR][NR]) {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) ia[i][j] = 0;
    for (int32_t p = 0; p < pairs; ++p, Ap += 2 * MR, Bp += 2 * NR) {
      for (int i = 0; i < MR; ++i) {
        const int32_t a0 = Ap[2 * i], a1 = Ap[2 * i + 1];
        for (int j = 0; j < NR; ++j)
          // Each pair sum and each partial chain sum fits int32 (chain <= L); compute the
          // addition in uint32 anyway so no reordering by the compiler can introduce UB.
          ia[i][j] = int32_t(uint32_t(ia[i][j]) + uint32_t(a0 * Bp[2 * j] + a1 * Bp[2 * j + 1]));
      }
    }
  }

  static void kernel(const int16_t* Ap, const int16_t* Bp, const UkArgs& u) {
    if (u.scaled && u.first)
      for (int t = 0; t < MR * NR; ++t) u.accf[t] = 0.0f;
    int32_t ia[MR][NR];
    for (int pi = 0; pi < u.npcs; ++pi) {
      const Piece& pc = u.pcs[pi];
      piece_sums(Ap, Bp, pc.pairs, ia);
      Ap += 2 * MR * pc.pairs;
      Bp += 2 * NR * pc.pairs;
      const bool opens = piece_opens_block(u, pi), closes = piece_closes_block(u, pi);
      // Exact spill: the block's int64 sum += the piece's int32 sum.
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) u.acc64[i * NR + j] = (opens ? 0 : u.acc64[i * NR + j]) + ia[i][j];
      if (!closes) continue;
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) {
          const float f = i64_to_f32(u.acc64[i * NR + j]);  // f(S): the one rounding of the block
          if (u.scaled) {
            float& acc = u.accf[i * NR + j];
            acc = acc + scale2(f, u.eap[i * u.ea_ld + pc.bl] + u.ebp[pc.bl * u.eb_ld + j]);
          } else {  // KB == 1: the block is the whole of K, closed in the last kc block
            u.C[i * u.ldc + j] = u.fuse ? scale2(f, u.fuse_e) : f;
          }
        }
    }
    if (!u.C || !u.scaled) return;
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) u.C[i * u.ldc + j] = u.accf[i * NR + j];
  }
};

}  // namespace

int tile_scalar(const Problem& P, const Tile& T) { return run_tile<UkScalar>(P, T); }

}  // namespace jdfp
