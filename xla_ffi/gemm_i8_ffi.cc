// XLA FFI handler of the exact INT8 GEMM (contract: docs/arithmetic.md, the same as the INT16 GEMM):
//
//   JdfpGemmI8 : int8 a [..., M, K], int8 b [..., K, N], int32 ea [..., M|1, KB], eb [..., KB, N|1]
//                -> float32 out [..., M, N]; attributes as JdfpGemmI16 (bits_a, bits_b <= 8).
//   JdfpGemmI8Col2im : the same GEMM's [1, rows, taps * C] result summed into a conv input's gradient
//                float32 dx [N, D, H, W, C] (col2im.h), image by image; plus the conv attributes.
//   JdfpGemmI8PatchWgrad : JdfpGemmI16PatchWgrad (gemm_ffi.cc) on this kernel, P converted to int8.
//
// Operand values must lie in [-qmax, qmax] (qmax = 2**(bits-1) - 1 <= 127, so never -128); a tile
// that meets one outside fails the call with an FFI error.  Tiling, threads and the future are
// ffi_runtime's (launch_tiles); the per-ISA kernels are gemm_i8_*.cc.  The shape checks repeat
// gemm_ffi.cc's read_shapes / check_batch_dims for int8 operands.
#include "col2im.h"
#include "ffi_runtime.h"
#include "gemm_i8_common.h"
#include "patch_source.h"

