"""Python side of ``xla_ffi/quantize_ffi.cc``: float32 -> int16 conversion, per-tensor exponents and
the quantization counters, in C++ (bit-identical to the pure-JAX quantizer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdfp._src.ffi.library import (INT32_MAX, TARGET_DFP_EXPONENTS, TARGET_QUANT_STATS, TARGET_QUANTIZE,
                                   TARGET_QUANTIZE_DFP, TARGET_QUANTIZE_DFP_NOCOUNT, check_bits, dtype_of,
                                   isa_attribute, require_lib)
from jdfp._src.numerics import philox
from jdfp._src.numerics.formats import ROUNDING_MODES
from jdfp._src.numerics.shard_types import match_varying

__all__ = ["check_out_dtype", "dfp_exponents", "quant_stats", "quantize", "quantize_dfp", "quantize_dfp_with_stats"]

# The kernels' `rounding` attribute (xla_ffi/quantize_kernels.h, enum Rounding).
ROUNDING_CODES = {"nearest": 0, "stochastic": 1, "biased": 2}
assert tuple(ROUNDING_CODES) == ROUNDING_MODES


def rounding_operands(rounding, key) -> tuple[np.int32, jax.Array]:
  """The ``rounding`` attribute and the uint32[2] key operand of a conversion call.

  ``stochastic`` needs a key (its Philox key: `jdfp._src.numerics.philox.key_words`); the other
  roundings ignore ``key`` (so a policy's key may be passed whatever the rounding) and get zeros.
  """
  if rounding not in ROUNDING_CODES:
    raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
  if rounding != "stochastic":
    return np.int32(ROUNDING_CODES[rounding]), jnp.zeros((2,), jnp.uint32)
  if key is None:
    raise ValueError("rounding='stochastic' needs a PRNG key: pass key=jax.random.key(...)")
  return np.int32(ROUNDING_CODES[rounding]), philox.key_words(key)


def check_out_dtype(out_dtype, int_bits: int) -> np.dtype:
  """The values' dtype of a conversion call: int16, or int8 for formats of <= 8 bits (sign included:
  |q| <= 127, exact), which the INT8 GEMM reads with no narrowing pass in XLA."""
  dt = np.dtype(out_dtype)
  if dt not in (np.dtype(np.int16), np.dtype(np.int8)):
    raise TypeError(f"out_dtype must be int16 or int8, got {dt.name}")
  if dt == np.int8 and int_bits > 8:
    raise ValueError(f"out_dtype int8 needs a format of <= 8 bits (|q| <= 127), got {int_bits} bits")
  return dt


def quantize(x, e, *, bits: int, isa: str = "auto", rounding: str = "nearest", key=None,
             out_dtype=jnp.int16) -> jax.Array:
  """int16 values of a per-tensor DFP quantization on the C++ kernel.

  ``clip(round(scale2(x, -e)), -qmax, qmax)`` for float32 ``x`` and one int32 exponent ``e`` (any
  shape of size 1); NaN -> 0 and all zeros when ``e`` is ``NONFINITE_EXPONENT``; ``rounding``:
  ``"nearest"`` (half to even), ``"stochastic"`` (Philox bits of ``key`` by element index) or
  ``"biased"`` (see `rounding_operands` for ``key``). Bit-identical to
  `jdfp.quantize_array(x, DFP(bits), rounding=rounding, key=key).values` given the same exponent, in
  one vectorized, multi-threaded pass (XLA:CPU's own float -> int16 conversion is several times slower).
  ``out_dtype``: int16, or int8 for ``bits <= 8`` (the same values, `check_out_dtype`).
  """
  bits = check_bits("bits", bits)
  out_dt = check_out_dtype(out_dtype, bits)
  isa_code = isa_attribute(isa)
  rounding_code, key_op = rounding_operands(rounding, key)
  for name, v, want in (("x", x, "float32"), ("e", e, "int32")):
    dt = dtype_of(name, v)
    if dt.name != want:
      raise TypeError(f"{name} must have dtype {want}, got {dt.name}")
  if int(np.prod(np.shape(x))) == 0:
    return jnp.zeros(np.shape(x), out_dt)
  if int(np.prod(np.shape(e))) != 1:
    raise ValueError(f"e must hold exactly one exponent (a per-tensor format), got shape {np.shape(e)}")
  require_lib()
  call = jax.ffi.ffi_call(TARGET_QUANTIZE, jax.ShapeDtypeStruct(np.shape(x), out_dt),
                          vmap_method="sequential")
  # An FFI result carries no shard_map varying axes: give it its inputs' ones.
  return match_varying(call(x, e, key_op, bits=np.int32(bits), isa=np.int32(isa_code), rounding=rounding_code),
                       x, e, key_op)


def _check_dfp_input(x, bits, isa) -> tuple[int, int, tuple[int, ...]]:
  """The checked ``bits``, the ``isa`` attribute and ``x``'s shape (``x`` must be float32)."""
  bits = check_bits("bits", bits)
  isa_code = isa_attribute(isa)
  dt = dtype_of("x", x)
  if dt.name != "float32":
    raise TypeError(f"x must have dtype float32, got {dt.name}")
  return bits, isa_code, tuple(np.shape(x))


def quantize_dfp(x, *, bits: int, isa: str = "auto", counted: bool = False, rounding: str = "nearest",
                 key=None, out_dtype=jnp.int16) -> tuple[jax.Array, jax.Array]:
  """Per-tensor DFP quantization in one kernel call: ``(int16 values, int32 exponent)``.

  The exponent is ``quantize.group_exponent(max|x|)`` (NaN/Inf: ``NONFINITE_EXPONENT`` and zeros;
  an all-zero tensor: 0), shaped ``(1,) * x.ndim``; values, ``rounding`` and ``key`` as `quantize`.
  Bit-identical to `jdfp.quantize_array(x, DFP(bits), rounding=rounding, key=key)`. Subnormal
  inputs read as zero (XLA:CPU's DAZ).
  ``counted``: make the call `quantize_dfp_with_stats` makes (and drop its counters), so that XLA
  merges it with a statistics call on the same tensor; by default the kernel counts nothing.
  ``out_dtype``: int16, or int8 for ``bits <= 8`` (`check_out_dtype`).
  """
  if counted:
    values, e, _ = quantize_dfp_with_stats(x, bits=bits, isa=isa, rounding=rounding, key=key, out_dtype=out_dtype)
    return values, e
  bits, isa_code, shape = _check_dfp_input(x, bits, isa)
  out_dt = check_out_dtype(out_dtype, bits)
  rounding_code, key_op = rounding_operands(rounding, key)
  if int(np.prod(shape)) == 0:
    return jnp.zeros(shape, out_dt), jnp.zeros((1,) * len(shape), jnp.int32)
  require_lib()
  call = jax.ffi.ffi_call(TARGET_QUANTIZE_DFP_NOCOUNT, (jax.ShapeDtypeStruct(shape, out_dt),
                                                        jax.ShapeDtypeStruct((1,) * len(shape), jnp.int32)),
                          vmap_method="sequential")
  values, e = call(x, key_op, bits=np.int32(bits), isa=np.int32(isa_code), rounding=rounding_code)
  return match_varying(values, x, key_op), match_varying(e, x)


def quantize_dfp_with_stats(x, *, bits: int, isa: str = "auto", rounding: str = "nearest",
                            key=None, out_dtype=jnp.int16) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`quantize_dfp` plus the `quant_stats` counters of the result, counted while converting.

  It is the same kernel call as ``quantize_dfp(..., counted=True)``, so when both quantize the same
  tensor in one program, XLA merges them into one call (the Flax statistics ride along with the
  op's own quantization for free; the ops ask for ``counted`` only while statistics are recorded).
  The counters do not depend on ``out_dtype`` (`check_out_dtype`).
  """
  bits, isa_code, shape = _check_dfp_input(x, bits, isa)
  out_dt = check_out_dtype(out_dtype, bits)
  rounding_code, key_op = rounding_operands(rounding, key)
  n = int(np.prod(shape))
  if n == 0:
    return jnp.zeros(shape, out_dt), jnp.zeros((1,) * len(shape), jnp.int32), jnp.zeros((4,), jnp.int32)
  if n > INT32_MAX:
    raise ValueError(f"x has {n} elements; the int32 counters hold at most {INT32_MAX}")
  require_lib()
  call = jax.ffi.ffi_call(TARGET_QUANTIZE_DFP, (jax.ShapeDtypeStruct(shape, out_dt),
                                                jax.ShapeDtypeStruct((1,) * len(shape), jnp.int32),
                                                jax.ShapeDtypeStruct((4,), jnp.int32)),
                          vmap_method="sequential")
  values, e, counts = call(x, key_op, bits=np.int32(bits), isa=np.int32(isa_code), rounding=rounding_code)
  return match_varying(values, x, key_op), match_varying(e, x), match_varying(counts, x, key_op)


def dfp_exponents(*xs, bits, isa: str = "auto") -> tuple[jax.Array, ...]:
  """The per-tensor DFP exponent of each float32 ``x`` in one kernel call, without converting it.

  ``bits``: one int, or one per tensor. Each exponent is what `quantize_dfp` gives that tensor
  (``quantize.group_exponent(max|x|)``, shaped ``(1,) * x.ndim``): for a GEMM that quantizes its
  float32 operands while packing them (`jdfp._src.ffi.gemm.gemm`), which then needs no int16 copy.
  """
  if not xs:
    raise ValueError("dfp_exponents needs at least one tensor")
  bits_t = tuple(bits) if isinstance(bits, (tuple, list)) else (bits,) * len(xs)
  if len(bits_t) != len(xs):
    raise ValueError(f"bits has {len(bits_t)} entries for {len(xs)} tensors")
  bits_t = tuple(check_bits("bits", b) for b in bits_t)
  isa_code = isa_attribute(isa)
  for i, x in enumerate(xs):
    dt = dtype_of(f"x{i}", x)
    if dt.name != "float32":
      raise TypeError(f"x{i} must have dtype float32, got {dt.name}")
  require_lib()
  outs = tuple(jax.ShapeDtypeStruct((1,) * np.ndim(x), jnp.int32) for x in xs)
  call = jax.ffi.ffi_call(TARGET_DFP_EXPONENTS, outs, vmap_method="sequential")
  es = call(*xs, bits=np.asarray(bits_t, np.int32), isa=np.int32(isa_code))
  return tuple(match_varying(e, x) for e, x in zip(es, xs))


def quant_stats(x, q, e, *, bits: int, isa: str = "auto") -> jax.Array:
  """How ``x`` fared in its per-tensor quantization ``q`` (int16) with exponent ``e``, in one pass:
  int32 ``[saturated, underflow, nonfinite, nonzero]``.

  With ``ok`` = x finite and nonzero (subnormals read as zero) and ``e`` not
  ``NONFINITE_EXPONENT``: saturated = #(ok and scale2(|x|, -e) > qmax), underflow = #(ok and
  q == 0), nonfinite = #(x NaN/Inf), nonzero = #ok. The Flax ``"dfp"`` collection's counters
  (`jdfp._src.flax.state.role_stats`), equal to its pure-JAX reductions.
  """
  bits = check_bits("bits", bits)
  isa_code = isa_attribute(isa)
  for name, v, want in (("x", x, "float32"), ("q", q, "int16"), ("e", e, "int32")):
    dt = dtype_of(name, v)
    if dt.name != want:
      raise TypeError(f"{name} must have dtype {want}, got {dt.name}")
  if tuple(np.shape(q)) != tuple(np.shape(x)):
    raise ValueError(f"q must have x's shape {tuple(np.shape(x))}, got {tuple(np.shape(q))}")
  if int(np.prod(np.shape(e))) != 1:
    raise ValueError(f"e must hold one exponent (per-tensor format), got shape {tuple(np.shape(e))}")
  n = int(np.prod(np.shape(x)))
  if n == 0:
    return jnp.zeros((4,), jnp.int32)
  if n > INT32_MAX:
    raise ValueError(f"x has {n} elements; the int32 counters hold at most {INT32_MAX}")
  require_lib()
  call = jax.ffi.ffi_call(TARGET_QUANT_STATS, jax.ShapeDtypeStruct((4,), jnp.int32), vmap_method="sequential")
  return match_varying(call(x, q, e, bits=np.int32(bits), isa=np.int32(isa_code)), x)


# ------------------------------------------------------------------------------------------------
# Convolution: implicit GEMM on the same driver (xla_ffi/conv_ffi.cc).  Canonical layouts: input
# [N, *S, C] (NWC / NHWC / NDHWC), kernel [*K, C/G, O] (WIO / HWIO / DHWIO), output [N, *O, O_features].
# The contraction order is (kernel taps row-major, then input channel): the result is bit-identical to
# the GEMM contract on the im2col matrix in that order.
