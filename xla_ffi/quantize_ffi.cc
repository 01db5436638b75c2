// XLA FFI handler: float32 -> int16 conversion of a DFP tensor with one shared exponent.
//
//   JdfpQuantizeI16 : float32 x [...], int32 e (one element), uint32 key [2] -> int16 out [...]
//                     (exponent given)
//   JdfpQuantizeDfp : float32 x [...], uint32 key [2] -> int16 out [...], int32 e [1...]  (exponent
//                     from max |x|), int32 counts [4] (as JdfpQuantStats: counted while converting)
//   JdfpQuantizeDfpNoCount : the same without the counters (conversions nobody reads them of)
//   attrs of these three: bits, isa, rounding (0 nearest, 1 stochastic, 2 biased).  The key (the
//   Philox key of stochastic rounding, docs/arithmetic.md) is always an operand, traced data; the
//   other roundings ignore it (the Python side passes zeros), so one handler serves all three.
//   The values `out` of these three conversions may also be an int8 buffer for bits <= 8 (|q| <= 127,
//   exact): what the INT8 GEMM reads, with no int16 tensor for XLA to narrow in a second pass.
//   JdfpQuantStats  : float32 x [...], int16 q [...], int32 e (one element) -> int32 [4]
//                     (saturated, underflow, nonfinite, nonzero: how x fared in q, see below)
//   attrs: bits, isa
//   JdfpDfpExponents: float32 x_0 .. x_{n-1} -> int32 e_0 .. e_{n-1} (one element each): the exponent
//                     JdfpQuantizeDfp would give each x (attr bits: int32 [n]; isa), from one max|x|
//                     pass and no int16 copy; for ops whose GEMM quantizes float32 operands while
//                     packing (JdfpGemmQ), so a forward-only op is two calls, not three.
//
// out = clip(round(scale2(x, -e)), -qmax, qmax), NaN -> 0, all zeros when e is the NONFINITE
// sentinel, round = half to even / stochastic (Philox bits by element index) / biased: bit for bit
// what jdfp's pure-JAX `quantize_given_amax` gives for a per-tensor format (docs/arithmetic.md).
// XLA:CPU lowers that conversion to a slow scalar-ish loop (~1 GB/s here); this one is a
// vectorized pass split over XLA's intra-op pool.
// With a cross-replica max (`pmax`) or delayed scaling the exponent comes from XLA (JdfpQuantizeI16);
// otherwise one call finds max |x| (NaN/Inf -> the NONFINITE sentinel, subnormals read as zero)
// and converts, reading x twice but with no float temporary (XLA materializes |x| before its max).
//
// Flow: check the attributes and pick the ISA entry (check_attrs), check the buffers, build a
// QuantJob / StatsJob with the entry's kernels, run it on the caller and XLA's pool (launch_quant,
// launch_stats).  The kernels themselves live in quantize_{scalar,avx2,avx512}.cc.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <vector>

#include "ffi_helpers.h"

