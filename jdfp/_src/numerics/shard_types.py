"""shard_map's varying-axes types (``check_vma``): values jdfp creates must carry their inputs' ones.

An FFI call's result, a constant accumulator or a custom_vjp cotangent has no varying axes of its
own; inside `shard_map` JAX then rejects the program (or psums where it should not).
"""

from __future__ import annotations

import jax
from jax import lax


def varying_axes(x) -> frozenset:
  mat = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset(mat.varying) if mat is not None else frozenset()


def match_varying(out, *inputs):
  """Mark `out` as varying over every shard_map axis any of `inputs` varies over."""
  want = frozenset().union(*(varying_axes(x) for x in inputs))
  missing = want - varying_axes(out)
  if missing:
    out = lax.pcast(out, tuple(sorted(missing)), to="varying")
  return out
