// XLA FFI handler of the BF16 GEMM (gemm_bf16.h; contract: docs/arithmetic.md, "BF16 GEMM").
//
//   JdfpGemmBf16 : a [..., M, K] (or [..., K, M] with transpose_a), b [..., K, N] (or [..., N, K]),
//                  each bfloat16 or float32 (rounded to bfloat16, nearest-even, while packing)
//                  -> float32 out [..., M, N]; batch dims broadcast (size 1 read with stride 0).
//   attributes: transpose_a, transpose_b (bool), isa (int32: 0 auto, 1 scalar, 2 avx512_bf16, 3 amx_bf16:
//                  the AMX-BF16 tiles of JdfpGemmF16 without its split, bfloat16 operands only; the tile
//                  unit's float32 sums, not the chain).
//
//   JdfpGemmF16  : the same shapes, layouts and attributes with float16 a and b (isa 0 only): the FP16
//                  recipe's GEMM on AMX-BF16 tiles (kernel_amx_f16.cc; every product exact, float32
//                  sums in the tile unit's order); an FFI error where the CPU has no AMX-BF16.
//
//   JdfpConvBf16 : the same chains on a convolution's patch matrix, gathered while packing (one group):
//                  forward          x [N, D, H, W, C], w [KD, KH, KW, C, O] -> y [N, OD, OH, OW, O]
//                                   = gemm(im2col(x) [pixels, (tap, c)], w [(tap, c), O]);
//                  weight-gradient  x, dy [N, OD, OH, OW, O] -> dw^T [O, KD, KH, KW, C]
//                                   = gemm(dy^T [O, pixels], im2col(x) [pixels, (tap, c)])
//                                   (the caller transposes this small tensor);
//                  bfloat16 operands, float32 out; attributes: the conv's spatial ones (conv_geometry.h),
//                  weight_gradient (bool), isa.  Backward-data is the forward on dy with the flipped,
//                  transposed kernel (the Python side sets it up, as for the INT16 conv).
//
//   JdfpConvF16  : the same convolutions with float16 operands on the FP16 GEMM's AMX-BF16 tiles (isa 0 only).
//
//   JdfpTranspose16 : x [..., R, C] of a 16-bit type -> [..., C, R], a physical copy.  XLA folds its own
//                  transposes into a dot's dimension numbers, and its bf16 dot runs on the AMX tiles
//                  only when the lhs contracts its last axis: a weight-gradient x^T . dy would be
//                  widened to an FP32 dot.  This copy is opaque to XLA (ops/gemm.py uses it there).
//
// Work is split into (batch, M, N) tiles that the calling thread and XLA's pool threads claim from
// one atomic counter; the returned future completes when the last tile is done (the promise counts
// tiles, so a pool thread that never starts owes nothing).  Every output element is one fixed chain
// over K whatever the tiling, so results do not depend on the thread count.
#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#include "conv_geometry.h"
#include "ffi_runtime.h"
#include "gemm_bf16.h"
#include "isa_table.h"

#if JDFP_X86
#include <cpuid.h>
#endif

