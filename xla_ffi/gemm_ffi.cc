// XLA FFI handlers of the jdfp exact INT16 GEMM (contract: docs/arithmetic.md).
//
//   JdfpGemmI16 : int16 a, int16 b
//   JdfpGemmQ   : a and/or b float32, quantized while packing (the int16 copy is never stored)
//   JdfpGemmI16Col2im : the int16 GEMM's [1, rows, taps * C] result summed into a conv input's
//                 gradient (col2im.h), image by image
//   JdfpGemmI16PatchWgrad : a block-format conv's weight gradient P^T . b, P the patch matrix of the
//                 float32 conv input, converted on the forward's tile exponents a kc block at a
//                 time while packing (patch_source.h)
//
// Both: int32 ea [..., M|1, KB], eb [..., KB, N|1] -> float32 out [..., M, N], leading batch dims
// broadcast (size 1 on one side, stride 0, no copies).  Work is split into (batch, M, N) tiles that
// the caller and XLA's intra-op pool threads grab from an atomic counter; the handler returns an
// ffi::Future completed by the last worker, so no pool thread ever waits for another.
//
// Flow: check the attributes and pick the ISA entry (check_attrs), check dtypes and shapes
// (read_shapes, check_batch_dims), fill the Job's Problem (set_up_job), run it (ffi_runtime's
// launch).  Also the plain C helpers of the Python side (jdfp_isa_mask, ...).
#include "col2im.h"
#include "ffi_runtime.h"
#include "patch_source.h"

