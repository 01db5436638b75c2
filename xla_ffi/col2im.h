// col2im for the fused backward-data of block-format convs (HBFP: tiles of the patch matrix), shared
// by the INT8 and INT16 GEMM handlers (gemm_i8_ffi.cc, gemm_ffi.cc): the patch gradient
// dP = a . b ([rows, taps * C], rows = output pixels) is computed image by image into a per-worker
// buffer, and each image's dP is summed at once into dx [n].  dP never exists whole: in the demo's
// HBFP8 step it was two 21 MiB float32 buffers for XLA's own col2im.
//
// The sum is bit for bit the transpose of jdfp._src.ops.conv_vjp.patches as JAX builds it
// (jax.linear_transpose: one zero-padded cotangent per tap, summed last tap first):
//   dx[i] = ((ct[T-1] + ct[T-2]) + ...) + ct[0],  ct[t] = dP[row(i, t), t] or +0.0 where tap t of no
// output pixel reads input position i,
// one float32 add per tap after the first, under the workers' FTZ / DAZ, as XLA:CPU adds them.
// Handler TUs only (baseline flags).
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "conv_geometry.h"
#include "ffi_runtime.h"

namespace jdfp {
namespace {

struct Col2im {
  PatchGeom geom;
  // Per spatial dim, per (input index, tap): the output index whose tap reads that input, or -1.
  std::vector<int64_t> inv[3];
  std::vector<int64_t> tap_d, tap_h, tap_w;  // each tap's kernel position (no divisions per pixel)
  int64_t img_rows = 0;  // output pixels per image: the GEMM rows of one image
  float* dx = nullptr;

  // Geometry from dx's dims [N, D, H, W, C] and the attributes, the GEMM operands a and b one batch
  // element each; the patch gradient's dims [1, rows, taps * C] into dp_dims.  False (with `err`)
  // on bad attributes or operand ranks.
  bool init(ffi::Span<const int64_t> dx_dims, ffi::Span<const int64_t> da, ffi::Span<const int64_t> db,
            ffi::Span<const int64_t> strides, ffi::Span<const int64_t> plo, ffi::Span<const int64_t> phi,
            ffi::Span<const int64_t> ldil, ffi::Span<const int64_t> rdil, ffi::Span<const int64_t> kernel_spatial,
            int64_t dp_dims[3], std::string& err) {
    if (da.size() != 3 || db.size() != 3 || da[0] != 1 || db[0] != 1) {
      err = "a and b must be [1, ., .], got a " + dims_str(da) + " b " + dims_str(db);
      return false;
    }
    ConvAttrs at{};
    if (!read_attrs(strides, plo, phi, ldil, rdil, 1, at, err)) return false;
    if (!geom.init(dx_dims, kernel_spatial, at, err)) return false;
    const PatchGeom& g = geom;
    img_rows = g.out_sp[0] * g.out_sp[1] * g.out_sp[2];
    for (int d = 0; d < 3; ++d) {
      inv[d].assign(size_t(g.in[d] * g.ks[d]), -1);
      for (int64_t o = 0; o < g.out_sp[d]; ++o)
        for (int64_t t = 0; t < g.ks[d]; ++t) {
          const int64_t i = g.src[d][size_t(o * g.ks[d] + t)];
          if (i >= 0) inv[d][size_t(i * g.ks[d] + t)] = o;
        }
    }
    for (int64_t t = 0; t < g.ntaps; ++t) {
      tap_w.push_back(t % g.ks[2]);
      tap_h.push_back((t / g.ks[2]) % g.ks[1]);
      tap_d.push_back(t / (g.ks[2] * g.ks[1]));
    }
    dp_dims[0] = 1, dp_dims[1] = g.rows, dp_dims[2] = g.cols;
    return true;
  }

  // The error when the GEMM's shapes (read_shapes' error e) are not the patch gradient's.
  std::string shape_error(const int64_t dp_dims[3], ffi::Span<const int64_t> dx_dims, const ffi::Error& e) const {
    return "the patch gradient a . b must be [1, rows, taps * C] = " + dims_str(ffi::Span<const int64_t>(dp_dims, 3)) +
           " for dx " + dims_str(dx_dims) + " and these attributes: " + e.message();
  }