namespace jdfp {
namespace {

// Chunks of 64 Ki elements (256 KiB read): several per thread for balance, one when small.
constexpr int64_t kChunk = int64_t(1) << 16;

// Counts of a multi-threaded pass: every worker adds its own; the one that brings the finished
// chunks to the total writes them out (before anyone completes the op's promise with the last
// chunks, so the result is in place when the future resolves).
struct CountTotals {
  std::atomic<int64_t> finished{0}, sat{0}, under{0}, nonfin{0}, ok{0};
  void add(const Counts& c, int64_t done, int64_t nchunks, int32_t* out) {
    sat.fetch_add(c.sat, std::memory_order_relaxed);
    under.fetch_add(c.under, std::memory_order_relaxed);
    nonfin.fetch_add(c.nonfin, std::memory_order_relaxed);
    ok.fetch_add(c.ok, std::memory_order_relaxed);
    if (finished.fetch_add(done, std::memory_order_acq_rel) + done != nchunks) return;
    out[0] = int32_t(sat.load(std::memory_order_relaxed));
    out[1] = int32_t(under.load(std::memory_order_relaxed));
    out[2] = int32_t(nonfin.load(std::memory_order_relaxed));
    out[3] = int32_t(ok.load(std::memory_order_relaxed));
  }
};

// The DFP exponent of a tensor from its max bits (quantize.group_exponent): floor(log2 m) + 1 -
// (bits - 1) for finite m > 0; 0 (ZERO_EXPONENT) for an all-zero tensor; the sentinel for NaN/Inf.
int32_t dfp_exponent(uint32_t amax_bits, int bits) {
  if (amax_bits >= kInfBits) return kNonfiniteExponent;
  if (amax_bits == 0) return 0;
  const int32_t k = int32_t(amax_bits >> 23) - 126;  // m = f * 2**k, f in [0.5, 1); m is normal here
  return k - (bits - 1);
}

// The statistics arguments of x (quantized to q with exponent ei): scale2(., -e) as two exact
// power-of-two multiplies, as the conversion does.
StatsArgs stats_args(const float* x, const int16_t* q, int32_t ei, float qm) {
  const int32_t ne = -eclamp(ei);
  const int32_t e1 = clamp_i32(ne, -126, 127), e2 = clamp_i32(ne - e1, -126, 127);
  return StatsArgs{x, q, pow2f(e1), pow2f(e2), qm, ei != kNonfiniteExponent};
}

// One conversion: optional phase 1 (max |x| -> exponent, when the exponent is not given), then
// phase 2 (convert). Both phases split x into chunks grabbed from atomic counters by the calling
// thread and XLA's pool threads. The thread finishing the last phase-1 chunk sets the exponent and
// goes on to phase 2; others that run out of phase-1 chunks wait for that only briefly (bounded
// spin, then they leave), so no pool thread ever blocks on another. The promise counts phase-2
// chunks, so whoever is left finishes the job.
struct QuantJob {
  ConvertArgs args{};
  ConvertFn convert = nullptr;
  AmaxFn amax = nullptr;
  const float* x = nullptr;
  int32_t* e_out = nullptr;  // phase 1 writes the exponent here (null: exponent given)
  int8_t* out8 = nullptr;    // int8 result (then args.out is null): see convert_chunk_i8
  int bits = 0;
  int64_t n = 0, chunk = 0, nchunks = 0;
  std::atomic<int64_t> next1{0}, done1{0}, next2{0};
  std::atomic<uint32_t> amax_bits{0};
  std::atomic<bool> phase2_ready{false};
  // Optional statistics of the conversion (JdfpQuantizeDfp's third result): each converted chunk is
  // counted while it is still in L2, and whoever converts the last chunk writes the totals.
  int32_t* counts_out = nullptr;
  StatsArgs stats{};
  StatsFn stats_fn = nullptr;
  CountTotals totals;
  ffi::CountDownPromise done;
};

void set_exponent(QuantJob& j, int32_t ei) {
  j.stats = stats_args(j.args.x, j.args.out, ei, j.args.qm);
  // A non-finite tensor converts to zeros: x * 0 is 0 or NaN, and NaN converts to 0.
  j.args.s1 = ei == kNonfiniteExponent ? 0.0f : j.stats.p1;
  j.args.s2 = j.stats.p2;
}

// Phase 1 (max |x|) for as long as there are chunks.  Returns true when this thread may go on to
// phase 2: it set the exponent itself, or saw it set within a bounded spin.
bool amax_phase(QuantJob& j) {
  bool go = false;
  for (;;) {
    const int64_t c = j.next1.fetch_add(1, std::memory_order_relaxed);
    if (c >= j.nchunks) break;
    const int64_t b = c * j.chunk;
    const uint32_t m = j.amax(j.x, b, std::min(j.n, b + j.chunk));
    uint32_t cur = j.amax_bits.load(std::memory_order_relaxed);
    while (m > cur && !j.amax_bits.compare_exchange_weak(cur, m, std::memory_order_relaxed)) {
    }
    if (j.done1.fetch_add(1, std::memory_order_acq_rel) + 1 == j.nchunks) {
      const int32_t ei = dfp_exponent(j.amax_bits.load(std::memory_order_relaxed), j.bits);
      *j.e_out = ei;
      set_exponent(j, ei);
      j.phase2_ready.store(true, std::memory_order_release);
      go = true;
    }
  }
  // Bounded wait for the exponent (~tens of microseconds); leaving is always safe.
  for (int spin = 0; !go && spin < 20000; ++spin) {
    if (j.phase2_ready.load(std::memory_order_acquire)) go = true;
    else spin_pause();
  }
  return go;
}

// int8 result: segment by segment into the thread's int16 scratch (element i at scratch[i - s]),
// counted from there and narrowed while it is in L1; the same kernels, so the same values.
void convert_chunk_i8(const QuantJob& j, int64_t b, int64_t e, int16_t* scratch, Counts& cnt) {
  ConvertArgs a = j.args;
  StatsArgs st = j.stats;
  a.out = scratch;
  st.q = scratch;
  for (int64_t s = b; s < e; s += kNarrowSegment) {  // s stays a multiple of 4: Philox block aligned
    const int64_t se = std::min(e, s + kNarrowSegment);
    a.out_index0 = st.q_index0 = s;
    j.convert(a, s, se);
    if (j.counts_out) j.stats_fn(st, s, se, cnt);
    narrow_to_i8(scratch, j.out8 + s, se - s);
  }
}

void quant_worker(const std::shared_ptr<QuantJob>& job) {
  QuantJob& j = *job;
  int64_t done = 0;
  Counts cnt;
  {
    const WorkerFpEnv fp_env;
    alignas(64) int16_t scratch[kNarrowSegment];  // int8 results only
    const bool go = j.e_out == nullptr || amax_phase(j);
    while (go) {
      const int64_t c = j.next2.fetch_add(1, std::memory_order_relaxed);
      if (c >= j.nchunks) break;
      const int64_t b = c * j.chunk, e = std::min(j.n, b + j.chunk);
      if (j.out8) {
        convert_chunk_i8(j, b, e, scratch, cnt);
      } else {
        j.convert(j.args, b, e);
        if (j.counts_out) j.stats_fn(j.stats, b, e, cnt);
      }
      ++done;
    }
  }
  if (!done) return;
  if (j.counts_out) j.totals.add(cnt, done, j.nchunks, j.counts_out);
  j.done.CountDown(size_t(done));
}

// bits, then isa (-> its table entry): the order in which the handlers report them.
ffi::Error check_attrs(const char* who, int32_t bits, int32_t isa, const IsaKernels*& kernels) {
  if (ffi::Error e = check_bits(who, "bits", bits); e.failure()) return e;
  return select_isa(who, isa, kernels);
}

// The conversion kernel of a rounding attribute, and the key operand (uint32 [2]) read into `k`.
ffi::Error select_convert(const IsaKernels& isa, int32_t rounding, ffi::AnyBuffer key, ConvertFn& fn,
                          PhiloxKey& k) {
  if (rounding == kRoundNearest) fn = isa.convert;
  else if (rounding == kRoundStochastic) fn = isa.convert_stochastic;
  else if (rounding == kRoundBiased) fn = isa.convert_biased;
  else return invalid_as("quantize", "rounding must be 0 (nearest), 1 (stochastic) or 2 (biased), got " +
                                         std::to_string(rounding));
  if (key.element_type() != ffi::U32 || key.element_count() != 2)
    return invalid_as("quantize", "key must be uint32 [2] (the Philox key), got " + dims_str(key.dimensions()));
  uint32_t words[2];
  std::memcpy(words, key.untyped_data(), 8);
  k = PhiloxKey{words[0], words[1]};
  return ffi::Error::Success();
}

// x float32 and out int16 (or int8 for bits <= 8) of x's shape.
ffi::Error check_convert_buffers(ffi::AnyBuffer x, ffi::AnyBuffer out, int32_t bits) {
  auto bad = [](const std::string& m) { return invalid_as("quantize", m); };
  if (x.element_type() != ffi::F32) return bad("x must be float32");
  if (out.element_type() != ffi::S16 && out.element_type() != ffi::S8) return bad("out must be int16 or int8");
  if (out.element_type() == ffi::S8 && bits > 8)
    return bad("out may be int8 only for bits <= 8 (|q| <= 127), got bits " + std::to_string(bits));
  const auto dx = x.dimensions(), dout = out.dimensions();
  if (dx.size() != dout.size() || !std::equal(dx.begin(), dx.end(), dout.begin()))
    return bad("out must have x's shape " + dims_str(dx) + ", got " + dims_str(dout));
  return ffi::Error::Success();
}

std::shared_ptr<QuantJob> new_quant_job(ffi::AnyBuffer x, ffi::AnyBuffer out, int32_t bits) {
  auto job = std::make_shared<QuantJob>();
  const bool i8 = out.element_type() == ffi::S8;
  job->args = ConvertArgs{static_cast<const float*>(x.untyped_data()),
                          i8 ? nullptr : static_cast<int16_t*>(out.untyped_data()), 0.0f, 0.0f, float(qmax_of(bits)),
                          PhiloxKey{0, 0}};
  job->out8 = i8 ? static_cast<int8_t*>(out.untyped_data()) : nullptr;
  job->x = job->args.x;
  job->bits = bits;
  job->n = int64_t(x.element_count());
  return job;
}

// `convert` and args.key are set (select_convert); the rest of the entry's kernels come from `isa`.
ffi::Future launch_quant(const std::shared_ptr<QuantJob>& job, ffi::ThreadPool pool, const IsaKernels& isa) {
  QuantJob& j = *job;
  j.amax = isa.amax;
  j.stats_fn = isa.stats;
  j.chunk = kChunk;
  j.nchunks = std::max<int64_t>(1, (j.n + j.chunk - 1) / j.chunk);
  const int64_t nthreads = std::min(pool_workers(pool), j.nchunks);
  j.done = ffi::CountDownPromise(size_t(j.nchunks));
  ffi::Future fut(j.done);
  for (int64_t w = 1; w < nthreads; ++w) pool.Schedule([job]() { quant_worker(job); });
  quant_worker(job);  // the calling thread always completes both phases if nobody else shows up
  return fut;
}

// Exponent given (e.g. after a cross-replica max): convert only.
ffi::Future quantize_given_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer e, ffi::AnyBuffer key,
                                ffi::Result<ffi::AnyBuffer> out, int32_t bits, int32_t isa, int32_t rounding) {
  const IsaKernels* kernels = nullptr;
  ConvertFn convert = nullptr;
  PhiloxKey k{};
  if (ffi::Error err = check_attrs("quantize", bits, isa, kernels); err.failure()) return error_future(std::move(err));
  if (ffi::Error err = select_convert(*kernels, rounding, key, convert, k); err.failure())
    return error_future(std::move(err));
  if (ffi::Error err = check_convert_buffers(x, *out, bits); err.failure()) return error_future(std::move(err));
  if (e.element_type() != ffi::S32) return error_future(invalid_as("quantize", "e must be int32"));
  if (e.element_count() != 1)
    return error_future(invalid_as("quantize", "e must hold one exponent (per-tensor format), got " +
                                                  dims_str(e.dimensions())));
  auto job = new_quant_job(x, *out, bits);
  job->convert = convert;
  job->args.key = k;
  int32_t ei;
  std::memcpy(&ei, e.untyped_data(), 4);
  set_exponent(*job, ei);
  return launch_quant(job, pool, *kernels);
}

// Exponent from the tensor's own max (per-tensor DFP): one call, x read twice.  `counts` null: no
// counters (JdfpQuantizeDfpNoCount, for conversions whose counters nobody reads).
ffi::Future quantize_dfp_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer key,
                              ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> e, ffi::AnyBuffer* counts,
                              int32_t bits, int32_t isa, int32_t rounding) {
  const IsaKernels* kernels = nullptr;
  ConvertFn convert = nullptr;
  PhiloxKey k{};
  if (ffi::Error err = check_attrs("quantize", bits, isa, kernels); err.failure()) return error_future(std::move(err));
  if (ffi::Error err = select_convert(*kernels, rounding, key, convert, k); err.failure())
    return error_future(std::move(err));
  if (ffi::Error err = check_convert_buffers(x, *out, bits); err.failure()) return error_future(std::move(err));
  if (e->element_type() != ffi::S32 || e->element_count() != 1)
    return error_future(invalid_as("quantize", "e (result) must be one int32"));
  if (counts && (counts->element_type() != ffi::S32 || counts->element_count() != 4))
    return error_future(invalid_as("quantize", "counts (result) must be int32 [4]"));
  if (counts && x.element_count() > size_t(2147483647))
    return error_future(invalid_as("quantize", "x has more than 2**31 - 1 elements (int32 counts)"));
  auto job = new_quant_job(x, *out, bits);
  job->convert = convert;
  job->args.key = k;
  job->e_out = static_cast<int32_t*>(e->untyped_data());
  job->counts_out = counts ? static_cast<int32_t*>(counts->untyped_data()) : nullptr;
  return launch_quant(job, pool, *kernels);
}