namespace jdfp {
namespace {

ffi::Error invalid(const std::string& msg) { return invalid_as("gemm", msg); }

ffi::Error check_attrs(int32_t bits_a, int32_t bits_b, int32_t isa, const IsaKernels*& kernels) {
  if (ffi::Error e = check_bits("gemm", "bits_a", bits_a); e.failure()) return e;
  if (ffi::Error e = check_bits("gemm", "bits_b", bits_b); e.failure()) return e;
  return select_isa("gemm", isa, kernels);
}

ffi::Error check_dtypes(ffi::AnyBuffer a, ffi::AnyBuffer b, bool allow_f32) {
  const auto ta = a.element_type(), tb = b.element_type();
  if (!(ta == ffi::S16 || (allow_f32 && ta == ffi::F32)))
    return invalid(std::string("a must be int16") + (allow_f32 ? " or float32" : ""));
  if (!(tb == ffi::S16 || (allow_f32 && tb == ffi::F32)))
    return invalid(std::string("b must be int16") + (allow_f32 ? " or float32" : ""));
  return ffi::Error::Success();
}

}  // namespace

// M, N, K, the block size and KB from the operands, with the exponents' and output's shapes checked.
ffi::Error read_shapes(GemmShape& s, int64_t block_k, bool trans_a, bool trans_b) {
  const auto &da = s.da, &db = s.db, &dea = s.dea, &deb = s.deb, &dout = s.dout;
  if (da.size() < 2 || db.size() < 2 || dea.size() < 2 || deb.size() < 2 || dout.size() < 2)
    return invalid("a, b, ea, eb and out must have rank >= 2");
  const size_t ra = da.size(), rb = db.size();
  s.M = trans_a ? da[ra - 1] : da[ra - 2];
  s.K = trans_a ? da[ra - 2] : da[ra - 1];
  const int64_t Kb = trans_b ? db[rb - 1] : db[rb - 2];
  s.N = trans_b ? db[rb - 2] : db[rb - 1];
  if (s.K != Kb) return invalid("contraction dims differ: a " + dims_str(da) + " b " + dims_str(db));
  if (block_k == 0 || block_k < -1)
    return invalid("block_k must be >= 1 (or -1 for K), got " + std::to_string(block_k));
  s.bk = block_k == -1 ? std::max<int64_t>(s.K, 1) : block_k;
  s.KB = (s.K + s.bk - 1) / s.bk;
  const size_t rea = dea.size(), reb = deb.size();
  if (dea[rea - 1] != s.KB || (dea[rea - 2] != s.M && dea[rea - 2] != 1))
    return invalid("ea must be [..., M or 1, KB] = [..., " + std::to_string(s.M) + ", " + std::to_string(s.KB) +
                   "], got " + dims_str(dea));
  if (deb[reb - 2] != s.KB || (deb[reb - 1] != s.N && deb[reb - 1] != 1))
    return invalid("eb must be [..., KB, N or 1] = [..., " + std::to_string(s.KB) + ", " + std::to_string(s.N) +
                   "], got " + dims_str(deb));
  const size_t ro = dout.size();
  if (dout[ro - 2] != s.M || dout[ro - 1] != s.N) return invalid("out must be [..., M, N], got " + dims_str(dout));
  return ffi::Error::Success();
}

// Each output batch dim must be the broadcast of the inputs' (not larger than all of them).
ffi::Error check_batch_dims(GemmShape& s) {
  s.ob.assign(s.dout.begin(), s.dout.end() - 2);
  for (size_t i = 0; i < s.ob.size(); ++i) {
    int64_t mx = 1;
    for (auto d : {s.da, s.db, s.dea, s.deb}) {
      const size_t nbd = d.size() - 2, back = s.ob.size() - i;
      if (back <= nbd) mx = std::max(mx, d[nbd - back]);
    }
    if (s.ob[i] != mx) return invalid("out batch dims " + dims_str(s.dout) + " are not the broadcast of the inputs'");
  }
  return ffi::Error::Success();
}

// Batch offsets of every operand, then the Problem (chains, strides, pointers) of the job.
ffi::Error set_up_job(Job& job, const GemmShape& s, const GemmOperands& ops, int32_t bits_a, int32_t bits_b,
                      bool trans_a, bool trans_b, const IsaKernels& isa) {
  const int64_t M = s.M, N = s.N, K = s.K, KB = s.KB;
  const size_t rea = s.dea.size(), reb = s.deb.size();
  if (!batch_offsets(s.da, s.ob, M * K, job.a_off) || !batch_offsets(s.db, s.ob, K * N, job.b_off) ||
      !batch_offsets(s.dea, s.ob, s.dea[rea - 2] * KB, job.ea_off) ||
      !batch_offsets(s.deb, s.ob, KB * s.deb[reb - 1], job.eb_off))
    return invalid("batch dims do not broadcast: a " + dims_str(s.da) + " b " + dims_str(s.db) + " ea " +
                   dims_str(s.dea) + " eb " + dims_str(s.deb) + " out " + dims_str(s.dout));
  const int64_t C = std::min(kernel_chain_length(bits_a, bits_b), s.bk);
  plan_chains(job, K, s.bk, KB, C, isa.kc_pairs);

  Problem& P = job.P;
  P.M = M; P.N = N; P.K = K; P.KB = KB; P.block_k = s.bk;
  P.bits_a = bits_a; P.bits_b = bits_b;
  P.qmax_a = qmax_of(bits_a); P.qmax_b = qmax_of(bits_b);
  P.trans_a = trans_a; P.trans_b = trans_b;
  P.a_sr = trans_a ? 1 : K; P.a_sk = trans_a ? M : 1;
  P.b_sr = trans_b ? K : 1; P.b_sk = trans_b ? 1 : N;
  P.ldc = N; P.c_off = nullptr; P.conv = nullptr;
  // Unique per call: lets a worker reuse packed B panels across its own tiles of this call only.
  P.job_id = next_job_id();
  P.a_f32 = ops.a_f32; P.b_f32 = ops.b_f32;
  P.a = ops.a; P.b = ops.b;
  P.ea = ops.ea; P.eb = ops.eb;
  P.out = ops.out;
  P.a_off = job.a_off.data(); P.b_off = job.b_off.data();
  P.ea_off = job.ea_off.data(); P.eb_off = job.eb_off.data();
  P.ea_mstride = s.dea[rea - 2] == 1 ? 0 : KB;
  P.eb_nstride = s.deb[reb - 1] == 1 ? 0 : 1;
  job.bits_a = bits_a; job.bits_b = bits_b;
  return ffi::Error::Success();
}

namespace {

GemmOperands operands_of(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Buffer<ffi::S32> ea, ffi::Buffer<ffi::S32> eb,
                         float* out) {
  return GemmOperands{a.untyped_data(), b.untyped_data(), ea.typed_data(), eb.typed_data(), out,
                      a.element_type() == ffi::F32, b.element_type() == ffi::F32};
}

ffi::Future gemm_impl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                      ffi::Buffer<ffi::S32> ea, ffi::Buffer<ffi::S32> eb,
                      ffi::Result<ffi::Buffer<ffi::F32>> out, int32_t bits_a, int32_t bits_b,
                      int64_t block_k, bool trans_a, bool trans_b, int32_t isa, bool allow_f32) {
  const IsaKernels* kernels = nullptr;
  if (ffi::Error e = check_attrs(bits_a, bits_b, isa, kernels); e.failure()) return error_future(std::move(e));
  if (ffi::Error e = check_dtypes(a, b, allow_f32); e.failure()) return error_future(std::move(e));
  GemmShape s;
  s.da = a.dimensions(); s.db = b.dimensions(); s.dea = ea.dimensions(); s.deb = eb.dimensions();
  s.dout = out->dimensions();
  if (ffi::Error e = read_shapes(s, block_k, trans_a, trans_b); e.failure()) return error_future(std::move(e));
  if (ffi::Error e = check_batch_dims(s); e.failure()) return error_future(std::move(e));
  if (ffi::Error e = check_block_sum_bound("jdfp_gemm", std::min(s.bk, s.K), bits_a, bits_b); e.failure())
    return error_future(std::move(e));
  auto job = reusable_job();
  if (ffi::Error e = set_up_job(*job, s, operands_of(a, b, ea, eb, out->typed_data()), bits_a, bits_b, trans_a, trans_b,
                                  *kernels); e.failure())
    return error_future(std::move(e));
  const int64_t nbatch = int64_t(job->a_off.size());
#ifdef JDFP_HAVE_SIMD
  // isa="auto" on a CPU with AMX-INT8: the GEMM runs as four byte GEMMs on the tiles (kernel_amx.cc),
  // the same result bit for bit.  A named ISA keeps its kernel, and so does a short K, which the tiles
  // pad to 64 (64 x 128 x 10 ran 1.3x slower there; from K = 64 on, every shape measured from 16^3
  // up ran faster on the tiles).
  if (isa == kIsaAuto && amx_i16_fits(job->P) && amx_int8_ready()) {
    job->fn = tile_amx_i16;
    return launch_tiles(job, pool, 16, 16, nbatch, s.M, s.N, s.K);
  }
#endif
  return launch(job, pool, *kernels, nbatch, s.M, s.N, s.K);
}

}  // namespace

