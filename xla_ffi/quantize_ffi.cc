// XLA FFI handler: float32 -> int16 conversion of a DFP tensor with one shared exponent.
//
//   JdfpQuantizeI16 : float32 x [...], int32 e (one element) -> int16 out [...]      (exponent given)
//   JdfpQuantizeDfp : float32 x [...] -> int16 out [...], int32 e [1...]  (exponent from max |x|),
//                     int32 counts [4] (as JdfpQuantStats: counted while converting)
//   JdfpQuantStats  : float32 x [...], int16 q [...], int32 e (one element) -> int32 [4]
//                     (saturated, underflow, nonfinite, nonzero: how x fared in q, see below)
//   attrs: bits, isa
//
// out = clip(round_half_even(scale2(x, -e)), -qmax, qmax), NaN -> 0, all zeros when e is the
// NONFINITE sentinel: bit for bit what jdfp's pure-JAX `quantize_given_amax` gives for a per-tensor
// format with nearest rounding (docs/arithmetic.md).  XLA:CPU lowers that conversion to a slow
// scalar-ish loop (~1 GB/s here); this one is a vectorized pass split over XLA's intra-op pool.
// With a cross-replica max (`pmax`) or delayed scaling the exponent comes from XLA (JdfpQuantizeI16);
// otherwise one call finds max |x| (NaN/Inf -> the NONFINITE sentinel, subnormals read as zero)
// and converts, reading x twice but with no float temporary (XLA materializes |x| before its max).
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "ffi_runtime.h"

#define JDFP_EXPORT extern "C" __attribute__((visibility("default")))

namespace jdfp {
namespace {

struct ConvertArgs {
  const float* x;
  int16_t* out;
  float s1, s2, qm;
};
using ConvertFn = void (*)(const ConvertArgs&, int64_t begin, int64_t end);

void convert_scalar(const ConvertArgs& a, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) a.out[i] = quantize1(a.x[i], a.s1, a.s2, a.qm);
}

#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
// Round with the MXCSR mode (round-to-nearest-even: set by the worker) after clamping to +-qmax, so
// the int32 -> int16 narrowing never saturates. NaN lanes are zeroed before the clamp.
__attribute__((target("avx2"))) void convert_avx2(const ConvertArgs& a, int64_t begin, int64_t end) {
  const __m256 s1 = _mm256_set1_ps(a.s1), s2 = _mm256_set1_ps(a.s2);
  const __m256 hi = _mm256_set1_ps(a.qm), lo = _mm256_set1_ps(-a.qm);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    __m256 y0 = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(a.x + i), s1), s2);
    __m256 y1 = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(a.x + i + 8), s1), s2);
    y0 = _mm256_and_ps(y0, _mm256_cmp_ps(y0, y0, _CMP_ORD_Q));
    y1 = _mm256_and_ps(y1, _mm256_cmp_ps(y1, y1, _CMP_ORD_Q));
    y0 = _mm256_min_ps(_mm256_max_ps(y0, lo), hi);
    y1 = _mm256_min_ps(_mm256_max_ps(y1, lo), hi);
    const __m256i p = _mm256_packs_epi32(_mm256_cvtps_epi32(y0), _mm256_cvtps_epi32(y1));
    // packs works per 128-bit lane: [a0..3 b0..3 | a4..7 b4..7] -> reorder the 64-bit quarters.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.out + i), _mm256_permute4x64_epi64(p, 0xD8));
  }
  convert_scalar(a, i, end);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline __m256i convert16_avx512(__m512 v, __m512 s1, __m512 s2,
                                                                                __m512 lo, __m512 hi) {
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(v, s1), s2);
  y = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y, y, _CMP_ORD_Q), y);
  y = _mm512_min_ps(_mm512_max_ps(y, lo), hi);
  return _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(y));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void convert_avx512(const ConvertArgs& a, int64_t begin,
                                                                 int64_t end) {
  const __m512 s1 = _mm512_set1_ps(a.s1), s2 = _mm512_set1_ps(a.s2);
  const __m512 hi = _mm512_set1_ps(a.qm), lo = _mm512_set1_ps(-a.qm);
  int64_t i = begin;
  for (; i + 32 <= end; i += 32) {
    const __m256i r0 = convert16_avx512(_mm512_loadu_ps(a.x + i), s1, s2, lo, hi), r1 = convert16_avx512(_mm512_loadu_ps(a.x + i + 16), s1, s2, lo, hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.out + i), r0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.out + i + 16), r1);
  }
  if (i < end) {  // masked tail: no scalar loop
    for (; i < end; i += 16) {
      const int rem = int(std::min<int64_t>(16, end - i));
      const __mmask16 m = __mmask16((1u << rem) - 1u);
      const __m256i r = convert16_avx512(_mm512_maskz_loadu_ps(m, a.x + i), s1, s2, lo, hi);
      _mm256_mask_storeu_epi16(a.out + i, m, r);
    }
  }
}
#endif