namespace jdfp {
namespace {

using TileFnBf16 = void (*)(const Bf16Problem&, const Bf16Tile&);

enum Bf16Isa : int32_t { kBf16Auto = 0, kBf16Scalar = 1, kBf16Avx512 = 2, kBf16Amx = 3 };

// isa amx_bf16: the FP16 GEMM's AMX-BF16 tiles on plain bfloat16 operands (kernel_amx_f16.cc), the
// tile unit's float32 sums instead of the vdpbf16ps chain; an FFI error where the tiles are missing.
ffi::Error amx_plain_fn(const char* who, TileFnBf16& fn) {
  if (!amx_bf16_ready())
    return ffi::Error(ffi::ErrorCode::kUnimplemented,
                      std::string("jdfp ") + who + ": isa amx_bf16 needs AMX-BF16 tiles (cpuid, OS tile state, JDFP_AMX not 0)");
#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
  fn = f16_tile_amx;
#endif
  return ffi::Error::Success();
}

ffi::Error invalid(const std::string& msg) { return invalid_as("gemm_bf16", msg); }

// AVX512_BF16 (cpuid 7.1:EAX bit 5) on top of the AVX-512 VNNI entry's checks (AVX512F/BW/VL, OS
// saves zmm state).
bool detect_avx512_bf16() {
#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
  if (!(isa_mask() & (1 << kIsaAvx512Vnni))) return false;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || a < 1) return false;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return (a >> 5) & 1u;
#else
  return false;
#endif
}


struct Bf16Job {
  Bf16Problem P;
  std::shared_ptr<void> f16_panels;  // the FP16 GEMM's shared packed operands
  std::vector<int64_t> a_off, b_off;
  std::vector<Bf16Tile> tiles;
  TileFnBf16 fn = nullptr;
  std::atomic<int64_t> next{0};
  ffi::CountDownPromise done;
};

void run_worker(const std::shared_ptr<Bf16Job>& job) {
  int64_t n = 0;
  {
    const WorkerFpEnv fp_env;  // RNE for the scalar path's conversions
    for (;;) {
      const int64_t t = job->next.fetch_add(1, std::memory_order_relaxed);
      if (t >= int64_t(job->tiles.size())) break;
      job->fn(job->P, job->tiles[size_t(t)]);
      ++n;
    }
  }
  if (n) job->done.CountDown(size_t(n));
}

// Tiles of whole micro-panels: mu rows (14: the vdpbf16ps kernel's; 32: the FP16 tile kernel's) by
// multiples of 32 columns.
ffi::Future launch_bf16(const std::shared_ptr<Bf16Job>& job, ffi::ThreadPool pool, int64_t nbatch, int64_t mu = 14) {
  const Bf16Problem& P = job->P;
  const int64_t M = P.M, N = P.N;
  int64_t nthreads = pool_workers(pool);
  if (nbatch * M * N * std::max<int64_t>(P.K, 1) < (int64_t(1) << 20)) nthreads = 1;  // inline small work
  // JDFP_TILE_M / JDFP_TILE_N (benchmarking knobs, as for the INT16 GEMM) override the tile.
  static const int64_t tm_env = env_knob("JDFP_TILE_M"), tn_env = env_knob("JDFP_TILE_N");
  auto up = [](int64_t x, int64_t u) { return (x + u - 1) / u * u; };
  int64_t mb = tm_env > 0 ? up(tm_env, mu) : up(168, mu), nb = tn_env > 0 ? up(tn_env, 32) : 256;
  mb = std::min<int64_t>(mb, std::max<int64_t>(mu, up(M, mu)));  // no taller than the rows there are
  nb = std::min<int64_t>(nb, std::max<int64_t>(32, up(N, 32)));
  auto count = [&]() { return nbatch * ((M + mb - 1) / mb) * ((N + nb - 1) / nb); };
  // A deep GEMM (a conv's weight gradient: O x pixels x taps) one tile per worker, as the INT16
  // GEMM's (deep_split; the 64-channel CNN's 64 x 32768 x 576 ran 8.7-9.4 -> 7.1-7.6 ms).
  const bool deep = nthreads > 1 && tm_env <= 0 && tn_env <= 0 && count() < 4 * nthreads &&
                    deep_split(int(mu), 32, nthreads, nbatch, M, N, P.K, mb, nb);
  // Split the columns first while the rows are few (<= 5 micro-panels: a conv's weight-gradient has
  // O rows): every tile then holds all rows, and a worker packs them once for all its tiles.
  while (!deep && nthreads > 1 && count() < 4 * nthreads && (mb > 2 * mu || nb > 32)) {
    if (nb > 32 && (nb >= mb || mb <= 5 * mu)) nb = up(nb / 2, 32);
    else mb = std::max<int64_t>(mu, up(mb / 2, mu));
  }
  for (int64_t bi = 0; bi < nbatch; ++bi)
    for (int64_t n0 = 0; n0 < N; n0 += nb)
      for (int64_t m0 = 0; m0 < M; m0 += mb)
        job->tiles.push_back(Bf16Tile{bi, m0, std::min(m0 + mb, M), n0, std::min(n0 + nb, N)});
  const int64_t ntiles = int64_t(job->tiles.size());
  job->done = ffi::CountDownPromise(size_t(std::max<int64_t>(ntiles, 1)));
  ffi::Future fut(job->done);
  const int64_t nworkers = std::max<int64_t>(1, std::min(nthreads, ntiles));
  for (int64_t w = 1; w < nworkers; ++w) pool.Schedule([job]() { run_worker(job); });
  run_worker(job);
  if (ntiles == 0) job->done.CountDown();
  return fut;
}

// Shapes of a GEMM's operands (float16 ones for the FP16 GEMM, else bfloat16 / float32).
ffi::Error check_operands(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Span<const int64_t> dout, bool ta, bool tb,
                          Bf16Problem& P, std::vector<int64_t>& ob, bool f16 = false) {
  for (auto [name, x] : {std::pair<const char*, ffi::AnyBuffer*>{"a", &a}, {"b", &b}}) {
    const auto t = x->element_type();
    if (f16 && t != ffi::F16) return invalid_as("gemm_f16", std::string(name) + " must be float16");
    if (!f16 && t != ffi::BF16 && t != ffi::F32) return invalid(std::string(name) + " must be bfloat16 or float32");
    if (x->dimensions().size() < 2) return invalid(std::string(name) + " must have rank >= 2, got " +
                                                   dims_str(x->dimensions()));
  }
  if (dout.size() < 2) return invalid("out must have rank >= 2");
  const auto da = a.dimensions(), db = b.dimensions();
  const size_t ra = da.size(), rb = db.size(), ro = dout.size();
  P.M = ta ? da[ra - 1] : da[ra - 2];
  P.K = ta ? da[ra - 2] : da[ra - 1];
  const int64_t kb = tb ? db[rb - 1] : db[rb - 2];
  P.N = tb ? db[rb - 2] : db[rb - 1];
  if (P.K != kb) return invalid("contraction dims differ: a " + dims_str(da) + " b " + dims_str(db));
  if (dout[ro - 2] != P.M || dout[ro - 1] != P.N) return invalid("out must be [..., M, N], got " + dims_str(dout));
  ob.assign(dout.begin(), dout.end() - 2);
  for (size_t i = 0; i < ob.size(); ++i) {
    int64_t mx = 1;
    for (auto d : {da, db}) {
      const size_t nbd = d.size() - 2, back = ob.size() - i;
      if (back <= nbd) mx = std::max(mx, d[nbd - back]);
    }
    if (ob[i] != mx) return invalid("out batch dims " + dims_str(dout) + " are not the broadcast of the inputs'");
  }
  return ffi::Error::Success();
}

// The ISA attribute -> the tile function (the same rules as the GEMM).
ffi::Error bf16_tile_fn(int32_t isa, const char* who, TileFnBf16& fn) {
  static const bool has_bf16 = detect_avx512_bf16();
  if (isa < kBf16Auto || isa > kBf16Amx)
    return invalid_as(who, "isa must be 0 (auto), 1 (scalar), 2 (avx512_bf16) or 3 (amx_bf16), got " +
                               std::to_string(isa));
  if (isa == kBf16Amx) return amx_plain_fn(who, fn);
  if (isa == kBf16Avx512 && !has_bf16)
    return ffi::Error(ffi::ErrorCode::kUnimplemented,
                      std::string("jdfp ") + who + ": ISA avx512_bf16 is not supported by this CPU/OS (or not built)");
#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
  fn = (isa == kBf16Scalar || !has_bf16) ? bf16_tile_scalar : bf16_tile_avx512;
#else
  fn = bf16_tile_scalar;
#endif
  return ffi::Error::Success();
}

ffi::Future gemm_bf16_impl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                           ffi::Result<ffi::Buffer<ffi::F32>> out, bool ta, bool tb, int32_t isa, bool f16 = false) {
  auto job = std::make_shared<Bf16Job>();
  if (f16) {
    if (isa != 0) return error_future(invalid_as("gemm_f16", "isa must be 0 (auto: AMX-BF16 tiles), got " +
                                                              std::to_string(isa)));
    if (!amx_bf16_ready())
      return error_future(ffi::Error(ffi::ErrorCode::kUnimplemented,
                                     "jdfp gemm_f16: needs AMX-BF16 tiles (cpuid, OS tile state, JDFP_AMX not 0)"));
#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
    job->fn = f16_tile_amx;
#endif
  } else if (ffi::Error e = bf16_tile_fn(isa, "gemm_bf16", job->fn); e.failure()) {
    return error_future(std::move(e));
  }
  Bf16Problem& P = job->P;
  std::vector<int64_t> ob;
  if (ffi::Error e = check_operands(a, b, out->dimensions(), ta, tb, P, ob, f16); e.failure())
    return error_future(std::move(e));
  if (!batch_offsets(a.dimensions(), ob, P.M * P.K, job->a_off) ||
      !batch_offsets(b.dimensions(), ob, P.K * P.N, job->b_off))
    return error_future(invalid("batch dims do not broadcast: a " + dims_str(a.dimensions()) + " b " +
                                dims_str(b.dimensions()) + " out " + dims_str(out->dimensions())));
  P.a = a.untyped_data(); P.b = b.untyped_data(); P.out = out->typed_data();
  P.a_f32 = a.element_type() == ffi::F32; P.b_f32 = b.element_type() == ffi::F32;
  P.a_sm = ta ? 1 : P.K; P.a_sk = ta ? P.M : 1;
  P.b_sk = tb ? 1 : P.N; P.b_sn = tb ? P.K : 1;
  P.a_off = job->a_off.data(); P.b_off = job->b_off.data();
  P.job_id = next_job_id();
  P.amx_plain = !f16 && isa == kBf16Amx;
  if (P.amx_plain && (P.a_f32 || P.b_f32))
    return error_future(invalid("isa amx_bf16 takes bfloat16 operands (round float32 ones first)"));
  const bool tiles = f16 || P.amx_plain;
#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
  if (tiles) job->f16_panels = f16_make_panels(P, int64_t(job->a_off.size())), P.f16_panels = job->f16_panels.get();
#endif
  return launch_bf16(job, pool, int64_t(job->a_off.size()), tiles ? 32 : 14);
}