namespace jdfp {
namespace {

ffi::Error invalid(const std::string& msg) { return invalid_as("gemm_i8", msg); }

#if (defined(__x86_64__) || defined(__i386__)) && defined(JDFP_HAVE_SIMD)
#define JDFP_I8_ENTRY(fn) fn
#else
#define JDFP_I8_ENTRY(fn) nullptr
#endif

// Indexed by Isa.  kc: a B micro-panel of NR x 4 * kc_quads bytes (32 KiB at NR = 32) stays in L1.
const I8KernelShape kI8Kernels[] = {
    /* kIsaAuto */ {nullptr, 0, 0, 0},
    /* kIsaScalar */ {tile_i8_scalar, 4, 8, 128},
    /* kIsaAvx2 */ {JDFP_I8_ENTRY(tile_i8_avx2), 6, 16, 256},
    /* kIsaAvxVnni */ {JDFP_I8_ENTRY(tile_i8_avxvnni), 6, 16, 256},
    /* kIsaAvx512Vnni */ {JDFP_I8_ENTRY(tile_i8_avx512vnni), 12, 32, 256},
};
static_assert(sizeof(kI8Kernels) / sizeof(kI8Kernels[0]) == kIsaAvx512Vnni + 1, "one entry per Isa value");

struct JobI8 : Job {
  ProblemI8 P8{};
  std::vector<I8Piece> pcs;
  std::vector<I8KcBlock> kcbs;
};

struct ShapeI8 {
  ffi::Span<const int64_t> da, db, dea, deb, dout;
  int64_t M = 0, N = 0, K = 0, bk = 0, KB = 0;
  std::vector<int64_t> ob;
};

ffi::Error check_i8_bits(const char* name, int32_t bits) {
  if (bits < 2 || bits > 8)
    return invalid(std::string(name) + " must be in [2, 8] for the INT8 kernel, got " + std::to_string(bits));
  return ffi::Error::Success();
}

// As gemm_ffi.cc's read_shapes: M, N, K, block size and KB, exponent and output shapes checked.
ffi::Error read_shapes_i8(ShapeI8& s, int64_t block_k, bool trans_a, bool trans_b) {
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

// The contract's chains (blocks of block_k, chains of at most C products) as pieces of at most
// kc_quads quads, grouped into kc blocks; a chain longer than a kc block is cut at multiples of
// 4 * kc_quads (its int32 running sum waits in memory between the pieces).
void plan_chains_i8(JobI8& j, int64_t K, int64_t block_k, int64_t KB, int64_t C, int32_t kc_quads) {
  auto& pcs = j.pcs;
  auto& kcb = j.kcbs;
  int32_t cur_begin = 0, cur_quads = 0;
  auto close = [&]() {
    const int32_t end = int32_t(pcs.size());
    if (end == cur_begin) return;
    I8KcBlock b{};
    b.piece_begin = cur_begin;
    b.piece_end = end;
    b.quads = cur_quads;
    b.blk_first = pcs[size_t(cur_begin)].blk;
    b.nblk = pcs[size_t(end) - 1].blk - b.blk_first + 1;
    for (int32_t i = cur_begin; i < end; ++i) pcs[size_t(i)].bl = pcs[size_t(i)].blk - b.blk_first;
    kcb.push_back(b);
    cur_begin = end;
    cur_quads = 0;
  };
  for (int64_t blk = 0; blk < KB; ++blk) {
    const int64_t bs = blk * block_k, be = std::min(bs + block_k, K);
    for (int64_t cs = bs; cs < be; cs += C) {
      const int64_t len = std::min(C, be - cs);
      const uint8_t chain_pos = uint8_t((cs == bs ? kI8FirstChain : 0) | (cs + len >= be ? kI8LastChain : 0));
      const int64_t cq = (len + 3) / 4;
      if (cq > kc_quads) close();
      for (int64_t o = 0; o < len; o += 4 * int64_t(kc_quads)) {
        const int64_t pl = std::min<int64_t>(4 * int64_t(kc_quads), len - o);
        const int32_t pq = int32_t((pl + 3) / 4);
        if (cur_quads + pq > kc_quads) close();
        const uint8_t fl = uint8_t(chain_pos | (o == 0 ? kI8ChainOpen : 0) | (o + pl >= len ? kI8ChainClose : 0));
        pcs.push_back(I8Piece{cs + o, int32_t(pl), pq, int32_t(blk), 0, fl});
        cur_quads += pq;
      }
    }
  }
  close();
  ProblemI8& P = j.P8;
  P.pieces = pcs.data();
  P.kcb = kcb.data();
  P.nkcb = int64_t(kcb.size());
  P.max_quads = P.max_pieces = P.max_nblk = 0;
  P.total_quads = 0;
  for (const auto& kb : kcb) {
    P.max_quads = std::max(P.max_quads, kb.quads);
    P.max_pieces = std::max(P.max_pieces, kb.piece_end - kb.piece_begin);
    P.max_nblk = std::max(P.max_nblk, kb.nblk);
    P.total_quads += kb.quads;
  }
}

ffi::Error set_up_job_i8(JobI8& job, const ShapeI8& s, const GemmOperands& ops, int32_t bits_a, int32_t bits_b,
                         bool trans_a, bool trans_b, const I8KernelShape& ks) {
  const int64_t M = s.M, N = s.N, K = s.K, KB = s.KB;
  const size_t rea = s.dea.size(), reb = s.deb.size();
  if (!batch_offsets(s.da, s.ob, M * K, job.a_off) || !batch_offsets(s.db, s.ob, K * N, job.b_off) ||
      !batch_offsets(s.dea, s.ob, s.dea[rea - 2] * KB, job.ea_off) ||
      !batch_offsets(s.deb, s.ob, KB * s.deb[reb - 1], job.eb_off))
    return invalid("batch dims do not broadcast: a " + dims_str(s.da) + " b " + dims_str(s.db) + " ea " +
                   dims_str(s.dea) + " eb " + dims_str(s.deb) + " out " + dims_str(s.dout));
  static const int64_t kc_env = env_knob("JDFP_I8_KC_QUADS");
  const int64_t C = std::min(safe_chain_length(bits_a, bits_b), s.bk);
  plan_chains_i8(job, K, s.bk, KB, C, kc_env > 0 ? int32_t(kc_env) : ks.kc_quads);
  ProblemI8& P = job.P8;
  P.M = M; P.N = N; P.K = K; P.KB = KB; P.block_k = s.bk;
  P.qmax_a = qmax_of(bits_a); P.qmax_b = qmax_of(bits_b);
  P.a_sr = trans_a ? 1 : K; P.a_sk = trans_a ? M : 1;
  P.b_sr = trans_b ? K : 1; P.b_sk = trans_b ? 1 : N;
  P.ldc = N;
  P.job_id = next_job_id();
  P.a = static_cast<const int8_t*>(ops.a); P.b = static_cast<const int8_t*>(ops.b);
  P.ea = ops.ea; P.eb = ops.eb;
  P.out = ops.out;
  P.a_off = job.a_off.data(); P.b_off = job.b_off.data();
  P.ea_off = job.ea_off.data(); P.eb_off = job.eb_off.data();
  P.ea_mstride = s.dea[rea - 2] == 1 ? 0 : KB;
  P.eb_nstride = s.deb[reb - 1] == 1 ? 0 : 1;
  job.who = "gemm_i8";
  job.operand_type = "int8";
  job.bits_a = bits_a; job.bits_b = bits_b;
  return ffi::Error::Success();
}

// Whether every exponent pair of a KB > 1 problem scales exactly (fast_scale_block over all of ea
// and eb; a NONFINITE exponent fails it): what the AMX path's blocked accumulation needs.
void exponent_range(const int32_t* e, size_t n, int32_t& mn, int32_t& mx) {
  mn = 0, mx = 0;
  for (size_t i = 0; i < n; ++i) mn = std::min(mn, e[i]), mx = std::max(mx, e[i]);
}

bool exact_block_scales(ffi::Buffer<ffi::S32> ea, ffi::Buffer<ffi::S32> eb) {
  int32_t amn, amx, bmn, bmx;
  exponent_range(ea.typed_data(), ea.element_count(), amn, amx);
  exponent_range(eb.typed_data(), eb.element_count(), bmn, bmx);
  return fast_scale_block(amn, amx, bmn, bmx);
}

GemmOperands operands_of(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Buffer<ffi::S32> ea, ffi::Buffer<ffi::S32> eb,
                         float* out) {
  return GemmOperands{a.untyped_data(), b.untyped_data(), ea.typed_data(), eb.typed_data(), out, false, false};
}

ffi::Future gemm_i8_impl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Buffer<ffi::S32> ea,
                         ffi::Buffer<ffi::S32> eb, ffi::Result<ffi::Buffer<ffi::F32>> out, int32_t bits_a,
                         int32_t bits_b, int64_t block_k, bool trans_a, bool trans_b, int32_t isa) {
  if (ffi::Error e = check_i8_bits("bits_a", bits_a); e.failure()) return error_future(std::move(e));
  if (ffi::Error e = check_i8_bits("bits_b", bits_b); e.failure()) return error_future(std::move(e));
  const IsaKernels* unused = nullptr;
  if (ffi::Error e = select_isa("gemm_i8", isa, unused); e.failure()) return error_future(std::move(e));
  const I8KernelShape& ks = kI8Kernels[isa == kIsaAuto ? best_isa() : isa];
  if (a.element_type() != ffi::S8) return error_future(invalid("a must be int8"));
  if (b.element_type() != ffi::S8) return error_future(invalid("b must be int8"));
  ShapeI8 s;
  s.da = a.dimensions(); s.db = b.dimensions(); s.dea = ea.dimensions(); s.deb = eb.dimensions();
  s.dout = out->dimensions();
  if (ffi::Error e = read_shapes_i8(s, block_k, trans_a, trans_b); e.failure()) return error_future(std::move(e));
  auto job = std::make_shared<JobI8>();
  if (ffi::Error e = set_up_job_i8(*job, s, operands_of(a, b, ea, eb, out->typed_data()), bits_a, bits_b, trans_a,
                                     trans_b, ks); e.failure())
    return error_future(std::move(e));
  const JobI8* j = job.get();  // the workers hold the job alive
  TileI8Fn fn = ks.tile;
  int mr = ks.mr, nr = ks.nr;
#ifdef JDFP_HAVE_SIMD
  // isa="auto" on a CPU with AMX-INT8: tdpbssd on the tiles (kernel_amx_i8.cc), the same result
  // bit for bit; a named ISA keeps its kernel.
  if (isa == kIsaAuto && amx_int8_ready() &&
      amx_i8_fits(job->P8, job->P8.KB == 1 || exact_block_scales(ea, eb))) {
    fn = tile_amx_i8;
    mr = nr = job->P8.KB == 1 ? 32 : 16;
  }
#endif
  job->tile_fn = [j, fn](const Tile& t) { return fn(j->P8, t); };
  return launch_tiles(job, pool, mr, nr, int64_t(job->a_off.size()), s.M, s.N, s.K);
}

// ---------------------------------------------------------------- GEMM + col2im (col2im.h)
struct Col2imJobI8 : JobI8 {
  Col2im c2i;
  TileI8Fn tile = nullptr;
};

ffi::Future gemm_i8_col2im_impl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Buffer<ffi::S32> ea,
                                ffi::Buffer<ffi::S32> eb, ffi::Result<ffi::Buffer<ffi::F32>> dx, int32_t bits_a,
                                int32_t bits_b, int64_t block_k, bool trans_a, bool trans_b, int32_t isa,
                                ffi::Span<const int64_t> strides, ffi::Span<const int64_t> plo,
                                ffi::Span<const int64_t> phi, ffi::Span<const int64_t> ldil,
                                ffi::Span<const int64_t> rdil, ffi::Span<const int64_t> kernel_spatial) {
  auto bad = [](const std::string& m) { return error_future(invalid_as("gemm_i8_col2im", m)); };
  if (ffi::Error e = check_i8_bits("bits_a", bits_a); e.failure()) return error_future(std::move(e));
  if (ffi::Error e = check_i8_bits("bits_b", bits_b); e.failure()) return error_future(std::move(e));
  const IsaKernels* unused = nullptr;
  if (ffi::Error e = select_isa("gemm_i8_col2im", isa, unused); e.failure()) return error_future(std::move(e));
  const I8KernelShape& ks = kI8Kernels[isa == kIsaAuto ? best_isa() : isa];
  if (a.element_type() != ffi::S8) return bad("a must be int8");
  if (b.element_type() != ffi::S8) return bad("b must be int8");
  auto job = std::make_shared<Col2imJobI8>();
  Col2imJobI8& j = *job;
  std::string err;
  int64_t dp_dims[3];
  if (!j.c2i.init(dx->dimensions(), a.dimensions(), b.dimensions(), strides, plo, phi, ldil, rdil, kernel_spatial,
                  dp_dims, err))
    return bad(err);
  ShapeI8 s;
  s.da = a.dimensions(); s.db = b.dimensions(); s.dea = ea.dimensions(); s.deb = eb.dimensions();
  s.dout = ffi::Span<const int64_t>(dp_dims, 3);
  if (ffi::Error e = read_shapes_i8(s, block_k, trans_a, trans_b); e.failure())
    return bad(j.c2i.shape_error(dp_dims, dx->dimensions(), e));
  // set_up_job_i8 points the output at dx; each tile redirects it to its worker's buffer.
  if (ffi::Error e = set_up_job_i8(j, s, operands_of(a, b, ea, eb, dx->typed_data()), bits_a, bits_b, trans_a, trans_b,
                                     ks); e.failure())
    return error_future(std::move(e));
  j.who = "gemm_i8_col2im";
  j.tile = ks.tile;
  return launch_col2im(job, pool, dx->typed_data(), [](const Col2imJobI8& jj, float* out, const Tile& t) {
    ProblemI8 P = jj.P8;
    P.out = out;
    return jj.tile(P, t);
  });
}

// ---------------------------------------------------------------- conv weight gradient from x
// JdfpGemmI8PatchWgrad: gemm_ffi.cc's JdfpGemmI16PatchWgrad for formats of <= 8 bits on the INT8
// kernel (patch_source.h): bit for bit JdfpGemmI8 (transpose_a) on the int8 P that
// JdfpBlockQuantizePatches converts.
struct PatchWgradA8 final : I8RowSource {
  PatchTiles p;
  const int8_t* rows(const Tile& T, int64_t k0, int64_t k1, int64_t& sr, int64_t& sk) const override {
    sr = 1, sk = T.m1 - T.m0;
    return p.convert_rows<int8_t>(T, k0, k1);
  }
  const int32_t* exponents(const Tile& T) const override { return p.exponents(T); }
};

struct PatchWgradJobI8 : JobI8 {
  PatchWgradA8 src;
};

ffi::Future patch_wgrad_i8_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> e, ffi::AnyBuffer b,
                                ffi::Buffer<ffi::S32> eb, ffi::Result<ffi::Buffer<ffi::F32>> out, int32_t bits_a,
                                int32_t bits_b, int64_t block_k, ffi::Span<const int64_t> block, int32_t isa,
                                ffi::Span<const int64_t> strides, ffi::Span<const int64_t> plo,
                                ffi::Span<const int64_t> phi, ffi::Span<const int64_t> ldil,
                                ffi::Span<const int64_t> rdil, ffi::Span<const int64_t> kernel_spatial) {
  const char* who = "gemm_i8_patch_wgrad";
  auto bad = [who](const std::string& m) { return error_future(invalid_as(who, m)); };
  if (ffi::Error err = check_i8_bits("bits_a", bits_a); err.failure()) return error_future(std::move(err));
  if (ffi::Error err = check_i8_bits("bits_b", bits_b); err.failure()) return error_future(std::move(err));
  const IsaKernels* unused = nullptr;
  if (ffi::Error err = select_isa(who, isa, unused); err.failure()) return error_future(std::move(err));
  const int32_t run_isa = isa == kIsaAuto ? best_isa() : isa;
  const I8KernelShape& ks = kI8Kernels[run_isa];
  if (b.element_type() != ffi::S8) return bad("b must be int8");
  auto job = std::make_shared<PatchWgradJobI8>();
  PatchWgradA8& src = job->src;
  if (ffi::Error err = src.p.init(who, x, e, block, block_k, strides, plo, phi, ldil, rdil, kernel_spatial);
      err.failure())
    return error_future(std::move(err));
  ShapeI8 s;
  s.da = ffi::Span<const int64_t>(src.p.da, 3), s.dea = ffi::Span<const int64_t>(src.p.dea, 3);
  s.db = b.dimensions(), s.deb = eb.dimensions(), s.dout = out->dimensions();
  if (ffi::Error err = PatchTiles::check_operands(who, s.db, s.deb, s.dout); err.failure())
    return error_future(std::move(err));
  if (ffi::Error err = read_shapes_i8(s, block_k, true, false); err.failure()) return error_future(std::move(err));
  const GemmOperands ops{nullptr, b.untyped_data(), nullptr, eb.typed_data(), out->typed_data(), false, false};
  if (ffi::Error err = set_up_job_i8(*job, s, ops, bits_a, bits_b, true, false, ks); err.failure())
    return error_future(std::move(err));
  job->who = who;
  src.p.qm = float(job->P8.qmax_a);
  src.p.avx512 = run_isa == kIsaAvx512Vnni;
  job->P8.a_src = &src;
  const PatchWgradJobI8* j = job.get();  // the workers hold the job alive
  TileI8Fn fn = ks.tile;
  job->tile_fn = [j, fn](const Tile& t) { return fn(j->P8, t); };
  return launch_tiles(job, pool, ks.mr, ks.nr, 1, s.M, s.N, s.K);
}

