// The ISA table (isa_table.h) and the one place that asks the CPU what it runs (cpuid + xgetbv).
// Compiled with baseline flags: it only takes the addresses of the per-ISA kernels.
#include "isa_table.h"

#include <cstdlib>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define JDFP_X86 1
#else
#define JDFP_X86 0
#endif

namespace jdfp {
namespace {

#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
#define JDFP_SIMD_ENTRY(fn) fn
#else
#define JDFP_SIMD_ENTRY(fn) nullptr  // not built: isa_mask() leaves the ISA out
#endif

// Indexed by Isa; entry 0 (kIsaAuto) is never returned.  The AVX2 and AVX-VNNI entries share the
// conversion kernels (VNNI adds nothing there) and use the scalar statistics (quantize_kernels.h).
const IsaKernels kTable[] = {
    /* kIsaAuto */ {"auto", nullptr, 0, 0, 0, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr},
    /* kIsaScalar */
    {"scalar", tile_scalar, 4, 8, 128, convert_scalar, amax_scalar, stats_scalar, convert_stochastic_scalar,
     convert_biased_scalar, float_stats_scalar, float_cast_stats_scalar},
    /* kIsaAvx2 */
    {"avx2", JDFP_SIMD_ENTRY(tile_avx2), 6, 16, 128, JDFP_SIMD_ENTRY(convert_avx2), JDFP_SIMD_ENTRY(amax_avx2),
     stats_scalar, JDFP_SIMD_ENTRY(convert_stochastic_avx2), JDFP_SIMD_ENTRY(convert_biased_avx2),
     JDFP_SIMD_ENTRY(float_stats_avx2), JDFP_SIMD_ENTRY(float_cast_stats_avx2)},
    /* kIsaAvxVnni */
    {"avx_vnni", JDFP_SIMD_ENTRY(tile_avxvnni), 6, 16, 128, JDFP_SIMD_ENTRY(convert_avx2),
     JDFP_SIMD_ENTRY(amax_avx2), stats_scalar, JDFP_SIMD_ENTRY(convert_stochastic_avx2),
     JDFP_SIMD_ENTRY(convert_biased_avx2), JDFP_SIMD_ENTRY(float_stats_avx2), JDFP_SIMD_ENTRY(float_cast_stats_avx2)},
    /* kIsaAvx512Vnni */
    {"avx512_vnni", JDFP_SIMD_ENTRY(tile_avx512vnni), 12, 32, 128, JDFP_SIMD_ENTRY(convert_avx512),
     JDFP_SIMD_ENTRY(amax_avx512), JDFP_SIMD_ENTRY(stats_avx512), JDFP_SIMD_ENTRY(convert_stochastic_avx512),
     JDFP_SIMD_ENTRY(convert_biased_avx512), JDFP_SIMD_ENTRY(float_stats_avx512), JDFP_SIMD_ENTRY(float_cast_stats_avx512)},
};
static_assert(sizeof(kTable) / sizeof(kTable[0]) == kIsaAvx512Vnni + 1, "one entry per Isa value");

#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}
#endif

int detect_isa_mask() {
  int mask = 1 << kIsaScalar;
#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return mask;
  const bool osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
  if (!osxsave || !avx) return mask;
  const uint64_t xcr0 = xgetbv0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;     // SSE + AVX state
  const bool os_zmm = (xcr0 & 0xE6) == 0xE6;   // + opmask, ZMM_Hi256, Hi16_ZMM
  if (__get_cpuid_max(0, nullptr) < 7) return mask;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1;
  const bool avx512vnni = (c >> 11) & 1;
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  __cpuid_count(7, 1, a1, b1, c1, d1);
  const bool avxvnni = (a1 >> 4) & 1;
  if (os_ymm && avx2) mask |= 1 << kIsaAvx2;
  if (os_ymm && avx2 && avxvnni) mask |= 1 << kIsaAvxVnni;
  if (os_zmm && avx512f && avx512bw && avx512vnni) mask |= 1 << kIsaAvx512Vnni;
#endif
  return mask;
}

}  // namespace

int isa_mask() {
  static const int m = detect_isa_mask();
  return m;
}

int best_isa() {
  static const int best = [] {
    const int m = isa_mask();
    for (int i = kIsaAvx512Vnni; i > kIsaScalar; --i)
      if (m & (1 << i)) return i;
    return int(kIsaScalar);
  }();
  return best;
}

const IsaKernels& isa_kernels(int isa) { return kTable[isa]; }

#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
// Whether the CPU has AMX tiles with the given cpuid 7.0:EDX feature bit (22 AMX-BF16, 25 AMX-INT8)
// and the OS saves their state (XCR0 bits 17-18: XTILECFG + XTILEDATA).
static bool has_amx(int edx_bit) {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;  // OSXSAVE: xgetbv works
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, a, b, c, d);
  const bool feature = (d >> edx_bit) & 1, amx_tile = (d >> 24) & 1;
  return feature && amx_tile && (xgetbv0() & 0x60000) == 0x60000;
}
#endif

bool has_amx_bf16() {
#if JDFP_X86 && defined(JDFP_HAVE_SIMD)
  static const bool has = has_amx(22);
  return has;
#else
  return false;
#endif
}

#if JDFP_X86 && defined(JDFP_HAVE_SIMD) && defined(__linux__)
// JDFP_AMX=0 not set, the AVX-512 entry runs (the AMX paths pack with AVX-512BW), and the process was
// granted the tile state: Linux hands out its 8 KiB only on request (process-wide, asked once).
static bool amx_allowed() {
  static const bool allowed = [] {
    const char* env = std::getenv("JDFP_AMX");
    if (env && std::string(env) == "0") return false;
    if (best_isa() != kIsaAvx512Vnni || !has_amx(24)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return allowed;
}
#endif

bool amx_int8_ready() {
#if JDFP_X86 && defined(JDFP_HAVE_SIMD) && defined(__linux__)
  static const bool ready = has_amx(25) && amx_allowed();
  return ready;
#else
  return false;
#endif
}

bool amx_bf16_ready() {
#if JDFP_X86 && defined(JDFP_HAVE_SIMD) && defined(__linux__)
  // The tile code also splits float16 with vcvtneps2bf16: AVX512_BF16 (cpuid 7.1:EAX bit 5), which
  // every AMX-BF16 CPU has.
  static const bool ready = has_amx(22) && amx_allowed() && [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1u);
  }();
  return ready;
#else
  return false;
#endif
}

}  // namespace jdfp
