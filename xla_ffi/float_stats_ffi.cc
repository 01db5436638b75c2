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
#include <cstring>
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

ffi::Error float_cast_stats_impl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> out,
                                 int32_t fmt, int32_t isa) {
  const std::string who = "float_cast_stats";
  const IsaKernels* kernels = nullptr;
  if (ffi::Error err = select_isa(who, isa, kernels); err.failure()) return err;
  if (fmt != 0 && fmt != 1) return invalid_as(who, "fmt must be 0 (float16) or 1 (bfloat16), got " + std::to_string(fmt));
  if (x.element_type() != ffi::DataType::F32) return invalid_as(who, "x must be float32");
  const ffi::DataType want = fmt == 0 ? ffi::DataType::F16 : ffi::DataType::BF16;
  if (q->element_type() != want) return invalid_as(who, "the cast result's dtype does not match fmt");
  if (q->element_count() != x.element_count()) return invalid_as(who, "the cast result must have x's size");
  if (out->element_type() != ffi::DataType::S32 || out->element_count() != 5)
    return invalid_as(who, "the counters result must be int32 [5]");
  FloatStats s;
  kernels->float_cast_stats(static_cast<const float*>(x.untyped_data()), static_cast<uint16_t*>(q->untyped_data()),
                            int64_t(x.element_count()), fmt == 1, s);
  const int32_t r[5] = {int32_t(s.amax), int32_t(s.amin), int32_t(s.sat), int32_t(s.under), int32_t(s.nonfin)};
  std::memcpy(out->untyped_data(), r, sizeof(r));
  return ffi::Error::Success();
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

static ffi::Error float_cast_stats(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> out,
                                   int32_t fmt, int32_t isa) {
  return jdfp::float_cast_stats_impl(x, q, out, fmt, isa);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpFloatCastStats, float_cast_stats,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("fmt")
                                  .Attr<int32_t>("isa"));
