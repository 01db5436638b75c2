"""jdfp's optax wrappers mean the same optimizer in every nesting order: the overwritten "dfp" state
is never unscaled, skipped or given a master copy."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdfp

SCALE = 2.0**10


def _wrappers():
  ls = lambda tx: jdfp.loss_scaled(tx, jdfp.DynamicLossScale(SCALE, period=2))
  mw = lambda tx: jdfp.master_weights(tx, jdfp.FP16)
  ow = lambda tx: jdfp.overwrite_state(tx, collections=("dfp",))
  return {"loss_scaled": ls, "master_weights": mw, "overwrite_state": ow}


def _run(order, steps=4):
  w = _wrappers()
  tx = optax.adam(1e-2)
  for name in reversed(order):  # order[0] is outermost
    tx = w[name](tx)
  variables = {"params": {"w": jnp.arange(4, dtype=jnp.float16)},
               "dfp": {"exponent": jnp.float32(-3.0), "history": jnp.array([1.5, 3.0], jnp.float32)}}
  state = tx.init(variables)
  for i in range(steps):
    g = jnp.full((4,), 0.25 * (i + 1), jnp.float32) * SCALE
    if i == 2:
      g = g.at[1].set(jnp.inf)  # a skipped step: the state overwrite still happens
    grads = {"params": {"w": g.astype(jnp.float16)},
             "dfp": {"exponent": jnp.float32(-2.0 - i), "history": jnp.array([6.0 * (i + 1), 3.0], jnp.float32)}}
    updates, state = jax.jit(tx.update)(grads, state, variables)
    variables = optax.apply_updates(variables, updates)
    # The overwritten collection holds exactly the new state, in every order.
    assert float(variables["dfp"]["exponent"]) == -2.0 - i
    np.testing.assert_array_equal(np.asarray(variables["dfp"]["history"]), [6.0 * (i + 1), 3.0])
  return variables, jdfp.current_loss_scale(state)


@pytest.mark.parametrize("order", list(itertools.permutations(("overwrite_state", "loss_scaled", "master_weights"))))
def test_every_nesting_order_is_the_canonical_optimizer(order):
  want, want_scale = _run(("overwrite_state", "loss_scaled", "master_weights"))
  got, got_scale = _run(order)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(got_scale) == float(want_scale)


def test_recipe_optimizer_with_collections_overwrites_state():
  tx = jdfp.recipes.optimizer("fp16", optax.sgd(0.1), collections=("dfp",))
  variables = {"params": {"w": jnp.ones((2,), jnp.float16)}, "dfp": {"e": jnp.float32(1.0)}}
  state = tx.init(variables)
  grads = {"params": {"w": jnp.ones((2,), jnp.float16) * jdfp.current_loss_scale(state).astype(jnp.float16)},
           "dfp": {"e": jnp.float32(4.0)}}
  updates, state = tx.update(grads, state, variables)
  variables = optax.apply_updates(variables, updates)
  assert float(variables["dfp"]["e"]) == 4.0
  np.testing.assert_allclose(np.asarray(variables["params"]["w"], np.float32), 0.9, rtol=1e-3)
