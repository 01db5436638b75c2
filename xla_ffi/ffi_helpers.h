// Helpers shared by the three FFI handler TUs (gemm_ffi.cc, conv_ffi.cc, quantize_ffi.cc): the
// export macro, error values ("jdfp <who>: ..."), the bits / isa attribute checks, the pool-size
// and tuning knobs, and the FP environment every worker runs under.  Baseline flags only.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define JDFP_X86 1
#else
#define JDFP_X86 0
#endif

#include "isa_table.h"
#include "xla/ffi/api/ffi.h"

// Plain C symbols the Python side looks up by name (the library is built -fvisibility=hidden).
#define JDFP_EXPORT extern "C" __attribute__((visibility("default")))

namespace ffi = xla::ffi;

namespace jdfp {

// ---------------------------------------------------------------- errors
inline ffi::Error invalid_as(const std::string& who, const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jdfp " + who + ": " + msg);
}

// The handlers return futures; a failed check becomes an already-failed one.
inline ffi::Future error_future(ffi::Error e) {
  ffi::Promise p;
  ffi::Future f(p);
  p.SetError(std::move(e));
  return f;
}

inline std::string dims_str(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

// ---------------------------------------------------------------- attribute checks
// `name` (bits_a, bits_x, bits, ...) must be in [2, 16]: qmax = 2**(bits-1) - 1 fits int16.
inline ffi::Error check_bits(const std::string& who, const char* name, int32_t bits) {
  if (bits < 2 || bits > 16)
    return invalid_as(who, std::string(name) + " must be in [2, 16], got " + std::to_string(bits));
  return ffi::Error::Success();
}

// Each exponent block's integer sum is kept exactly in int64 (docs/arithmetic.md): a block of `len`
// products of at most qmax_a * qmax_b each must stay below 2**63 (at 16/16 bits: len <= 2**33).
inline ffi::Error check_block_sum_bound(const std::string& who, int64_t len, int32_t bits_a, int32_t bits_b) {
  const int64_t q = int64_t((int32_t(1) << (bits_a - 1)) - 1) * int64_t((int32_t(1) << (bits_b - 1)) - 1);
  if (q > 0 && len > INT64_MAX / q)
    return invalid_as(who, "a block of " + std::to_string(len) + " products could overflow its exact int64 sum "
                      "(at most " + std::to_string(INT64_MAX / q) + " for these bits)");
  return ffi::Error::Success();
}

// The `isa` attribute (an Isa value; kIsaAuto -> best_isa()) to its table entry, or the error: an
// out-of-range value is invalid, an ISA this CPU/OS (or build) cannot run is unimplemented.
inline ffi::Error select_isa(const std::string& who, int32_t isa, const IsaKernels*& kernels) {
  if (isa < 0 || isa > kIsaAvx512Vnni) return invalid_as(who, "isa must be 0..4, got " + std::to_string(isa));
  if (isa == kIsaAuto) isa = best_isa();
  if (!(isa_mask() & (1 << isa)))
    return ffi::Error(ffi::ErrorCode::kUnimplemented, "jdfp " + who + ": ISA " + isa_kernels(isa).name +
                                                          " is not supported by this CPU/OS (or not built)");
  kernels = &isa_kernels(isa);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- knobs
// Tuning knobs for benchmarking only (JDFP_KC_PAIRS, JDFP_TILE_M, JDFP_TILE_N, JDFP_THREADS);
// 0 = default.  Callers read each once into a function-local static.
inline int64_t env_knob(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::strtoll(v, nullptr, 10) : 0;
}

// Workers an op may use: XLA's intra-op pool size (the calling thread counts as one), capped by
// JDFP_THREADS when set.
inline int64_t pool_workers(ffi::ThreadPool pool) {
  static const int64_t threads_env = env_knob("JDFP_THREADS");
  int64_t nthreads = std::max<int64_t>(1, pool.num_threads());
  if (threads_env > 0) nthreads = std::min(nthreads, threads_env);
  return nthreads;
}

// ---------------------------------------------------------------- job ids
// A unique id for one kernel call, from one counter for every handler: the per-worker packed-panel
// caches (INT16 GEMM and conv share gemm_driver.h's, the BF16 GEMM and conv the BF16 tile's) are
// keyed by it, so two calls must never share an id (ffi_runtime.cc).
uint64_t next_job_id();

// ---------------------------------------------------------------- FP environment
// Every worker runs under round-to-nearest-even with FTZ + DAZ, which is what XLA:CPU runs its own
// float code with (so the pure-JAX reference and the kernels round and flush the same way; the
// SIMD conversions round with this mode).  Restores the caller's MXCSR on scope exit.
class WorkerFpEnv {
 public:
#if JDFP_X86
  WorkerFpEnv() : old_(_mm_getcsr()) { _mm_setcsr(0x1F80u | 0x8000u | 0x0040u); }
  ~WorkerFpEnv() { _mm_setcsr(old_); }

 private:
  unsigned old_;
#else
  WorkerFpEnv() {}
#endif
 public:
  WorkerFpEnv(const WorkerFpEnv&) = delete;
  WorkerFpEnv& operator=(const WorkerFpEnv&) = delete;
};

// Cheap pause inside a bounded spin-wait.
inline void spin_pause() {
#if JDFP_X86
  _mm_pause();
#endif
}

}  // namespace jdfp
