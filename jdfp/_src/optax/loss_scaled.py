"""``loss_scaled``: an optax wrapper that unscales, skips non-finite steps and adjusts the scale.

The train step multiplies the loss by the current scale (``current_loss_scale(opt_state)``) and
hands the *scaled* gradients to ``tx.update``. The wrapper then, in this order (docs/design.md §4):

1. unscales the gradients in float32 (before ``inner``, so clipping and weight decay see the true
   gradients, and so float16 gradients are not flushed to zero by the division);
2. checks that every gradient is finite (agreeing across replicas with ``axis_name``);
3. runs ``inner``, but keeps its result only when the check passed: otherwise the updates are zero
   and ``inner``'s state is left exactly as it was (the step is skipped);
4. adjusts the loss scale (a ``DynamicLossScale`` halves on overflow, grows after clean steps).

With ``NoOpLossScale()`` it is simply "skip non-finite steps", like ``optax.apply_if_finite`` but
without its give-up counter (a non-finite step is never applied).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jdfp._src.optax import scales as ls_lib
from jdfp._src.optax.overwrite_state import overwrite_state, split_overwrite


class LossScaledState(NamedTuple):
  """State of ``loss_scaled``.

  Attributes:
    loss_scale: the current loss scale (a ``NoOpLossScale``, ``StaticLossScale`` or
      ``DynamicLossScale`` pytree; its scale is float32).
    inner_state: the wrapped transformation's state.
    last_finite: whether the last step's gradients were finite (bool scalar).
    total_notfinite: how many steps were skipped so far (int32 scalar).
  """

  loss_scale: ls_lib.LossScale
  inner_state: Any
  last_finite: jax.Array
  total_notfinite: jax.Array


def _check_axis_name(axis_name):
  if axis_name is None:
    return None
  try:
    hash(axis_name)
  except TypeError as e:
    raise TypeError(f"axis_name must be a hashable axis name or tuple of names, got {axis_name!r}") from e
  return axis_name


def _select_like(pred, new, old):
  """``new`` where pred else ``old``, with ``new`` cast to ``old``'s dtypes (inner transforms may
  return weakly typed or promoted leaves; the state must keep one type to be a jit carry)."""
  new = jax.tree.map(lambda n, o: jnp.asarray(n).astype(jnp.asarray(o).dtype), new, old)
  return ls_lib.select_tree(pred, new, old)


def loss_scaled(inner: optax.GradientTransformation, loss_scale: ls_lib.LossScale, *,
                axis_name=None) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that it receives unscaled gradients and skips non-finite steps.

  Args:
    inner: the optimizer (e.g. ``optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(...))``
      or ``jdfp.master_weights(...)``).
    loss_scale: the initial loss scale, e.g. ``jdfp.DynamicLossScale()`` (start ``2**15``).
    axis_name: a ``pmap``/``shard_map`` axis name (or tuple). With it, the finite check is agreed
      across replicas (``lax.pmin``), so every replica skips, and rescales, identically.

  Returns:
    An optax ``GradientTransformationExtraArgs``. ``update(grads, state, params)`` takes the
    gradients of the *scaled* loss. Updates come back in at least float32 (the unscaled gradients
    are float32). The current scale: ``jdfp.current_loss_scale(opt_state)``.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"inner must be an optax.GradientTransformation, got {type(inner).__name__}")
  wrapped = split_overwrite(inner)
  if wrapped is not None:  # the overwritten state ("dfp") is not a gradient: never unscale it
    tx, collections = wrapped
    return overwrite_state(loss_scaled(tx, loss_scale, axis_name=axis_name), collections)
  ls_lib.check_loss_scale(loss_scale)
  axis_name = _check_axis_name(axis_name)
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return LossScaledState(
        loss_scale=loss_scale,
        inner_state=inner.init(params),
        last_finite=jnp.array(True),
        total_notfinite=jnp.zeros([], jnp.int32),
    )

  def update(grads, state, params=None, **extra_args):
    if not isinstance(state, LossScaledState):
      raise TypeError(f"loss_scaled: state must be a LossScaledState, got {type(state).__name__}")
    grads = state.loss_scale.unscale(grads, upcast=True)
    ok = ls_lib.all_finite(grads, axis_name=axis_name)
    # The inner update is computed either way and then selected (not lax.cond): this works the
    # same under vmap/pmap, and select never lets the rejected branch's NaN through.
    updates, new_inner = inner.update(grads, state.inner_state, params, **extra_args)
    updates = ls_lib.select_tree(ok, updates, jax.tree.map(jnp.zeros_like, updates))
    new_inner = _select_like(ok, new_inner, state.inner_state)
    new_state = LossScaledState(
        loss_scale=state.loss_scale.adjust(ok),  # ok is already agreed across replicas
        inner_state=new_inner,
        last_finite=ok,
        total_notfinite=state.total_notfinite + (~ok).astype(jnp.int32),
    )
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init, update)


def _find_states(opt_state, cls):
  nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, cls))
  return [n for n in nodes if isinstance(n, cls)]


def loss_scale_state(opt_state) -> LossScaledState:
  """The (single) ``LossScaledState`` inside an optimizer state, however deeply chained/wrapped."""
  found = _find_states(opt_state, LossScaledState)
  if len(found) != 1:
    raise ValueError(
        f"expected exactly one jdfp.loss_scaled state in opt_state, found {len(found)}; build the "
        "optimizer with jdfp.loss_scaled(...) (or a recipe that uses it)")
  return found[0]


def current_loss_scale(opt_state) -> jax.Array:
  """The current loss scale (a float32 scalar) of the ``loss_scaled`` state inside ``opt_state``.

  The train step multiplies the loss by it before differentiating::

      scale = jdfp.current_loss_scale(opt_state)
      grads = jax.grad(lambda p: loss_fn(p, batch).astype(jnp.float32) * scale)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
  """
  return loss_scale_state(opt_state).loss_scale.loss_scale