struct RowGemmI8 : RowGemm {
  JobI8 job;
  TileI8Fn tile = nullptr;
  bool amx = false;           // isa "auto" on a CPU with AMX-INT8
  int32_t ebmn = 0, ebmx = 0;  // eb's exponent range (exact_block_scales)
  int run(int64_t r0, int64_t r1, const void* a, const int32_t* ea) const override {
    ProblemI8 P = job.P8;
    // Row r of A (and of its exponents) at the same offset as in a stored [M, K] matrix.
    P.a = static_cast<const int8_t*>(a) - r0 * P.K;
    P.ea = ea - r0 * P.KB;
    TileI8Fn fn = tile;
#ifdef JDFP_HAVE_SIMD
    if (amx) {  // as gemm_i8_impl, on these rows' exponents: the same result on either kernel
      int32_t amn, amx_e;
      exponent_range(ea, size_t((r1 - r0) * P.KB), amn, amx_e);
      if (amx_i8_fits(P, P.KB == 1 || fast_scale_block(amn, amx_e, ebmn, ebmx))) fn = tile_amx_i8;
    }
#endif
    return fn(P, Tile{0, r0, r1, 0, P.N});
  }
};

}  // namespace

ffi::Error make_row_gemm_i8(GemmShape& gs, int64_t block_k, const void* b, const int32_t* eb, float* out,
                            int32_t bits_a, int32_t bits_b, int32_t isa, std::unique_ptr<RowGemm>& gemm) {
  if (ffi::Error e = check_i8_bits("bits_a", bits_a); e.failure()) return e;
  if (ffi::Error e = check_i8_bits("bits_b", bits_b); e.failure()) return e;
  const IsaKernels* unused = nullptr;
  if (ffi::Error e = select_isa("gemm_i8", isa, unused); e.failure()) return e;
  const I8KernelShape& ks = kI8Kernels[isa == kIsaAuto ? best_isa() : isa];
  ShapeI8 s;
  s.da = gs.da; s.db = gs.db; s.dea = gs.dea; s.deb = gs.deb; s.dout = gs.dout;
  if (ffi::Error e = read_shapes_i8(s, block_k, false, false); e.failure()) return e;
  gs.M = s.M, gs.N = s.N, gs.K = s.K, gs.bk = s.bk, gs.KB = s.KB, gs.ob = s.ob;
  auto g = std::make_unique<RowGemmI8>();
  if (ffi::Error e = set_up_job_i8(g->job, s, GemmOperands{nullptr, b, nullptr, eb, out, false, false}, bits_a, bits_b,
                                   false, false, ks);
      e.failure())
    return e;
  g->tile = ks.tile;
#ifdef JDFP_HAVE_SIMD
  g->amx = isa == kIsaAuto && amx_int8_ready();
#endif
  exponent_range(eb, size_t(s.KB * s.deb[s.deb.size() - 1]), g->ebmn, g->ebmx);
  gemm = std::move(g);
  return ffi::Error::Success();
}

}  // namespace jdfp

JDFP_EXPORT XLA_FFI_Error* JdfpGemmI8(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpGemmI8Col2im(XLA_FFI_CallFrame*);

static ffi::Future gemm_i8(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Buffer<ffi::S32> ea,
                           ffi::Buffer<ffi::S32> eb, ffi::Result<ffi::Buffer<ffi::F32>> out, int32_t bits_a,
                           int32_t bits_b, int64_t block_k, bool trans_a, bool trans_b, int32_t isa) {
  return jdfp::gemm_i8_impl(pool, a, b, ea, eb, out, bits_a, bits_b, block_k, trans_a, trans_b, isa);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpGemmI8, gemm_i8, JDFP_GEMM_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpGemmI8Col2im, jdfp::gemm_i8_col2im_impl,
                              JDFP_GEMM_BINDING JDFP_CONV_SPATIAL_ATTRS.Attr<ffi::Span<const int64_t>>("kernel_spatial"));

JDFP_EXPORT XLA_FFI_Error* JdfpGemmI8PatchWgrad(XLA_FFI_CallFrame*);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpGemmI8PatchWgrad, jdfp::patch_wgrad_i8_impl, JDFP_PATCH_WGRAD_BINDING);
