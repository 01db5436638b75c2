"""`jdfp.dot_general`: the drop-in for `jax.lax.dot_general` whose GEMM (and its two backward GEMMs)
run in DFP / BFP on the exact kernel, or FP16 / BF16 with FP32 accumulation."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jdfp._src.ops import delayed
from jdfp._src.ops.dot_vjp import dot_core
from jdfp._src.ops.layout import canonical_dims, check_float, lax_dot_general_shape, result_dtype
from jdfp._src.ops.policy import Policy, check_key

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]


def dot_general(lhs, rhs, dimension_numbers: DimensionNumbers, precision=None, preferred_element_type=None,
                *, policy: Policy | None = None, key=None, scale_state=None, **kwargs) -> jax.Array:
  """Drop-in for `jax.lax.dot_general` that runs the GEMM (and its two backward GEMMs) in DFP/BFP.

  Args:
    lhs, rhs, dimension_numbers, precision, preferred_element_type: as `jax.lax.dot_general`
      (`precision` applies to FP16/BF16 policies; integer GEMMs are exact).
    policy: a `jdfp.Policy` (default `Policy()`: DFP with 14 bits, nearest rounding, kernel on CPU).
    key: PRNG key, required when the policy rounds stochastically.
    scale_state: with ``Policy(scaling="delayed")``, the `jdfp.ScaleState` of this op; the call then
      returns ``(out, new_state)`` (see `jdfp._src.ops.delayed` for how the gradient history flows).
  Other keyword arguments of newer `lax.dot_general` (e.g. ``out_sharding``) must be None.
  """
  for k_, v in kwargs.items():
    if v is not None:
      raise TypeError(f"jdfp.dot_general does not support {k_}={v!r}")
  policy = Policy() if policy is None else policy
  if not isinstance(policy, Policy):
    raise TypeError(f"policy must be a jdfp.Policy, got {type(policy).__name__}")
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  check_float("lhs", lhs)
  check_float("rhs", rhs)
  out_struct = lax_dot_general_shape(lhs, rhs, dimension_numbers, precision)  # lax's own checks and errors
  dims = canonical_dims(dimension_numbers, lhs.ndim, rhs.ndim)
  check_key(policy, key)
  out_dtype = result_dtype(lhs, rhs, preferred_element_type)
  empty = not out_struct.size or not lhs.size or not rhs.size  # empty result or empty sum: lax's zeros
  if policy.scaling == "delayed":
    if scale_state is None:
      raise ValueError("Policy(scaling='delayed') needs scale_state=jdfp.init_scale_state(policy) "
                       "(the call then returns (out, new_state))")
    if empty:
      return jnp.zeros(out_struct.shape, out_dtype), scale_state
    return delayed.dot_general(lhs, rhs, dims, precision, out_dtype, policy=policy, key=key, scale_state=scale_state)
  if scale_state is not None:
    raise ValueError("scale_state= is for Policy(scaling='delayed'); this policy uses current scaling")
  if empty:
    return jnp.zeros(out_struct.shape, out_dtype)
  return dot_core(lhs, rhs, key, dims, policy, precision, out_dtype)
