"""The C++ exact INT16 GEMM (xla_ffi/, docs/arithmetic.md) as a JAX op.

``libjdfp_ffi.so`` is built by CMake (``pip install .``, or the dev build with
``-DJDFP_DEV_INPLACE=ON``) and lives next to this package's ``__init__.py``.  Importing this module
loads it with ctypes and registers its XLA FFI handlers for the CPU platform once; nothing is compiled
at import.  If the library is missing, importing warns and every ``gemm`` call raises
:class:`KernelUnavailableError` -- there is no silent float fallback.
"""

from __future__ import annotations

import ctypes
import math
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ISA_NAMES",
    "KernelUnavailableError",
    "available_isas",
    "best_isa",
    "gemm",
    "kernel_available",
    "safe_chain_length",
]

# Attribute value of each ISA name (the C++ `isa` attribute); "auto" picks the best available.
ISA_NAMES = ("auto", "scalar", "avx2", "avx_vnni", "avx512_vnni")
_ISA_CODE = {name: i for i, name in enumerate(ISA_NAMES)}

TARGET_I16 = "jdfp_gemm_i16"  # int16 a, int16 b
TARGET_Q = "jdfp_gemm_q"  # float32 a and/or b, quantized while packing

_LIB_FILE = "libjdfp_ffi.so"
_MAX_CHAIN = 2**20
_INT32_MAX = 2**31 - 1


class KernelUnavailableError(ImportError):
  """libjdfp_ffi.so could not be loaded (not built, or built for another platform)."""


def _find_library() -> Path:
  override = os.environ.get("JDFP_FFI_LIBRARY")
  if override:
    return Path(override)
  return Path(__file__).resolve().parent.parent / _LIB_FILE


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
    if lib.jdfp_abi_version() != 1:
      raise OSError(f"unexpected ABI version {lib.jdfp_abi_version()}")
    for name, sym in ((TARGET_I16, lib.JdfpGemmI16), (TARGET_Q, lib.JdfpGemmQ)):
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


def _require_lib() -> ctypes.CDLL:
  if _lib is None:
    raise KernelUnavailableError(_load_error or "libjdfp_ffi.so is not loaded")
  return _lib


def available_isas() -> tuple[str, ...]:
  """ISA paths this CPU/OS can run, slowest first, e.g. ('scalar', 'avx2', 'avx_vnni', 'avx512_vnni')."""
  mask = _require_lib().jdfp_isa_mask()
  return tuple(name for i, name in enumerate(ISA_NAMES) if i and mask & (1 << i))


def best_isa() -> str:
  """The ISA ``isa="auto"`` runs."""
  return ISA_NAMES[_require_lib().jdfp_best_isa()]


def _check_bits(name: str, bits: Any) -> int:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 16:
    raise ValueError(f"{name} must be an int in 2..16, got {bits!r}")
  return int(bits)