// max |x| as the bit pattern of a non-negative float (integer order == float order there):
// NaN patterns exceed Inf's, subnormals count as zero (DAZ, as XLA:CPU's own max reads them).
using AmaxFn = uint32_t (*)(const float* x, int64_t begin, int64_t end);
constexpr uint32_t kAbsMask = 0x7FFFFFFFu, kMinNormalBits = 0x00800000u, kInfBits = 0x7F800000u;

uint32_t amax_scalar(const float* x, int64_t begin, int64_t end) {
  uint32_t m = 0;
  for (int64_t i = begin; i < end; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    u &= kAbsMask;
    m = std::max(m, u < kMinNormalBits ? 0u : u);
  }
  return m;
}

#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
__attribute__((target("avx2"))) uint32_t amax_avx2(const float* x, int64_t begin, int64_t end) {
  const __m256i abs = _mm256_set1_epi32(int(kAbsMask)), tiny = _mm256_set1_epi32(int(kMinNormalBits));
  __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    __m256i u0 = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), abs);
    __m256i u1 = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 8)), abs);
    // Subnormals (0 < u < min normal) lose to any normal and are >= 0: only an all-subnormal
    // tensor could pick one; flush them (u < tiny -> 0) to keep DAZ semantics exactly.
    u0 = _mm256_andnot_si256(_mm256_cmpgt_epi32(tiny, u0), u0);
    u1 = _mm256_andnot_si256(_mm256_cmpgt_epi32(tiny, u1), u1);
    m0 = _mm256_max_epu32(m0, u0);
    m1 = _mm256_max_epu32(m1, u1);
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_max_epu32(m0, m1));
  uint32_t m = amax_scalar(x, i, end);
  for (uint32_t v : lanes) m = std::max(m, v);
  return m;
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) uint32_t amax_avx512(const float* x, int64_t begin,
                                                                          int64_t end) {
  const __m512i abs = _mm512_set1_epi32(int(kAbsMask)), tiny = _mm512_set1_epi32(int(kMinNormalBits));
  __m512i m0 = _mm512_setzero_si512(), m1 = _mm512_setzero_si512();
  int64_t i = begin;
  for (; i + 32 <= end; i += 32) {
    __m512i u0 = _mm512_and_si512(_mm512_loadu_si512(x + i), abs);
    __m512i u1 = _mm512_and_si512(_mm512_loadu_si512(x + i + 16), abs);
    u0 = _mm512_maskz_mov_epi32(_mm512_cmpge_epu32_mask(u0, tiny), u0);
    u1 = _mm512_maskz_mov_epi32(_mm512_cmpge_epu32_mask(u1, tiny), u1);
    m0 = _mm512_max_epu32(m0, u0);
    m1 = _mm512_max_epu32(m1, u1);
  }
  return std::max(uint32_t(_mm512_reduce_max_epu32(_mm512_max_epu32(m0, m1))), amax_scalar(x, i, end));
}
#endif

AmaxFn amax_fn(int isa) {
#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
  if (isa == kIsaAvx512Vnni) return amax_avx512;
  if (isa == kIsaAvx2 || isa == kIsaAvxVnni) return amax_avx2;
#endif
  return amax_scalar;
}