// Statistics: chunks grabbed by the calling thread and XLA's pool threads; each adds its counts,
// and whoever finishes the last chunk writes them (the promise counts chunks, so the write lands
// before the future completes).
struct StatsJob {
  StatsArgs args{};
  StatsFn fn = nullptr;
  int32_t* out = nullptr;
  int64_t n = 0, chunk = 0, nchunks = 0;
  std::atomic<int64_t> next{0};
  CountTotals totals;
  ffi::CountDownPromise done;
};

void stats_worker(const std::shared_ptr<StatsJob>& job) {
  StatsJob& j = *job;
  Counts c;
  int64_t done = 0;
  {
    const WorkerFpEnv fp_env;  // DAZ, as XLA:CPU computes role_stats
    for (;;) {
      const int64_t k = j.next.fetch_add(1, std::memory_order_relaxed);
      if (k >= j.nchunks) break;
      const int64_t b = k * j.chunk;
      j.fn(j.args, b, std::min(j.n, b + j.chunk), c);
      ++done;
    }
  }
  if (!done) return;
  j.totals.add(c, done, j.nchunks, j.out);
  j.done.CountDown(size_t(done));
}

ffi::Future launch_stats(const std::shared_ptr<StatsJob>& job, ffi::ThreadPool pool) {
  job->chunk = kChunk;
  job->nchunks = std::max<int64_t>(1, (job->n + job->chunk - 1) / job->chunk);
  const int64_t nthreads = std::min(pool_workers(pool), job->nchunks);
  job->done = ffi::CountDownPromise(size_t(job->nchunks));
  ffi::Future fut(job->done);
  for (int64_t w = 1; w < nthreads; ++w) pool.Schedule([job]() { stats_worker(job); });
  stats_worker(job);  // the calling thread finishes every chunk if nobody else shows up
  return fut;
}

