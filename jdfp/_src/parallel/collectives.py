"""Data-parallel helpers: a DFP-compressed gradient all-reduce and data-parallel policies.

`psum` / `pmean` send int16 instead of float32 (half the all-reduce bytes):

1. every replica takes the max |g| of each leaf; one `pmax` agrees on it (a scalar per leaf);
2. each replica quantizes its leaf to DFP with one shared exponent and ``bits = 16 - ceil(log2 R)``
   for R replicas, so that the sum of R values of at most ``qmax`` fits int16: the integer sum
   inside the all-reduce is exact, whatever order the collective adds in;
3. `psum` of the int16 values, then ``values * 2**e``.

Error bound per element (nearest rounding): ``R * 2**(e - 1)``, with
``2**e <= 2 * max|g| * 2**-(bits - 1)``; so ``|err| <= R * max|g| * 2**-(bits - 1)``.
Stochastic rounding (with `key`) makes the compressed sum unbiased.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jdfp._src.numerics import formats
from jdfp._src.numerics.formats import DFP, NONFINITE_EXPONENT
from jdfp._src.numerics.quantize import group_exponent, round_to_int


def axis_size(axis_name) -> int:
  """Number of replicas along a mapped axis (a Python int at trace time)."""
  names = axis_name if isinstance(axis_name, (tuple, list)) else (axis_name,)
  n = 1
  for a in names:
    n *= int(lax.psum(1, a))
  return n


def allreduce_bits(replicas: int) -> int:
  """Widest DFP bits whose R-fold int16 sum cannot overflow: ``R * (2**(bits-1) - 1) <= 32767``."""
  bits = 16 - math.ceil(math.log2(max(replicas, 1)))
  if bits < 2:
    raise ValueError(f"an int16 all-reduce over {replicas} replicas leaves fewer than 2 bits")
  return bits


def _psum_leaf(g, axis_name, replicas, bits, rounding, key):
  if not jnp.issubdtype(g.dtype, jnp.floating):
    return lax.psum(g, axis_name)
  fmt = DFP(bits)
  x = g.astype(jnp.float32)
  amax = jnp.max(jnp.where(jnp.isnan(x), jnp.inf, jnp.abs(x))) if x.size else jnp.float32(0)
  amax = lax.pmax(amax, axis_name)  # one exponent for all replicas
  e = group_exponent(amax, fmt)
  nonfinite = e == NONFINITE_EXPONENT
  y = formats.scale2(jnp.where(nonfinite, 0.0, x), -jnp.where(nonfinite, 0, e))
  i = jnp.clip(round_to_int(y, rounding, key), -fmt.qmax, fmt.qmax).astype(jnp.int16)
  total = lax.psum(i, axis_name)  # exact: |sum| <= R * qmax <= 32767
  out = formats.scale2(total.astype(jnp.float32), jnp.where(nonfinite, 0, e))
  return jnp.where(nonfinite, jnp.nan, out).astype(g.dtype)


def psum(tree, axis_name, *, bits: int | None = None, rounding: str = "nearest", key=None):
  """All-reduce (sum) a pytree of gradients in DFP over ``axis_name`` (inside pmap / shard_map).

  Args:
    tree: a pytree of arrays (float leaves are compressed; integer leaves are summed exactly).
    axis_name: the mapped axis name (or tuple of names).
    bits: DFP bits of the transmitted int16 values; default and maximum ``16 - ceil(log2 R)``.
    rounding: ``"nearest"`` or ``"stochastic"`` (unbiased; needs ``key``, which should differ
      per replica, e.g. ``fold_in(key, axis_index)``).
  """
  if rounding not in ("nearest", "stochastic"):
    raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
  if rounding == "stochastic" and key is None:
    raise ValueError("rounding='stochastic' needs key=")
  replicas = axis_size(axis_name)
  max_bits = allreduce_bits(replicas)
  if bits is None:
    bits = max_bits
  elif not isinstance(bits, int) or not 2 <= bits <= max_bits:
    raise ValueError(f"bits must be an int in 2..{max_bits} for {replicas} replicas (R * qmax <= 32767), got {bits!r}")
  leaves, treedef = jax.tree.flatten(tree)
  keys = [None] * len(leaves) if key is None else list(jax.random.split(key, max(len(leaves), 1)))
  out = [_psum_leaf(g, axis_name, replicas, bits, rounding, k) for g, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, out)


def pmean(tree, axis_name, **kw):
  """`psum` divided by the replica count (the usual data-parallel gradient average)."""
  replicas = axis_size(axis_name)
  return jax.tree.map(lambda x: x / replicas if jnp.issubdtype(x.dtype, jnp.floating) else x // replicas,
                      psum(tree, axis_name, **kw))


def error_bound(max_abs: float, replicas: int, bits: int | None = None) -> float:
  """The documented worst-case |psum error| per element for nearest rounding."""
  bits = allreduce_bits(replicas) if bits is None else bits
  return replicas * max_abs * 2.0 ** -(bits - 1)