// ---------------------------------------------------------------- quantization statistics
// The Flax "dfp" collection's per-tensor counters (jdfp/_src/flax/core.py role_stats), in one pass
// over x and its int16 values q instead of several XLA reductions.  With ok = x finite, nonzero
// (subnormals read as zero: DAZ) and the exponent not the NONFINITE sentinel:
//   saturated = #(ok & scale2(|x|, -e) > qmax), underflow = #(ok & q == 0),
//   nonfinite = #(x is NaN/Inf), nonzero = #ok.
struct StatsArgs {
  const float* x;
  const int16_t* q;
  float p1, p2, qm;  // scale2(., -e) = (. * p1) * p2
  bool group_ok;     // e is not the sentinel
};
struct Counts {
  int64_t sat = 0, under = 0, nonfin = 0, ok = 0;
};
using StatsFn = void (*)(const StatsArgs&, int64_t begin, int64_t end, Counts&);

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

void stats_scalar(const StatsArgs& a, int64_t begin, int64_t end, Counts& c) {
  for (int64_t i = begin; i < end; ++i) {
    uint32_t u;
    std::memcpy(&u, a.x + i, 4);
    u &= kAbsMask;
    if (u >= kInfBits) {
      ++c.nonfin;
      continue;
    }
    if (u < kMinNormalBits || !a.group_ok) continue;
    ++c.ok;
    float ax;
    std::memcpy(&ax, &u, 4);
    c.sat += (ax * a.p1) * a.p2 > a.qm;
    c.under += a.q[i] == 0;
  }
}

#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
__attribute__((target("avx512f,avx512bw,avx512vl,popcnt"))) void stats_avx512(const StatsArgs& a, int64_t begin,
                                                                             int64_t end, Counts& c) {
  const __m512i abs = _mm512_set1_epi32(int(kAbsMask)), tiny = _mm512_set1_epi32(int(kMinNormalBits)),
                inf = _mm512_set1_epi32(int(kInfBits));
  const __m512 p1 = _mm512_set1_ps(a.p1), p2 = _mm512_set1_ps(a.p2), qm = _mm512_set1_ps(a.qm);
  const __mmask16 gok = a.group_ok ? __mmask16(0xFFFF) : __mmask16(0);
  int64_t sat = 0, under = 0, nonfin = 0, ok = 0;
  for (int64_t i = begin; i < end; i += 16) {
    const __mmask16 in = end - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (end - i)) - 1u);
    const __m512i u = _mm512_and_si512(_mm512_maskz_loadu_epi32(in, a.x + i), abs);
    const __mmask16 bad = _mm512_mask_cmpge_epu32_mask(in, u, inf);
    const __mmask16 good = _mm512_mask_cmplt_epu32_mask(gok & in, u, inf) & _mm512_cmpge_epu32_mask(u, tiny);
    const __m512 s = _mm512_mul_ps(_mm512_mul_ps(_mm512_castsi512_ps(u), p1), p2);
    const __m512i q = _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(in, a.q + i));
    nonfin += _mm_popcnt_u32(bad);
    ok += _mm_popcnt_u32(good);
    sat += _mm_popcnt_u32(_mm512_mask_cmp_ps_mask(good, s, qm, _CMP_GT_OQ));
    under += _mm_popcnt_u32(_mm512_mask_cmpeq_epi32_mask(good, q, _mm512_setzero_si512()));
  }
  c.sat += sat, c.under += under, c.nonfin += nonfin, c.ok += ok;
}
#endif

StatsFn stats_fn(int isa) {
#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
  if (isa == kIsaAvx512Vnni) return stats_avx512;
#endif
  return stats_scalar;  // AVX2 machines: GCC vectorizes this loop well enough for a statistics pass
}