def safe_chain_length(bits_a: int, bits_b: int) -> int:
  """L = floor((2**31 - 1) / (qmax_a * qmax_b)), capped at 2**20 (docs/arithmetic.md)."""
  bits_a = _check_bits("bits_a", bits_a)
  bits_b = _check_bits("bits_b", bits_b)
  qa, qb = 2 ** (bits_a - 1) - 1, 2 ** (bits_b - 1) - 1
  return min(_MAX_CHAIN, _INT32_MAX // (qa * qb))


def _dtype_of(name: str, x: Any) -> np.dtype:
  dt = getattr(x, "dtype", None)
  if dt is None:
    raise TypeError(f"{name} must be an array (jax.Array or numpy.ndarray), got {type(x).__name__}")
  return np.dtype(dt)


def _isa_code(isa: Any) -> int:
  if isinstance(isa, str) and isa in _ISA_CODE:
    return _ISA_CODE[isa]
  raise ValueError(f"isa must be one of {ISA_NAMES}, got {isa!r}")


def gemm(a, b, ea, eb, *, bits_a: int, bits_b: int, block_k: int | None = None,
         transpose_a: bool = False, transpose_b: bool = False, isa: str = "auto") -> jax.Array:
  """Exact DFP GEMM on the C++ kernel: ``float32 [..., M, N]`` per docs/arithmetic.md.

  Args:
    a: int16 ``[..., M, K]`` (``[..., K, M]`` with ``transpose_a``), values in ``[-qmax_a, qmax_a]``;
      or float32, quantized while packing: ``clip(round_half_even(scale2(a, -ea)), +-qmax_a)``,
      bit-identical to quantizing first and passing int16.
    b: int16 or float32 ``[..., K, N]`` (``[..., N, K]`` with ``transpose_b``).
    ea: int32 exponents ``[..., M, KB]`` (or ``[..., 1, KB]``: one exponent for every row).
    eb: int32 exponents ``[..., KB, N]`` (or ``[..., KB, 1]``).  ``KB = ceil(K / block_k)``.
    bits_a, bits_b: the operands' bits (2..16, sign included); they fix the safe chain length.
    block_k: exponent block length along K; None means K (a single block, KB == 1).
    transpose_a, transpose_b: the operand layouts above (no copies are made).
    isa: "auto" (best available), "scalar", "avx2", "avx_vnni" or "avx512_vnni"; an ISA the CPU
      lacks makes the call fail at run time.

  Leading batch dims broadcast numpy-style (size 1 is read with stride 0, never copied).  An
  int16 value outside ``[-qmax, qmax]`` makes the call fail at run time (never a silent wrap).  A
  ``NONFINITE_EXPONENT`` (2**30) in ``ea[..., m, :]`` or ``eb[..., :, n]`` makes ``out[..., m, n]`` NaN.
  """
  bits_a = _check_bits("bits_a", bits_a)
  bits_b = _check_bits("bits_b", bits_b)
  isa_code = _isa_code(isa)
  for name, flag in (("transpose_a", transpose_a), ("transpose_b", transpose_b)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"{name} must be a bool, got {flag!r}")
  dts = {}
  for name, x, allowed in (("a", a, ("int16", "float32")), ("b", b, ("int16", "float32")),
                           ("ea", ea, ("int32",)), ("eb", eb, ("int32",))):
    dt = _dtype_of(name, x)
    if dt.name not in allowed:
      raise TypeError(f"{name} must have dtype {' or '.join(allowed)}, got {dt.name}")
    if np.ndim(x) < 2:
      raise ValueError(f"{name} must have rank >= 2, got shape {np.shape(x)}")
    dts[name] = dt
  sa, sb, sea, seb = (tuple(np.shape(x)) for x in (a, b, ea, eb))
  m, k = (sa[-1], sa[-2]) if transpose_a else (sa[-2], sa[-1])
  kb_, n = (sb[-1], sb[-2]) if transpose_b else (sb[-2], sb[-1])
  if k != kb_:
    raise ValueError(f"contraction dims differ: a has K={k} (shape {sa}, transpose_a={transpose_a}), "
                     f"b has K={kb_} (shape {sb}, transpose_b={transpose_b})")
  if block_k is None:
    bk_attr, bk = -1, max(k, 1)
  else:
    if isinstance(block_k, bool) or not isinstance(block_k, (int, np.integer)) or block_k < 1:
      raise ValueError(f"block_k must be None or an int >= 1, got {block_k!r}")
    bk_attr = bk = int(block_k)
  kb = -(-k // bk)
  if sea[-1] != kb or sea[-2] not in (m, 1):
    raise ValueError(f"ea must have shape [..., {m} (or 1), {kb}] (KB = ceil(K={k} / block_k={bk})), "
                     f"got {sea}")
  if seb[-2] != kb or seb[-1] not in (n, 1):
    raise ValueError(f"eb must have shape [..., {kb}, {n} (or 1)] (KB = ceil(K={k} / block_k={bk})), "
                     f"got {seb}")
  try:
    batch = np.broadcast_shapes(sa[:-2], sb[:-2], sea[:-2], seb[:-2])
  except ValueError:
    raise ValueError(f"batch dims of a {sa[:-2]}, b {sb[:-2]}, ea {sea[:-2]}, eb {seb[:-2]} "
                     "do not broadcast") from None
  _require_lib()
  quant = dts["a"].name == "float32" or dts["b"].name == "float32"
  call = jax.ffi.ffi_call(
      TARGET_Q if quant else TARGET_I16,
      jax.ShapeDtypeStruct(tuple(batch) + (m, n), jnp.float32),
      vmap_method="expand_dims",
  )
  return call(a, b, ea, eb, bits_a=np.int32(bits_a), bits_b=np.int32(bits_b),
              block_k=np.int64(bk_attr), transpose_a=bool(transpose_a),
              transpose_b=bool(transpose_b), isa=np.int32(isa_code))
