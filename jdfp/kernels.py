"""The C++ kernels as JAX ops (XLA FFI, CPU): the exact INT16 and INT8 GEMMs, INT16 convolutions, the BF16
GEMM and convolutions (vdpbf16ps; the convolutions also on AMX-BF16 tiles, isa="amx_bf16"), the FP16 GEMM (AMX-BF16 tiles), float -> int16 conversion and quantization counters. Exactness contract: docs/arithmetic.md.

Most users call `jdfp.dot_general` & co., which quantize and dispatch here; these are for direct use
and benchmarks. Every call raises `KernelUnavailableError` when the library is not built: there is no
silent float fallback.
"""

from jdfp._src.ffi.conv import conv, conv_input_grad, conv_out_spatial, conv_padding, conv_weight_grad
from jdfp._src.ffi.gemm import gemm
from jdfp._src.ffi.gemm_bf16 import (amx_bf16_ready, conv_bf16, conv_bf16_input_grad, conv_bf16_weight_grad,
                                   conv_f16, conv_f16_input_grad, conv_f16_weight_grad, gemm_bf16, gemm_f16,
                                   has_amx_bf16, has_avx512_bf16)
from jdfp._src.ffi.gemm_i8 import gemm_i8
from jdfp._src.ffi.library import (ISA_NAMES, KernelUnavailableError, available_isas, best_isa, has_amx_int8,
                                   kernel_available)
from jdfp._src.ffi.quantize import quant_stats, quantize, quantize_dfp, quantize_dfp_with_stats
from jdfp._src.numerics.reference import safe_chain_length

__all__ = [
    # conv.py
    "conv",
    "conv_input_grad",
    "conv_out_spatial",
    "conv_padding",
    "conv_weight_grad",
    # gemm.py
    "gemm",
    # gemm_bf16.py
    "amx_bf16_ready",
    "conv_bf16",
    "conv_bf16_input_grad",
    "conv_bf16_weight_grad",
    "conv_f16",
    "conv_f16_input_grad",
    "conv_f16_weight_grad",
    "gemm_bf16",
    "gemm_f16",
    "has_amx_bf16",
    "has_avx512_bf16",
    # gemm_i8.py
    "gemm_i8",
    # library.py
    "ISA_NAMES",
    "KernelUnavailableError",
    "available_isas",
    "best_isa",
    "has_amx_int8",
    "kernel_available",
    # quantize.py
    "quant_stats",
    "quantize",
    "quantize_dfp",
    "quantize_dfp_with_stats",
    # numerics
    "safe_chain_length",
]