// The DFP exponent of a tensor from its max bits (quantize.group_exponent): floor(log2 m) + 1 -
// (bits - 1) for finite m > 0; 0 (ZERO_EXPONENT) for an all-zero tensor; the sentinel for NaN/Inf.
int32_t dfp_exponent(uint32_t amax_bits, int bits) {
  if (amax_bits >= kInfBits) return kNonfiniteExponent;
  if (amax_bits == 0) return 0;
  const int32_t k = int32_t(amax_bits >> 23) - 126;  // m = f * 2**k, f in [0.5, 1); m is normal here
  return k - (bits - 1);
}

ConvertFn convert_fn(int isa) {
#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
  if (isa == kIsaAvx512Vnni) return convert_avx512;
  if (isa == kIsaAvx2 || isa == kIsaAvxVnni) return convert_avx2;
#endif
  return convert_scalar;
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
  const int32_t ne = -eclamp(ei);
  const int32_t e1 = clamp_i32(ne, -126, 127), e2 = clamp_i32(ne - e1, -126, 127);
  // A non-finite tensor converts to zeros: x * 0 is 0 or NaN, and NaN converts to 0.
  j.args.s1 = ei == kNonfiniteExponent ? 0.0f : pow2f(e1);
  j.args.s2 = pow2f(e2);
  j.stats = StatsArgs{j.args.x, j.args.out, pow2f(e1), pow2f(e2), j.args.qm, ei != kNonfiniteExponent};
}

void quant_worker(const std::shared_ptr<QuantJob>& job) {
#if JDFP_X86
  const unsigned old_csr = _mm_getcsr();
  _mm_setcsr(0x1F80u | 0x8000u | 0x0040u);  // RNE + FTZ + DAZ, as XLA:CPU and the GEMM workers
#endif
  QuantJob& j = *job;
  bool go = j.e_out == nullptr;
  if (!go) {
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
#if JDFP_X86
      else _mm_pause();
#endif
    }
  }
  int64_t done = 0;
  Counts cnt;
  if (go) {
    for (;;) {
      const int64_t c = j.next2.fetch_add(1, std::memory_order_relaxed);
      if (c >= j.nchunks) break;
      const int64_t b = c * j.chunk, e = std::min(j.n, b + j.chunk);
      j.convert(j.args, b, e);
      if (j.counts_out) j.stats_fn(j.stats, b, e, cnt);
      ++done;
    }
  }
#if JDFP_X86
  _mm_setcsr(old_csr);
#endif
  if (!done) return;
  if (j.counts_out) j.totals.add(cnt, done, j.nchunks, j.counts_out);
  j.done.CountDown(size_t(done));
}

ffi::Error check_common(int32_t bits, int32_t& isa, ffi::AnyBuffer x, ffi::AnyBuffer out) {
  auto bad = [](const std::string& m) { return invalid_as("quantize", m); };
  if (bits < 2 || bits > 16) return bad("bits must be in [2, 16], got " + std::to_string(bits));
  if (isa < 0 || isa > kIsaAvx512Vnni) return bad("isa must be 0..4, got " + std::to_string(isa));
  if (isa == kIsaAuto) isa = best_isa();
  if (!(isa_mask() & (1 << isa)))
    return ffi::Error(ffi::ErrorCode::kUnimplemented, "jdfp quantize: ISA " + std::string(isa_info(isa).name) +
                                                          " is not supported by this CPU/OS (or not built)");
  if (x.element_type() != ffi::F32) return bad("x must be float32");
  if (out.element_type() != ffi::S16) return bad("out must be int16");
  const auto dx = x.dimensions(), dout = out.dimensions();
  if (dx.size() != dout.size() || !std::equal(dx.begin(), dx.end(), dout.begin()))
    return bad("out must have x's shape " + dims_str(dx) + ", got " + dims_str(dout));
  return ffi::Error::Success();
}