// ---------------------------------------------------------------- rows supplied by the caller
struct RowGemmI16 : RowGemm {
  Job job;
  TileFn tile = nullptr;
  int run(int64_t r0, int64_t r1, const void* a, const int32_t* ea) const override {
    Problem P = job.P;
    // Row r of A (and of its exponents) at the same offset as in a stored [M, K] matrix.
    P.a = static_cast<const int16_t*>(a) - r0 * P.K;
    P.ea = ea - r0 * P.KB;
    return tile(P, Tile{0, r0, r1, 0, P.N});
  }
};

ffi::Error make_row_gemm_i16(GemmShape& s, int64_t block_k, const void* b, const int32_t* eb, float* out,
                             int32_t bits_a, int32_t bits_b, int32_t isa, std::unique_ptr<RowGemm>& gemm) {
  const IsaKernels* kernels = nullptr;
  if (ffi::Error e = check_attrs(bits_a, bits_b, isa, kernels); e.failure()) return e;
  if (ffi::Error e = read_shapes(s, block_k, false, false); e.failure()) return e;
  if (ffi::Error e = check_batch_dims(s); e.failure()) return e;
  if (ffi::Error e = check_block_sum_bound("jdfp_gemm", std::min(s.bk, s.K), bits_a, bits_b); e.failure()) return e;
  auto g = std::make_unique<RowGemmI16>();
  const GemmOperands ops{nullptr, b, nullptr, eb, out, false, false};
  if (ffi::Error e = set_up_job(g->job, s, ops, bits_a, bits_b, false, false, *kernels); e.failure()) return e;
  g->tile = kernels->tile;
#ifdef JDFP_HAVE_SIMD
  if (isa == kIsaAuto && amx_i16_fits(g->job.P) && amx_int8_ready()) g->tile = tile_amx_i16;  // as gemm_impl
#endif
  gemm = std::move(g);
  return ffi::Error::Success();
}