  // No output pixel or no tap reads x: dx = +0.0, written now (true); else one tile per image into
  // `tiles` (false).
  bool trivial(std::vector<Tile>& tiles) const {
    const PatchGeom& g = geom;
    if (g.rows == 0 || g.cols == 0) {
      std::memset(dx, 0, size_t(g.n * g.in[0] * g.in[1] * g.in[2] * g.C) * sizeof(float));
      return true;
    }
    for (int64_t n = 0; n < g.n; ++n) tiles.push_back(Tile{0, n * img_rows, (n + 1) * img_rows, 0, g.cols});
    return false;
  }

  // One image: its rows of the patch gradient through `gemm_tile(out, t)` (the GEMM's tile function
  // with the problem's output at `out`) into this thread's buffer, then summed into dx.  The base
  // puts row t.m0 of the [rows, cols] problem at buf[0] (address arithmetic only: the tile writes
  // rows [m0, m1), all inside buf).
  template <class GemmTile>
  int run_image(const Tile& t, GemmTile&& gemm_tile) const {
    thread_local std::vector<float> buf;
    const size_t need = size_t(img_rows) * size_t(geom.cols);
    if (buf.size() < need) buf.resize(need);
    float* out = reinterpret_cast<float*>(reinterpret_cast<uintptr_t>(buf.data()) -
                                          uintptr_t(t.m0) * uintptr_t(geom.cols) * sizeof(float));
    if (const int bad = gemm_tile(out, t)) return bad;
    image(t, buf.data());
    return 0;
  }

  // dx of the image of tile t from its patch gradient dp [img_rows, taps * C].
  void image(const Tile& t, const float* dp) const {
    const PatchGeom& g = geom;
    const int64_t C = g.C, cols = g.cols, T = g.ntaps;  // (T >= 1: cols > 0)
    const int64_t n = t.m0 / img_rows;
    float* out = dx + n * g.in[0] * g.in[1] * g.in[2] * C;
    for (int64_t id = 0; id < g.in[0]; ++id)
      for (int64_t ih = 0; ih < g.in[1]; ++ih)
        for (int64_t iw = 0; iw < g.in[2]; ++iw, out += C) {
          const int64_t* vd = inv[0].data() + id * g.ks[0];
          const int64_t* vh = inv[1].data() + ih * g.ks[1];
          const int64_t* vw = inv[2].data() + iw * g.ks[2];
          for (int64_t tap = T - 1; tap >= 0; --tap) {
            const int64_t od = vd[tap_d[size_t(tap)]], oh = vh[tap_h[size_t(tap)]], ow = vw[tap_w[size_t(tap)]];
            const bool hit = od >= 0 && oh >= 0 && ow >= 0;
            const float* src = hit ? dp + ((od * g.out_sp[1] + oh) * g.out_sp[2] + ow) * cols + tap * C : nullptr;
            if (tap == T - 1) {
              if (hit) std::memcpy(out, src, size_t(C) * sizeof(float));
              else std::memset(out, 0, size_t(C) * sizeof(float));
            } else if (hit) {
              for (int64_t c = 0; c < C; ++c) out[c] += src[c];
            } else {
              for (int64_t c = 0; c < C; ++c) out[c] += 0.0f;  // -0.0 + +0.0 = +0.0, as XLA's add of the zero padding
            }
          }
        }
  }
};

// Runs a col2im job (a Job type with a `c2i` member whose GEMM problem is set up): one tile per image
// on the pool, each through `gemm_tile(job, out, tile)`; dx = +0.0 at once where no tap reads x.
template <class JobT, class GemmTile>
ffi::Future launch_col2im(const std::shared_ptr<JobT>& job, ffi::ThreadPool pool, float* dx, GemmTile gemm_tile) {
  job->c2i.dx = dx;
  if (job->c2i.trivial(job->tiles)) {
    ffi::Promise p;
    ffi::Future f(p);
    p.SetAvailable();
    return f;
  }
  const JobT* jp = job.get();  // the workers hold the job alive
  job->tile_fn = [jp, gemm_tile](const Tile& t) {
    return jp->c2i.run_image(t, [&](float* out, const Tile& tt) { return gemm_tile(*jp, out, tt); });
  };
  return launch_job_tiles(job, pool, pool_workers(pool));
}

}  // namespace
}  // namespace jdfp