ffi::Future launch_quant(const std::shared_ptr<QuantJob>& job, ffi::ThreadPool pool, int32_t isa) {
  QuantJob& j = *job;
  j.convert = convert_fn(isa);
  j.amax = amax_fn(isa);
  j.stats_fn = stats_fn(isa);
  // Chunks of 64 Ki elements (256 KiB read): several per thread for balance, inline when small.
  j.chunk = int64_t(1) << 16;
  j.nchunks = std::max<int64_t>(1, (j.n + j.chunk - 1) / j.chunk);
  static const int64_t threads_env = env_knob("JDFP_THREADS");
  int64_t nthreads = std::max<int64_t>(1, pool.num_threads());
  if (threads_env > 0) nthreads = std::min(nthreads, threads_env);
  nthreads = std::min(nthreads, j.nchunks);
  j.done = ffi::CountDownPromise(size_t(j.nchunks));
  ffi::Future fut(j.done);
  for (int64_t w = 1; w < nthreads; ++w) pool.Schedule([job]() { quant_worker(job); });
  quant_worker(job);  // the calling thread always completes both phases if nobody else shows up
  return fut;
}

// Exponent given (e.g. after a cross-replica max): convert only.
ffi::Future quantize_given_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer e,
                                ffi::Result<ffi::AnyBuffer> out, int32_t bits, int32_t isa) {
  if (ffi::Error err = check_common(bits, isa, x, *out); err.failure()) return error_future(std::move(err));
  if (e.element_type() != ffi::S32) return error_future(invalid_as("quantize", "e must be int32"));
  if (e.element_count() != 1)
    return error_future(invalid_as("quantize", "e must hold one exponent (per-tensor format), got " +
                                                  dims_str(e.dimensions())));
  auto job = std::make_shared<QuantJob>();
  int32_t ei;
  std::memcpy(&ei, e.untyped_data(), 4);
  job->args = ConvertArgs{static_cast<const float*>(x.untyped_data()), static_cast<int16_t*>(out->untyped_data()),
                          0.0f, 0.0f, float(qmax_of(bits))};
  set_exponent(*job, ei);
  job->x = job->args.x;
  job->bits = bits;
  job->n = int64_t(x.element_count());
  return launch_quant(job, pool, isa);
}

// Exponent from the tensor's own max (per-tensor DFP): one call, x read twice.
ffi::Future quantize_dfp_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out,
                              ffi::Result<ffi::AnyBuffer> e, ffi::Result<ffi::AnyBuffer> counts, int32_t bits,
                              int32_t isa) {
  if (ffi::Error err = check_common(bits, isa, x, *out); err.failure()) return error_future(std::move(err));
  if (e->element_type() != ffi::S32 || e->element_count() != 1)
    return error_future(invalid_as("quantize", "e (result) must be one int32"));
  if (counts->element_type() != ffi::S32 || counts->element_count() != 4)
    return error_future(invalid_as("quantize", "counts (result) must be int32 [4]"));
  if (x.element_count() > size_t(2147483647))
    return error_future(invalid_as("quantize", "x has more than 2**31 - 1 elements (int32 counts)"));
  auto job = std::make_shared<QuantJob>();
  job->args = ConvertArgs{static_cast<const float*>(x.untyped_data()), static_cast<int16_t*>(out->untyped_data()),
                          0.0f, 0.0f, float(qmax_of(bits))};
  job->x = job->args.x;
  job->e_out = static_cast<int32_t*>(e->untyped_data());
  job->counts_out = static_cast<int32_t*>(counts->untyped_data());
  job->bits = bits;
  job->n = int64_t(x.element_count());
  return launch_quant(job, pool, isa);
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
#if JDFP_X86
  const unsigned old_csr = _mm_getcsr();
  _mm_setcsr(0x1F80u | 0x8000u | 0x0040u);  // FTZ + DAZ, as XLA:CPU computes role_stats
#endif
  StatsJob& j = *job;
  Counts c;
  int64_t done = 0;
  for (;;) {
    const int64_t k = j.next.fetch_add(1, std::memory_order_relaxed);
    if (k >= j.nchunks) break;
    const int64_t b = k * j.chunk;
    j.fn(j.args, b, std::min(j.n, b + j.chunk), c);
    ++done;
  }
#if JDFP_X86
  _mm_setcsr(old_csr);
#endif
  if (!done) return;
  j.totals.add(c, done, j.nchunks, j.out);
  j.done.CountDown(size_t(done));
}

