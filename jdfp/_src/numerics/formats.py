"""Number formats: dynamic fixed point (DFP), block floating point (BFP/HBFP), FP16 and BF16.

A format is a frozen, hashable dataclass, so it can be a static argument of `jax.jit` and a field of
other frozen configs. The integer formats share one idea: values are int16 integers `i` and every
group of elements (the whole tensor, a row, a 1-D block or a 2-D tile) shares one power-of-two
exponent `e`, so that `x = i * 2**e`. Which elements share an exponent is described per axis by a
*block shape* (see `block_shape`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

# Exponent marking a group that held NaN or Inf: it has no DFP representation, and everything
# computed from it must come out NaN (docs/arithmetic.md).
NONFINITE_EXPONENT = 2**30
# Exponent of an all-zero group (any value works; fixed so results are reproducible).
ZERO_EXPONENT = 0
# Exponents are clamped to this range before they are added, so that sums never wrap int32.
# scale2 saturates long before this, so the clamp never changes a result.
EXPONENT_CLAMP = 1000

ROUNDING_MODES = ("nearest", "stochastic", "biased")

Axis = int | tuple[int, ...] | None


def _normalize_axis(axis: Axis, name: str = "axis") -> Axis:
  if axis is None:
    return None
  if isinstance(axis, (int, np.integer)):
    return int(axis)
  if isinstance(axis, (tuple, list)) and all(isinstance(a, (int, np.integer)) for a in axis):
    return tuple(int(a) for a in axis)
  raise TypeError(f"{name} must be None, an int or a tuple of ints, got {axis!r}")


def _normalize_block(block: Any, name: str = "block") -> int | tuple[int, int] | None:
  if block is None:
    return None
  if isinstance(block, (int, np.integer)) and not isinstance(block, bool):
    if block < 1:
      raise ValueError(f"{name} must be >= 1, got {block}")
    return int(block)
  if isinstance(block, (tuple, list)) and len(block) == 2:
    if all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1 for b in block):
      return (int(block[0]), int(block[1]))
  raise ValueError(f"{name} must be None, an int >= 1 or a pair of ints >= 1 (a 2-D tile), got {block!r}")


class _SharedExponentFormat:
  """Shared pieces of DFP and BFP: which elements share an exponent."""

  axis: Axis
  block: int | tuple[int, int] | None
  is_integer: ClassVar[bool] = True

  def block_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per axis, how many consecutive elements share one exponent.

    - ``block`` a pair ``(r, c)``: 2-D tiles over the last two axes (leading axes: one tile each).
    - ``block`` an int: 1-D blocks of that length along ``axis`` (an int); every other index has its
      own exponents.
    - ``block`` None: the exponent is shared along ``axis`` (None: the whole tensor).
    """
    ndim = len(shape)
    if isinstance(self.block, tuple):
      if ndim < 2:
        # A 1-D tensor (a bias, say) gets 1-D blocks of the tile's column length.
        return tuple(min(self.block[1], max(n, 1)) for n in shape)
      return (1,) * (ndim - 2) + (self.block[0], self.block[1])
    if ndim == 0:
      return ()
    if self.axis is None:
      axes = set(range(ndim))
    else:
      raw = self.axis if isinstance(self.axis, tuple) else (self.axis,)
      for a in raw:
        if not -ndim <= a < ndim:
          raise ValueError(f"axis {a} is out of range for an array of rank {ndim} (format {self})")
      axes = {a % ndim for a in raw}
    if isinstance(self.block, int):
      if len(axes) != 1:
        raise ValueError(f"1-D blocks need a single axis, got axis={self.axis!r} (format {self})")
      return tuple(self.block if i in axes else 1 for i in range(ndim))
    return tuple(max(shape[i], 1) if i in axes else 1 for i in range(ndim))

  @property
  def qmax(self) -> int:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class DFP(_SharedExponentFormat):
  """Dynamic fixed point (Das et al. 2018): int16 values, one shared power-of-two exponent.

  Args:
    bits: bits actually used, sign included (2..16); values lie in ``[-qmax, qmax]``,
      ``qmax = 2**(bits-1) - 1``. Intel's DFP16 training used 14 effective bits.
    axis: axes along which one exponent is shared (None: the whole tensor, the paper's choice;
      ``-1``: one exponent per row of the last axis).
    block: optional 1-D block length along ``axis`` (an int) or a 2-D tile ``(rows, cols)``.

  Exponent rule (docs/design.md §1): ``e = floor(log2(max|x|)) + 1 - (bits - 1)``.
  """

  bits: int = 16
  axis: Axis = None
  block: int | tuple[int, int] | None = None

  def __post_init__(self):
    if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
      raise TypeError(f"DFP bits must be an int in 2..16, got {self.bits!r}")
    if not 2 <= self.bits <= 16:
      raise ValueError(f"DFP bits must be in 2..16, got {self.bits}")
    object.__setattr__(self, "bits", int(self.bits))
    object.__setattr__(self, "axis", _normalize_axis(self.axis))
    object.__setattr__(self, "block", _normalize_block(self.block))

  @property
  def qmax(self) -> int:
    return 2 ** (self.bits - 1) - 1

  @property
  def int_bits(self) -> int:
    """Bits of the integer values, sign included (what bounds the int32 chain length)."""
    return self.bits

  def __repr__(self):
    extra = "".join(f", {k}={getattr(self, k)!r}" for k in ("axis", "block") if getattr(self, k) is not None)
    return f"DFP(bits={self.bits}{extra})"


