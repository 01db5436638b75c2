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
from jax import lax

from jdfp._src.shard_types import match_varying

__all__ = [
    "ISA_NAMES",
    "KernelUnavailableError",
    "available_isas",
    "best_isa",
    "conv",
    "conv_input_grad",
    "conv_weight_grad",
    "gemm",
    "kernel_available",
    "quant_stats",
    "quantize",
    "quantize_dfp",
    "quantize_dfp_with_stats",
    "safe_chain_length",
]

# Attribute value of each ISA name (the C++ `isa` attribute); "auto" picks the best available.
ISA_NAMES = ("auto", "scalar", "avx2", "avx_vnni", "avx512_vnni")
_ISA_CODE = {name: i for i, name in enumerate(ISA_NAMES)}

TARGET_I16 = "jdfp_gemm_i16"  # int16 a, int16 b
TARGET_Q = "jdfp_gemm_q"  # float32 a and/or b, quantized while packing
TARGET_CONV_FWD = "jdfp_conv_fwd"  # int16 x, int16 w -> float32 y (also backward-data)
TARGET_CONV_WGRAD = "jdfp_conv_wgrad"  # int16 x, int16 dy -> float32 dw
TARGET_QUANTIZE = "jdfp_quantize_i16"  # float32 x, int32 e (per tensor) -> int16
TARGET_QUANTIZE_DFP = "jdfp_quantize_dfp"  # float32 x -> int16, int32 e (from max |x|)
TARGET_QUANT_STATS = "jdfp_quant_stats"  # float32 x, int16 q, int32 e -> int32 [4] counters

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
    for name, sym in ((TARGET_I16, lib.JdfpGemmI16), (TARGET_Q, lib.JdfpGemmQ),
                      (TARGET_CONV_FWD, lib.JdfpConvFwd), (TARGET_CONV_WGRAD, lib.JdfpConvWgrad),
                      (TARGET_QUANTIZE, lib.JdfpQuantizeI16), (TARGET_QUANTIZE_DFP, lib.JdfpQuantizeDfp),
                      (TARGET_QUANT_STATS, lib.JdfpQuantStats)):
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


def quantize(x, e, *, bits: int, isa: str = "auto") -> jax.Array:
  """int16 values of a per-tensor DFP quantization on the C++ kernel (nearest rounding).

  ``clip(round_half_even(scale2(x, -e)), -qmax, qmax)`` for float32 ``x`` and one int32 exponent
  ``e`` (any shape of size 1); NaN -> 0 and all zeros when ``e`` is ``NONFINITE_EXPONENT``:
  bit-identical to `jdfp.quantize_array(x, DFP(bits)).values` given the same exponent, in one
  vectorized, multi-threaded pass (XLA:CPU's own float -> int16 conversion is several times slower).
  """
  bits = _check_bits("bits", bits)
  isa_code = _isa_code(isa)
  for name, v, want in (("x", x, "float32"), ("e", e, "int32")):
    dt = _dtype_of(name, v)
    if dt.name != want:
      raise TypeError(f"{name} must have dtype {want}, got {dt.name}")
  if int(np.prod(np.shape(x))) == 0:
    return jnp.zeros(np.shape(x), jnp.int16)
  if int(np.prod(np.shape(e))) != 1:
    raise ValueError(f"e must hold exactly one exponent (a per-tensor format), got shape {np.shape(e)}")
  _require_lib()
  call = jax.ffi.ffi_call(TARGET_QUANTIZE, jax.ShapeDtypeStruct(np.shape(x), jnp.int16),
                          vmap_method="sequential")
  # An FFI result carries no shard_map varying axes: give it its inputs' ones.
  return match_varying(call(x, e, bits=np.int32(bits), isa=np.int32(isa_code)), x, e)


