// Convolution geometry shared by the conv handlers (conv_ffi.cc) and the block conversion of a conv's
// patch matrix (block_quantize_ffi.cc): the spatial attributes, lax's output size rule, and the
// patch matrix itself -- patches[n, od, oh, ow, tap, c] = x at the tap's input position, +0.0 where
// the tap reads padding or a hole of the lhs dilation (rows: output pixels; columns: (tap, c), taps
// row-major), gathered a row segment at a time so that nobody has to store it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "ffi_helpers.h"
#include "gemm_common.h"

// The spatial attributes of every FFI binding that takes a conv geometry, in this order (3 entries
// each, one per spatial dim).
#define JDFP_CONV_SPATIAL_ATTRS                        \
  .Attr<ffi::Span<const int64_t>>("window_strides")    \
      .Attr<ffi::Span<const int64_t>>("padding_lo")    \
      .Attr<ffi::Span<const int64_t>>("padding_hi")    \
      .Attr<ffi::Span<const int64_t>>("lhs_dilation")  \
      .Attr<ffi::Span<const int64_t>>("rhs_dilation")

namespace jdfp {
namespace {

struct ConvAttrs {
  int64_t stride[3], lo[3], hi[3], ldil[3], rdil[3];
  int64_t groups;
};

// Validates the 5 spatial attribute spans and returns the first error (or none).
bool read_attrs(ffi::Span<const int64_t> strides, ffi::Span<const int64_t> plo, ffi::Span<const int64_t> phi,
                ffi::Span<const int64_t> ldil, ffi::Span<const int64_t> rdil, int64_t groups, ConvAttrs& a,
                std::string& err) {
  const std::pair<const char*, ffi::Span<const int64_t>> spans[] = {
      {"window_strides", strides}, {"padding_lo", plo}, {"padding_hi", phi}, {"lhs_dilation", ldil},
      {"rhs_dilation", rdil}};
  for (const auto& [name, sp] : spans)
    if (sp.size() != 3) {
      err = std::string(name) + " must have 3 entries (one per spatial dim), got " + std::to_string(sp.size());
      return false;
    }
  for (int d = 0; d < 3; ++d) {
    a.stride[d] = strides[d]; a.lo[d] = plo[d]; a.hi[d] = phi[d]; a.ldil[d] = ldil[d]; a.rdil[d] = rdil[d];
    if (a.stride[d] < 1 || a.ldil[d] < 1 || a.rdil[d] < 1) {
      err = "window_strides, lhs_dilation and rhs_dilation must be >= 1";
      return false;
    }
    if (std::abs(a.lo[d]) > (int64_t(1) << 40) || std::abs(a.hi[d]) > (int64_t(1) << 40)) {
      err = "padding out of range";
      return false;
    }
  }
  if (groups < 1) {
    err = "feature_group_count must be >= 1, got " + std::to_string(groups);
    return false;
  }
  a.groups = groups;
  return true;
}

// Output spatial size of one dim (lax.conv_general_dilated's rule).
int64_t conv_out_size(int64_t in, int64_t k, const ConvAttrs& a, int d) {
  const int64_t din = in > 0 ? (in - 1) * a.ldil[d] + 1 : 0;
  const int64_t dk = k > 0 ? (k - 1) * a.rdil[d] + 1 : 0;
  const int64_t span = din + a.lo[d] + a.hi[d] - dk;
  return span < 0 ? 0 : span / a.stride[d] + 1;
}

// The implicit-GEMM geometry of one pass (gemm_common.h's ConvGeom) from x [N, D, H, W, C], the
// kernel's spatial sizes, the channels read per tap (per group) and the attributes: the gather of
// the forward / backward-data (pixels x (tap, c)) or of the weight-gradient (its transpose, on B).
inline void set_conv_geom(ConvGeom& g, ffi::Span<const int64_t> dx, const int64_t* ks, int64_t cg, const ConvAttrs& at,
                   bool wgrad) {
  g.mode = wgrad ? kConvRowsTaps : kConvRowsPixels;
  g.on_b = wgrad;
  g.n = dx[0];
  g.C = dx[4];
  g.cg = cg;
  for (int d = 0; d < 3; ++d) {
    g.in[d] = dx[1 + d];
    g.ks[d] = ks[d];
    g.stride[d] = at.stride[d];
    g.pad[d] = at.lo[d];
    g.ldil[d] = at.ldil[d];
    g.rdil[d] = at.rdil[d];
    g.out[d] = conv_out_size(g.in[d], g.ks[d], at, d);
  }
  g.npix = g.n * g.out[0] * g.out[1] * g.out[2];
  g.ntaps = g.ks[0] * g.ks[1] * g.ks[2];
}

// The patch matrix of x [N, D, H, W, C] (1-D / 2-D convs: size-1 leading spatial dims).
struct PatchGeom {
  int64_t n = 0, C = 0, in[3] = {}, out_sp[3] = {}, ks[3] = {}, ntaps = 0, rows = 0, cols = 0;
  // Per dim, per (output position, tap): the input index read, or -1 (padding / dilation hole).
  std::vector<int64_t> src[3];