@dataclasses.dataclass(frozen=True)
class BFP(_SharedExponentFormat):
  """Hybrid block floating point (Drumond et al. 2018): a shared exponent per block or tile.

  Args:
    mantissa_bits: magnitude bits ``m`` (sign extra); HBFP8 is 7, HBFP12 is 11, the wide weight
      copy 15. Values lie in ``[-(2**m - 1), 2**m - 1]``.
    block: ``(24, 24)`` tiles over the last two axes (default, the paper's weights), an int for 1-D
      blocks along ``axis`` (MX style), or None for one exponent along ``axis`` (``axis=-1``: per
      row / per sample, the paper's activations and gradients).
    axis: see ``block``.

  Exponent rule (docs/design.md §3): ``E = ceil(log2(max|x|))``, step ``2**(E - m)``.
  """

  mantissa_bits: int = 7
  block: int | tuple[int, int] | None = (24, 24)
  axis: Axis = -1

  def __post_init__(self):
    m = self.mantissa_bits
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
      raise TypeError(f"BFP mantissa_bits must be an int in 1..15, got {m!r}")
    if not 1 <= m <= 15:
      raise ValueError(f"BFP mantissa_bits must be in 1..15 (int16 storage), got {m}")
    object.__setattr__(self, "mantissa_bits", int(m))
    object.__setattr__(self, "axis", _normalize_axis(self.axis))
    object.__setattr__(self, "block", _normalize_block(self.block))

  @property
  def qmax(self) -> int:
    return 2**self.mantissa_bits - 1

  @property
  def int_bits(self) -> int:
    return self.mantissa_bits + 1

  def __repr__(self):
    return f"BFP(mantissa_bits={self.mantissa_bits}, block={self.block!r}, axis={self.axis!r})"


@dataclasses.dataclass(frozen=True)
class FloatFormat:
  """An IEEE float storage format (FP16 or BF16) for the mixed-precision recipe."""

  name: str
  is_integer: ClassVar[bool] = False

  def __post_init__(self):
    if self.name not in ("float16", "bfloat16"):
      raise ValueError(f"FloatFormat name must be 'float16' or 'bfloat16', got {self.name!r}")

  @property
  def dtype(self):
    return jnp.dtype(self.name)

  def __repr__(self):
    return "FP16" if self.name == "float16" else "BF16"