def quantize_dfp(x, *, bits: int, isa: str = "auto") -> tuple[jax.Array, jax.Array]:
  """Per-tensor DFP quantization in one kernel call: ``(int16 values, int32 exponent)``.

  The exponent is ``quantize.group_exponent(max|x|)`` (NaN/Inf: ``NONFINITE_EXPONENT`` and zeros;
  an all-zero tensor: 0), shaped ``(1,) * x.ndim``; values as `quantize`. Bit-identical to
  `jdfp.quantize_array(x, DFP(bits))`. Subnormal inputs read as zero (XLA:CPU's DAZ).
  """
  values, e, _ = quantize_dfp_with_stats(x, bits=bits, isa=isa)
  return values, e


def quantize_dfp_with_stats(x, *, bits: int, isa: str = "auto") -> tuple[jax.Array, jax.Array, jax.Array]:
  """`quantize_dfp` plus the `quant_stats` counters of the result, counted while converting.

  It is the same kernel call as `quantize_dfp` (which drops the counters), so when both quantize
  the same tensor in one program, XLA merges them into one call (the Flax statistics ride along
  with the op's own quantization for free).
  """
  bits = _check_bits("bits", bits)
  isa_code = _isa_code(isa)
  dt = _dtype_of("x", x)
  if dt.name != "float32":
    raise TypeError(f"x must have dtype float32, got {dt.name}")
  shape = tuple(np.shape(x))
  n = int(np.prod(shape))
  if n == 0:
    return jnp.zeros(shape, jnp.int16), jnp.zeros((1,) * len(shape), jnp.int32), jnp.zeros((4,), jnp.int32)
  if n > _INT32_MAX:
    raise ValueError(f"x has {n} elements; the int32 counters hold at most {_INT32_MAX}")
  _require_lib()
  call = jax.ffi.ffi_call(TARGET_QUANTIZE_DFP, (jax.ShapeDtypeStruct(shape, jnp.int16),
                                                jax.ShapeDtypeStruct((1,) * len(shape), jnp.int32),
                                                jax.ShapeDtypeStruct((4,), jnp.int32)),
                          vmap_method="sequential")
  values, e, counts = call(x, bits=np.int32(bits), isa=np.int32(isa_code))
  return match_varying(values, x), match_varying(e, x), match_varying(counts, x)


def quant_stats(x, q, e, *, bits: int, isa: str = "auto") -> jax.Array:
  """How ``x`` fared in its per-tensor quantization ``q`` (int16) with exponent ``e``, in one pass:
  int32 ``[saturated, underflow, nonfinite, nonzero]``.

  With ``ok`` = x finite and nonzero (subnormals read as zero) and ``e`` not
  ``NONFINITE_EXPONENT``: saturated = #(ok and scale2(|x|, -e) > qmax), underflow = #(ok and
  q == 0), nonfinite = #(x NaN/Inf), nonzero = #ok. The Flax ``"dfp"`` collection's counters
  (`jdfp._src.flax.core.role_stats`), equal to its pure-JAX reductions.
  """
  bits = _check_bits("bits", bits)
  isa_code = _isa_code(isa)
  for name, v, want in (("x", x, "float32"), ("q", q, "int16"), ("e", e, "int32")):
    dt = _dtype_of(name, v)
    if dt.name != want:
      raise TypeError(f"{name} must have dtype {want}, got {dt.name}")
  if tuple(np.shape(q)) != tuple(np.shape(x)):
    raise ValueError(f"q must have x's shape {tuple(np.shape(x))}, got {tuple(np.shape(q))}")
  if int(np.prod(np.shape(e))) != 1:
    raise ValueError(f"e must hold one exponent (per-tensor format), got shape {tuple(np.shape(e))}")
  n = int(np.prod(np.shape(x)))
  if n == 0:
    return jnp.zeros((4,), jnp.int32)
  if n > _INT32_MAX:
    raise ValueError(f"x has {n} elements; the int32 counters hold at most {_INT32_MAX}")
  _require_lib()
  call = jax.ffi.ffi_call(TARGET_QUANT_STATS, jax.ShapeDtypeStruct((4,), jnp.int32), vmap_method="sequential")
  return match_varying(call(x, q, e, bits=np.int32(bits), isa=np.int32(isa_code)), x)


