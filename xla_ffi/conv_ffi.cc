// XLA FFI handlers of the jdfp exact INT16 convolution: implicit GEMM on the GEMM driver.
//
//   JdfpConvFwd   : x int16 [N, D, H, W, C], w int16 [KD, KH, KW, C/G, O], ex, ew int32 [1]
//                   -> y float32 [N, OD, OH, OW, O]
//   JdfpConvWgrad : x int16 [N, D, H, W, C], dy int16 [N, OD, OH, OW, O], ex, edy int32 [1]
//                   -> dw^T float32 [G, O/G, KD, KH, KW, C/G] (the caller transposes it to [KD, KH, KW, C/G, O])
//
//   JdfpIm2col    : x float32 [N, D, H, W, C] -> patches float32 [N, OD, OH, OW, KD*KH*KW, C] (the patch
//                   matrix of the block-format convs, which quantize it by tiles; attrs as below plus
//                   kernel_spatial, without groups, bits and isa)
//
// Attributes (3 entries each, one per spatial dim): window_strides, padding_lo, padding_hi,
// lhs_dilation, rhs_dilation; feature_group_count; bits_x, bits_w (bits of the second operand:
// weights or output gradient); isa.  1-D / 2-D convolutions pass size-1 leading spatial dims.
//
// The forward is y[pixel, o] = sum over K = (tap, c) of im2col(x)[pixel, (tap, c)] * w[(tap, c), o],
// per group, with K in (kd, kh, kw, c) order; the weight-gradient is dw[(tap, c), o] = sum over
// K = pixel (n, od, oh, ow) of im2col(x)[pixel, (tap, c)] * dy[pixel, o] (computed as dy^T . im2col(x):
// the same chains and FP32 adds per element).  Both are exactly the GEMM
// contract of docs/arithmetic.md (same chains, FP32 spill order and epilogue as JdfpGemmI16) on that
// im2col matrix, with per-tensor exponents (KB == 1).  The im2col matrix is never stored: the driver's
// A (forward) or B (weight-gradient) packing gathers it from x (conv_pack.h, and the ISA's vectorized gather).  Backward-data is the
// forward handler on dy with the flipped, transposed kernel (lhs dilation = forward stride); the
// Python side (jdfp._src.kernels.conv_input_grad) sets that up.
//
// Flow: check the attributes and pick the ISA entry (check_attrs), check the buffers
// (check_operands), derive the geometry and check the output-shaped operand (conv_geometry), map
// the pass onto a GEMM (conv_gemm), fill the Job's Problem (set_up_job), run it (ffi_runtime's launch).
#include <atomic>
#include <cstring>
#include <memory>
#include <vector>

#include "conv_geometry.h"
#include "ffi_runtime.h"

