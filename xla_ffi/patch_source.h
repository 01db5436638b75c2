// The patch matrix of a float32 conv input as a GEMM's A = P^T, supplied a kc block at a time: the
// weight gradients of block-format convs without a stored patch matrix (JdfpGemmI16PatchWgrad in
// gemm_ffi.cc, JdfpGemmI8PatchWgrad in gemm_i8_ffi.cc).  dW = P^T . g, P [rows, K] in tiles br x bc
// whose exponents e [1, GR, GC] the forward's conversion found.  A worker gathers the rows of a kc
// block and its tile's columns of P from x, quantized on those exponents (nearest rounding: the
// conversion's integers, by the conversion's own row kernels), into its buffer (conv_geometry.h's
// channel runs), and the GEMM packs them while they are in L2.  Handler TUs only (baseline flags).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "block_quantize_kernels.h"
#include "conv_geometry.h"
#include "ffi_runtime.h"

// Both handlers: float32 x [N, D, H, W, C], int32 e [1, GR, GC], b [1, rows, N] (int16 / int8), int32
// eb [1, KB, N or 1] -> float32 out [1, taps * C, N]; the GEMM's attributes (bits_a, bits_b, block_k,
// isa), the tiles (block: br, bc) and the conv's.
#define JDFP_PATCH_WGRAD_BINDING                   \
  ffi::Ffi::Bind()                                 \
      .Ctx<ffi::ThreadPool>()                      \
      .Arg<ffi::AnyBuffer>()                       \
      .Arg<ffi::Buffer<ffi::S32>>()                \
      .Arg<ffi::AnyBuffer>()                       \
      .Arg<ffi::Buffer<ffi::S32>>()                \
      .Ret<ffi::Buffer<ffi::F32>>()                \
      .Attr<int32_t>("bits_a")                     \
      .Attr<int32_t>("bits_b")                     \
      .Attr<int64_t>("block_k")                    \
      .Attr<ffi::Span<const int64_t>>("block")     \
      .Attr<int32_t>("isa")                        \
      JDFP_CONV_SPATIAL_ATTRS                      \
      .Attr<ffi::Span<const int64_t>>("kernel_spatial")

namespace jdfp {
namespace {

// The AVX-512 row kernels of the block conversion exist (x86 builds with SIMD).
#if (defined(__x86_64__) || defined(__i386__)) && defined(JDFP_HAVE_SIMD)
constexpr bool kConvertColsAvx512 = true;
#else
constexpr bool kConvertColsAvx512 = false;
#endif

struct PatchTiles {
  PatchGeom geom;
  const float* x = nullptr;
  const int32_t* e = nullptr;
  int64_t br = 1, bc = 1, GR = 0, GC = 0;
  int64_t bk = 1, KB = 0;  // the GEMM's blocks along P's rows (its contraction)
  int64_t da[3] = {}, dea[3] = {};  // P as the GEMM's transposed a [1, rows, K], ea [1, K, KB]
  float qm = 0.0f;      // the format's largest value (the GEMM's qmax_a)
  bool avx512 = false;  // the GEMM runs on AVX-512 VNNI: convert with the AVX-512 row kernels

  // x's geometry, the tiles (block: br, bc), e's shape and block_k (it must divide br, or one tile
  // row holds every row) checked; `who` names the handler in errors.
  ffi::Error init(const char* who, ffi::AnyBuffer xb, ffi::Buffer<ffi::S32> eb_, ffi::Span<const int64_t> block,
                  int64_t block_k, ffi::Span<const int64_t> strides, ffi::Span<const int64_t> plo,
                  ffi::Span<const int64_t> phi, ffi::Span<const int64_t> ldil, ffi::Span<const int64_t> rdil,
                  ffi::Span<const int64_t> kernel_spatial) {
    auto bad = [who](const std::string& m) { return invalid_as(who, m); };
    if (xb.element_type() != ffi::F32) return bad("x must be float32");
    ConvAttrs at{};
    std::string err;
    if (!read_attrs(strides, plo, phi, ldil, rdil, 1, at, err) || !geom.init(xb.dimensions(), kernel_spatial, at, err))
      return bad(err);
    if (block.size() != 2 || block[0] < 1 || block[1] < 1) return bad("block must be two ints >= 1: the tiles (br, bc)");
    const int64_t rows = geom.rows, K = geom.cols;
    br = block[0], bc = block[1];
    GR = (rows + br - 1) / br, GC = (K + bc - 1) / bc;
    const auto de = eb_.dimensions();
    if (de.size() != 3 || de[0] != 1 || de[1] != GR || de[2] != GC)
      return bad("e must be the patch matrix's tile grid [1, " + std::to_string(GR) + ", " + std::to_string(GC) +
                 "], got " + dims_str(de));
    if (block_k == 0 || block_k < -1) return bad("block_k must be >= 1 (or -1 for all rows), got " + std::to_string(block_k));
    if (GR > 1 && (block_k < 1 || br % block_k != 0))
      return bad("block_k must divide the tiles' rows br = " + std::to_string(br) + ", got " + std::to_string(block_k));
    bk = block_k == -1 ? std::max<int64_t>(rows, 1) : block_k;
    KB = (rows + bk - 1) / bk;
    da[0] = 1, da[1] = rows, da[2] = K;
    dea[0] = 1, dea[1] = K, dea[2] = KB;
    x = static_cast<const float*>(xb.untyped_data());
    e = eb_.typed_data();
    return ffi::Error::Success();
  }

