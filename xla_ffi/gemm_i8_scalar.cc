// Portable scalar INT8 GEMM (no -m flags): the driver of gemm_i8_driver.h with one-lane "vectors"
// and plain int8 products (B unshifted, no compensation).  The fallback on CPUs without AVX2.
#include "gemm_i8_driver.h"

namespace jdfp {
namespace {

struct VI8Scalar {
  static constexpr int kLanes = 1;
  static constexpr bool kShiftB = false;
  using vi = int32_t;
  using vf = float;
  template <class T>
  static inline vi load(const T* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return v;
  }
  static inline void store(int32_t* p, vi v) { *p = v; }
  static inline vf loadf(const float* p) { return *p; }
  static inline void storef(float* p, vf v) { *p = v; }
  static inline vi zero() { return 0; }
  static inline vf zerof() { return 0.0f; }
  static inline vi bcast(int32_t x) { return x; }
  static inline vf bcastf(float x) { return x; }
  static inline vf cvt(vi x) { return float(x); }
  // Integer adds in uint32: the running sums wrap modulo 2**32 by design (no signed-overflow UB).
  static inline vi add(vi a, vi b) { return int32_t(uint32_t(a) + uint32_t(b)); }
  static inline vf addf(vf a, vf b) { return a + b; }
  static inline vf mulf(vf a, vf b) { return a * b; }
  static inline vf fmaf(vf a, vf b, vf c) { return a * b + c; }  // a * b exact where used
  static inline vi dp(vi acc, vi b, vi a) {
    uint32_t s = uint32_t(acc);
    for (int t = 0; t < 4; ++t) s += uint32_t(int32_t(int8_t(b >> (8 * t))) * int32_t(int8_t(a >> (8 * t))));
    return int32_t(s);
  }
  static inline vf scale2(vf x, vi e) { return jdfp::scale2(x, e); }
};

}  // namespace

int tile_i8_scalar(const ProblemI8& P, const Tile& T) {
  return tile_i8<VI8Scalar, UkI8<VI8Scalar, 4, 8, false>, UkI8<VI8Scalar, 4, 8, true>>(P, T);
}

}  // namespace jdfp