// x float32, q int16 of x's shape, e one int32, out int32 [4].
ffi::Error check_stats_buffers(ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::AnyBuffer e, ffi::AnyBuffer out) {
  auto bad = [](const std::string& m) { return invalid_as("quant_stats", m); };
  if (x.element_type() != ffi::F32) return bad("x must be float32");
  if (q.element_type() != ffi::S16) return bad("q must be int16");
  if (e.element_type() != ffi::S32 || e.element_count() != 1) return bad("e must be one int32 (per-tensor exponent)");
  if (out.element_type() != ffi::S32 || out.element_count() != 4) return bad("out must be int32 [4]");
  const auto dx = x.dimensions(), dq = q.dimensions();
  if (dx.size() != dq.size() || !std::equal(dx.begin(), dx.end(), dq.begin()))
    return bad("q must have x's shape " + dims_str(dx) + ", got " + dims_str(dq));
  if (int64_t(x.element_count()) > int64_t(2147483647)) return bad("x has more than 2**31 - 1 elements (int32 counts)");
  return ffi::Error::Success();
}

ffi::Future quant_stats_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::AnyBuffer e,
                             ffi::Result<ffi::AnyBuffer> out, int32_t bits, int32_t isa) {
  const IsaKernels* kernels = nullptr;
  if (ffi::Error err = check_attrs("quant_stats", bits, isa, kernels); err.failure())
    return error_future(std::move(err));
  if (ffi::Error err = check_stats_buffers(x, q, e, *out); err.failure()) return error_future(std::move(err));
  auto job = std::make_shared<StatsJob>();
  int32_t ei;
  std::memcpy(&ei, e.untyped_data(), 4);
  job->args = stats_args(static_cast<const float*>(x.untyped_data()), static_cast<const int16_t*>(q.untyped_data()),
                         ei, float(qmax_of(bits)));
  job->fn = kernels->stats;
  job->out = static_cast<int32_t*>(out->untyped_data());
  job->n = int64_t(x.element_count());
  return launch_stats(job, pool);
}

