"""`jdfp.einsum`: jnp.einsum's contraction planning, with every pairwise contraction through
`jdfp.dot_general`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdfp._src.numerics import philox
from jdfp._src.ops.dot import dot_general
from jdfp._src.ops.policy import Policy


class _EinsumDot:
  """The `_dot_general` hook of jnp.einsum; hashed by identity, carries the policy and a key."""

  def __init__(self, policy, key):
    self.policy, self.key, self.count = policy, key, 0

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    key = None
    if self.key is not None:
      key = philox.fold_in_words(self.key, self.count)
      self.count += 1
    return dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                       policy=self.policy, key=key, **kw)


def einsum(subscripts, *operands, precision=None, preferred_element_type=None, optimize="auto",
           policy: Policy | None = None, key=None, **kwargs):
  """Drop-in for `jnp.einsum` whose contractions run through `jdfp.dot_general`."""
  hook = _EinsumDot(Policy() if policy is None else policy, key)
  return jnp.einsum(subscripts, *operands, precision=precision, preferred_element_type=preferred_element_type,
                    optimize=optimize, _dot_general=hook, **kwargs)