# ------------------------------------------------------------------------------------------------
# Convolution: implicit GEMM on the same driver (xla_ffi/conv_ffi.cc).  Canonical layouts: input
# [N, *S, C] (NWC / NHWC / NDHWC), kernel [*K, C/G, O] (WIO / HWIO / DHWIO), output [N, *O, O_features].
# The contraction order is (kernel taps row-major, then input channel): the result is bit-identical to
# the GEMM contract on the im2col matrix in that order.


def _check_ints(name: str, v, n: int, lo: int) -> tuple[int, ...]:
  try:
    t = tuple(int(x) for x in v)
  except TypeError:
    raise TypeError(f"{name} must be a sequence of {n} ints, got {v!r}") from None
  if len(t) != n or any(x < lo for x in t) or any(isinstance(x, bool) for x in v):
    raise ValueError(f"{name} must be {n} ints >= {lo} (one per spatial dim), got {v!r}")
  return t


def conv_padding(padding, in_spatial, kernel_spatial, window_strides, lhs_dilation, rhs_dilation):
  """Explicit ``((lo, hi), ...)`` padding from "SAME" / "VALID" / explicit pairs (lax's rules, applied
  to the lhs-dilated input and the rhs-dilated kernel as `lax.conv_general_dilated` does)."""
  nsp = len(in_spatial)
  if isinstance(padding, str):
    in_d = [(s - 1) * d + 1 if s else 0 for s, d in zip(in_spatial, lhs_dilation)]
    k_d = [(k - 1) * d + 1 if k else 0 for k, d in zip(kernel_spatial, rhs_dilation)]
    try:
      pads = lax.padtype_to_pads(in_d, k_d, window_strides, padding)
    except Exception as e:  # unknown padding string
      raise ValueError(f"padding must be 'SAME', 'VALID', 'SAME_LOWER' or (lo, hi) pairs, got {padding!r}") from e
    return tuple((int(lo), int(hi)) for lo, hi in pads)
  try:
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  except (TypeError, ValueError):
    raise ValueError(f"padding must be a string or a sequence of (lo, hi) pairs, got {padding!r}") from None
  if len(pads) != nsp:
    raise ValueError(f"padding needs {nsp} (lo, hi) pairs, got {padding!r}")
  return pads