struct ConvBf16Job : Bf16Job {
  ConvGeom geom;
};

ffi::Future conv_bf16_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer b,
                           ffi::Result<ffi::Buffer<ffi::F32>> out, ffi::Span<const int64_t> strides,
                           ffi::Span<const int64_t> plo, ffi::Span<const int64_t> phi,
                           ffi::Span<const int64_t> ldil, ffi::Span<const int64_t> rdil, bool wgrad, int32_t isa,
                           bool f16 = false) {
  const char* who = f16 ? "conv_f16" : "conv_bf16";
  auto bad = [who](const std::string& m) { return error_future(invalid_as(who, m)); };
  auto job = std::make_shared<ConvBf16Job>();
  if (f16) {
    if (isa != 0) return bad("isa must be 0 (auto: AMX-BF16 tiles), got " + std::to_string(isa));
    if (!amx_bf16_ready())
      return error_future(ffi::Error(ffi::ErrorCode::kUnimplemented,
                                     "jdfp conv_f16: needs AMX-BF16 tiles (cpuid, OS tile state, JDFP_AMX not 0)"));
#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
    job->fn = f16_tile_amx;
#endif
  } else if (ffi::Error e = bf16_tile_fn(isa, "conv_bf16", job->fn); e.failure()) {
    return error_future(std::move(e));
  }
  ConvAttrs at{};
  std::string err;
  if (!read_attrs(strides, plo, phi, ldil, rdil, 1, at, err)) return bad(err);
  const char* bname = wgrad ? "dy" : "w";
  const auto want = f16 ? ffi::F16 : ffi::BF16;
  const std::string tname = f16 ? "float16" : "bfloat16";
  if (x.element_type() != want) return bad("x must be " + tname);
  if (b.element_type() != want) return bad(std::string(bname) + " must be " + tname);
  const auto dx = x.dimensions(), db = b.dimensions(), dout = out->dimensions();
  if (dx.size() != 5 || db.size() != 5 || dout.size() != 5)
    return bad(std::string("expected x [N, D, H, W, C], ") +
               (wgrad ? "dy [N, OD, OH, OW, O] and out [O, KD, KH, KW, C]" : "w [KD, KH, KW, C, O] and out [N, OD, OH, OW, O]") +
               "; got x " + dims_str(dx) + ", " + bname + " " + dims_str(db) + ", out " + dims_str(dout));
  // The kernel's dims [KD, KH, KW, C, O] from w, or from out = dw^T [O, KD, KH, KW, C].
  const int64_t kdims[5] = {wgrad ? dout[1] : db[0], wgrad ? dout[2] : db[1], wgrad ? dout[3] : db[2],
                            wgrad ? dout[4] : db[3], wgrad ? dout[0] : db[4]};
  ConvGeom& g = job->geom;
  set_conv_geom(g, dx, kdims, dx[4], at, wgrad);  // one group
  const int64_t O = kdims[4];
  const int64_t want_y[5] = {g.n, g.out[0], g.out[1], g.out[2], O};
  if (kdims[3] != g.C)
    return bad(std::string(wgrad ? "out must be [O, KD, KH, KW, C]" : "w must be [KD, KH, KW, C, O]") +
               " with C = x's channels " + std::to_string(g.C) + " (one group), got " +
               dims_str(wgrad ? dout : db));
  const auto dy = wgrad ? db : dout;  // output-shaped
  if (!std::equal(want_y, want_y + 5, dy.begin()))
    return bad(std::string(wgrad ? "dy" : "out") + " must be [N, OD, OH, OW, O] = " +
               dims_str(ffi::Span<const int64_t>(want_y, 5)) + " for these shapes and attributes, got " + dims_str(dy));
  Bf16Problem& P = job->P;
  const int64_t taps_c = g.ntaps * g.C;
  P.out = out->typed_data();
  if (wgrad) {  // dw^T = dy^T [O, pixels] . P [pixels, (tap, c)]: P's 32-row panels are whole taps' channel runs
    P.M = O; P.K = g.npix; P.N = taps_c;
    P.a = b.untyped_data(); P.b = x.untyped_data();
    P.a_sm = 1; P.a_sk = O;
  } else {  // y = P [pixels, (tap, c)] . w [(tap, c), O]
    P.M = g.npix; P.K = taps_c; P.N = O;
    P.a = x.untyped_data(); P.b = b.untyped_data();
    P.b_sk = O; P.b_sn = 1;
  }
  job->a_off.assign(1, 0);
  job->b_off.assign(1, 0);
  P.a_off = job->a_off.data(); P.b_off = job->b_off.data();
  P.conv = &g;
  P.job_id = next_job_id();
  P.amx_plain = !f16 && isa == kBf16Amx;
  const bool tiles = f16 || P.amx_plain;
#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
  if (tiles) job->f16_panels = f16_make_panels(P, 1), P.f16_panels = job->f16_panels.get();
#endif
  return launch_bf16(job, pool, 1, tiles ? 32 : 14);
}

}  // namespace

