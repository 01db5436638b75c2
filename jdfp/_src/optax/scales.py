"""Loss scaling for FP16 mixed precision (docs/design.md §4), with the interface jmp users know.

A loss scale multiplies the loss by ``S`` before differentiation, so that small gradients survive
in float16, and divides the gradients by ``S`` before the optimizer sees them. Three policies:

- ``NoOpLossScale``: ``S = 1`` (FP32, BF16, DFP and HBFP need no scaling).
- ``StaticLossScale(S)``: a fixed ``S``.
- ``DynamicLossScale()``: start at ``2**15``, halve (and skip the step) when a gradient is Inf/NaN,
  double after ``period`` clean steps.

Differences from jmp, on purpose:

- The scale is always float32 and all arithmetic with it happens in (at least) float32. jmp casts
  the scale to the gradient's dtype, so a float16 tree overflows to Inf once ``S > 65504`` and a
  tiny ``1/S`` flushes to zero.
- The dynamic scale is clamped to ``[min_loss_scale, max_loss_scale]`` (default ``[1, 2**24]``), so
  no sequence of overflows or clean steps can make it 0 or Inf.
- ``all_finite`` and ``adjust`` take ``axis_name``: the finite flag is reduced with ``lax.pmin``
  across replicas, so every replica of a ``pmap``/``shard_map`` makes the identical decision even
  when each holds a different shard of the gradients.

All three are registered pytrees (array leaves: the scale and the counter; static: the
hyper-parameters), so they can be part of an optax state or a ``jit``/``scan`` carry.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

AxisName = Any  # a hashable axis name or a tuple of them (as lax.pmin accepts)

# The dynamic scale's bounds when none are given. 2**24 keeps S * (the largest float16, 65504)
# far inside float32's range, and S >= 1 means the scale never shrinks gradients.
DEFAULT_MIN_LOSS_SCALE = 1.0
DEFAULT_MAX_LOSS_SCALE = float(2**24)
DEFAULT_INITIAL_LOSS_SCALE = float(2**15)  # docs/design.md §4
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_float(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def _compute_dtype(dtype):
  """At least float32: scaling in float16 would overflow (S > 65504) or flush 1/S to zero."""
  return jnp.promote_types(dtype, jnp.float32)


def _multiply(tree, factor: jax.Array, *, keep_dtype: bool):
  """``x * factor`` for every float leaf, computed in >= float32; other leaves pass through."""

  def mul(x):
    x = jnp.asarray(x) if isinstance(x, (float, np.floating)) else x
    if not _is_float(x):
      return x  # integer or float0 leaves (e.g. gradients of integer inputs): nothing to scale
    y = x.astype(_compute_dtype(x.dtype)) * factor.astype(_compute_dtype(x.dtype))
    return y.astype(x.dtype) if keep_dtype else y

  return jax.tree.map(mul, tree)


def _check_static_number(value, name: str, *, low: float, low_inclusive: bool = True) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise TypeError(f"{name} must be a real number, got {value!r}")
  value = float(value)
  if not math.isfinite(value) or value > _FLOAT32_MAX:
    raise ValueError(f"{name} must be finite and representable in float32, got {value}")
  if value < low or (value == low and not low_inclusive):
    op = ">=" if low_inclusive else ">"
    raise ValueError(f"{name} must be {op} {low}, got {value}")
  return value


def _as_scale_array(value, name: str = "loss_scale") -> jax.Array:
  """The scale as a float32 scalar array; checks range when the value is concrete."""
  if isinstance(value, bool) or isinstance(value, str):
    raise TypeError(f"{name} must be a positive float scalar, got {value!r}")
  try:
    arr = jnp.asarray(value)
  except TypeError as e:
    raise TypeError(f"{name} must be a positive float scalar, got {value!r}") from e
  if arr.shape != ():
    raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
  if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
    raise TypeError(f"{name} must be a real number, got dtype {arr.dtype}")
  arr = arr.astype(jnp.float32)
  if not isinstance(arr, jax.core.Tracer):
    v = float(arr)
    if not (math.isfinite(v) and v > 0):
      raise ValueError(f"{name} must be finite and > 0, got {v}")
  return arr


def _as_counter_array(value) -> jax.Array:
  arr = jnp.asarray(value)
  if arr.shape != () or not jnp.issubdtype(arr.dtype, jnp.integer):
    raise TypeError(f"counter must be an integer scalar, got {value!r}")
  return arr.astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Finite checks and selection.


def all_finite(tree, *, axis_name: AxisName | None = None) -> jax.Array:
  """True (a bool scalar array) when every float leaf of ``tree`` is free of Inf and NaN.

  Args:
    tree: any pytree; integer and float0 leaves are ignored.
    axis_name: a ``pmap``/``shard_map`` axis name (or tuple of names). When given, the result is
      True only if it is True on every replica (``lax.pmin``), so all replicas agree even when
      each checks a different shard of the gradients.
  """
  leaves = [x for x in jax.tree.leaves(tree) if _is_float(x)]
  if leaves:
    ok = jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()
  else:
    ok = jnp.array(True)
  if axis_name is not None:
    # pmin on an int: every replica gets the same answer (bool collectives are not portable).
    ok = jax.lax.pmin(ok.astype(jnp.int32), axis_name) == 1
  return ok


def select_tree(pred, a, b):
  """``a`` where the scalar bool ``pred`` is True, else ``b``, leaf by leaf (like jmp).

  Unlike ``jnp.where`` it keeps each leaf's dtype and never mixes the two trees' values, so NaN in
  the rejected tree cannot leak (``lax.select`` picks, it does not compute ``0 * NaN``).
  """
  pred = jnp.asarray(pred)
  if pred.shape != () or pred.dtype != jnp.bool_:
    raise TypeError(f"select_tree: pred must be a bool scalar, got dtype {pred.dtype} shape {pred.shape}")
  if jax.tree.structure(a) != jax.tree.structure(b):
    raise ValueError(
        f"select_tree: a and b must have the same tree structure, got {jax.tree.structure(a)} and "
        f"{jax.tree.structure(b)}")
  return jax.tree.map(lambda x, y: jax.lax.select(pred, x, y), a, b)


# ----------------------------------------------------------------------------------------------
# Loss scales.


class LossScale:
  """Base class: ``scale``, ``unscale``, ``adjust`` and the float32 ``loss_scale``."""

  @property
  def loss_scale(self) -> jax.Array:
    raise NotImplementedError

  def scale(self, tree):
    """Multiplies every float leaf by the scale (in >= float32, result in the leaf's dtype)."""
    return _multiply(tree, self.loss_scale, keep_dtype=True)

  def unscale(self, tree, *, upcast: bool = False):
    """Divides every float leaf by the scale.

    Args:
      tree: scaled gradients.
      upcast: if True, float16/bfloat16 leaves come back as float32 (the product is computed in
        float32 either way). Unscaling back into float16 would flush exactly the small gradients
        that loss scaling exists to keep, so optimizer code should upcast.
    """
    inv = jnp.float32(1.0) / self.loss_scale  # exact for the power-of-two scales used in practice
    return _multiply(tree, inv, keep_dtype=not upcast)

  def adjust(self, grads_finite, *, axis_name: AxisName | None = None) -> "LossScale":
    raise NotImplementedError


def _register(cls, data_fields: Sequence[str], meta_fields: Sequence[str]):
  """Registers ``cls`` as a pytree; unflattening bypasses ``__init__`` (and its validation), so
  transformations may put tracers or placeholders in the leaves."""

  def flatten_with_keys(obj):
    children = [(jax.tree_util.GetAttrKey(f), getattr(obj, f)) for f in data_fields]
    return children, tuple(getattr(obj, f) for f in meta_fields)

  def unflatten(meta, children):
    obj = object.__new__(cls)
    obj.__dict__.update(zip(data_fields, children))
    obj.__dict__.update(zip(meta_fields, meta))
    return obj

  jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten)
  return cls


