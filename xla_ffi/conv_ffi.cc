// XLA FFI handlers of the jdfp exact INT16 convolution: implicit GEMM on the GEMM driver.
//
//   JdfpConvFwd   : x int16 [N, D, H, W, C], w int16 [KD, KH, KW, C/G, O], ex, ew int32 [1]
//                   -> y float32 [N, OD, OH, OW, O]
//   JdfpConvWgrad : x int16 [N, D, H, W, C], dy int16 [N, OD, OH, OW, O], ex, edy int32 [1]
//                   -> dw float32 [KD, KH, KW, C/G, O]
//
// Attributes (3 entries each, one per spatial dim): window_strides, padding_lo, padding_hi,
// lhs_dilation, rhs_dilation; feature_group_count; bits_x, bits_w (bits of the second operand:
// weights or output gradient); isa.  1-D / 2-D convolutions pass size-1 leading spatial dims.
//
// The forward is y[pixel, o] = sum over K = (tap, c) of im2col(x)[pixel, (tap, c)] * w[(tap, c), o],
// per group, with K in (kd, kh, kw, c) order; the weight-gradient is dw[(tap, c), o] = sum over
// K = pixel (n, od, oh, ow) of im2col(x)[pixel, (tap, c)] * dy[pixel, o].  Both are exactly the GEMM
// contract of docs/arithmetic.md (same chains, FP32 spill order and epilogue as JdfpGemmI16) on that
// im2col matrix, with per-tensor exponents (KB == 1).  The im2col matrix is never stored: the driver's
// A packing gathers it from x (conv_pack.h, and the ISA's vectorized gather).  Backward-data is the
// forward handler on dy with the flipped, transposed kernel (lhs dilation = forward stride); the
// Python side (jdfp._src.kernels.conv_input_grad) sets that up.
#include "ffi_runtime.h"

#define JDFP_EXPORT extern "C" __attribute__((visibility("default")))