// The contract's chain, element by element (used for isa=scalar and where AVX512_BF16 is missing).
void bf16_tile_scalar(const Bf16Problem& P, const Bf16Tile& t) {
  const int64_t ab = P.a_off[t.batch], bb = P.b_off[t.batch];
  float* out = P.out + t.batch * P.M * P.N;
  // The conv's patch matrix P[pixel, (tap, c)] is A (forward) or B (weight-gradient, k = pixel).
  auto a_at = [&](int64_t m, int64_t k) -> uint16_t {
    if (!P.conv || P.conv->on_b) return bf16_at(P.a, P.a_f32, ab + m * P.a_sm + k * P.a_sk);
    return conv_patch_bf16(static_cast<const uint16_t*>(P.a) + ab, *P.conv, m, k);
  };
  auto b_at = [&](int64_t k, int64_t n) -> uint16_t {
    if (!P.conv || !P.conv->on_b) return bf16_at(P.b, P.b_f32, bb + k * P.b_sk + n * P.b_sn);
    return conv_patch_bf16(static_cast<const uint16_t*>(P.b) + bb, *P.conv, k, n);
  };
  for (int64_t m = t.m0; m < t.m1; ++m)
    for (int64_t n = t.n0; n < t.n1; ++n) {
      float acc = 0.0f;
      for (int64_t k = 0; k < P.K; k += 2) {
        const bool pair = k + 1 < P.K;
        const uint16_t a1 = pair ? a_at(m, k + 1) : 0;
        const uint16_t b1 = pair ? b_at(k + 1, n) : 0;
        acc = bf16_step(acc, a1, b1);
        acc = bf16_step(acc, a_at(m, k), b_at(k, n));
      }
      out[m * P.N + n] = acc;
    }
}