namespace {

// ---------------------------------------------------------------- GEMM + col2im (col2im.h)
// The INT16 kernel's form of gemm_i8_ffi.cc's JdfpGemmI8Col2im (HBFP12: 12-bit operands).
struct Col2imJob : Job {
  Col2im c2i;
};

ffi::Future gemm_col2im_impl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Buffer<ffi::S32> ea,
                             ffi::Buffer<ffi::S32> eb, ffi::Result<ffi::Buffer<ffi::F32>> dx, int32_t bits_a,
                             int32_t bits_b, int64_t block_k, bool trans_a, bool trans_b, int32_t isa,
                             ffi::Span<const int64_t> strides, ffi::Span<const int64_t> plo,
                             ffi::Span<const int64_t> phi, ffi::Span<const int64_t> ldil,
                             ffi::Span<const int64_t> rdil, ffi::Span<const int64_t> kernel_spatial) {
  auto bad = [](const std::string& m) { return error_future(invalid_as("gemm_col2im", m)); };
  const IsaKernels* kernels = nullptr;
  if (ffi::Error e = check_attrs(bits_a, bits_b, isa, kernels); e.failure()) return error_future(std::move(e));
  if (ffi::Error e = check_dtypes(a, b, /*allow_f32=*/false); e.failure()) return error_future(std::move(e));
  auto job = std::make_shared<Col2imJob>();
  Col2imJob& j = *job;
  std::string err;
  int64_t dp_dims[3];
  if (!j.c2i.init(dx->dimensions(), a.dimensions(), b.dimensions(), strides, plo, phi, ldil, rdil, kernel_spatial,
                  dp_dims, err))
    return bad(err);
  GemmShape s;
  s.da = a.dimensions(); s.db = b.dimensions(); s.dea = ea.dimensions(); s.deb = eb.dimensions();
  s.dout = ffi::Span<const int64_t>(dp_dims, 3);
  if (ffi::Error e = read_shapes(s, block_k, trans_a, trans_b); e.failure())
    return bad(j.c2i.shape_error(dp_dims, dx->dimensions(), e));
  if (ffi::Error e = check_batch_dims(s); e.failure()) return error_future(std::move(e));
  if (ffi::Error e = check_block_sum_bound("jdfp_gemm_col2im", std::min(s.bk, s.K), bits_a, bits_b); e.failure())
    return error_future(std::move(e));
  // set_up_job points the output at dx; each tile redirects it to its worker's buffer.
  if (ffi::Error e = set_up_job(j, s, operands_of(a, b, ea, eb, dx->typed_data()), bits_a, bits_b, trans_a, trans_b,
                                  *kernels); e.failure())
    return error_future(std::move(e));
  j.who = "gemm_col2im";
  j.fn = kernels->tile;
  return launch_col2im(job, pool, dx->typed_data(), [](const Col2imJob& jj, float* out, const Tile& t) {
    Problem P = jj.P;
    P.out = out;
    return jj.fn(P, t);
  });
}

// ---------------------------------------------------------------- conv weight gradient from x
// JdfpGemmI16PatchWgrad: dW [1, K, N] = P^T . b for the patch matrix P of a float32 conv input in a
// block format (patch_source.h), bit for bit JdfpGemmI16 (transpose_a) on the int16 P that
// JdfpBlockQuantizePatches converts.
struct PatchWgradA final : ARowSource {
  PatchTiles p;
  const int16_t* rows(const Tile& T, int64_t k0, int64_t k1, int64_t& sr, int64_t& sk) const override {
    sr = 1, sk = T.m1 - T.m0;
    return p.convert_rows<int16_t>(T, k0, k1);
  }
  const int32_t* exponents(const Tile& T) const override { return p.exponents(T); }
};

struct PatchWgradJob : Job {
  PatchWgradA src;
};