class _Frozen:
  """Immutable after construction (pickle and copy restore ``__dict__`` directly, so they work)."""

  def __setattr__(self, name, value):
    raise AttributeError(f"{type(self).__name__} is immutable; use adjust() or replace()")


class NoOpLossScale(_Frozen, LossScale):
  """A scale of 1: ``scale``/``unscale`` return the tree unchanged, ``adjust`` returns self."""

  @property
  def loss_scale(self) -> jax.Array:
    return jnp.ones([], jnp.float32)

  def scale(self, tree):
    return tree

  def unscale(self, tree, *, upcast: bool = False):
    if not upcast:
      return tree
    return jax.tree.map(lambda x: x.astype(_compute_dtype(x.dtype)) if _is_float(x) else x, tree)

  def adjust(self, grads_finite, *, axis_name: AxisName | None = None) -> "NoOpLossScale":
    del grads_finite, axis_name
    return self

  def __repr__(self):
    return "NoOpLossScale()"


class StaticLossScale(_Frozen, LossScale):
  """A fixed scale ``S`` (float32); ``adjust`` returns self.

  Args:
    loss_scale: the scale ``S`` > 0 (SSD trained in FP16 with ``S = 8``, docs/design.md §4).
  """

  def __init__(self, loss_scale):
    object.__setattr__(self, "_loss_scale", _as_scale_array(loss_scale))

  @property
  def loss_scale(self) -> jax.Array:
    return self._loss_scale

  def adjust(self, grads_finite, *, axis_name: AxisName | None = None) -> "StaticLossScale":
    del grads_finite, axis_name
    return self

  def __repr__(self):
    return f"StaticLossScale({self._loss_scale!r})"