// 32 x 32 blocks: each block's rows and columns stay within a few cache lines.
ffi::Error transpose16_impl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out) {
  const auto d = x.dimensions();
  if (d.size() < 2) return invalid_as("transpose16", "x must have rank >= 2, got " + dims_str(d));
  if (ffi::ByteWidth(x.element_type()) != 2 || out->element_type() != x.element_type())
    return invalid_as("transpose16", "x and the result must have one 16-bit dtype");
  const int64_t R = d[d.size() - 2], C = d[d.size() - 1];
  const auto od = out->dimensions();
  bool same = od.size() == d.size() && od[d.size() - 2] == C && od[d.size() - 1] == R;
  for (size_t i = 0; same && i + 2 < d.size(); ++i) same = od[i] == d[i];
  if (!same) return invalid_as("transpose16", "result shape " + dims_str(od) + " is not x " + dims_str(d) +
                                                   " with its last two dims swapped");
  const int64_t B = (R > 0 && C > 0) ? int64_t(x.element_count()) / (R * C) : 0;
  const uint16_t* src = static_cast<const uint16_t*>(x.untyped_data());
  uint16_t* dst = static_cast<uint16_t*>(out->untyped_data());
  constexpr int64_t kBlk = 32;
  for (int64_t b = 0; b < B; ++b, src += R * C, dst += R * C)
    for (int64_t r0 = 0; r0 < R; r0 += kBlk)
      for (int64_t c0 = 0; c0 < C; c0 += kBlk) {
        const int64_t r1 = std::min(R, r0 + kBlk), c1 = std::min(C, c0 + kBlk);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = r0; r < r1; ++r) dst[c * R + r] = src[r * C + c];
      }
  return ffi::Error::Success();
}

}  // namespace jdfp