  // b, eb and out (b [1, rows, N], eb [1, KB, N or 1], out [1, K, N]): 3-D with batch 1 (the GEMM's
  // shape checks do the rest).
  static ffi::Error check_operands(const char* who, ffi::Span<const int64_t> db, ffi::Span<const int64_t> deb,
                                   ffi::Span<const int64_t> dout) {
    for (auto d : {db, deb, dout})
      if (d.size() != 3 || d[0] != 1)
        return invalid_as(who, "b, eb and out must be 3-D with batch 1: b [1, rows, N], eb [1, KB, N or 1], out [1, "
                          "K, N]; got b " + dims_str(db) + " eb " + dims_str(deb) + " out " + dims_str(dout));
    return ffi::Error::Success();
  }

  // n values with per-column scales onto the grid (|q| <= qm): the conversion's AVX-512 row kernel
  // where the GEMM runs on AVX-512 (`avx512`), else quantize1; the same integers either way.
  template <class Q>
  void cols(const float* xv, Q* q, int64_t n, const float* s1, const float* s2) const {
    if (kConvertColsAvx512 && avx512) {
      if constexpr (sizeof(Q) == 1) convert_cols_i8_avx512(xv, q, n, s1, s2, qm, false, nullptr);
      else convert_cols_i16_avx512(xv, q, n, s1, s2, qm, false, nullptr);
      return;
    }
    for (int64_t i = 0; i < n; ++i) q[i] = Q(quantize1(xv[i], s1[i], s2[i], qm));
  }

  // P's rows [k0, k1) x T's columns quantized on e into the worker's buffer of Q (int8 / int16):
  // (m, k) at result[(m - T.m0) + (k - k0) * w], w = T.m1 - T.m0 (the result is offset so that
  // result[m + k * w] reads it).  Tap runs of at least kDirectRun channels convert straight from x;
  // shorter ones (a first layer's 1-3 channels) are gathered into rows first.
  static constexpr int64_t kDirectRun = 16;
  template <class Q>
  const Q* convert_rows(const Tile& T, int64_t k0, int64_t k1) const {
    thread_local std::vector<float> f, s1, s2;  // kept per thread: page-faulted once, then in L2
    thread_local std::vector<Q> q;
    const int64_t w = T.m1 - T.m0;
    if (q.size() < size_t((k1 - k0) * w)) q.resize(size_t((k1 - k0) * w));
    s1.resize(size_t(w)), s2.resize(size_t(w));
    const int32_t* scaled_row = nullptr;  // the tile row whose scales s1 / s2 hold
    auto rescale = [&](int64_t k) {
      const int32_t* er = tile_row(k);
      if (er == scaled_row) return;
      scaled_row = er;
      for (int64_t i = 0; i < w;) {  // one scales_of per column tile
        const int64_t cb = (T.m0 + i) / bc, end = std::min(w, (cb + 1) * bc - T.m0);
        float a, b;
        scales_of(er[cb], a, b);
        for (; i < end; ++i) s1[size_t(i)] = a, s2[size_t(i)] = b;
      }
    };
    if (geom.C >= kDirectRun) {
      geom.for_each_run(x, k0, k1 - k0, T.m0, w, [&](int64_t r, int64_t at, int64_t n, const float* xp) {
        if (at == 0) rescale(k0 + r);
        Q* d = q.data() + r * w + at;
        if (xp) cols<Q>(xp, d, n, s1.data() + at, s2.data() + at);
        else std::memset(d, 0, size_t(n) * sizeof(Q));  // padding: 0 whatever the scale
      });
    } else {
      if (f.size() < size_t((k1 - k0) * w)) f.resize(size_t((k1 - k0) * w));
      geom.gather_rows(x, k0, k1 - k0, T.m0, w, f.data());
      for (int64_t k = k0; k < k1; ++k) {
        rescale(k);
        cols<Q>(f.data() + (k - k0) * w, q.data() + (k - k0) * w, w, s1.data(), s2.data());
      }
    }
    return q.data() - k0 * w - T.m0;
  }

  // The exponent of P's rows k (the GEMM's contraction) at column m: e[tile row of k, m / bc].
  const int32_t* tile_row(int64_t k) const { return e + std::min(k / br, GR - 1) * GC; }

  // T's exponents as the GEMM reads them, ea[m * KB + j] (the worker's buffer, valid for T's rows):
  // one strided gather per column tile, then a contiguous copy per row (row-by-row gathers missed L1
  // on every element).
  const int32_t* exponents(const Tile& T) const {
    thread_local std::vector<int32_t> ea, col;
    ea.resize(size_t((T.m1 - T.m0) * KB));
    col.resize(size_t(KB));
    for (int64_t m = T.m0, cb = -1; m < T.m1; ++m) {
      if (m / bc != cb) {
        cb = m / bc;
        for (int64_t j = 0; j < KB; ++j) col[size_t(j)] = tile_row(j * bk)[cb];
      }
      std::copy(col.begin(), col.end(), ea.begin() + (m - T.m0) * KB);
    }
    return ea.data() - T.m0 * KB;
  }
};

}  // namespace
}  // namespace jdfp
