"""Quantize float arrays to a jdfp format and back (pure JAX; jit, vmap and grad friendly)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jdfp._src.numerics import formats, philox
from jdfp._src.numerics.formats import DFP, FloatFormat, NONFINITE_EXPONENT, ZERO_EXPONENT


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized array: ``values * 2**exponent`` with ``exponent`` broadcast over its blocks.

  Attributes:
    values: int16 integers (float16/bfloat16 values for FP16/BF16 formats), the array's shape.
    exponent: int32 per-block exponents; one axis per axis of ``values``, of length
      ``ceil(n / block)`` (1 where the exponent is shared along the whole axis).
    fmt: the format (static).
    blocks: the block shape used (static; None means ``fmt.block_shape(values.shape)``).
  """

  values: jax.Array
  exponent: jax.Array
  fmt: formats.Format = dataclasses.field(metadata=dict(static=True))
  blocks: tuple[int, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))

  @property
  def shape(self):
    return self.values.shape

  @property
  def ndim(self):
    return self.values.ndim

  @property
  def block_shape(self) -> tuple[int, ...]:
    if not self.fmt.is_integer:
      return tuple(max(n, 1) for n in self.values.shape)
    if self.blocks is not None:
      return self.blocks
    return self.fmt.block_shape(self.values.shape)

  def dequantize(self) -> jax.Array:
    return dequantize(self)


def check_rounding(rounding, key):
  if rounding not in formats.ROUNDING_MODES:
    raise ValueError(f"rounding must be one of {formats.ROUNDING_MODES}, got {rounding!r}")
  if rounding == "stochastic" and key is None:
    raise ValueError("rounding='stochastic' needs a PRNG key: pass key=jax.random.key(...)")