JDFP_EXPORT XLA_FFI_Error* JdfpTranspose16(XLA_FFI_CallFrame*);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpTranspose16, jdfp::transpose16_impl,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

// The bindings the 16-bit float GEMMs (bfloat16 / float16) and convolutions share.
#define JDFP_GEMM16_BINDING                                                                            \
  ffi::Ffi::Bind()                                                                                     \
      .Ctx<ffi::ThreadPool>()                                                                          \
      .Arg<ffi::AnyBuffer>()                                                                           \
      .Arg<ffi::AnyBuffer>()                                                                           \
      .Ret<ffi::Buffer<ffi::F32>>()                                                                    \
      .Attr<bool>("transpose_a")                                                                       \
      .Attr<bool>("transpose_b")                                                                       \
      .Attr<int32_t>("isa")
#define JDFP_CONV16_BINDING                                                                            \
  ffi::Ffi::Bind()                                                                                     \
      .Ctx<ffi::ThreadPool>()                                                                          \
      .Arg<ffi::AnyBuffer>()                                                                           \
      .Arg<ffi::AnyBuffer>()                                                                           \
      .Ret<ffi::Buffer<ffi::F32>>() JDFP_CONV_SPATIAL_ATTRS.Attr<bool>("weight_gradient").Attr<int32_t>("isa")

using ConvSpan = ffi::Span<const int64_t>;

JDFP_EXPORT XLA_FFI_Error* JdfpGemmBf16(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpGemmF16(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpConvBf16(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpConvF16(XLA_FFI_CallFrame*);

template <bool kF16>
static ffi::Future gemm16(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                          ffi::Result<ffi::Buffer<ffi::F32>> out, bool ta, bool tb, int32_t isa) {
  return jdfp::gemm_bf16_impl(pool, a, b, out, ta, tb, isa, kF16);
}

template <bool kF16>
static ffi::Future conv16(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer b, ffi::Result<ffi::Buffer<ffi::F32>> out,
                          ConvSpan strides, ConvSpan plo, ConvSpan phi, ConvSpan ldil, ConvSpan rdil, bool wgrad,
                          int32_t isa) {
  return jdfp::conv_bf16_impl(pool, x, b, out, strides, plo, phi, ldil, rdil, wgrad, isa, kF16);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpGemmBf16, gemm16<false>, JDFP_GEMM16_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpGemmF16, gemm16<true>, JDFP_GEMM16_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpConvBf16, conv16<false>, JDFP_CONV16_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpConvF16, conv16<true>, JDFP_CONV16_BINDING);

// 1 when the avx512_bf16 path can run here (the Python side's ISA query).
JDFP_EXPORT int jdfp_has_avx512_bf16() {
  static const bool has = jdfp::detect_avx512_bf16();
  return has ? 1 : 0;
}

// 1 when the CPU has AMX-BF16 (isa_table.h): the Python side then leaves BF16 dots to XLA.
JDFP_EXPORT int jdfp_has_amx_bf16() { return jdfp::has_amx_bf16() ? 1 : 0; }

// 1 when JdfpGemmF16 runs here (AMX-BF16 tiles granted to this process, JDFP_AMX not 0).
JDFP_EXPORT int jdfp_amx_bf16_ready() { return jdfp::amx_bf16_ready() ? 1 : 0; }
