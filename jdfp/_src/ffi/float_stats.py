"""Python side of ``xla_ffi/float_stats_ffi.cc``: how a float32 tensor fared in its FP16 / BF16 cast,
counted in one C++ pass (the Flax statistics of the mixed-precision recipes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdfp._src.ffi.library import (INT32_MAX, TARGET_FLOAT_CAST_STATS, TARGET_FLOAT_STATS, dtype_of, isa_attribute,
                                  require_lib)
from jdfp._src.numerics.shard_types import match_varying

__all__ = ["float_cast_stats", "float_stats"]

_FMT_CODE = {"float16": 0, "bfloat16": 1}


def float_stats(x, q, *, isa: str = "auto") -> jax.Array:
  """int32 ``[amax, amin, saturated, underflow, nonfinite]`` of float32 ``x`` and its cast ``q``.

  ``q``: ``x.astype(float16)`` or ``x.astype(bfloat16)``, same shape. With ok = x finite and
  nonzero (subnormals read as zero, as XLA:CPU reads them): ``amax`` / ``amin`` are the largest /
  smallest |x| over ok as float32 bit patterns (0 / Inf's bits when nothing is ok), saturated =
  #(x finite and q = +-Inf), underflow = #(ok and q = +-0), nonfinite = #(x NaN/Inf).
  """
  isa_code = isa_attribute(isa)
  dt = dtype_of("x", x)
  if dt.name != "float32":
    raise TypeError(f"x must have dtype float32, got {dt.name}")
  qdt = dtype_of("q", q)
  if qdt.name not in _FMT_CODE:
    raise TypeError(f"q must have dtype float16 or bfloat16, got {qdt.name}")
  if tuple(np.shape(q)) != tuple(np.shape(x)):
    raise ValueError(f"q must have x's shape {tuple(np.shape(x))}, got {tuple(np.shape(q))}")
  n = int(np.prod(np.shape(x)))
  if n > INT32_MAX:
    raise ValueError(f"x has {n} elements; the int32 counters hold at most {INT32_MAX}")
  if n == 0:
    return jnp.array([0, 0x7F800000, 0, 0, 0], jnp.int32)
  require_lib()
  call = jax.ffi.ffi_call(TARGET_FLOAT_STATS, jax.ShapeDtypeStruct((5,), jnp.int32), vmap_method="sequential")
  out = call(x, q, fmt=np.int32(_FMT_CODE[qdt.name]), isa=np.int32(isa_code))
  return match_varying(out, x, q)


def float_cast_stats(x, dtype, *, isa: str = "auto") -> tuple[jax.Array, jax.Array]:
  """``(x.astype(dtype), float_stats(x, x.astype(dtype)))`` in one C++ pass over float32 ``x``.

  ``dtype``: float16 or bfloat16. The cast is bit for bit XLA:CPU's convert (round to nearest even,
  overflow to Inf, float32 subnormals: float16 0, bfloat16 kept; NaN: float16 quiet with the payload's
  top bits, bfloat16 the canonical quiet NaN), so an op may use it as its GEMM operand and the
  statistics' identical call merges with it (XLA CSE): one pass per operand.
  """
  isa_code = isa_attribute(isa)
  dt = dtype_of("x", x)
  if dt.name != "float32":
    raise TypeError(f"x must have dtype float32, got {dt.name}")
  qdt = jnp.dtype(dtype)
  if qdt.name not in _FMT_CODE:
    raise TypeError(f"dtype must be float16 or bfloat16, got {qdt.name}")
  shape = tuple(np.shape(x))
  n = int(np.prod(shape))
  if n > INT32_MAX:
    raise ValueError(f"x has {n} elements; the int32 counters hold at most {INT32_MAX}")
  if n == 0:
    return jnp.zeros(shape, qdt), jnp.array([0, 0x7F800000, 0, 0, 0], jnp.int32)
  require_lib()
  call = jax.ffi.ffi_call(TARGET_FLOAT_CAST_STATS, (jax.ShapeDtypeStruct(shape, qdt),
                                                    jax.ShapeDtypeStruct((5,), jnp.int32)),
                          vmap_method="sequential")
  q, counts = call(x, fmt=np.int32(_FMT_CODE[qdt.name]), isa=np.int32(isa_code))
  return match_varying(q, x), match_varying(counts, x)
