// Portable scalar micro-kernel (no -m flags): the reference path for every other ISA and the
// fallback on CPUs without AVX2.  Same packing and chain order as the SIMD kernels.
#include "gemm_driver.h"

namespace jdfp {
namespace {

struct UkScalar {
  static constexpr int MR = 4, NR = 8;
  static void kernel(const int16_t* Ap, const int16_t* Bp, const Piece* pcs, int npcs, float* acc, bool first,
                     float* C, int64_t ldc, bool scaled, const int32_t* eap, int64_t ea_ld,
                     const int32_t* ebp, int64_t eb_ld, int32_t* carry, bool fuse, int32_t fuse_e) {
    float ct[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) ct[i][j] = first ? 0.0f : acc[i * NR + j];
    int32_t ia[MR][NR];
    for (int pi = 0; pi < npcs; ++pi) {
      const Piece& pc = pcs[pi];
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) ia[i][j] = pc.cont_in ? carry[i * NR + j] : 0;
      for (int32_t p = 0; p < pc.pairs; ++p, Ap += 2 * MR, Bp += 2 * NR) {
        for (int i = 0; i < MR; ++i) {
          const int32_t a0 = Ap[2 * i], a1 = Ap[2 * i + 1];
          for (int j = 0; j < NR; ++j)
            // Each pair sum and each partial chain sum fits int32 (chain <= L); compute the
            // addition in uint32 anyway so no reordering by the compiler can introduce UB.
            ia[i][j] = int32_t(uint32_t(ia[i][j]) + uint32_t(a0 * Bp[2 * j] + a1 * Bp[2 * j + 1]));
        }
      }
      if (pc.cont_out) {
        for (int i = 0; i < MR; ++i)
          for (int j = 0; j < NR; ++j) carry[i * NR + j] = ia[i][j];
        continue;
      }
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) {
          float f = float(ia[i][j]);
          if (scaled) f = scale2(f, eap[pc.bl * ea_ld + i] + ebp[pc.bl * eb_ld + j]);
          ct[i][j] = ct[i][j] + f;
        }
    }
    if (!C) {
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i * NR + j] = ct[i][j];
      return;
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) C[i * ldc + j] = fuse ? scale2(ct[i][j], fuse_e) : ct[i][j];
  }
};

}  // namespace

int tile_scalar(const Problem& P, const Tile& T) { return run_tile<UkScalar>(P, T); }

}  // namespace jdfp
