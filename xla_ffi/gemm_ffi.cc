// XLA FFI handlers of the jdfp exact INT16 GEMM (contract: docs/arithmetic.md).
//
//   JdfpGemmI16 : int16 a, int16 b
//   JdfpGemmQ   : a and/or b float32, quantized while packing (the int16 copy is never stored)
//
// Both: int32 ea [..., M|1, KB], eb [..., KB, N|1] -> float32 out [..., M, N], leading batch dims
// broadcast (size 1 on one side, stride 0, no copies).  Work is split into (batch, M, N) tiles that
// the caller and XLA's intra-op pool threads grab from an atomic counter; the handler returns an
// ffi::Future completed by the last worker, so no pool thread ever waits for another.
#include "ffi_runtime.h"

namespace jdfp {
namespace {

ffi::Future gemm_impl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                      ffi::Buffer<ffi::S32> ea, ffi::Buffer<ffi::S32> eb,
                      ffi::Result<ffi::Buffer<ffi::F32>> out, int32_t bits_a, int32_t bits_b,
                      int64_t block_k, bool trans_a, bool trans_b, int32_t isa, bool allow_f32) {
  // ---- attributes
  if (bits_a < 2 || bits_a > 16) return error_future(invalid("bits_a must be in [2, 16], got " + std::to_string(bits_a)));
  if (bits_b < 2 || bits_b > 16) return error_future(invalid("bits_b must be in [2, 16], got " + std::to_string(bits_b)));
  const IsaKernels* kernels = nullptr;
  if (ffi::Error e = select_isa("gemm", isa, kernels); e.failure()) return error_future(std::move(e));
  // ---- dtypes
  const auto ta = a.element_type(), tb = b.element_type();
  const bool a_f32 = ta == ffi::F32, b_f32 = tb == ffi::F32;
  if (!(ta == ffi::S16 || (allow_f32 && a_f32)))
    return error_future(invalid(std::string("a must be int16") + (allow_f32 ? " or float32" : "")));
  if (!(tb == ffi::S16 || (allow_f32 && b_f32)))
    return error_future(invalid(std::string("b must be int16") + (allow_f32 ? " or float32" : "")));
  // ---- shapes
  const auto da = a.dimensions(), db = b.dimensions(), dea = ea.dimensions(), deb = eb.dimensions();
  const auto dout = out->dimensions();
  if (da.size() < 2 || db.size() < 2 || dea.size() < 2 || deb.size() < 2 || dout.size() < 2)
    return error_future(invalid("a, b, ea, eb and out must have rank >= 2"));
  const size_t ra = da.size(), rb = db.size();
  const int64_t M = trans_a ? da[ra - 1] : da[ra - 2];
  const int64_t K = trans_a ? da[ra - 2] : da[ra - 1];
  const int64_t Kb = trans_b ? db[rb - 1] : db[rb - 2];
  const int64_t N = trans_b ? db[rb - 2] : db[rb - 1];
  if (K != Kb)
    return error_future(invalid("contraction dims differ: a " + dims_str(da) + " b " + dims_str(db)));
  if (block_k == 0 || block_k < -1)
    return error_future(invalid("block_k must be >= 1 (or -1 for K), got " + std::to_string(block_k)));
  const int64_t bk = block_k == -1 ? std::max<int64_t>(K, 1) : block_k;
  const int64_t KB = (K + bk - 1) / bk;
  const size_t rea = dea.size(), reb = deb.size();
  if (dea[rea - 1] != KB || (dea[rea - 2] != M && dea[rea - 2] != 1))
    return error_future(invalid("ea must be [..., M or 1, KB] = [..., " + std::to_string(M) + ", " +
                                std::to_string(KB) + "], got " + dims_str(dea)));
  if (deb[reb - 2] != KB || (deb[reb - 1] != N && deb[reb - 1] != 1))
    return error_future(invalid("eb must be [..., KB, N or 1] = [..., " + std::to_string(KB) + ", " +
                                std::to_string(N) + "], got " + dims_str(deb)));
  const size_t ro = dout.size();
  if (dout[ro - 2] != M || dout[ro - 1] != N)
    return error_future(invalid("out must be [..., M, N], got " + dims_str(dout)));
  std::vector<int64_t> ob(dout.begin(), dout.end() - 2);
  // Each output batch dim must be the broadcast of the inputs' (not larger than all of them).
  for (size_t i = 0; i < ob.size(); ++i) {
    int64_t mx = 1;
    for (auto d : {da, db, dea, deb}) {
      const size_t nbd = d.size() - 2, back = ob.size() - i;
      if (back <= nbd) mx = std::max(mx, d[nbd - back]);
    }
    if (ob[i] != mx) return error_future(invalid("out batch dims " + dims_str(dout) + " are not the broadcast of the inputs'"));
  }

  auto job = std::make_shared<Job>();
  Problem& P = job->P;
  if (!batch_offsets(da, ob, M * K, job->a_off) || !batch_offsets(db, ob, K * N, job->b_off) ||
      !batch_offsets(dea, ob, dea[rea - 2] * KB, job->ea_off) ||
      !batch_offsets(deb, ob, KB * deb[reb - 1], job->eb_off))
    return error_future(invalid("batch dims do not broadcast: a " + dims_str(da) + " b " + dims_str(db) +
                                " ea " + dims_str(dea) + " eb " + dims_str(deb) + " out " + dims_str(dout)));
  const int64_t nbatch = int64_t(job->a_off.size());

  const IsaKernels& info = *kernels;
  const int64_t L = safe_chain_length(bits_a, bits_b);
  const int64_t C = std::min(L, bk);
  static const int64_t kc_env = env_knob("JDFP_KC_PAIRS");
  build_chains(*job, K, bk, KB, C, kc_env > 0 ? int32_t(kc_env) : info.kc_pairs);

  P.M = M; P.N = N; P.K = K; P.KB = KB; P.block_k = bk;
  P.bits_a = bits_a; P.bits_b = bits_b;
  P.qmax_a = qmax_of(bits_a); P.qmax_b = qmax_of(bits_b);
  P.trans_a = trans_a; P.trans_b = trans_b;
  P.a_sr = trans_a ? 1 : K; P.a_sk = trans_a ? M : 1;
  P.b_sr = trans_b ? K : 1; P.b_sk = trans_b ? 1 : N;
  P.ldc = N; P.c_off = nullptr; P.conv = nullptr;
  static std::atomic<uint64_t> job_seq{0};
  P.job_id = job_seq.fetch_add(1, std::memory_order_relaxed) + 1;
  P.a_f32 = a_f32; P.b_f32 = b_f32;
  P.a = a.untyped_data(); P.b = b.untyped_data();
  P.ea = ea.typed_data(); P.eb = eb.typed_data();
  P.out = out->typed_data();
  P.a_off = job->a_off.data(); P.b_off = job->b_off.data();
  P.ea_off = job->ea_off.data(); P.eb_off = job->eb_off.data();
  P.ea_mstride = dea[rea - 2] == 1 ? 0 : KB;
  P.eb_nstride = deb[reb - 1] == 1 ? 0 : 1;
  P.pieces = job->pieces.data();
  P.kcb = job->kcb.data();
  P.nkcb = int64_t(job->kcb.size());
  P.max_pairs = 0; P.max_nblk = 0;
  for (const auto& kb : job->kcb) {
    P.max_pairs = std::max(P.max_pairs, kb.pairs);
    P.max_nblk = std::max(P.max_nblk, kb.nblk);
  }
  job->fn = info.tile;
  job->bits_a = bits_a; job->bits_b = bits_b;

  return launch(job, pool, info, nbatch, M, N, K);
}

}  // namespace
}  // namespace jdfp