def as_float_input(x, name: str = "x") -> jax.Array:
  """float inputs pass through (float64 -> float32 under x32); integer inputs become float32."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(jnp.float32) if x.dtype != jnp.float32 else x
  if jnp.issubdtype(x.dtype, jnp.integer):
    return x.astype(jnp.float32)
  raise TypeError(f"{name} must be a real float (or integer) array, got dtype {x.dtype}")


def group_exponent(amax: jax.Array, fmt) -> jax.Array:
  """The shared exponent of each group from its max magnitude (docs/design.md §1 for DFP, docs/design.md §3 for BFP)."""
  finite = jnp.isfinite(amax)
  positive = amax > 0
  safe = jnp.where(finite & positive, amax, 1.0)
  k = formats.frexp_exponent(safe)  # safe = f * 2**k, f in [0.5, 1)
  if isinstance(fmt, DFP):
    e = k - (fmt.bits - 1)  # floor(log2 m) + 1 - (bits - 1), floor(log2 m) = k - 1
  else:
    is_pow2 = safe == formats.scale2(jnp.full_like(safe, 0.5), k)
    ceil_log2 = jnp.where(is_pow2, k - 1, k)  # ceil(log2 m)
    e = ceil_log2 - fmt.mantissa_bits
  e = jnp.where(positive, e, ZERO_EXPONENT)
  return jnp.where(finite, e, NONFINITE_EXPONENT).astype(jnp.int32)


def round_to_int(y: jax.Array, rounding: str, key) -> jax.Array:
  """Round float32 y to integers (as float32) with the named rule (docs/arithmetic.md)."""
  if rounding == "nearest":
    return jnp.round(y)  # half to even
  if rounding == "biased":
    mag = jnp.abs(y)
    low = jnp.floor(mag)
    return jnp.sign(y) * (low + (mag - low >= 0.25).astype(y.dtype))
  # Stochastic: floor(y) + Bernoulli(frac). A 24-bit uniform keeps u exact in float32, and the
  # comparison (instead of floor(y + u)) avoids the rounding of y + u for large |y|. The bits are
  # Philox-4x32-10 by row-major element index, as the C++ kernels draw them (docs/arithmetic.md).
  low = jnp.floor(y)
  frac = y - low
  bits = philox.philox_bits(key, y.shape) >> np.uint32(8)
  u = bits.astype(jnp.float32) * np.float32(2.0**-24)
  return low + (u < frac).astype(y.dtype)


def quantize_array(x, fmt, *, rounding: str = "nearest", key=None, axis_name=None) -> QArray:
  """Quantize ``x`` to ``fmt``.

  Args:
    x: a float array (integer arrays are converted to float32).
    fmt: ``DFP``, ``BFP``, ``FP16`` or ``BF16``.
    rounding: ``"nearest"`` (half to even), ``"stochastic"`` (unbiased; needs ``key``) or
      ``"biased"`` (Intel's: magnitude up when the discarded fraction is >= 1/4). FP16/BF16 only
      support ``"nearest"``.
    key: a JAX PRNG key for stochastic rounding.
    axis_name: inside `pmap` / `shard_map`, a mapped axis name (or tuple) whose replicas agree on
      the exponents: each block's max is `lax.pmax`-ed over it before the exponent is taken.

  Returns:
    A ``QArray``. NaN/Inf make their group's exponent ``NONFINITE_EXPONENT`` so the group
    dequantizes to NaN.
  """
  formats.check_format(fmt)
  check_rounding(rounding, key)
  x = as_float_input(x)
  bshape = fmt.block_shape(x.shape) if fmt.is_integer else None
  return _quantize(x, key if rounding == "stochastic" else None, fmt, rounding, bshape,
                   normalize_axis_name(axis_name))


def shared_amax(amax, axis_name):
  """``lax.pmax`` of per-block maxima over the replicas of ``axis_name`` (Inf, from NaN/Inf, wins: a
  non-finite replica taints all), with an error that says what to do when the axis is not bound."""
  try:
    return jax.lax.pmax(amax, axis_name)
  except NameError as e:
    raise NameError(
        f"jdfp: axis_name={axis_name!r} (Policy.axis_name / jdfp.parallel.data_parallel) is not a mapped axis "
        "here: call the op inside jax.pmap(..., axis_name=...) or jax.shard_map over a mesh axis of that name, "
        f"or use axis_name=None ({e})") from None


def normalize_axis_name(axis_name):
  """A mapped axis name as `lax.pmax` takes it (a list of names becomes a tuple)."""
  return tuple(axis_name) if isinstance(axis_name, list) else axis_name


def quantize_blocks(x, fmt, bshape: tuple[int, ...], *, rounding: str = "nearest", key=None,
                    axis_name=None) -> QArray:
  """Like `quantize_array` but with an explicit block shape (the ops choose blocks per GEMM view).

  The returned QArray records ``bshape``; `dequantize` and the GEMM exponent maps use it. Pure JAX:
  the ops convert on the C++ kernel through `jdfp._src.ops.convert`, bit-identical to this.
  """
  formats.check_format(fmt)
  check_rounding(rounding, key)
  return _quantize(as_float_input(x), key if rounding == "stochastic" else None, fmt, rounding, tuple(bshape),
                   normalize_axis_name(axis_name))


# One jit per (shape, format, rounding): eager callers get one compiled program instead of a
# dozen small ones, and inside an outer jit this simply inlines.
@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _quantize(x, key, fmt, rounding, bshape, axis_name=None) -> QArray:
  if isinstance(fmt, FloatFormat):
    return quantize_float(x, fmt, rounding)
  if x.size == 0:
    return quantize_empty(x, fmt, bshape)
  amax = formats.block_amax(x, bshape)
  if axis_name is not None:
    amax = shared_amax(amax, axis_name)
  return quantize_given_amax(x, amax, fmt, rounding, key, bshape)


def quantize_float(x, fmt, rounding) -> QArray:
  """FP16 / BF16: a cast (round to nearest even), with a dummy exponent."""
  if rounding != "nearest":
    raise ValueError(f"rounding={rounding!r} is not supported for {fmt!r}; use 'nearest'")
  return QArray(x.astype(fmt.dtype), jnp.zeros((1,) * x.ndim, jnp.int32), fmt, None)


def quantize_empty(x, fmt, bshape) -> QArray:
  """A zero-size integer QArray (exponent grid of the right shape, no values)."""
  grid = formats.grid_shape(x.shape, bshape)
  return QArray(jnp.zeros(x.shape, jnp.int16), jnp.zeros(grid, jnp.int32), fmt, bshape)


def quantize_given_amax(x, amax, fmt, rounding, key, bshape) -> QArray:
  """Quantize with the per-block maxima given (delayed scaling passes a history's max; larger
  elements saturate at qmax). ``amax`` must be Inf for blocks holding NaN/Inf."""
  return quantize_given_exponent(x, group_exponent(amax, fmt), fmt, rounding, key, bshape)


def quantize_given_exponent(x, e, fmt, rounding, key, bshape) -> QArray:
  """Quantize with the per-block exponents ``e`` given (`NONFINITE_EXPONENT` blocks become 0): the
  conversion step of every quantizer, and how a backward pass re-reads a float residual
  (``Policy(float_residuals=...)``) bit for bit as the forward's int16 operand."""
  e_full = formats.expand_blocks(e, bshape, x.shape)
  nonfinite = e_full == NONFINITE_EXPONENT
  y = formats.scale2(jnp.where(nonfinite, 0.0, x), -jnp.where(nonfinite, 0, e_full))
  i = jnp.clip(round_to_int(y, rounding, key), -fmt.qmax, fmt.qmax)
  return QArray(i.astype(jnp.int16), e, fmt, bshape)


def dequantize(q: QArray, dtype=jnp.float32) -> jax.Array:
  """Values of a ``QArray`` as floats (NaN where the group was non-finite)."""
  if not isinstance(q, QArray):
    raise TypeError(f"dequantize expects a jdfp.QArray, got {type(q).__name__}")
  return _dequantize(q, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(q: QArray, dtype) -> jax.Array:
  if not q.fmt.is_integer:
    return q.values.astype(dtype)
  e_full = formats.expand_blocks(q.exponent, q.block_shape, q.values.shape)
  nonfinite = e_full == NONFINITE_EXPONENT
  x = formats.scale2(q.values.astype(jnp.float32), jnp.where(nonfinite, 0, e_full))
  return jnp.where(nonfinite, jnp.nan, x).astype(dtype)


def fake_quantize(x, fmt, *, rounding: str = "nearest", key=None) -> jax.Array:
  """``dequantize(quantize_array(x, fmt))`` in the input's float dtype: x rounded onto fmt's grid."""
  x = jnp.asarray(x)
  dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  return dequantize(quantize_array(x, fmt, rounding=rounding, key=key), dtype)