// Exponents only (JdfpDfpExponents): the chunks of every input, grabbed by the calling thread and
// XLA's pool threads; whoever finishes a tensor's last chunk writes its exponent (before counting
// the chunk down, so every exponent is in place when the future completes).
struct ExpJob {
  AmaxFn amax = nullptr;
  std::vector<const float*> x;
  std::vector<int32_t*> e;
  std::vector<int32_t> bits;
  std::vector<int64_t> n, first;  // elements, first global chunk of each tensor
  std::unique_ptr<std::atomic<uint32_t>[]> amax_bits;
  std::unique_ptr<std::atomic<int64_t>[]> left;  // chunks of each tensor not yet done
  int64_t nchunks = 0;
  std::atomic<int64_t> next{0};
  ffi::CountDownPromise done;
};

void exp_worker(const std::shared_ptr<ExpJob>& job) {
  ExpJob& j = *job;
  int64_t done = 0;
  {
    const WorkerFpEnv fp_env;
    for (;;) {
      const int64_t c = j.next.fetch_add(1, std::memory_order_relaxed);
      if (c >= j.nchunks) break;
      const size_t t = size_t(std::upper_bound(j.first.begin(), j.first.end(), c) - j.first.begin() - 1);
      const int64_t b = (c - j.first[t]) * kChunk;
      const uint32_t m = j.amax(j.x[t], b, std::min(j.n[t], b + kChunk));
      uint32_t cur = j.amax_bits[t].load(std::memory_order_relaxed);
      while (m > cur && !j.amax_bits[t].compare_exchange_weak(cur, m, std::memory_order_relaxed)) {
      }
      if (j.left[t].fetch_sub(1, std::memory_order_acq_rel) == 1)
        *j.e[t] = dfp_exponent(j.amax_bits[t].load(std::memory_order_relaxed), j.bits[t]);
      ++done;
    }
  }
  if (done) j.done.CountDown(size_t(done));
}

