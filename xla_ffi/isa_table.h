// The ISA table: one entry per instruction set, holding every kernel family that has per-ISA code
// (the GEMM/conv tile function with its micro-tile shape, and the conversion, max |x|,
// statistics and float-cast statistics kernels), plus the CPU detection that decides which entries may run.  Handlers
// resolve their `isa` attribute to an entry once (ffi_helpers.h's select_isa) and call through it;
// nothing else branches on the ISA.  Baseline flags only: included by the handler TUs.
#pragma once

#include "gemm_common.h"
#include "float_stats.h"
#include "quantize_kernels.h"

namespace jdfp {

struct IsaKernels {
  const char* name;  // as jdfp/_src/kernels.py's ISA_NAMES, for messages
  // GEMM / conv: tile function, micro-tile (mr x nr), max packed k-pairs per kc block.
  TileFn tile;
  int mr, nr;
  int kc_pairs;
  // float32 -> int16 conversion, max |x|, quantization statistics.
  ConvertFn convert;
  AmaxFn amax;
  StatsFn stats;
  // float32 -> int16 conversion with stochastic (Philox bits) and biased rounding.
  ConvertFn convert_stochastic, convert_biased;
  // Counters of an FP16 / BF16 cast (float_stats.h).
  FloatStatsFn float_stats;
  // The cast itself and its counters, in one pass (float_stats.h).
  FloatCastStatsFn float_cast_stats;
};

// Bit i set: ISA i (an Isa value, kIsaScalar..kIsaAvx512Vnni) is built and the CPU/OS runs it.
// Detected once (cpuid + xgetbv), on first use.
int isa_mask();
// The highest ISA in isa_mask(): what kIsaAuto means.
int best_isa();
// The entry of a concrete ISA (kIsaScalar..kIsaAvx512Vnni).  Entries of ISAs that were not built
// (non-x86) have null kernels; isa_mask() never lists them.
const IsaKernels& isa_kernels(int isa);
// The CPU has AMX-BF16 tiles and the OS saves their state (cpuid 7.0:EDX bits 22, 24; XCR0 bits 17,
// 18) (what jdfp.kernels.has_amx_bf16() reports; amx_bf16_ready() below decides what runs there).
bool has_amx_bf16();
// The CPU has AMX-INT8 tiles, the OS saves their state and granted this process their use
// (arch_prctl ARCH_REQ_XCOMP_PERM, asked once): kernel_amx.cc may run.  JDFP_AMX=0 turns it off.
bool amx_int8_ready();
// The same for AMX-BF16, plus AVX512_BF16 (kernel_amx_f16.cc: the FP16 GEMM and convs, the BF16
// recipe's dots and convs).
bool amx_bf16_ready();

}  // namespace jdfp
