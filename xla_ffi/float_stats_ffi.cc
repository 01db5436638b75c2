// XLA FFI handler: the counters of an FP16 / BF16 cast (float_stats.h), for the Flax "dfp"
// collection of the mixed-precision recipes.
//
//   JdfpFloatStats : float32 x [...], q [...] (the cast: float16 / bfloat16, or its uint16 bit
//                    patterns) -> int32 [5]: amax bits, amin bits, saturated,
//                    underflow, nonfinite.   attrs: fmt (0: float16, 1: bfloat16), isa
//   JdfpFloatCastStats : float32 x [...] -> q [...] (float16 / bfloat16: x's cast, bit for bit XLA:CPU's
//                    convert), int32 [5] (the counters above).   attrs: fmt, isa
//                    One pass instead of XLA's cast plus JdfpFloatStats: the GEMM reads this q.
//
// One pass on the calling thread: the counters are read once per tensor per step, and a single
// core streams the 6 bytes per element faster than a pool dispatch pays off at these sizes.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <string>

#include "ffi_helpers.h"
#include "float_stats.h"

namespace jdfp {

void float_stats_scalar(const float* x, const uint16_t* q, int64_t n, uint16_t q_inf, FloatStats& s) {
  float_stats_ref(x, q, n, q_inf, s);
}

void float_cast_stats_scalar(const float* x, uint16_t* q, int64_t n, bool bf16, FloatStats& s) {
  float_cast_stats_ref(x, q, n, bf16, s);
}

namespace {

ffi::Error float_stats_impl(ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::Result<ffi::AnyBuffer> out, int32_t fmt,
                            int32_t isa) {
  const std::string who = "float_stats";
  const IsaKernels* kernels = nullptr;
  if (ffi::Error err = select_isa(who, isa, kernels); err.failure()) return err;
  if (fmt != 0 && fmt != 1) return invalid_as(who, "fmt must be 0 (float16) or 1 (bfloat16), got " + std::to_string(fmt));
  if (x.element_type() != ffi::DataType::F32) return invalid_as(who, "x must be float32");
  // q arrives as the cast itself (float16 / bfloat16: no bitcast op in the graph, which XLA:CPU ran as
  // a separate fusion recomputing the cast) or as its uint16 bit patterns.
  const ffi::DataType qt = q.element_type();
  if (qt != ffi::DataType::U16 && qt != ffi::DataType::F16 && qt != ffi::DataType::BF16)
    return invalid_as(who, "q must be float16, bfloat16 or uint16 (the cast or its bit patterns)");
  if ((qt == ffi::DataType::F16 && fmt != 0) || (qt == ffi::DataType::BF16 && fmt != 1))
    return invalid_as(who, "q's dtype does not match fmt");
  if (out->element_type() != ffi::DataType::S32 || out->element_count() != 5)
    return invalid_as(who, "the result must be int32 [5]");
  if (q.element_count() != x.element_count())
    return invalid_as(who, "q must have x's size " + std::to_string(x.element_count()) + ", got " +
                               std::to_string(q.element_count()));
  FloatStats s;
  kernels->float_stats(static_cast<const float*>(x.untyped_data()), static_cast<const uint16_t*>(q.untyped_data()),
                       int64_t(x.element_count()), fmt == 0 ? 0x7C00 : 0x7F80, s);
  const int32_t r[5] = {int32_t(s.amax), int32_t(s.amin), int32_t(s.sat), int32_t(s.under), int32_t(s.nonfin)};
  std::memcpy(out->untyped_data(), r, sizeof(r));
  return ffi::Error::Success();
}

// The cast sits on the GEMM's critical path (XLA's convert ran there on its pool), so large
// tensors are cut into chunks that the calling thread and XLA's pool threads take in turn; each
// chunk's counters are merged atomically and the last chunk writes the result.
constexpr int64_t kCastChunk = int64_t(1) << 16;

struct CastJob {
  const float* x = nullptr;
  uint16_t* q = nullptr;
  int32_t* out = nullptr;
  int64_t n = 0, nchunks = 0;
  bool bf16 = false;
  FloatCastStatsFn fn = nullptr;
  std::atomic<int64_t> next{0}, left{0}, sat{0}, under{0}, nonfin{0};
  std::atomic<uint32_t> amax{0}, amin{0x7F800000u};
  ffi::CountDownPromise done;
};

void cast_worker(const std::shared_ptr<CastJob>& job) {
  CastJob& j = *job;
  int64_t done = 0;
  for (;;) {
    const int64_t c = j.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= j.nchunks) break;
    const int64_t b = c * kCastChunk;
    FloatStats s;
    j.fn(j.x + b, j.q + b, std::min(kCastChunk, j.n - b), j.bf16, s);
    uint32_t cur = j.amax.load(std::memory_order_relaxed);
    while (s.amax > cur && !j.amax.compare_exchange_weak(cur, s.amax, std::memory_order_relaxed)) {
    }
    cur = j.amin.load(std::memory_order_relaxed);
    while (s.amin < cur && !j.amin.compare_exchange_weak(cur, s.amin, std::memory_order_relaxed)) {
    }
    j.sat.fetch_add(s.sat, std::memory_order_relaxed);
    j.under.fetch_add(s.under, std::memory_order_relaxed);
    j.nonfin.fetch_add(s.nonfin, std::memory_order_relaxed);
    if (j.left.fetch_sub(1, std::memory_order_acq_rel) == 1) {  // the last chunk: all merged
      const int32_t r[5] = {int32_t(j.amax.load()), int32_t(j.amin.load()), int32_t(j.sat.load()),
                            int32_t(j.under.load()), int32_t(j.nonfin.load())};
      std::memcpy(j.out, r, sizeof(r));
    }
    ++done;
  }
  if (done) j.done.CountDown(size_t(done));
}

ffi::Error check_cast(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer>& q, ffi::Result<ffi::AnyBuffer>& out, int32_t fmt) {
  const std::string who = "float_cast_stats";
  if (fmt != 0 && fmt != 1) return invalid_as(who, "fmt must be 0 (float16) or 1 (bfloat16), got " + std::to_string(fmt));
  if (x.element_type() != ffi::DataType::F32) return invalid_as(who, "x must be float32");
  const ffi::DataType want = fmt == 0 ? ffi::DataType::F16 : ffi::DataType::BF16;
  if (q->element_type() != want) return invalid_as(who, "the cast result's dtype does not match fmt");
  if (q->element_count() != x.element_count()) return invalid_as(who, "the cast result must have x's size");
  if (out->element_type() != ffi::DataType::S32 || out->element_count() != 5)
    return invalid_as(who, "the counters result must be int32 [5]");
  return ffi::Error::Success();
}

ffi::Future float_cast_stats_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                                  ffi::Result<ffi::AnyBuffer> out, int32_t fmt, int32_t isa) {
  const IsaKernels* kernels = nullptr;
  if (ffi::Error err = select_isa("float_cast_stats", isa, kernels); err.failure()) return error_future(std::move(err));
  if (ffi::Error err = check_cast(x, q, out, fmt); err.failure()) return error_future(std::move(err));
  auto job = std::make_shared<CastJob>();
  job->x = static_cast<const float*>(x.untyped_data());
  job->q = static_cast<uint16_t*>(q->untyped_data());
  job->out = static_cast<int32_t*>(out->untyped_data());
  job->n = int64_t(x.element_count());
  job->nchunks = (job->n + kCastChunk - 1) / kCastChunk;
  job->left.store(job->nchunks);
  job->bf16 = fmt == 1;
  job->fn = kernels->float_cast_stats;
  if (job->nchunks == 0) {  // nothing to cast: the empty counters
    const int32_t r[5] = {0, int32_t(0x7F800000), 0, 0, 0};
    std::memcpy(job->out, r, sizeof(r));
  }
  // Pool threads only for more than one chunk (small tensors: inline, no dispatch).
  const int64_t nthreads = std::min(pool_workers(pool), job->nchunks);
  job->done = ffi::CountDownPromise(size_t(std::max<int64_t>(job->nchunks, 1)));
  ffi::Future fut(job->done);
  for (int64_t w = 1; w < nthreads; ++w) pool.Schedule([job]() { cast_worker(job); });
  cast_worker(job);  // the calling thread finishes every chunk if nobody else shows up
  if (job->nchunks == 0) job->done.CountDown();
  return fut;
}

}  // namespace
}  // namespace jdfp

JDFP_EXPORT XLA_FFI_Error* JdfpFloatStats(XLA_FFI_CallFrame*);

static ffi::Error float_stats(ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::Result<ffi::AnyBuffer> out, int32_t fmt,
                              int32_t isa) {
  return jdfp::float_stats_impl(x, q, out, fmt, isa);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpFloatStats, float_stats,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("fmt")
                                  .Attr<int32_t>("isa"));

JDFP_EXPORT XLA_FFI_Error* JdfpFloatCastStats(XLA_FFI_CallFrame*);

static ffi::Future float_cast_stats(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                                    ffi::Result<ffi::AnyBuffer> out, int32_t fmt, int32_t isa) {
  return jdfp::float_cast_stats_impl(pool, x, q, out, fmt, isa);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpFloatCastStats, float_cast_stats,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("fmt")
                                  .Attr<int32_t>("isa"));