// ---------------------------------------------------------------- exported symbols
JDFP_EXPORT XLA_FFI_Error* JdfpGemmI16(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpGemmQ(XLA_FFI_CallFrame*);

// Both bind AnyBuffer for a/b so that a wrong dtype gets our own error message.
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

#define JDFP_BINDING(A_T, B_T)                    \
  ffi::Ffi::Bind()                                \
      .Ctx<ffi::ThreadPool>()                     \
      .Arg<A_T>()                                 \
      .Arg<B_T>()                                 \
      .Arg<ffi::Buffer<ffi::S32>>()               \
      .Arg<ffi::Buffer<ffi::S32>>()               \
      .Ret<ffi::Buffer<ffi::F32>>()               \
      .Attr<int32_t>("bits_a")                    \
      .Attr<int32_t>("bits_b")                    \
      .Attr<int64_t>("block_k")                   \
      .Attr<bool>("transpose_a")                  \
      .Attr<bool>("transpose_b")                  \
      .Attr<int32_t>("isa")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpGemmI16, gemm_i16, JDFP_BINDING(ffi::AnyBuffer, ffi::AnyBuffer));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpGemmQ, gemm_q, JDFP_BINDING(ffi::AnyBuffer, ffi::AnyBuffer));

// Plain C helpers for the Python side (ctypes).
JDFP_EXPORT int jdfp_abi_version() { return 1; }
JDFP_EXPORT int jdfp_isa_mask() { return jdfp::isa_mask(); }
JDFP_EXPORT int jdfp_best_isa() { return jdfp::best_isa(); }
JDFP_EXPORT int64_t jdfp_safe_chain_length(int bits_a, int bits_b) {
  if (bits_a < 2 || bits_a > 16 || bits_b < 2 || bits_b > 16) return -1;
  return jdfp::safe_chain_length(bits_a, bits_b);
}