FP16 = FloatFormat("float16")
BF16 = FloatFormat("bfloat16")

Format = DFP | BFP | FloatFormat


def check_format(fmt: Any, name: str = "fmt") -> Format:
  if not isinstance(fmt, (DFP, BFP, FloatFormat)):
    raise TypeError(f"{name} must be a jdfp format (DFP, BFP, FP16 or BF16), got {fmt!r}")
  return fmt


# ----------------------------------------------------------------------------------------------
# Power-of-two helpers shared by quantization and the reference GEMM.


def pow2(e: jax.Array) -> jax.Array:
  """2.0**e as float32 for int32 e in [-126, 127], built from the bits (exact)."""
  return jax.lax.bitcast_convert_type((e.astype(jnp.int32) + 127) << 23, jnp.float32)


def scale2(x: jax.Array, e: jax.Array) -> jax.Array:
  """x * 2**e in two exact-where-possible float32 steps (docs/arithmetic.md)."""
  e = jnp.clip(e.astype(jnp.int32), -EXPONENT_CLAMP, EXPONENT_CLAMP)
  e1 = jnp.clip(e, -126, 127)
  e2 = jnp.clip(e - e1, -126, 127)
  return (x * pow2(e1)) * pow2(e2)


def frexp_exponent(m: jax.Array) -> jax.Array:
  """k with m = f * 2**k, f in [0.5, 1), for finite m > 0 (float32, subnormals included)."""
  m = m.astype(jnp.float32)
  subnormal = m < np.float32(2.0**-126)
  m_norm = jnp.where(subnormal, m * np.float32(2.0**64), m)
  biased = (jax.lax.bitcast_convert_type(m_norm, jnp.int32) >> 23) & 0xFF
  return biased - 126 - jnp.where(subnormal, 64, 0)


# ----------------------------------------------------------------------------------------------
# Block reductions.


def grid_shape(shape, bshape):
  return tuple(-(-n // b) if n else 0 for n, b in zip(shape, bshape))


def block_amax(x: jax.Array, bshape: tuple[int, ...]) -> jax.Array:
  """max|x| over each block; NaN if the block holds NaN, Inf if it holds Inf. Shape: the grid."""
  # NaN -> Inf so that one test (amax == inf) flags every non-finite block, whatever max does with NaN.
  ax = jnp.where(jnp.isnan(x), jnp.inf, jnp.abs(x))
  shape = x.shape
  if all(b == max(n, 1) for b, n in zip(bshape, shape)):
    return jnp.max(ax, keepdims=True) if ax.size else jnp.zeros((1,) * x.ndim, ax.dtype)
  reduce_axes = tuple(i for i, (b, n) in enumerate(zip(bshape, shape)) if b == max(n, 1) and b > 1)
  if all(b == 1 or b == max(n, 1) for b, n in zip(bshape, shape)):
    return jnp.max(ax, axis=reduce_axes, keepdims=True) if reduce_axes else ax
  grid = grid_shape(shape, bshape)
  pads = [(0, g * b - n) for g, b, n in zip(grid, bshape, shape)]
  ax = jnp.pad(ax, pads)
  split = []
  for g, b in zip(grid, bshape):
    split += [g, b]
  return jnp.max(ax.reshape(split), axis=tuple(range(1, 2 * x.ndim, 2)))


def expand_blocks(e: jax.Array, bshape: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
  """Broadcast a per-block array (the grid) back to ``shape``."""
  for axis, (b, n) in enumerate(zip(bshape, shape)):
    if e.shape[axis] == n or e.shape[axis] == 1:
      continue
    # A Python-int repeat is a broadcast + reshape; `total_repeat_length` would select jnp.repeat's
    # general path (cumsum, roll, gather: ~100 HLO lines per call, compiled once per GEMM operand).
    e = jnp.repeat(e, b, axis=axis)
    e = jax.lax.slice_in_dim(e, 0, n, axis=axis)
  return e