namespace jdfp {
namespace {

ffi::Error conv_invalid(const std::string& msg) { return invalid_as("conv", msg); }

// The attributes: bits, isa (-> its table entry), then the spatial ones.
ffi::Error check_attrs(int32_t bits_x, int32_t bits_w, int32_t isa, ffi::Span<const int64_t> strides,
                       ffi::Span<const int64_t> plo, ffi::Span<const int64_t> phi, ffi::Span<const int64_t> ldil,
                       ffi::Span<const int64_t> rdil, int64_t groups, const IsaKernels*& kernels, ConvAttrs& at) {
  if (ffi::Error e = check_bits("conv", "bits_x", bits_x); e.failure()) return e;
  if (ffi::Error e = check_bits("conv", "bits_w", bits_w); e.failure()) return e;
  if (ffi::Error e = select_isa("conv", isa, kernels); e.failure()) return e;
  std::string err;
  if (!read_attrs(strides, plo, phi, ldil, rdil, groups, at, err)) return conv_invalid(err);
  return ffi::Error::Success();
}

// Dtypes and ranks of x, the second operand b (w or dy) and out; the per-tensor exponents.
ffi::Error check_operands(ffi::AnyBuffer x, ffi::AnyBuffer b, ffi::Buffer<ffi::S32> ex, ffi::Buffer<ffi::S32> eb,
                          ffi::Span<const int64_t> dout, bool wgrad) {
  const char* bname = wgrad ? "dy" : "w";
  if (x.element_type() != ffi::S16) return conv_invalid("x must be int16");
  if (b.element_type() != ffi::S16) return conv_invalid(std::string(bname) + " must be int16");
  const auto dx = x.dimensions(), db = b.dimensions();
  const size_t out_rank = wgrad ? 6 : 5;
  if (dx.size() != 5 || db.size() != 5 || dout.size() != out_rank)
    return conv_invalid(std::string("expected x [N, D, H, W, C], ") +
                        (wgrad ? "dy [N, OD, OH, OW, O] and out [G, O/G, KD, KH, KW, C/G]"
                               : "w [KD, KH, KW, C/G, O] and out [N, OD, OH, OW, O]") +
                        "; got x " + dims_str(dx) + ", " + bname + " " + dims_str(db) + ", out " + dims_str(dout));
  if (ex.element_count() != 1 || eb.element_count() != 1)
    return conv_invalid("the exponents must have one element each (per-tensor), got " + dims_str(ex.dimensions()) +
                        " and " + dims_str(eb.dimensions()));
  return ffi::Error::Success();
}

// The convolution's geometry: kernel sizes, input features per group I and output features O from
// w (forward) or out (weight-gradient), the gather geometry, and the output-shaped operand checked.
ffi::Error conv_geometry(ffi::Span<const int64_t> dx, ffi::Span<const int64_t> db, ffi::Span<const int64_t> dout,
                         const ConvAttrs& at, bool wgrad, ConvGeom& g, int64_t& I, int64_t& O) {
  const int64_t G = at.groups, C = dx[4];
  int64_t ks[3];
  if (wgrad) {
    if (dout[0] != G)
      return conv_invalid("out must be [G, O/G, KD, KH, KW, C/G] with G = feature_group_count = " + std::to_string(G) +
                          ", got " + dims_str(dout));
    for (int d = 0; d < 3; ++d) ks[d] = dout[2 + d];
    I = dout[5];
    O = dout[1] * G;
  } else {
    for (int d = 0; d < 3; ++d) ks[d] = db[d];
    I = db[3];
    O = db[4];
  }
  if (C != I * G || O % G != 0)
    return conv_invalid("feature_group_count=" + std::to_string(G) + ": input channels " + std::to_string(C) +
                        " must equal kernel input features " + std::to_string(I) + " x groups, and output features " +
                        std::to_string(O) + " must divide by groups");
  set_conv_geom(g, dx, ks, I, at, wgrad);
  const auto dy = wgrad ? db : dout;  // output-shaped
  const int64_t want[5] = {g.n, g.out[0], g.out[1], g.out[2], O};
  for (int i = 0; i < 5; ++i)
    if (dy[i] != want[i])
      return conv_invalid(std::string(wgrad ? "dy" : "out") + " must be [N, OD, OH, OW, O] = [" +
                          std::to_string(want[0]) + ", " + std::to_string(want[1]) + ", " + std::to_string(want[2]) +
                          ", " + std::to_string(want[3]) + ", " + std::to_string(want[4]) +
                          "] for these shapes and attributes, got " + dims_str(dy));
  return ffi::Error::Success();
}

// The GEMM of one group, per pass:
//   Forward:         A = im2col(x) [npix, taps*I] (gathered), B = w [taps*I, O] cols g*Og.., C = y [npix, O].
//   Weight-gradient: A = dy^T [Og, npix] (dy [npix, O], rows contiguous), B = im2col(x) [npix, taps*I]
//                    (gathered, so its 32-wide panels amortize the gather over all of A), C = dw^T
//                    [G, Og, taps*I] (the caller transposes this small tensor to [taps, I, O]).
struct ConvGemm {
  int64_t G, I, O, Og, M, N, K;
  int32_t bits_a, bits_b;  // of the GEMM's A and B
};

ConvGemm conv_gemm(const ConvGeom& g, int64_t G, int64_t I, int64_t O, int32_t bits_x, int32_t bits_w, bool wgrad) {
  ConvGemm cg{};
  cg.G = G; cg.I = I; cg.O = O; cg.Og = O / G;
  cg.M = wgrad ? cg.Og : g.npix;
  cg.K = wgrad ? g.npix : g.ntaps * I;
  cg.N = wgrad ? g.ntaps * I : cg.Og;
  cg.bits_a = wgrad ? bits_w : bits_x;
  cg.bits_b = wgrad ? bits_x : bits_w;
  return cg;
}

// Group offsets, chains (one block: per-tensor exponents, KB == 1) and the Problem of the job.
void set_up_job(Job& job, const ConvGemm& cg, ffi::AnyBuffer x, ffi::AnyBuffer b, ffi::Buffer<ffi::S32> ex,
                ffi::Buffer<ffi::S32> eb, ffi::Result<ffi::Buffer<ffi::F32>>& out, bool wgrad,
                const IsaKernels& isa) {
  const int64_t G = cg.G, I = cg.I, Og = cg.Og, M = cg.M, N = cg.N, K = cg.K;
  job.who = "conv";
  job.name_a = wgrad ? "dy" : "x";
  job.name_b = wgrad ? "x" : "w";
  job.a_off.resize(size_t(G));
  job.b_off.resize(size_t(G));
  job.c_off.resize(size_t(G));
  job.ea_off.assign(size_t(G), 0);
  job.eb_off.assign(size_t(G), 0);
  for (int64_t gi = 0; gi < G; ++gi) {
    job.a_off[size_t(gi)] = wgrad ? gi * Og : gi * I;  // dy column / x channel offset of the group
    job.b_off[size_t(gi)] = wgrad ? gi * I : gi * Og;  // x channel / w column offset
    job.c_off[size_t(gi)] = wgrad ? gi * M * N : gi * Og;
  }
  const int64_t bk = std::max<int64_t>(K, 1);
  plan_chains(job, K, bk, 1, std::min(kernel_chain_length(cg.bits_a, cg.bits_b), bk), isa.kc_pairs);

  Problem& P = job.P;
  P.M = M; P.N = N; P.K = K; P.KB = 1; P.block_k = bk;
  P.bits_a = cg.bits_a; P.bits_b = cg.bits_b;
  P.qmax_a = qmax_of(cg.bits_a); P.qmax_b = qmax_of(cg.bits_b);
  P.trans_a = false; P.trans_b = false;
  P.a_f32 = false; P.b_f32 = false;
  P.a = wgrad ? b.untyped_data() : x.untyped_data();
  P.b = wgrad ? x.untyped_data() : b.untyped_data();
  P.ea = wgrad ? eb.typed_data() : ex.typed_data();
  P.eb = wgrad ? ex.typed_data() : eb.typed_data();
  P.out = out->typed_data();
  P.a_off = job.a_off.data(); P.b_off = job.b_off.data();
  P.ea_off = job.ea_off.data(); P.eb_off = job.eb_off.data();
  P.ea_mstride = 0;
  P.eb_nstride = 0;
  if (wgrad) {
    P.a_sr = 1; P.a_sk = cg.O;  // dy^T
    P.b_sr = 0; P.b_sk = 0;     // gathered
    P.ldc = N;
  } else {
    P.a_sr = 0; P.a_sk = 0;  // gathered
    P.b_sr = 1; P.b_sk = cg.O;
    P.ldc = cg.O;
  }
  P.c_off = job.c_off.data();
  P.conv = &job.conv;
  // Unique per call: a worker reuses the panels it packed for its earlier tiles of this call (the
  // weight-gradient's dy^T when its O rows fit one tile and the taps are split into column ranges).
  P.job_id = next_job_id();
  job.bits_a = cg.bits_a; job.bits_b = cg.bits_b;
}

ffi::Future conv_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer b, ffi::Buffer<ffi::S32> ex,
                      ffi::Buffer<ffi::S32> eb, ffi::Result<ffi::Buffer<ffi::F32>> out,
                      ffi::Span<const int64_t> strides, ffi::Span<const int64_t> plo,
                      ffi::Span<const int64_t> phi, ffi::Span<const int64_t> ldil,
                      ffi::Span<const int64_t> rdil, int64_t groups, int32_t bits_a, int32_t bits_b,
                      int32_t isa, bool wgrad) {
  const IsaKernels* kernels = nullptr;
  ConvAttrs at{};
  if (ffi::Error e = check_attrs(bits_a, bits_b, isa, strides, plo, phi, ldil, rdil, groups, kernels, at);
      e.failure())
    return error_future(std::move(e));
  const auto dout = out->dimensions();
  if (ffi::Error e = check_operands(x, b, ex, eb, dout, wgrad); e.failure()) return error_future(std::move(e));
  ConvGeom g;
  int64_t I = 0, O = 0;
  if (ffi::Error e = conv_geometry(x.dimensions(), b.dimensions(), dout, at, wgrad, g, I, O); e.failure())
    return error_future(std::move(e));
  const ConvGemm cg = conv_gemm(g, at.groups, I, O, bits_a, bits_b, wgrad);
  if (ffi::Error e = check_block_sum_bound("jdfp_conv", cg.K, cg.bits_a, cg.bits_b); e.failure())
    return error_future(std::move(e));
  auto job = reusable_job();
  job->conv = g;
  set_up_job(*job, cg, x, b, ex, eb, out, wgrad, *kernels);
#ifdef JDFP_HAVE_SIMD
  // isa="auto" on a CPU with AMX-INT8: the forward and backward-data GEMMs on the tiles (kernel_amx.cc,
  // each pixel's patch row gathered while packing), the same result bit for bit, for convs of at least
  // kAmxConvMinWork products (1.5-2.5x the AVX-512 kernel on 32-128-channel 3 x 3 convs; at a few
  // million products the gather and the 64-k padding leave the two even, docs/benchmarks.md).  A named
  // ISA, a K under kAmxMinK (a first layer's 3 x 3 x 3 taps) and the weight gradient keep the
  // AVX-512 / AVX2 / scalar kernels.
  constexpr int64_t kAmxConvMinWork = int64_t(1) << 26;
  if (isa == kIsaAuto && cg.G * cg.M * cg.N * cg.K >= kAmxConvMinWork && amx_i16_fits(job->P) && amx_int8_ready()) {
    job->fn = tile_amx_i16;
    return launch_tiles(job, pool, 16, 16, cg.G, cg.M, cg.N, cg.K);
  }
#endif
  return launch(job, pool, *kernels, cg.G, cg.M, cg.N, cg.K);
}

// ---------------------------------------------------------------- im2col (float32)
// The patch matrix of a convolution, for the formats whose exponents belong to tiles of that matrix
// (HBFP): patches[n, od, oh, ow, tap, c] = x at the tap's input position, +0.0 where it falls in the
// padding or between lhs-dilated inputs: bit for bit the lax.pad + strided slices + stack of
// jdfp._src.ops.conv_vjp.patches (a pure copy: NaN payloads, -0.0 and subnormals kept), in one pass
// with one memcpy per (pixel, tap) channel run instead of one XLA fusion per tap plus a stack.

struct Im2colJob {
  PatchGeom geom;
  const float* x = nullptr;
  float* out = nullptr;
  int64_t rows_per_unit = 1, nunits = 0;
  std::atomic<int64_t> next{0};
  ffi::CountDownPromise done;
};

void im2col_rows(const Im2colJob& j, int64_t r0, int64_t r1) {
  j.geom.gather_rows(j.x, r0, r1 - r0, 0, j.geom.cols, j.out + r0 * j.geom.cols);
}

void im2col_worker(const std::shared_ptr<Im2colJob>& job) {
  Im2colJob& j = *job;
  int64_t done = 0;
  for (;;) {
    const int64_t u = j.next.fetch_add(1, std::memory_order_relaxed);
    if (u >= j.nunits) break;
    im2col_rows(j, u * j.rows_per_unit, std::min(j.geom.rows, (u + 1) * j.rows_per_unit));
    ++done;
  }
  if (done) j.done.CountDown(size_t(done));
}

ffi::Future im2col_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Result<ffi::Buffer<ffi::F32>> out,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> plo, ffi::Span<const int64_t> phi,
                        ffi::Span<const int64_t> ldil, ffi::Span<const int64_t> rdil,
                        ffi::Span<const int64_t> kernel_spatial) {
  auto bad = [](const std::string& m) { return error_future(invalid_as("im2col", m)); };
  ConvAttrs at{};
  std::string err;
  if (!read_attrs(strides, plo, phi, ldil, rdil, 1, at, err)) return bad(err);
  auto job = std::make_shared<Im2colJob>();
  Im2colJob& j = *job;
  PatchGeom& g = j.geom;
  if (!g.init(x.dimensions(), kernel_spatial, at, err)) return bad(err);
  const auto dout = out->dimensions();
  const int64_t want[6] = {g.n, g.out_sp[0], g.out_sp[1], g.out_sp[2], g.ntaps, g.C};
  if (dout.size() != 6 || !std::equal(want, want + 6, dout.begin()))
    return bad("out must be [N, OD, OH, OW, taps, C] = " + dims_str(ffi::Span<const int64_t>(want, 6)) +
               " for these shapes and attributes, got " + dims_str(dout));
  j.x = x.typed_data();
  j.out = out->typed_data();
  j.rows_per_unit = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, g.cols));
  j.nunits = g.rows && g.cols ? (g.rows + j.rows_per_unit - 1) / j.rows_per_unit : 0;
  if (j.nunits == 0) {
    ffi::Promise p;
    ffi::Future f(p);
    p.SetAvailable();
    return f;
  }
  const int64_t nthreads = std::min(pool_workers(pool), j.nunits);
  j.done = ffi::CountDownPromise(size_t(j.nunits));
  ffi::Future fut(j.done);
  for (int64_t w = 1; w < nthreads; ++w) pool.Schedule([job]() { im2col_worker(job); });
  im2col_worker(job);
  return fut;
}

}  // namespace
}  // namespace jdfp