class DynamicLossScale(_Frozen, LossScale):
  """A scale that halves on overflow and doubles after ``period`` clean steps (docs/design.md §4).

  Args:
    loss_scale: initial scale (default ``2**15``), kept as a float32 scalar.
    counter: clean steps since the last change (int32; default 0).
    period: clean steps before the scale grows (default 2000).
    factor: growth / shrink factor (default 2; a power of two keeps ``1/S`` exact).
    min_loss_scale: lower bound (default 1); the scale never goes below it, so never reaches 0.
    max_loss_scale: upper bound (default ``2**24``); the scale never grows past it, so never Inf.

  ``adjust(grads_finite)`` returns the next state: on a non-finite step the scale becomes
  ``max(S / factor, min)`` and the counter resets; on a finite step the counter counts up and, at
  ``period``, the scale becomes ``min(S * factor, max)`` and the counter resets.
  """

  def __init__(self, loss_scale=DEFAULT_INITIAL_LOSS_SCALE, counter=0, period: int = 2000,
               factor: float = 2, min_loss_scale: float = DEFAULT_MIN_LOSS_SCALE,
               max_loss_scale: float = DEFAULT_MAX_LOSS_SCALE):
    if isinstance(period, bool) or not isinstance(period, (int, np.integer)):
      raise TypeError(f"period must be an int >= 1, got {period!r}")
    if period < 1:
      raise ValueError(f"period must be >= 1, got {period}")
    factor = _check_static_number(factor, "factor", low=1.0, low_inclusive=False)
    min_loss_scale = _check_static_number(min_loss_scale, "min_loss_scale", low=0.0,
                                          low_inclusive=False)
    max_loss_scale = _check_static_number(max_loss_scale, "max_loss_scale", low=min_loss_scale)
    scale = _as_scale_array(loss_scale)
    if not isinstance(scale, jax.core.Tracer):
      if not min_loss_scale <= float(scale) <= max_loss_scale:
        raise ValueError(
            f"loss_scale must lie in [min_loss_scale, max_loss_scale] = [{min_loss_scale}, "
            f"{max_loss_scale}], got {float(scale)}")
    set_ = object.__setattr__
    set_(self, "_loss_scale", scale)
    set_(self, "counter", _as_counter_array(counter))
    set_(self, "period", int(period))
    set_(self, "factor", factor)
    set_(self, "min_loss_scale", min_loss_scale)
    set_(self, "max_loss_scale", max_loss_scale)

  @property
  def loss_scale(self) -> jax.Array:
    return self._loss_scale

  def replace(self, **changes) -> "DynamicLossScale":
    """A copy with some fields changed (validated like the constructor)."""
    kwargs = dict(loss_scale=self._loss_scale, counter=self.counter, period=self.period,
                  factor=self.factor, min_loss_scale=self.min_loss_scale,
                  max_loss_scale=self.max_loss_scale)
    unknown = set(changes) - set(kwargs)
    if unknown:
      raise TypeError(f"DynamicLossScale.replace: unknown fields {sorted(unknown)}")
    kwargs.update(changes)
    return DynamicLossScale(**kwargs)

  def adjust(self, grads_finite, *, axis_name: AxisName | None = None) -> "DynamicLossScale":
    """The next state after a step whose gradients were (not) all finite.

    Args:
      grads_finite: a bool scalar, e.g. ``all_finite(grads)``.
      axis_name: if given, the flag is first reduced across replicas (``lax.pmin``), so every
        replica halves or grows identically.
    """
    ok = jnp.asarray(grads_finite)
    if ok.shape != () or ok.dtype != jnp.bool_:
      raise TypeError(f"grads_finite must be a bool scalar, got dtype {ok.dtype} shape {ok.shape}")
    if axis_name is not None:
      ok = jax.lax.pmin(ok.astype(jnp.int32), axis_name) == 1
    s = self._loss_scale.astype(jnp.float32)
    factor = jnp.float32(self.factor)
    lo, hi = jnp.float32(self.min_loss_scale), jnp.float32(self.max_loss_scale)
    grow = self.counter + 1 >= self.period
    grown = jnp.where(grow, jnp.minimum(s * factor, hi), s)
    shrunk = jnp.maximum(s / factor, lo)
    # The final clip guards against a scale that was put out of range by hand (e.g. a restored
    # checkpoint): whatever happened before, the result is finite and within the bounds.
    new_scale = jnp.clip(jnp.where(ok, grown, shrunk), lo, hi).astype(jnp.float32)
    new_counter = jnp.where(ok & ~grow, self.counter + 1, 0).astype(jnp.int32)
    # Bypass __init__: the new leaves may be tracers and are in range by construction.
    out = object.__new__(DynamicLossScale)
    out.__dict__.update(self.__dict__, _loss_scale=new_scale, counter=new_counter)
    return out

  def __repr__(self):
    return (f"DynamicLossScale(loss_scale={self._loss_scale!r}, counter={self.counter!r}, "
            f"period={self.period}, factor={self.factor}, min_loss_scale={self.min_loss_scale}, "
            f"max_loss_scale={self.max_loss_scale})")


_register(NoOpLossScale, (), ())
_register(StaticLossScale, ("_loss_scale",), ())
_register(DynamicLossScale, ("_loss_scale", "counter"),
          ("period", "factor", "min_loss_scale", "max_loss_scale"))


def check_loss_scale(loss_scale, name: str = "loss_scale") -> LossScale:
  if not isinstance(loss_scale, LossScale):
    raise TypeError(
        f"{name} must be a jdfp loss scale (NoOpLossScale, StaticLossScale or DynamicLossScale), "
        f"got {loss_scale!r}")
  return loss_scale
