"""What every custom VJP of the ops shares: PRNG key splitting, the symbolic-zero forward wrappers
(an operand nobody differentiates needs no backward GEMM), and cotangents under shard_map."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal

from jdfp._src.numerics import philox
from jdfp._src.numerics.shard_types import match_varying, varying_axes


def split_keys(key, n):
  """``n`` keys for an op's conversions (raw uint32[2] Philox keys, `philox.split_words`)."""
  if key is None:
    return (None,) * n
  return philox.split_words(key, n)


def primal_values(tree):
  """The values of a symbolic-zeros fwd's `CustomVJPPrimal` arguments (any pytree of them)."""
  return jax.tree.map(lambda p: p.value, tree, is_leaf=lambda p: isinstance(p, CustomVJPPrimal))


def perturbed_marker(primal):
  """A residual marking whether ``primal`` is differentiated: an empty array if so, else None (the
  bwd then skips that operand's GEMM)."""
  return perturbed_marker_of(primal.perturbed)


def perturbed_marker_of(perturbed: bool):
  """`perturbed_marker` from the flag itself."""
  return jnp.zeros((0,), jnp.int8) if perturbed else None


def as_cotangent_of(d, primal):
  """Inside shard_map, the cotangent of an input that is invariant over an axis is the psum over it
  (as JAX's own autodiff does: the transpose of the implicit pvary), and carries the input's type."""
  extra = varying_axes(d) - varying_axes(primal)
  if extra:
    d = lax.psum(d, tuple(sorted(extra)))
  return match_varying(d, primal)