// Checks every input (float32) / result (one int32) / bits entry and fills the job's tensors.
ffi::Error set_up_exponents(ExpJob& j, ffi::RemainingArgs args, ffi::RemainingRets rets,
                            ffi::Span<const int32_t> bits) {
  auto bad = [](const std::string& m) { return invalid_as("dfp_exponents", m); };
  const size_t nt = args.size();
  if (nt == 0 || rets.size() != nt || bits.size() != nt)
    return bad("needs n >= 1 inputs, n results and n bits, got " + std::to_string(nt) + ", " +
               std::to_string(rets.size()) + ", " + std::to_string(bits.size()));
  j.amax_bits.reset(new std::atomic<uint32_t>[nt]);
  j.left.reset(new std::atomic<int64_t>[nt]);
  for (size_t t = 0; t < nt; ++t) {
    auto x = args.get<ffi::AnyBuffer>(t);
    auto e = rets.get<ffi::AnyBuffer>(t);
    if (x.has_error() || e.has_error()) return bad("bad buffer " + std::to_string(t));
    if (ffi::Error err = check_bits("dfp_exponents", "bits", bits[t]); err.failure()) return err;
    if (x->element_type() != ffi::F32) return bad("input " + std::to_string(t) + " must be float32");
    if ((*e)->element_type() != ffi::S32 || (*e)->element_count() != 1)
      return bad("result " + std::to_string(t) + " must be one int32");
    const int64_t n = int64_t(x->element_count()), nc = (n + kChunk - 1) / kChunk;
    j.x.push_back(static_cast<const float*>(x->untyped_data()));
    j.e.push_back(static_cast<int32_t*>((*e)->untyped_data()));
    j.bits.push_back(bits[t]);
    j.n.push_back(n);
    j.first.push_back(j.nchunks);
    j.amax_bits[t].store(0, std::memory_order_relaxed);
    j.left[t].store(nc, std::memory_order_relaxed);
    if (nc == 0) *j.e.back() = 0;  // an empty tensor: the all-zero exponent, as JdfpQuantizeDfp
    j.nchunks += nc;
  }
  return ffi::Error::Success();
}