JDFP_EXPORT XLA_FFI_Error* JdfpConvFwd(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpConvWgrad(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpIm2col(XLA_FFI_CallFrame*);

using Span64 = ffi::Span<const int64_t>;

static ffi::Future conv_fwd(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> ex,
                            ffi::Buffer<ffi::S32> ew, ffi::Result<ffi::Buffer<ffi::F32>> out, Span64 strides,
                            Span64 plo, Span64 phi, Span64 ldil, Span64 rdil, int64_t groups, int32_t bits_x,
                            int32_t bits_w, int32_t isa) {
  return jdfp::conv_impl(pool, x, w, ex, ew, out, strides, plo, phi, ldil, rdil, groups, bits_x, bits_w, isa,
                         /*wgrad=*/false);
}

static ffi::Future conv_wgrad(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::S32> ex,
                              ffi::Buffer<ffi::S32> edy, ffi::Result<ffi::Buffer<ffi::F32>> out, Span64 strides,
                              Span64 plo, Span64 phi, Span64 ldil, Span64 rdil, int64_t groups, int32_t bits_x,
                              int32_t bits_w, int32_t isa) {
  return jdfp::conv_impl(pool, x, dy, ex, edy, out, strides, plo, phi, ldil, rdil, groups, bits_x, bits_w, isa,
                         /*wgrad=*/true);
}

#define JDFP_CONV_BINDING                         \
  ffi::Ffi::Bind()                                \
      .Ctx<ffi::ThreadPool>()                     \
      .Arg<ffi::AnyBuffer>()                      \
      .Arg<ffi::AnyBuffer>()                      \
      .Arg<ffi::Buffer<ffi::S32>>()               \
      .Arg<ffi::Buffer<ffi::S32>>()               \
      .Ret<ffi::Buffer<ffi::F32>>()               \
      JDFP_CONV_SPATIAL_ATTRS                     \
      .Attr<int64_t>("feature_group_count")       \
      .Attr<int32_t>("bits_x")                    \
      .Attr<int32_t>("bits_w")                    \
      .Attr<int32_t>("isa")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpConvFwd, conv_fwd, JDFP_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpConvWgrad, conv_wgrad, JDFP_CONV_BINDING);

#define JDFP_IM2COL_BINDING                 \
  ffi::Ffi::Bind()                          \
      .Ctx<ffi::ThreadPool>()               \
      .Arg<ffi::Buffer<ffi::F32>>()         \
      .Ret<ffi::Buffer<ffi::F32>>()         \
      JDFP_CONV_SPATIAL_ATTRS               \
      .Attr<Span64>("kernel_spatial")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpIm2col, jdfp::im2col_impl, JDFP_IM2COL_BINDING);