namespace jdfp {
namespace {

ffi::Error conv_invalid(const std::string& msg) { return invalid_as("conv", msg); }

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

ffi::Future conv_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer b, ffi::Buffer<ffi::S32> ex,
                      ffi::Buffer<ffi::S32> eb, ffi::Result<ffi::Buffer<ffi::F32>> out,
                      ffi::Span<const int64_t> strides, ffi::Span<const int64_t> plo,
                      ffi::Span<const int64_t> phi, ffi::Span<const int64_t> ldil,
                      ffi::Span<const int64_t> rdil, int64_t groups, int32_t bits_a, int32_t bits_b,
                      int32_t isa, bool wgrad) {
  const char* bname = wgrad ? "dy" : "w";
  // ---- attributes
  if (bits_a < 2 || bits_a > 16) return error_future(conv_invalid("bits_x must be in [2, 16], got " + std::to_string(bits_a)));
  if (bits_b < 2 || bits_b > 16) return error_future(conv_invalid("bits_w must be in [2, 16], got " + std::to_string(bits_b)));
  if (isa < 0 || isa > kIsaAvx512Vnni) return error_future(conv_invalid("isa must be 0..4, got " + std::to_string(isa)));
  if (isa == kIsaAuto) isa = best_isa();
  if (!(isa_mask() & (1 << isa)))
    return error_future(ffi::Error(ffi::ErrorCode::kUnimplemented,
                                   "jdfp conv: ISA " + std::string(isa_info(isa).name) +
                                       " is not supported by this CPU/OS (or not built)"));
  ConvAttrs at{};
  std::string err;
  if (!read_attrs(strides, plo, phi, ldil, rdil, groups, at, err)) return error_future(conv_invalid(err));
  // ---- dtypes and ranks
  if (x.element_type() != ffi::S16) return error_future(conv_invalid("x must be int16"));
  if (b.element_type() != ffi::S16) return error_future(conv_invalid(std::string(bname) + " must be int16"));
  const auto dx = x.dimensions(), db = b.dimensions(), dout = out->dimensions();
  if (dx.size() != 5 || db.size() != 5 || dout.size() != 5)
    return error_future(conv_invalid("x, " + std::string(bname) + " and the output must have rank 5 (N, D, H, W, C / "
                                     "KD, KH, KW, I, O); got x " + dims_str(dx) + ", " + bname + " " + dims_str(db) +
                                     ", out " + dims_str(dout)));
  if (ex.element_count() != 1 || eb.element_count() != 1)
    return error_future(conv_invalid("the exponents must have one element each (per-tensor), got " +
                                     dims_str(ex.dimensions()) + " and " + dims_str(eb.dimensions())));
  const int64_t G = at.groups, C = dx[4];
  // Kernel [KD, KH, KW, I, O] and output [N, O...] of the GEMM, whichever pass this is.
  const auto dw = wgrad ? dout : db;  // weights-shaped
  const auto dy = wgrad ? db : dout;  // output-shaped
  const int64_t I = dw[3], O = dw[4];
  if (C != I * G || O % G != 0)
    return error_future(conv_invalid("feature_group_count=" + std::to_string(G) + ": input channels " +
                                     std::to_string(C) + " must equal kernel input features " + std::to_string(I) +
                                     " x groups, and output features " + std::to_string(O) + " must divide by groups"));
  const int64_t Og = O / G;
  ConvGeom g;
  g.mode = wgrad ? kConvRowsTaps : kConvRowsPixels;
  g.n = dx[0];
  g.C = C;
  g.cg = I;
  for (int d = 0; d < 3; ++d) {
    g.in[d] = dx[1 + d];
    g.ks[d] = dw[d];
    g.stride[d] = at.stride[d];
    g.pad[d] = at.lo[d];
    g.ldil[d] = at.ldil[d];
    g.rdil[d] = at.rdil[d];
    g.out[d] = conv_out_size(g.in[d], g.ks[d], at, d);
  }
  const int64_t want[5] = {g.n, g.out[0], g.out[1], g.out[2], O};
  for (int i = 0; i < 5; ++i)
    if (dy[i] != want[i])
      return error_future(conv_invalid(std::string(wgrad ? "dy" : "out") + " must be [N, OD, OH, OW, O] = [" +
                                       std::to_string(want[0]) + ", " + std::to_string(want[1]) + ", " +
                                       std::to_string(want[2]) + ", " + std::to_string(want[3]) + ", " +
                                       std::to_string(want[4]) + "] for these shapes and attributes, got " +
                                       dims_str(dy)));
  g.npix = g.n * g.out[0] * g.out[1] * g.out[2];
  g.ntaps = g.ks[0] * g.ks[1] * g.ks[2];

  auto job = std::make_shared<Job>();
  job->who = "conv";
  job->name_a = "x";
  job->name_b = bname;
  job->conv = g;
  Problem& P = job->P;
  const int64_t M = wgrad ? g.ntaps * I : g.npix;
  const int64_t K = wgrad ? g.npix : g.ntaps * I;
  const int64_t N = Og;
  job->a_off.resize(size_t(G));
  job->b_off.resize(size_t(G));
  job->c_off.resize(size_t(G));
  job->ea_off.assign(size_t(G), 0);
  job->eb_off.assign(size_t(G), 0);
  for (int64_t gi = 0; gi < G; ++gi) {
    job->a_off[size_t(gi)] = gi * I;   // channel offset of the group in x
    job->b_off[size_t(gi)] = gi * Og;  // column offset in w [K, O] or dy [npix, O]
    job->c_off[size_t(gi)] = gi * Og;  // column offset in y [npix, O] or dw [K, O]
  }
  const IsaInfo info = isa_info(isa);
  const int64_t L = safe_chain_length(bits_a, bits_b);
  const int64_t bk = std::max<int64_t>(K, 1);
  static const int64_t kc_env = env_knob("JDFP_KC_PAIRS");
  build_chains(*job, K, bk, 1, std::min(L, bk), kc_env > 0 ? int32_t(kc_env) : info.kc_pairs);

  P.M = M; P.N = N; P.K = K; P.KB = 1; P.block_k = bk;
  P.bits_a = bits_a; P.bits_b = bits_b;
  P.qmax_a = qmax_of(bits_a); P.qmax_b = qmax_of(bits_b);
  P.trans_a = false; P.trans_b = false;
  P.a_f32 = false; P.b_f32 = false;
  P.a = x.untyped_data(); P.b = b.untyped_data();
  P.ea = ex.typed_data(); P.eb = eb.typed_data();
  P.out = out->typed_data();
  P.a_off = job->a_off.data(); P.b_off = job->b_off.data();
  P.ea_off = job->ea_off.data(); P.eb_off = job->eb_off.data();
  P.ea_mstride = 0;
  P.eb_nstride = 0;
  P.pieces = job->pieces.data();
  P.kcb = job->kcb.data();
  P.nkcb = int64_t(job->kcb.size());
  P.max_pairs = 0; P.max_nblk = 0;
  for (const auto& kb : job->kcb) {
    P.max_pairs = std::max(P.max_pairs, kb.pairs);
    P.max_nblk = std::max(P.max_nblk, kb.nblk);
  }
  P.a_sr = 0; P.a_sk = 0;  // A is gathered (P.conv)
  P.b_sr = 1; P.b_sk = O;
  P.ldc = O;
  P.c_off = job->c_off.data();
  P.conv = &job->conv;
  job->fn = info.fn;
  job->bits_a = bits_a; job->bits_b = bits_b;
  return launch(job, pool, info, G, M, N, K);
}

}  // namespace
}  // namespace jdfp

JDFP_EXPORT XLA_FFI_Error* JdfpConvFwd(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpConvWgrad(XLA_FFI_CallFrame*);

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
      .Attr<Span64>("window_strides")             \
      .Attr<Span64>("padding_lo")                 \
      .Attr<Span64>("padding_hi")                 \
      .Attr<Span64>("lhs_dilation")               \
      .Attr<Span64>("rhs_dilation")               \
      .Attr<int64_t>("feature_group_count")       \
      .Attr<int32_t>("bits_x")                    \
      .Attr<int32_t>("bits_w")                    \
      .Attr<int32_t>("isa")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpConvFwd, conv_fwd, JDFP_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpConvWgrad, conv_wgrad, JDFP_CONV_BINDING);