ffi::Future quant_stats_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::AnyBuffer e,
                             ffi::Result<ffi::AnyBuffer> out, int32_t bits, int32_t isa) {
  auto bad = [](const std::string& m) { return error_future(invalid_as("quant_stats", m)); };
  if (bits < 2 || bits > 16) return bad("bits must be in [2, 16], got " + std::to_string(bits));
  if (isa < 0 || isa > kIsaAvx512Vnni) return bad("isa must be 0..4, got " + std::to_string(isa));
  if (isa == kIsaAuto) isa = best_isa();
  if (!(isa_mask() & (1 << isa)))
    return error_future(ffi::Error(ffi::ErrorCode::kUnimplemented, "jdfp quant_stats: ISA " +
                                   std::string(isa_info(isa).name) + " is not supported by this CPU/OS (or not built)"));
  if (x.element_type() != ffi::F32) return bad("x must be float32");
  if (q.element_type() != ffi::S16) return bad("q must be int16");
  if (e.element_type() != ffi::S32 || e.element_count() != 1) return bad("e must be one int32 (per-tensor exponent)");
  if (out->element_type() != ffi::S32 || out->element_count() != 4) return bad("out must be int32 [4]");
  const auto dx = x.dimensions(), dq = q.dimensions();
  if (dx.size() != dq.size() || !std::equal(dx.begin(), dx.end(), dq.begin()))
    return bad("q must have x's shape " + dims_str(dx) + ", got " + dims_str(dq));
  const int64_t n = int64_t(x.element_count());
  if (n > int64_t(2147483647)) return bad("x has more than 2**31 - 1 elements (int32 counts)");
  auto job = std::make_shared<StatsJob>();
  int32_t ei;
  std::memcpy(&ei, e.untyped_data(), 4);
  const int32_t ne = -eclamp(ei);
  const int32_t e1 = clamp_i32(ne, -126, 127), e2 = clamp_i32(ne - e1, -126, 127);
  job->args = StatsArgs{static_cast<const float*>(x.untyped_data()), static_cast<const int16_t*>(q.untyped_data()),
                        pow2f(e1), pow2f(e2), float(qmax_of(bits)), ei != kNonfiniteExponent};
  job->fn = stats_fn(isa);
  job->out = static_cast<int32_t*>(out->untyped_data());
  job->n = n;
  job->chunk = int64_t(1) << 16;
  job->nchunks = std::max<int64_t>(1, (n + job->chunk - 1) / job->chunk);
  static const int64_t threads_env = env_knob("JDFP_THREADS");
  int64_t nthreads = std::max<int64_t>(1, pool.num_threads());
  if (threads_env > 0) nthreads = std::min(nthreads, threads_env);
  nthreads = std::min(nthreads, job->nchunks);
  job->done = ffi::CountDownPromise(size_t(job->nchunks));
  ffi::Future fut(job->done);
  for (int64_t w = 1; w < nthreads; ++w) pool.Schedule([job]() { stats_worker(job); });
  stats_worker(job);  // the calling thread finishes every chunk if nobody else shows up
  return fut;
}

}  // namespace
}  // namespace jdfp

JDFP_EXPORT XLA_FFI_Error* JdfpQuantizeI16(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpQuantizeDfp(XLA_FFI_CallFrame*);
JDFP_EXPORT XLA_FFI_Error* JdfpQuantStats(XLA_FFI_CallFrame*);

static ffi::Future quantize_i16(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer e,
                                ffi::Result<ffi::AnyBuffer> out, int32_t bits, int32_t isa) {
  return jdfp::quantize_given_impl(pool, x, e, out, bits, isa);
}

static ffi::Future quantize_dfp(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out,
                                ffi::Result<ffi::AnyBuffer> e, ffi::Result<ffi::AnyBuffer> counts, int32_t bits,
                                int32_t isa) {
  return jdfp::quantize_dfp_impl(pool, x, out, e, counts, bits, isa);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpQuantizeI16, quantize_i16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpQuantizeDfp, quantize_dfp,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("isa"));

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
