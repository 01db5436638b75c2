"""Data-parallel recipes: a `Policy` whose replicas share every operand's exponents."""

from __future__ import annotations

from jdfp._src.ops.policy import Policy


def data_parallel(policy: Policy, axis_name) -> Policy:
  """``policy`` with exponents shared across the data-parallel replicas of ``axis_name``."""
  return policy.replace(axis_name=axis_name)
