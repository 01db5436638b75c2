"""Operand layouts: how an operand of any rank maps onto the kernel's 3-D ``[batch, rows, cols]``
view (a transpose only where no free view exists), and `dot_general`'s dimension numbers."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# JAX's own functions, captured at import: the Flax integration swaps the public names while a
# model runs, and these checks must reach lax itself.
_LAX_DOT_GENERAL = lax.dot_general
_LAX_CONV_GENERAL_DILATED = lax.conv_general_dilated

@dataclasses.dataclass(frozen=True)
class View:
  """How an operand of rank n maps onto a physical 3-D ``[B, R, C]`` array.

  ``perm`` is applied first (identity when no copy is needed); ``c_ax`` (1 or 2) is the physical
  axis holding the contraction dims of the *forward* GEMM; the other one holds the free dims.
  """

  perm: tuple[int, ...]
  shape3: tuple[int, int, int]
  c_ax: int

  @property
  def f_ax(self) -> int:
    return 3 - self.c_ax


def prod(xs) -> int:
  return int(math.prod(xs))


def make_view(shape, batch, contract, prefer_contract_last: bool) -> View:
  ndim = len(shape)
  free = tuple(d for d in range(ndim) if d not in batch and d not in contract)
  b, k, f = prod(shape[d] for d in batch), prod(shape[d] for d in contract), prod(shape[d] for d in free)
  ident = tuple(range(ndim))
  last = tuple(batch) + free + tuple(contract)
  first = tuple(batch) + tuple(contract) + free
  options = [(last, (b, f, k), 2), (first, (b, k, f), 1)]
  if not prefer_contract_last:
    options.reverse()
  for perm, shape3, c_ax in options:
    if perm == ident:
      return View(perm, shape3, c_ax)
  perm, shape3, c_ax = options[0]
  return View(perm, shape3, c_ax)


def to3(x, view: View):
  if view.perm != tuple(range(x.ndim)):
    x = jnp.transpose(x, view.perm)
  return x.reshape(view.shape3)


def from3(x3, view: View, shape):
  permuted_shape = tuple(shape[d] for d in view.perm)
  x = x3.reshape(permuted_shape)
  if view.perm != tuple(range(len(shape))):
    x = jnp.transpose(x, np.argsort(view.perm))
  return x


def check_float(name, x):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"jdfp ops take float operands; {name} has dtype {x.dtype}")


def canonical_dims(dimension_numbers, lhs_ndim, rhs_ndim):
  try:
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(d) for d in ds) for ds in (lc, rc, lb, rb))
  except (TypeError, ValueError):
    raise ValueError(f"dimension_numbers must be ((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch)), "
                     f"got {dimension_numbers!r}") from None
  lc = tuple(d % lhs_ndim for d in lc)
  lb = tuple(d % lhs_ndim for d in lb)
  rc = tuple(d % rhs_ndim for d in rc)
  rb = tuple(d % rhs_ndim for d in rb)
  return (lc, rc), (lb, rb)


def views(lhs_shape, rhs_shape, dims):
  (lc, rc), (lb, rb) = dims
  return (make_view(lhs_shape, lb, lc, prefer_contract_last=True),
          make_view(rhs_shape, rb, rc, prefer_contract_last=False))


def out_shape(lhs_shape, rhs_shape, dims):
  (lc, rc), (lb, rb) = dims
  lf = [lhs_shape[d] for d in range(len(lhs_shape)) if d not in lc and d not in lb]
  rf = [rhs_shape[d] for d in range(len(rhs_shape)) if d not in rc and d not in rb]
  return tuple(lhs_shape[d] for d in lb) + tuple(lf) + tuple(rf)


def result_dtype(lhs, rhs, preferred_element_type):
  if preferred_element_type is not None:
    dt = jnp.dtype(preferred_element_type)
    if not jnp.issubdtype(dt, jnp.floating):
      raise TypeError(f"preferred_element_type must be a float dtype for jdfp ops, got {dt}")
    return dt
  return jnp.result_type(lhs.dtype, rhs.dtype)


def _struct(x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, jnp.float32)


# Shapes `lax` already accepted, by op and static arguments: `jax.eval_shape` traces lax's rule
# anew on every call (a third of a quantized MLP step's trace time went there). Only successes are
# kept, so invalid arguments raise lax's own error every time.
_SHAPES: dict = {}
_MAX_SHAPES = 4096


def _frozen(x):
  return tuple(_frozen(v) for v in x) if isinstance(x, (list, tuple)) else x


def _lax_shape(fn, lhs, rhs, *args) -> jax.ShapeDtypeStruct:
  key = (fn, tuple(lhs.shape), tuple(rhs.shape), _frozen(args))
  try:
    shape = _SHAPES.get(key)
  except TypeError:  # an unhashable static argument: no caching
    key, shape = None, None
  if shape is None:
    shape = jax.eval_shape(lambda a, b: fn(a, b, *args), _struct(lhs), _struct(rhs)).shape
    if key is not None and len(_SHAPES) < _MAX_SHAPES:
      _SHAPES[key] = shape
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def lax_dot_general_shape(lhs, rhs, dimension_numbers, precision=None) -> jax.ShapeDtypeStruct:
  """The result of `lax.dot_general` on these shapes, found abstractly: invalid dimension numbers
  raise exactly what lax raises (same exception type and message), at trace time."""
  return _lax_shape(_LAX_DOT_GENERAL, lhs, rhs, dimension_numbers, precision)


def lax_conv_shape(lhs, rhs, *args) -> jax.ShapeDtypeStruct:
  """The result of `lax.conv_general_dilated(lhs, rhs, *args)` on these shapes, found abstractly
  (invalid geometry raises what lax raises)."""
  return _lax_shape(_LAX_CONV_GENERAL_DILATED, lhs, rhs, *args)