ffi::Future dfp_exponents_impl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets,
                               ffi::Span<const int32_t> bits, int32_t isa) {
  const IsaKernels* kernels = nullptr;
  if (ffi::Error err = select_isa("dfp_exponents", isa, kernels); err.failure()) return error_future(std::move(err));
  auto job = std::make_shared<ExpJob>();
  if (ffi::Error err = set_up_exponents(*job, args, rets, bits); err.failure()) return error_future(std::move(err));
  job->amax = kernels->amax;
  // Pool threads only for more than one chunk's worth of elements in all (small tensors: inline).
  int64_t total = 0;
  for (int64_t n : job->n) total += n;
  const int64_t nthreads = std::min(pool_workers(pool), (total + kChunk - 1) / kChunk);
  job->done = ffi::CountDownPromise(size_t(std::max<int64_t>(job->nchunks, 1)));
  ffi::Future fut(job->done);
  for (int64_t w = 1; w < nthreads; ++w) pool.Schedule([job]() { exp_worker(job); });
  exp_worker(job);  // the calling thread finishes every chunk if nobody else shows up
  if (job->nchunks == 0) job->done.CountDown();
  return fut;
}

}  // namespace
}  // namespace jdfp

JDFP_EXPORT XLA_FFI_Error* JdfpQuantizeI16(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpDfpExponents(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpQuantizeDfp(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpQuantizeDfpNoCount(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpQuantStats(XLA_FFI_CallFrame*);

static ffi::Future quantize_i16(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer e, ffi::AnyBuffer key,
                                ffi::Result<ffi::AnyBuffer> out, int32_t bits, int32_t isa, int32_t rounding) {
  return jdfp::quantize_given_impl(pool, x, e, key, out, bits, isa, rounding);
}

static ffi::Future quantize_dfp(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer key,
                                ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> e,
                                ffi::Result<ffi::AnyBuffer> counts, int32_t bits, int32_t isa, int32_t rounding) {
  return jdfp::quantize_dfp_impl(pool, x, key, out, e, &*counts, bits, isa, rounding);
}

static ffi::Future quantize_dfp_nocount(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer key,
                                        ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> e, int32_t bits,
                                        int32_t isa, int32_t rounding) {
  return jdfp::quantize_dfp_impl(pool, x, key, out, e, nullptr, bits, isa, rounding);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpQuantizeI16, quantize_i16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("rounding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpQuantizeDfp, quantize_dfp,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("rounding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpQuantizeDfpNoCount, quantize_dfp_nocount,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("rounding"));

static ffi::Future quant_stats(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::AnyBuffer e,
                               ffi::Result<ffi::AnyBuffer> out, int32_t bits, int32_t isa) {
  return jdfp::quant_stats_impl(pool, x, q, e, out, bits, isa);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpQuantStats, quant_stats,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("isa"));

static ffi::Future dfp_exponents(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets,
                                 ffi::Span<const int32_t> bits, int32_t isa) {
  return jdfp::dfp_exponents_impl(pool, args, rets, bits, isa);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpDfpExponents, dfp_exponents,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int32_t>>("bits")
                                  .Attr<int32_t>("isa"));