ffi::Future patch_wgrad_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> e, ffi::AnyBuffer b,
                             ffi::Buffer<ffi::S32> eb, ffi::Result<ffi::Buffer<ffi::F32>> out, int32_t bits_a,
                             int32_t bits_b, int64_t block_k, ffi::Span<const int64_t> block, int32_t isa,
                             ffi::Span<const int64_t> strides, ffi::Span<const int64_t> plo,
                             ffi::Span<const int64_t> phi, ffi::Span<const int64_t> ldil,
                             ffi::Span<const int64_t> rdil, ffi::Span<const int64_t> kernel_spatial) {
  const char* who = "gemm_patch_wgrad";
  const IsaKernels* kernels = nullptr;
  if (ffi::Error err = check_attrs(bits_a, bits_b, isa, kernels); err.failure()) return error_future(std::move(err));
  if (b.element_type() != ffi::S16) return error_future(invalid_as(who, "b must be int16"));
  auto job = std::make_shared<PatchWgradJob>();
  PatchTiles& p = job->src.p;
  if (ffi::Error err = p.init(who, x, e, block, block_k, strides, plo, phi, ldil, rdil, kernel_spatial); err.failure())
    return error_future(std::move(err));
  GemmShape s;
  s.da = ffi::Span<const int64_t>(p.da, 3), s.dea = ffi::Span<const int64_t>(p.dea, 3);
  s.db = b.dimensions(), s.deb = eb.dimensions(), s.dout = out->dimensions();
  if (ffi::Error err = PatchTiles::check_operands(who, s.db, s.deb, s.dout); err.failure())
    return error_future(std::move(err));
  if (ffi::Error err = read_shapes(s, block_k, true, false); err.failure()) return error_future(std::move(err));
  if (ffi::Error err = check_batch_dims(s); err.failure()) return error_future(std::move(err));
  if (ffi::Error err = check_block_sum_bound("jdfp_gemm_patch_wgrad", std::min(s.bk, s.K), bits_a, bits_b);
      err.failure())
    return error_future(std::move(err));
  const GemmOperands ops{nullptr, b.untyped_data(), nullptr, eb.typed_data(), out->typed_data(), false, false};
  if (ffi::Error err = set_up_job(*job, s, ops, bits_a, bits_b, true, false, *kernels); err.failure())
    return error_future(std::move(err));
  job->src.p.qm = float(job->P.qmax_a);
  job->src.p.avx512 = kernels == &isa_kernels(kIsaAvx512Vnni);
  job->P.a_src = &job->src;
  return launch(job, pool, *kernels, 1, s.M, s.N, s.K);
}

}  // namespace
}  // namespace jdfp

// ---------------------------------------------------------------- exported symbols
JDFP_EXPORT XLA_FFI_Error* JdfpGemmI16(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpGemmQ(XLA_FFI_CallFrame*);

static ffi::Future gemm_i16(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                            ffi::Buffer<ffi::S32> ea, ffi::Buffer<ffi::S32> eb,
                            ffi::Result<ffi::Buffer<ffi::F32>> out, int32_t bits_a, int32_t bits_b,
                            int64_t block_k, bool trans_a, bool trans_b, int32_t isa) {
  return jdfp::gemm_impl(pool, a, b, ea, eb, out, bits_a, bits_b,
                         block_k, trans_a, trans_b, isa, /*allow_f32=*/false);
}

static ffi::Future gemm_q(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                          ffi::Buffer<ffi::S32> ea, ffi::Buffer<ffi::S32> eb,
                          ffi::Result<ffi::Buffer<ffi::F32>> out, int32_t bits_a, int32_t bits_b,
                          int64_t block_k, bool trans_a, bool trans_b, int32_t isa) {
  return jdfp::gemm_impl(pool, a, b, ea, eb, out, bits_a, bits_b, block_k, trans_a, trans_b, isa,
                         /*allow_f32=*/true);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpGemmI16, gemm_i16, JDFP_GEMM_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpGemmQ, gemm_q, JDFP_GEMM_BINDING);

JDFP_EXPORT XLA_FFI_Error* JdfpGemmI16Col2im(XLA_FFI_CallFrame*);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpGemmI16Col2im, jdfp::gemm_col2im_impl,
                              JDFP_GEMM_BINDING
                                  JDFP_CONV_SPATIAL_ATTRS
                                  .Attr<ffi::Span<const int64_t>>("kernel_spatial"));

JDFP_EXPORT XLA_FFI_Error* JdfpGemmI16PatchWgrad(XLA_FFI_CallFrame*);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpGemmI16PatchWgrad, jdfp::patch_wgrad_impl, JDFP_PATCH_WGRAD_BINDING);

// Plain C helpers for the Python side (ctypes).
// 2: the quantize handlers take a key operand and a rounding attribute.
JDFP_EXPORT int jdfp_abi_version() { return 2; }
JDFP_EXPORT int jdfp_isa_mask() { return jdfp::isa_mask(); }
JDFP_EXPORT int jdfp_best_isa() { return jdfp::best_isa(); }
// 1: isa="auto" runs the INT16 and INT8 GEMMs that fit on AMX-INT8 tiles (kernel_amx.cc, kernel_amx_i8.cc).
JDFP_EXPORT int jdfp_amx_int8_ready() { return jdfp::amx_int8_ready() ? 1 : 0; }
JDFP_EXPORT int64_t jdfp_safe_chain_length(int bits_a, int bits_b) {
  if (bits_a < 2 || bits_a > 16 || bits_b < 2 || bits_b > 16) return -1;
  return jdfp::safe_chain_length(bits_a, bits_b);
}
