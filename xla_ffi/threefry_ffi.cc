// JdfpThreefryFoldIn: uint32 key [..., 2], uint32 data [...] (or one element) -> uint32 [..., 2]:
// `jax.random.fold_in` of each threefry key (Threefry-2x32, 20 rounds, of the counter (0, data)),
// bit for bit jdfp/_src/numerics/threefry.py.  Why a kernel for a few hundred scalar operations:
// the per-op key derivation of a quantized Flax model (jdfp/_src/flax/rng.py) unrolled in XLA costs
// ~15-20 ms of XLA:CPU compile time per op when the key is a step argument; as a custom call it
// costs a thunk (~1-2 us) per step and nothing to compile.
#include <cstdint>
#include <cstring>

#include "ffi_helpers.h"

namespace jdfp {
namespace {

inline uint32_t rotl(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

// Threefry-2x32 of the counter (x0, x1) under (k0, k1): key schedule (k0, k1, k0 ^ k1 ^ parity),
// rotations 13 15 26 6 / 17 29 16 24 alternating every four rounds, a key injection after each four.
void threefry2x32(uint32_t k0, uint32_t k1, uint32_t& x0, uint32_t& x1) {
  const uint32_t ks[3] = {k0, k1, k0 ^ k1 ^ 0x1BD11BDAu};
  static constexpr int kRot[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};
  x0 += ks[0];
  x1 += ks[1];
  for (int i = 0; i < 5; ++i) {
    for (int r : kRot[i % 2]) {
      x0 += x1;
      x1 = rotl(x1, r) ^ x0;
    }
    x0 += ks[(i + 1) % 3];
    x1 += ks[(i + 2) % 3] + uint32_t(i + 1);
  }
}

ffi::Error fold_in(ffi::AnyBuffer key, ffi::AnyBuffer data, ffi::Result<ffi::AnyBuffer> out) {
  const std::string who = "threefry_fold_in";
  if (key.element_type() != ffi::U32 || data.element_type() != ffi::U32 || out->element_type() != ffi::U32)
    return invalid_as(who, "key, data and the result must be uint32");
  const auto kd = key.dimensions();
  if (kd.size() == 0 || kd[kd.size() - 1] != 2)
    return invalid_as(who, "key must be uint32 [..., 2] threefry key data, got " + dims_str(kd));
  const int64_t n = int64_t(key.element_count()) / 2;
  const int64_t nd = int64_t(data.element_count());
  if (nd != n && nd != 1)
    return invalid_as(who, "data must have one element or one per key (" + std::to_string(n) + "), got " +
                               dims_str(data.dimensions()));
  if (int64_t(out->element_count()) != 2 * n) return invalid_as(who, "the result must have the key's shape");
  const uint32_t* k = static_cast<const uint32_t*>(key.untyped_data());
  const uint32_t* d = static_cast<const uint32_t*>(data.untyped_data());
  uint32_t* o = static_cast<uint32_t*>(out->untyped_data());
  for (int64_t i = 0; i < n; ++i) {
    uint32_t x0 = 0, x1 = d[nd == 1 ? 0 : i];
    threefry2x32(k[2 * i], k[2 * i + 1], x0, x1);
    o[2 * i] = x0;
    o[2 * i + 1] = x1;
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jdfp

JDFP_EXPORT XLA_FFI_Error* JdfpThreefryFoldIn(XLA_FFI_CallFrame*);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdfpThreefryFoldIn, jdfp::fold_in,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