def conv_out_spatial(in_spatial, kernel_spatial, window_strides, pads, lhs_dilation, rhs_dilation):
  out = []
  for s, k, st, (lo, hi), ld, rd in zip(in_spatial, kernel_spatial, window_strides, pads, lhs_dilation,
                                         rhs_dilation):
    din = (s - 1) * ld + 1 if s else 0
    dk = (k - 1) * rd + 1 if k else 0
    span = din + lo + hi - dk
    out.append(span // st + 1 if span >= 0 else 0)
  return tuple(out)


def _conv_common(x, b, ex, eb, names, nsp_from, window_strides, lhs_dilation, rhs_dilation,
                 feature_group_count, bits_a, bits_b, isa):
  bits_a = _check_bits(f"bits_{names[0]}", bits_a)
  bits_b = _check_bits(f"bits_{names[1]}", bits_b)
  isa_code = _isa_code(isa)
  for name, v, allowed in ((names[0], x, "int16"), (names[1], b, "int16"), ("e" + names[0], ex, "int32"),
                           ("e" + names[1], eb, "int32")):
    dt = _dtype_of(name, v)
    if dt.name != allowed:
      raise TypeError(f"{name} must have dtype {allowed}, got {dt.name}")
  for name, v in (("e" + names[0], ex), ("e" + names[1], eb)):
    if np.size(v) != 1:
      raise ValueError(f"{name} must hold one (per-tensor) exponent, got shape {np.shape(v)}")
  nsp = np.ndim(nsp_from) - 2
  if not 1 <= nsp <= 3 or np.ndim(x) != nsp + 2 or np.ndim(b) != nsp + 2:
    raise ValueError(f"conv operands must have rank 3, 4 or 5 (1 to 3 spatial dims) and equal ranks, got "
                     f"{names[0]} {np.shape(x)} and {names[1]} {np.shape(b)}")
  strides = _check_ints("window_strides", window_strides, nsp, 1)
  ldil = _check_ints("lhs_dilation", lhs_dilation or (1,) * nsp, nsp, 1)
  rdil = _check_ints("rhs_dilation", rhs_dilation or (1,) * nsp, nsp, 1)
  if isinstance(feature_group_count, bool) or not isinstance(feature_group_count, (int, np.integer)) \
      or feature_group_count < 1:
    raise ValueError(f"feature_group_count must be an int >= 1, got {feature_group_count!r}")
  return nsp, strides, ldil, rdil, int(feature_group_count), bits_a, bits_b, isa_code


def _to5(x, nsp):
  s = np.shape(x)
  return x.reshape((s[0],) + (1,) * (3 - nsp) + tuple(s[1:]))


def _w5(w, nsp):
  s = np.shape(w)
  return w.reshape((1,) * (3 - nsp) + tuple(s))


def _attrs(nsp, strides, pads, ldil, rdil, groups, bits_a, bits_b, isa_code):
  pad3 = lambda v, fill: np.asarray((fill,) * (3 - nsp) + tuple(v), np.int64)
  return dict(window_strides=pad3(strides, 1), padding_lo=pad3([p[0] for p in pads], 0),
              padding_hi=pad3([p[1] for p in pads], 0), lhs_dilation=pad3(ldil, 1), rhs_dilation=pad3(rdil, 1),
              feature_group_count=np.int64(groups), bits_x=np.int32(bits_a), bits_w=np.int32(bits_b),
              isa=np.int32(isa_code))


def conv(x, w, ex, ew, *, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
         feature_group_count: int = 1, bits_x: int, bits_w: int, isa: str = "auto") -> jax.Array:
  """Exact DFP convolution on the C++ kernel (implicit GEMM, no im2col buffer): float32 ``[N, *O, O]``.

  Args:
    x: int16 ``[N, *S, C]`` with 1 to 3 spatial dims (NWC, NHWC, NDHWC), values in ``[-qmax_x, qmax_x]``.
    w: int16 ``[*K, C / G, O]`` (WIO, HWIO, DHWIO), values in ``[-qmax_w, qmax_w]``.
    ex, ew: int32 per-tensor exponents (one element each).
    window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count: as
      `jax.lax.conv_general_dilated` (padding "SAME", "VALID" or ``(lo, hi)`` pairs).
    bits_x, bits_w: the operands' bits (2..16); they fix the safe int32 chain length.
    isa: "auto" or one of `available_isas()`.

  The result is bit-identical to the GEMM contract (docs/arithmetic.md) on ``im2col(x)`` with K
  ordered as (kernel taps row-major, input channel), per group.  An int16 value outside
  ``[-qmax, qmax]`` that the conv reads makes the call fail at run time.
  """
  nsp, strides, ldil, rdil, g, bx, bw, isa_code = _conv_common(
      x, w, ex, ew, ("x", "w"), x, window_strides, lhs_dilation, rhs_dilation, feature_group_count,
      bits_x, bits_w, isa)
  sx, sw = tuple(np.shape(x)), tuple(np.shape(w))
  c, i, o = sx[-1], sw[-2], sw[-1]
  if c != i * g or o % g:
    raise ValueError(f"feature_group_count={g}: x features {c} must equal w input features {i} x groups, "
                     f"and w output features {o} must divide by groups")
  pads = conv_padding(padding, sx[1:-1], sw[:-2], strides, ldil, rdil)
  out_sp = conv_out_spatial(sx[1:-1], sw[:-2], strides, pads, ldil, rdil)
  _require_lib()
  out5 = (sx[0],) + (1,) * (3 - nsp) + out_sp + (o,)
  call = jax.ffi.ffi_call(TARGET_CONV_FWD, jax.ShapeDtypeStruct(out5, jnp.float32), vmap_method="sequential")
  y = call(_to5(x, nsp), _w5(w, nsp), jnp.reshape(ex, (1,)), jnp.reshape(ew, (1,)),
           **_attrs(nsp, strides, pads, ldil, rdil, g, bx, bw, isa_code))
  return y.reshape((sx[0],) + out_sp + (o,))


def conv_weight_grad(x, dy, ex, edy, *, kernel_spatial, window_strides, padding, lhs_dilation=None,
                     rhs_dilation=None, feature_group_count: int = 1, bits_x: int, bits_dy: int,
                     isa: str = "auto") -> jax.Array:
  """Weight-gradient of `conv` on the kernel: float32 ``[*K, C / G, O]``.

  ``dw[(tap, c), o] = sum over output pixels (n, *o) of im2col(x)[pixel, (tap, c)] * dy[pixel, o]``
  per group: the GEMM contract with K = the output pixels in row-major order (so bit-identical to
  ``reference_gemm(im2col(x)^T, dy)``).  ``dy``: int16 ``[N, *O, O]``, its exponent ``edy``.
  """
  nsp, strides, ldil, rdil, g, bx, bd, isa_code = _conv_common(
      x, dy, ex, edy, ("x", "dy"), x, window_strides, lhs_dilation, rhs_dilation, feature_group_count,
      bits_x, bits_dy, isa)
  ksp = _check_ints("kernel_spatial", kernel_spatial, nsp, 0)
  sx, sd = tuple(np.shape(x)), tuple(np.shape(dy))
  c, o = sx[-1], sd[-1]
  if c % g or o % g:
    raise ValueError(f"feature_group_count={g} must divide x features {c} and dy features {o}")
  pads = conv_padding(padding, sx[1:-1], ksp, strides, ldil, rdil)
  out_sp = conv_out_spatial(sx[1:-1], ksp, strides, pads, ldil, rdil)
  if sd != (sx[0],) + out_sp + (o,):
    raise ValueError(f"dy must have shape {(sx[0],) + out_sp + (o,)} (the conv output), got {sd}")
  _require_lib()
  # The kernel writes dw^T per group, [G, O/G, *K, C/G]; the transpose of this small tensor is cheap.
  out6 = (g, o // g) + (1,) * (3 - nsp) + ksp + (c // g,)
  call = jax.ffi.ffi_call(TARGET_CONV_WGRAD, jax.ShapeDtypeStruct(out6, jnp.float32), vmap_method="sequential")
  dwt = call(_to5(x, nsp), _to5(dy, nsp), jnp.reshape(ex, (1,)), jnp.reshape(edy, (1,)),
             **_attrs(nsp, strides, pads, ldil, rdil, g, bx, bd, isa_code))
  dwt = dwt.reshape((g, o // g) + ksp + (c // g,))
  perm = tuple(range(2, 2 + nsp)) + (2 + nsp, 0, 1)
  return jnp.transpose(dwt, perm).reshape(ksp + (c // g, o))


def conv_input_grad_setup(w, in_spatial, window_strides, pads, lhs_dilation, rhs_dilation,
                          feature_group_count: int):
  """The backward-data conv of `conv`: ``dx = conv(dy, w_t, strides=lhs_dilation, padding=pads_t,
  lhs_dilation=window_strides, rhs_dilation=rhs_dilation, groups)``.  Returns ``(w_t, pads_t)``:
  ``w_t[*K, O/G, C]`` is w flipped spatially with the input and output features swapped per group
  (an exact int16 permutation), ``pads_t`` the adjusted padding (JAX's transpose rule)."""
  ksp = tuple(np.shape(w)[:-2])
  i, o = np.shape(w)[-2:]
  g = feature_group_count
  nsp = len(ksp)
  wt = lax.rev(w, tuple(range(nsp)))
  wt = wt.reshape(ksp + (i, g, o // g))
  wt = jnp.transpose(wt, tuple(range(nsp)) + (nsp + 2, nsp + 1, nsp)).reshape(ksp + (o // g, g * i))
  out_sp = conv_out_spatial(in_spatial, ksp, window_strides, pads, lhs_dilation, rhs_dilation)
  pads_t = []
  for s, k, st, (lo, _), ld, rd, os_ in zip(in_spatial, ksp, window_strides, pads, lhs_dilation, rhs_dilation,
                                             out_sp):
    din = (s - 1) * ld + 1 if s else 0
    dk = (k - 1) * rd + 1 if k else 0
    dout = (os_ - 1) * st + 1 if os_ else 0
    before = dk - lo - 1
    pads_t.append((int(before), int(din + dk - 1 - dout - before)))
  return wt, tuple(pads_t)


def conv_input_grad(dy, w, edy, ew, *, input_spatial, window_strides, padding, lhs_dilation=None,
                    rhs_dilation=None, feature_group_count: int = 1, bits_dy: int, bits_w: int,
                    isa: str = "auto") -> jax.Array:
  """Backward-data of `conv` on the kernel: float32 ``[N, *S, C]``, the conv of ``dy`` with the
  flipped, transposed kernel (`conv_input_grad_setup`), lhs dilation = the forward strides."""
  nsp = np.ndim(dy) - 2
  if not 1 <= nsp <= 3 or np.ndim(w) != nsp + 2:
    raise ValueError(f"dy and w must have equal ranks 3..5, got {np.shape(dy)} and {np.shape(w)}")
  strides = _check_ints("window_strides", window_strides, nsp, 1)
  ldil = _check_ints("lhs_dilation", lhs_dilation or (1,) * nsp, nsp, 1)
  rdil = _check_ints("rhs_dilation", rhs_dilation or (1,) * nsp, nsp, 1)
  in_sp = _check_ints("input_spatial", input_spatial, nsp, 0)
  pads = conv_padding(padding, in_sp, np.shape(w)[:-2], strides, ldil, rdil)
  out_sp = conv_out_spatial(in_sp, np.shape(w)[:-2], strides, pads, ldil, rdil)
  if tuple(np.shape(dy)[1:-1]) != out_sp or np.shape(dy)[-1] != np.shape(w)[-1]:
    raise ValueError(f"dy must have shape {(np.shape(dy)[0],) + out_sp + (np.shape(w)[-1],)} (the conv output), "
                     f"got {np.shape(dy)}")
  if isinstance(feature_group_count, bool) or not isinstance(feature_group_count, (int, np.integer)) \
      or feature_group_count < 1 or np.shape(w)[-1] % feature_group_count:
    raise ValueError(f"feature_group_count must be an int >= 1 dividing the output features, "
                     f"got {feature_group_count!r}")
  g = int(feature_group_count)
  wt, pads_t = conv_input_grad_setup(w, in_sp, strides, pads, ldil, rdil, g)
  kw = dict(feature_group_count=g, bits_x=bits_dy, bits_w=bits_w, isa=isa)
  if any(s > 1 for s in strides) and all(d == 1 for d in ldil):
    bits_dy = _check_bits("bits_dy", bits_dy)
    bits_w = _check_bits("bits_w", bits_w)
    k_full = _prod(np.shape(wt)[:-1])
    og = np.shape(wt)[-2]
    chain = min(safe_chain_length(bits_dy, bits_w), max(k_full, 1))
    if chain == k_full or og % chain == 0:
      return _input_grad_phases(dy, wt, edy, ew, in_sp, strides, pads_t, rdil, kw)
  return conv(dy, wt, edy, ew, window_strides=ldil, padding=pads_t, lhs_dilation=strides, rhs_dilation=rdil, **kw)


def _prod(xs) -> int:
  return int(math.prod(xs))


def _input_grad_phases(dy, wt, edy, ew, in_sp, strides, pads_t, rdil, kw):
  """Backward-data of a strided conv without the zeros of the lhs-dilated dy: one stride-1 conv per
  output phase (dx[..., r::s, ...]) with the kernel taps that phase reads (sub-pixel decomposition).

  Exact: the dropped taps read only dilation zeros, and the caller checked that every int32 chain of
  the full problem lies inside one tap (or is all of K), so the dropped taps are whole all-zero chains
  (each adds +0.0 to the FP32 accumulator, which is never -0.0) and the kept chains are the same.
  """
  nsp = len(in_sp)
  od = np.shape(dy)[1:-1]
  ksp = np.shape(wt)[:nsp]
  per_dim = []  # per dim: for each phase r, (count, taps, rhs dilation, (lo, hi)) or None (no taps)
  for d in range(nsp):
    s, rd, lo, size = strides[d], rdil[d], pads_t[d][0], in_sp[d]
    phases = []
    for r in range(s):
      cnt = len(range(r, size, s))
      taps = [k for k in range(ksp[d]) if (r + k * rd - lo) % s == 0]
      if cnt == 0 or not taps:
        phases.append((cnt, None, None, None))
        continue
      q = [(r + k * rd - lo) // s for k in taps]
      rd2 = q[1] - q[0] if len(q) > 1 else 1
      lo2 = -q[0]
      hi2 = cnt + (len(taps) - 1) * rd2 - od[d] - lo2
      phases.append((cnt, tuple(taps), rd2, (lo2, hi2)))
    per_dim.append(phases)
  nb, c = np.shape(dy)[0], np.shape(wt)[-1]
  blocks = [-(-size // s) for size, s in zip(in_sp, strides)]
  zero_or_nan = None
  outs = []
  for ph in np.ndindex(*strides):
    sel = [per_dim[d][r] for d, r in enumerate(ph)]
    shape = (nb,) + tuple(x[0] for x in sel) + (c,)
    if any(x[1] is None for x in sel):
      if zero_or_nan is None:  # nothing reads this phase: +0.0 (NaN for a non-finite exponent), as the kernel
        bad = (jnp.reshape(edy, ()) == 2**30) | (jnp.reshape(ew, ()) == 2**30)
        zero_or_nan = jnp.where(bad, jnp.float32(jnp.nan), jnp.float32(0))
      y = jnp.broadcast_to(zero_or_nan, shape)
    else:
      wsub = wt
      for d, x in enumerate(sel):
        if len(x[1]) != ksp[d]:
          wsub = jnp.take(wsub, np.asarray(x[1]), axis=d)
      y = conv(dy, wsub, edy, ew, window_strides=(1,) * nsp, padding=tuple(x[3] for x in sel),
               rhs_dilation=tuple(x[2] for x in sel), **kw)
    # pad every phase to the block grid, then interleave
    outs.append(jnp.pad(y, [(0, 0)] + [(0, b - x[0]) for b, x in zip(blocks, sel)] + [(0, 0)]))
  st = jnp.stack(outs).reshape(tuple(strides) + (nb,) + tuple(blocks) + (c,))
  # [*s, N, *B, C] -> [N, B0, s0, B1, s1, ..., C]
  perm = (nsp,) + tuple(x for d in range(nsp) for x in (nsp + 1 + d, d)) + (2 * nsp + 1,)
  full = jnp.transpose(st, perm).reshape((nb,) + tuple(b * s for b, s in zip(blocks, strides)) + (c,))
  return full[(slice(None),) + tuple(slice(0, size) for size in in_sp)]
