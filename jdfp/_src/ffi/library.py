"""Loading ``libjdfp_ffi.so`` (the C++ kernels of ``xla_ffi/``) and what every FFI wrapper shares.

``libjdfp_ffi.so`` is built by CMake (``pip install .``, or the dev build with
``-DJDFP_DEV_INPLACE=ON``) and lives next to this package's ``__init__.py``.  Importing this module
loads it with ctypes and registers its XLA FFI handlers for the CPU platform once; nothing is compiled
at import.  If the library is missing, importing warns and every kernel call raises
:class:`KernelUnavailableError` -- there is no silent float fallback.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = [
    "ISA_NAMES",
    "KernelUnavailableError",
    "available_isas",
    "best_isa",
    "has_amx_int8",
    "check_bits",
    "dtype_of",
    "isa_attribute",
    "kernel_available",
    "load_error",
    "require_lib",
]

# Attribute value of each ISA name (the C++ `isa` attribute); "auto" picks the best available.
ISA_NAMES = ("auto", "scalar", "avx2", "avx_vnni", "avx512_vnni")
_ISA_CODE = {name: i for i, name in enumerate(ISA_NAMES)}

TARGET_I16 = "jdfp_gemm_i16"  # int16 a, int16 b
TARGET_I16_COL2IM = "jdfp_gemm_i16_col2im"  # its [1, rows, taps * C] result summed into a conv input's (col2im)
TARGET_I16_PATCH_WGRAD = "jdfp_gemm_i16_patch_wgrad"  # P^T . int16 b, P a float32 conv input's patch matrix
TARGET_Q = "jdfp_gemm_q"  # float32 a and/or b, quantized while packing
TARGET_I8 = "jdfp_gemm_i8"  # int8 a, int8 b (bits <= 8): the vpdpbusd kernel
TARGET_I8_COL2IM = "jdfp_gemm_i8_col2im"  # the same GEMM's patch gradient, summed into the conv input's (col2im)
TARGET_I8_PATCH_WGRAD = "jdfp_gemm_i8_patch_wgrad"  # P^T . int8 b, P a float32 conv input's patch matrix
TARGET_CONV_FWD = "jdfp_conv_fwd"  # int16 x, int16 w -> float32 y (also backward-data)
TARGET_CONV_WGRAD = "jdfp_conv_wgrad"  # int16 x, int16 dy -> float32 dw
TARGET_IM2COL = "jdfp_im2col"  # float32 x -> float32 patches (block-format convs)
# The library's jdfp_abi_version(): bumped when a handler's operands or attributes change, so a stale
# build fails to load with a clear message instead of failing at the first call.
ABI_VERSION = 2
# The three conversions take a uint32[2] Philox key operand and a `rounding` attribute (0 nearest,
# 1 stochastic, 2 biased) besides bits / isa.
TARGET_QUANTIZE = "jdfp_quantize_i16"  # float32 x, int32 e (per tensor), uint32 key [2] -> int16
# float32 x, uint32 key [2] -> int16, int32 e (from max |x|), int32 [4] counters
TARGET_QUANTIZE_DFP = "jdfp_quantize_dfp"
TARGET_QUANTIZE_DFP_NOCOUNT = "jdfp_quantize_dfp_nocount"  # the same without the counters
TARGET_QUANT_STATS = "jdfp_quant_stats"  # float32 x, int16 q, int32 e -> int32 [4] counters
TARGET_DFP_EXPONENTS = "jdfp_dfp_exponents"  # float32 x_0..x_n -> int32 e_0..e_n (from max |x|)
TARGET_FLOAT_STATS = "jdfp_float_stats"  # float32 x, uint16 bits of its FP16/BF16 cast -> int32 [5] counters
TARGET_FLOAT_CAST_STATS = "jdfp_float_cast_stats"  # float32 x -> its FP16/BF16 cast, int32 [5] counters
TARGET_BLOCK_QUANTIZE = "jdfp_block_quantize"  # float32 x [B, R, C] -> int16, int32 e per block
TARGET_BLOCK_QUANTIZE_STATS = "jdfp_block_quantize_stats"  # the same + int32 [4] counters, int32 [2] exponent range
TARGET_BLOCK_QUANTIZE_PATCHES = "jdfp_block_quantize_patches"  # float32 conv input -> its patch matrix, converted
TARGET_BLOCK_QUANTIZE_PATCHES_STATS = "jdfp_block_quantize_patches_stats"  # the same + the counters
TARGET_BLOCK_PATCH_GEMM = "jdfp_block_patch_gemm"  # the patch matrix converted and times int16 b, in one call
TARGET_BLOCK_PATCH_GEMM_STATS = "jdfp_block_patch_gemm_stats"  # the same + the counters
TARGET_THREEFRY_FOLD_IN = "jdfp_threefry_fold_in"  # uint32 key [..., 2], uint32 data -> jax.random.fold_in's key data
TARGET_BLOCK_FAKE_QUANTIZE = "jdfp_block_fake_quantize"  # float32 x -> float32 dequantized values, int32 e

_LIB_FILE = "libjdfp_ffi.so"
INT32_MAX = 2**31 - 1  # the int32 counters of jdfp_quant_stats


class KernelUnavailableError(ImportError):
  """libjdfp_ffi.so could not be loaded (not built, or built for another platform)."""


def _find_library() -> Path:
  override = os.environ.get("JDFP_FFI_LIBRARY")
  if override:
    return Path(override)
  return Path(__file__).resolve().parents[2] / _LIB_FILE  # jdfp/


_lib: ctypes.CDLL | None = None
_load_error: str | None = None


def _load() -> None:
  global _lib, _load_error
  path = _find_library()
  try:
    lib = ctypes.CDLL(str(path))
    lib.jdfp_isa_mask.restype = ctypes.c_int
    lib.jdfp_best_isa.restype = ctypes.c_int
    lib.jdfp_abi_version.restype = ctypes.c_int
    lib.jdfp_safe_chain_length.restype = ctypes.c_int64
    lib.jdfp_safe_chain_length.argtypes = (ctypes.c_int, ctypes.c_int)
    if lib.jdfp_abi_version() != ABI_VERSION:
      raise OSError(f"unexpected ABI version {lib.jdfp_abi_version()}")
    for name, sym in ((TARGET_I16, lib.JdfpGemmI16), (TARGET_I16_COL2IM, lib.JdfpGemmI16Col2im), (TARGET_Q, lib.JdfpGemmQ),
                      (TARGET_I16_PATCH_WGRAD, lib.JdfpGemmI16PatchWgrad),
                      (TARGET_I8, lib.JdfpGemmI8), (TARGET_I8_COL2IM, lib.JdfpGemmI8Col2im),
                      (TARGET_I8_PATCH_WGRAD, lib.JdfpGemmI8PatchWgrad),
                      (TARGET_CONV_FWD, lib.JdfpConvFwd), (TARGET_CONV_WGRAD, lib.JdfpConvWgrad),
                      (TARGET_IM2COL, lib.JdfpIm2col),
                      (TARGET_QUANTIZE, lib.JdfpQuantizeI16), (TARGET_QUANTIZE_DFP, lib.JdfpQuantizeDfp),
                      (TARGET_QUANTIZE_DFP_NOCOUNT, lib.JdfpQuantizeDfpNoCount),
                      (TARGET_QUANT_STATS, lib.JdfpQuantStats), (TARGET_DFP_EXPONENTS, lib.JdfpDfpExponents),
                      (TARGET_FLOAT_STATS, lib.JdfpFloatStats), (TARGET_FLOAT_CAST_STATS, lib.JdfpFloatCastStats),
                      (TARGET_BLOCK_QUANTIZE, lib.JdfpBlockQuantize),
                      (TARGET_BLOCK_QUANTIZE_STATS, lib.JdfpBlockQuantizeStats),
                      (TARGET_BLOCK_FAKE_QUANTIZE, lib.JdfpBlockFakeQuantize),
                      (TARGET_BLOCK_QUANTIZE_PATCHES, lib.JdfpBlockQuantizePatches),
                      (TARGET_BLOCK_QUANTIZE_PATCHES_STATS, lib.JdfpBlockQuantizePatchesStats),
                      (TARGET_BLOCK_PATCH_GEMM, lib.JdfpBlockPatchGemm),
                      (TARGET_BLOCK_PATCH_GEMM_STATS, lib.JdfpBlockPatchGemmStats),
                      (TARGET_THREEFRY_FOLD_IN, lib.JdfpThreefryFoldIn)):
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(sym), platform="cpu")
  except (OSError, AttributeError) as e:  # missing file, wrong arch, missing symbol
    _load_error = (
        f"jdfp's C++ kernel library could not be loaded from {path}: {e}. Build it with "
        "`pip install .` or, for development, `cmake -S . -B build/dev -DJDFP_DEV_INPLACE=ON && "
        "cmake --build build/dev -j2`.")
    warnings.warn(_load_error, RuntimeWarning, stacklevel=3)
    return
  _lib = lib


_load()


def kernel_available() -> bool:
  """True when libjdfp_ffi.so is loaded and its FFI targets are registered."""
  return _lib is not None


def load_error() -> str | None:
  """Why the library is not loaded (None when it is)."""
  return _load_error


def require_lib() -> ctypes.CDLL:
  if _lib is None:
    raise KernelUnavailableError(_load_error or "libjdfp_ffi.so is not loaded")
  return _lib


def available_isas() -> tuple[str, ...]:
  """ISA paths this CPU/OS can run, slowest first, e.g. ('scalar', 'avx2', 'avx_vnni', 'avx512_vnni')."""
  mask = require_lib().jdfp_isa_mask()
  return tuple(name for i, name in enumerate(ISA_NAMES) if i and mask & (1 << i))


def best_isa() -> str:
  """The ISA ``isa="auto"`` runs."""
  return ISA_NAMES[require_lib().jdfp_best_isa()]


@functools.cache
def has_amx_int8() -> bool:
  """True when ``isa="auto"`` runs the INT16 GEMM on AMX-INT8 tiles: the CPU has them, the OS saves
  their state and granted this process their use, and ``JDFP_AMX=0`` is not set.  The AMX path
  takes GEMMs with one exponent pair per output element (per-tensor, per-row, per-column DFP) and
  K <= 16384, and the forward and backward-data passes of large enough convolutions
  (`jdfp._src.ffi.gemm.conv_runs_on_amx`); other GEMMs, weight gradients and a named ISA keep the
  AVX-512 / AVX2 / scalar kernels."""
  return kernel_available() and bool(require_lib().jdfp_amx_int8_ready())


def check_bits(name: str, bits: Any) -> int:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 16:
    raise ValueError(f"{name} must be an int in 2..16, got {bits!r}")
  return int(bits)




def dtype_of(name: str, x: Any) -> np.dtype:
  dt = getattr(x, "dtype", None)
  if dt is None:
    raise TypeError(f"{name} must be an array (jax.Array or numpy.ndarray), got {type(x).__name__}")
  return np.dtype(dt)


def isa_attribute(isa: Any) -> int:
  if isinstance(isa, str) and isa in _ISA_CODE:
    return _ISA_CODE[isa]
  raise ValueError(f"isa must be one of {ISA_NAMES}, got {isa!r}")
