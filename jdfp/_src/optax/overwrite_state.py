"""``overwrite_state``: carry non-trained state (e.g. DFP scale histories) through an optax step.

Flax layers that keep per-tensor quantization state (exponent or amax histories) can follow
Flax's ``fp8_ops`` OVERWRITE_WITH_GRADIENT convention: the state lives in its own variable
collection, the custom VJP returns the *new state* as that collection's "gradient", and the
optimizer must replace the old state by it instead of treating it as a gradient. This wrapper does
that inside optax, so the ordinary loop works unchanged::

    tx = jdfp.overwrite_state(optax.adamw(1e-3), collections=("dfp",))
    variables = {"params": ..., "dfp": ...}
    opt_state = tx.init(variables)
    grads = jax.grad(loss)(variables)            # grads["dfp"] holds the new state
    updates, opt_state = tx.update(grads, opt_state, variables)
    variables = optax.apply_updates(variables, updates)

For the top-level keys in ``collections`` the update is ``new - old``; every other key goes
through ``inner`` (which never sees the overwritten collections, so they get no weight decay, no
momentum, no clipping and no master copy). The nesting order with `jdfp.loss_scaled` and
`jdfp.master_weights` does not matter: they move themselves inside ``overwrite_state``
(`split_overwrite`), so ``loss_scaled(overwrite_state(tx), ...)`` is
``overwrite_state(loss_scaled(tx, ...))``.

Exactness: ``apply_updates`` adds, so ``old + (new - old)`` equals ``new`` bitwise for integer
leaves (two's complement wraps consistently) and for float leaves whenever the float32 (x64:
float64) difference is exact, e.g. when ``new`` is within a factor 2 of ``old`` or both are powers
of two less than 2**23 apart. Otherwise the result is off by at most an ulp of ``max(|old|,|new|)``,
which can swamp a value that shrinks by > 2**24 in one step. Store such state as integer exponents,
or, when bitwise overwrite of arbitrary floats matters, replace the collection yourself after
``apply_updates`` (``{**variables, "dfp": grads["dfp"]}``), which is what Flax's TrainState does.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class OverwriteState(NamedTuple):
  """State of ``overwrite_state``: the inner optimizer's state (over the trained keys only)."""

  inner_state: Any


# update function of each overwrite_state transformation -> (inner, collections): lets the other jdfp
# wrappers move themselves inside it, so that every nesting order means the same optimizer.
_WRAPPED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def split_overwrite(tx) -> tuple[optax.GradientTransformation, tuple[str, ...]] | None:
  """``(inner, collections)`` when ``tx`` was made by `overwrite_state`, else None.

  `jdfp.loss_scaled` and `jdfp.master_weights` use it to wrap *inner* instead, re-applying
  ``overwrite_state`` outside: ``loss_scaled(overwrite_state(tx))`` is then
  ``overwrite_state(loss_scaled(tx))``, and the overwritten state is never unscaled, skipped or given
  a master copy, whatever the nesting order.
  """
  try:
    return _WRAPPED.get(tx.update)
  except (AttributeError, TypeError):
    return None


def _check_collections(collections) -> tuple[str, ...]:
  if isinstance(collections, str):
    collections = (collections,)
  try:
    out = tuple(collections)
  except TypeError as e:
    raise TypeError(f"collections must be a sequence of collection names, got {collections!r}") from e
  if not out or not all(isinstance(c, str) and c for c in out):
    raise ValueError(f"collections must be a non-empty sequence of non-empty strings, got {collections!r}")
  return out


def _update_dtype(dtype):
  wide = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  return jnp.promote_types(dtype, wide)


def _overwrite_update(new, old):
  new, old = jnp.asarray(new), jnp.asarray(old)
  if new.shape != old.shape:
    raise ValueError(f"overwrite_state: new state shape {new.shape} != old shape {old.shape}")
  if jnp.issubdtype(old.dtype, jnp.floating):
    dt = _update_dtype(old.dtype)
    return new.astype(dt) - old.astype(dt)
  if jnp.issubdtype(old.dtype, jnp.integer):
    return new.astype(old.dtype) - old  # wraps, and old + (new - old) wraps back exactly
  raise TypeError(f"overwrite_state: cannot express an overwrite of dtype {old.dtype} as an update")


def overwrite_state(inner: optax.GradientTransformation, collections=("dfp",)
                    ) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that the top-level ``collections`` of the params are overwritten.

  Args:
    inner: the optimizer for every other top-level key (it receives a dict without the
      overwritten keys, e.g. ``{"params": ...}``).
    collections: top-level keys whose "gradient" is the new value (default ``("dfp",)``).

  Returns:
    An optax transformation; params and grads must be mappings (dict / FrozenDict) with the same
    top-level keys. Keys in ``collections`` that the params lack are simply absent.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"inner must be an optax.GradientTransformation, got {type(inner).__name__}")
  collections = _check_collections(collections)
  inner = optax.with_extra_args_support(inner)

  def split(tree, what):
    if not isinstance(tree, Mapping):
      raise TypeError(
          f"overwrite_state: {what} must be a mapping of collections (e.g. {{'params': ..., "
          f"'dfp': ...}}), got {type(tree).__name__}")
    trained = {k: v for k, v in tree.items() if k not in collections}
    overwritten = {k: v for k, v in tree.items() if k in collections}
    return trained, overwritten

  def init(params):
    trained, _ = split(params, "params")
    return OverwriteState(inner_state=inner.init(trained))

  def update(grads, state, params=None, **extra_args):
    if params is None:
      raise ValueError("overwrite_state.update needs params (tx.update(grads, opt_state, params))")
    g_trained, g_over = split(grads, "grads")
    p_trained, p_over = split(params, "params")
    if set(g_over) != set(p_over) or set(g_trained) != set(p_trained):
      raise ValueError(
          f"overwrite_state: grads has top-level keys {sorted(grads)} but params has {sorted(params)}")
    u_trained, new_inner = inner.update(g_trained, state.inner_state, p_trained, **extra_args)
    u_over = {k: jax.tree.map(_overwrite_update, g_over[k], p_over[k]) for k in p_over}
    merged = {k: (u_over[k] if k in u_over else u_trained[k]) for k in params}
    # Keep the params' container type (dict or FrozenDict) so apply_updates sees one structure.
    updates = merged if type(params) is dict else type(params)(merged)
    return updates, OverwriteState(inner_state=new_inner)

  _WRAPPED[update] = (inner, collections)
  return optax.GradientTransformationExtraArgs(init, update)