  // From x's dims and the attributes; false (with `err`) when the kernel sizes are invalid.
  bool init(ffi::Span<const int64_t> dx, ffi::Span<const int64_t> kernel_spatial, const ConvAttrs& at,
            std::string& err) {
    if (dx.size() != 5) {
      err = "x must be [N, D, H, W, C], got " + dims_str(dx);
      return false;
    }
    if (kernel_spatial.size() != 3) {
      err = "kernel_spatial must have 3 entries (one per spatial dim)";
      return false;
    }
    n = dx[0], C = dx[4], ntaps = 1;
    for (int d = 0; d < 3; ++d) {
      if (kernel_spatial[d] < 0) {
        err = "kernel_spatial must be >= 0";
        return false;
      }
      in[d] = dx[1 + d], ks[d] = kernel_spatial[d];
      out_sp[d] = conv_out_size(in[d], ks[d], at, d);
      ntaps *= ks[d];
    }
    rows = n * out_sp[0] * out_sp[1] * out_sp[2];
    cols = ntaps * C;
    for (int d = 0; d < 3; ++d) {
      src[d].assign(size_t(out_sp[d] * ks[d]), -1);
      for (int64_t o = 0; o < out_sp[d]; ++o)
        for (int64_t t = 0; t < ks[d]; ++t) {
          const int64_t q = o * at.stride[d] + t * at.rdil[d] - at.lo[d];  // index in the dilated input
          if (q >= 0 && q % at.ldil[d] == 0 && q / at.ldil[d] < in[d]) src[d][size_t(o * ks[d] + t)] = q / at.ldil[d];
        }
    }
    return true;
  }

  // Rows [row0, row0 + nrows) of patches[:, k0 : k0 + len), row after row at dst (len floats each):
  // one memcpy (or zero fill) per tap's channel run.
  void gather_rows(const float* x, int64_t row0, int64_t nrows, int64_t k0, int64_t len, float* dst) const {
    for_each_run(x, row0, nrows, k0, len, [dst, len](int64_t r, int64_t at, int64_t n, const float* sp) {
      float* d = dst + r * len + at;
      if (!sp) {
        if (n == 1) *d = 0.0f;
        else std::memset(d, 0, size_t(n) * sizeof(float));
      } else {
        if (n == 1) *d = *sp;
        else std::memcpy(d, sp, size_t(n) * sizeof(float));
      }
    });
  }

  // For rows [row0, row0 + nrows) of patches[:, k0 : k0 + len), in order, each tap's channel run:
  // f(r - row0, offset in the row segment, length, the run's first element in x or null for padding).
  // The column range's runs are found once and the output position is stepped from row to row, so
  // no row pays a division.
  template <class F>
  void for_each_run(const float* x, int64_t row0, int64_t nrows, int64_t k0, int64_t len, F&& f) const {
    if (nrows <= 0 || len <= 0) return;
    struct Run {
      int64_t td, th, tw, c, n, at;  // the tap's (d, h, w), first channel, length, offset in the row
    };
    constexpr int kStackRuns = 64;
    Run stack_runs[kStackRuns];
    std::vector<Run> heap_runs;
    Run* runs = stack_runs;
    const int64_t tap0 = k0 / C, nruns = (k0 + len + C - 1) / C - tap0;
    if (nruns > kStackRuns) heap_runs.resize(size_t(nruns)), runs = heap_runs.data();
    {
      int64_t tap = tap0, c = k0 - tap0 * C;
      for (int64_t done = 0, i = 0; done < len; ++i, ++tap, c = 0) {
        const int64_t n = std::min(C - c, len - done);
        runs[i] = {tap / (ks[2] * ks[1]), (tap / ks[2]) % ks[1], tap % ks[2], c, n, done};
        done += n;
      }
    }
    int64_t rem = row0;
    int64_t ow = rem % out_sp[2]; rem /= out_sp[2];
    int64_t oh = rem % out_sp[1]; rem /= out_sp[1];
    int64_t od = rem % out_sp[0];
    int64_t nb = rem / out_sp[0];
    const int64_t image = in[0] * in[1] * in[2] * C;
    for (int64_t r = 0; r < nrows; ++r) {
      const int64_t* sd = src[0].data() + od * ks[0];
      const int64_t* sh = src[1].data() + oh * ks[1];
      const int64_t* sw = src[2].data() + ow * ks[2];
      const float* xb = x + nb * image;
      for (int64_t i = 0; i < nruns; ++i) {
        const Run& u = runs[i];
        const int64_t id = sd[u.td], ih = sh[u.th], iw = sw[u.tw];
        const bool pad = id < 0 || ih < 0 || iw < 0;
        f(r, u.at, u.n, pad ? nullptr : xb + ((id * in[1] + ih) * in[2] + iw) * C + u.c);
      }
      if (++ow == out_sp[2]) {
        ow = 0;
        if (++oh == out_sp[1]) {
          oh = 0;
          if (++od == out_sp[0]) od = 0, ++nb;
        }
      }
    }
  }
};

}  // namespace
}  // namespace jdfp
