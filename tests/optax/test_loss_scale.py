"""Loss scaling (docs/design.md §4): jdfp.loss_scale and the jdfp.loss_scaled optax wrapper."""

import os
import pickle
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from jdfp._src.optax.scales import (DynamicLossScale, NoOpLossScale, StaticLossScale, all_finite,
                                  select_tree)
from jdfp._src.optax.loss_scaled import LossScaledState, current_loss_scale, loss_scaled
from jdfp._src.optax.master_weights import master_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# The loss scales.


def test_dynamic_defaults_match_spec():
  ls = DynamicLossScale()
  assert float(ls.loss_scale) == 2.0**15
  assert ls.loss_scale.dtype == jnp.float32
  assert ls.counter.dtype == jnp.int32 and int(ls.counter) == 0
  assert (ls.period, ls.factor, ls.min_loss_scale, ls.max_loss_scale) == (2000, 2.0, 1.0, 2.0**24)


def test_scale_is_float32_whatever_the_input_dtype():
  for init in (jnp.float16(1024), np.float16(1024), 1024, jnp.bfloat16(1024)):
    assert DynamicLossScale(init).loss_scale.dtype == jnp.float32
    assert StaticLossScale(init).loss_scale.dtype == jnp.float32
  assert NoOpLossScale().loss_scale.dtype == jnp.float32


def test_scale_and_unscale_compute_in_float32_for_fp16_trees():
  # jmp casts S to the leaf dtype: 2**16 is Inf in float16 and scaling 1e-3 gives Inf.
  ls = StaticLossScale(2.0**16)
  x = jnp.full((3,), 1e-3, jnp.float16)
  y = ls.scale(x)
  assert y.dtype == jnp.float16
  np.testing.assert_allclose(np.float32(y), np.float32(x) * 2**16, rtol=1e-3)
  g = ls.unscale(y)
  assert g.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(g)))
  np.testing.assert_allclose(np.float32(g), np.float32(x), rtol=1e-3)
  # upcast keeps the small unscaled gradients that float16 would flush to zero.
  tiny = jnp.full((2,), 2.0**-10, jnp.float16)  # a scaled gradient; true value 2**-34
  big = DynamicLossScale(2.0**24, max_loss_scale=2.0**24)
  assert float(big.unscale(tiny)[0]) == 0.0
  up = big.unscale(tiny, upcast=True)
  assert up.dtype == jnp.float32 and float(up[0]) == 2.0**-34


def test_scale_skips_non_float_leaves():
  ls = StaticLossScale(4.0)
  tree = {"f": jnp.ones(2), "i": jnp.arange(3)}
  out = ls.scale(tree)
  chex.assert_trees_all_equal(out["i"], tree["i"])
  chex.assert_trees_all_equal(out["f"], 4 * jnp.ones(2))


def test_noop_and_static_adjust_return_self():
  for ls in (NoOpLossScale(), StaticLossScale(8.0)):
    assert ls.adjust(jnp.array(False)) is ls
  tree = {"a": jnp.arange(3.0)}
  assert NoOpLossScale().scale(tree) is tree


def test_dynamic_halves_on_overflow_and_grows_after_period():
  ls = DynamicLossScale(2.0**10, period=3)
  adjust = jax.jit(lambda s, ok: s.adjust(ok))
  seen = []
  for ok in [True, True, True, True, False, True, False, False]:
    ls = adjust(ls, jnp.array(ok))
    seen.append((float(ls.loss_scale), int(ls.counter)))
  assert seen == [(2.0**10, 1), (2.0**10, 2), (2.0**11, 0), (2.0**11, 1), (2.0**10, 0),
                  (2.0**10, 1), (2.0**9, 0), (2.0**8, 0)]


def test_dynamic_bounds_clamp():
  ls = DynamicLossScale(2.0, min_loss_scale=1.0, max_loss_scale=4.0, period=1)
  for _ in range(5):
    ls = ls.adjust(jnp.array(False))
  assert float(ls.loss_scale) == 1.0
  for _ in range(5):
    ls = ls.adjust(jnp.array(True))
  assert float(ls.loss_scale) == 4.0


def _reference(flags, scale, period, factor, lo, hi):
  counter = 0
  for ok in flags:
    if ok:
      counter += 1
      if counter >= period:
        scale, counter = min(scale * factor, hi), 0
    else:
      scale, counter = max(scale / factor, lo), 0
  return scale, counter


@settings(max_examples=40, deadline=None)
@given(flags=st.lists(st.booleans(), max_size=60),
       period=st.sampled_from([1, 2, 3]),
       log_init=st.integers(0, 6))
def test_dynamic_never_reaches_zero_or_inf(flags, period, log_init):
  lo, hi = 1.0, 2.0**6
  ls = DynamicLossScale(2.0**log_init, period=period, min_loss_scale=lo, max_loss_scale=hi)
  flags_arr = jnp.array(flags + [True] * (60 - len(flags)))
  valid = jnp.arange(60) < len(flags)

  @jax.jit
  def run(ls, flags_arr, valid):
    def body(ls, xs):
      ok, v = xs
      new = ls.adjust(ok)
      return select_tree(v, new, ls), new.loss_scale
    return jax.lax.scan(body, ls, (flags_arr, valid))

  final, scales = run(ls, flags_arr, valid)
  scales = np.asarray(scales)
  assert scales.dtype == np.float32 and final.loss_scale.dtype == jnp.float32
  assert np.all(np.isfinite(scales)) and np.all(scales >= lo) and np.all(scales <= hi)
  assert (float(final.loss_scale), int(final.counter)) == _reference(
      flags, 2.0**log_init, period, 2.0, lo, hi)


def test_default_bounds_hold_under_long_overflow_runs():
  ls = DynamicLossScale()
  run = jax.jit(lambda ls, flags: jax.lax.scan(lambda s, ok: (s.adjust(ok), None), ls, flags)[0])
  low = run(ls, jnp.zeros(200, bool))
  assert float(low.loss_scale) == 1.0
  high = run(DynamicLossScale(period=1), jnp.ones(200, bool))
  assert float(high.loss_scale) == 2.0**24 and bool(jnp.isfinite(high.loss_scale))


def test_loss_scales_are_pytrees_and_pickle():
  ls = DynamicLossScale(2.0**12, period=7)
  leaves, treedef = jax.tree.flatten(ls)
  assert len(leaves) == 2
  back = jax.tree.unflatten(treedef, leaves)
  assert back.period == 7 and float(back.loss_scale) == 2.0**12
  again = pickle.loads(pickle.dumps(ls))
  assert again.period == 7 and float(again.loss_scale) == 2.0**12
  assert jax.tree.leaves(NoOpLossScale()) == []
  assert len(jax.tree.leaves(StaticLossScale(3.0))) == 1
  with pytest.raises(AttributeError):
    ls.period = 3
  assert ls.replace(period=3).period == 3


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(period=0), ValueError, "period"),
    (dict(period=2.5), TypeError, "period"),
    (dict(factor=1), ValueError, "factor"),
    (dict(factor="2"), TypeError, "factor"),
    (dict(loss_scale=0.0), ValueError, "loss_scale"),
    (dict(loss_scale=float("inf")), ValueError, "loss_scale"),
    (dict(loss_scale=jnp.ones(2)), ValueError, "loss_scale"),
    (dict(loss_scale=0.5), ValueError, "loss_scale"),  # below the default min 1
    (dict(min_loss_scale=0.0), ValueError, "min_loss_scale"),
    (dict(max_loss_scale=float("inf")), ValueError, "max_loss_scale"),
    (dict(min_loss_scale=8.0, max_loss_scale=4.0, loss_scale=4.0), ValueError, "max_loss_scale"),
    (dict(counter=1.5), TypeError, "counter"),
])
def test_dynamic_bad_arguments(kwargs, exc, word):
  with pytest.raises(exc, match=word):
    DynamicLossScale(**kwargs)


def test_bad_arguments_elsewhere():
  with pytest.raises(ValueError, match="loss_scale"):
    StaticLossScale(-1.0)
  with pytest.raises(TypeError, match="grads_finite"):
    DynamicLossScale().adjust(jnp.ones(3, bool))
  with pytest.raises(TypeError, match="pred"):
    select_tree(jnp.array(1.0), 1.0, 2.0)
  with pytest.raises(TypeError, match="loss_scale"):
    loss_scaled(optax.sgd(1.0), 2.0**15)
  with pytest.raises(TypeError, match="inner"):
    loss_scaled(lambda g: g, DynamicLossScale())
  with pytest.raises(TypeError, match="axis_name"):
    loss_scaled(optax.sgd(1.0), DynamicLossScale(), axis_name=["i"])


# ----------------------------------------------------------------------------------------------
# all_finite and select_tree.


def test_all_finite():
  assert bool(all_finite({"a": jnp.ones(3), "b": jnp.arange(3)}))
  assert bool(all_finite({}))
  assert not bool(all_finite({"a": jnp.array([1.0, jnp.nan])}))
  assert not bool(all_finite([jnp.ones(2), jnp.array([jnp.inf], jnp.float16)]))
  assert all_finite(jnp.ones(2)).dtype == jnp.bool_


def test_select_tree_keeps_dtypes_and_does_not_leak_nan():
  a = {"x": jnp.array([jnp.nan, 1.0], jnp.float16), "n": jnp.int32(3)}
  b = {"x": jnp.zeros(2, jnp.float16), "n": jnp.int32(4)}
  out = select_tree(jnp.array(False), a, b)
  chex.assert_trees_all_equal(out, b)
  assert out["x"].dtype == jnp.float16
  with pytest.raises(ValueError, match="structure"):
    select_tree(jnp.array(True), a, [1.0])


# ----------------------------------------------------------------------------------------------
# loss_scaled.


def _params():
  return {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5)}


def test_skip_on_overflow_leaves_inner_state_and_halves():
  tx = loss_scaled(optax.adam(0.1), DynamicLossScale(2.0**4, period=2))
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  good = jax.tree.map(lambda p: jnp.ones_like(p) * 16, params)
  u, state = update(good, state, params)
  assert bool(state.last_finite) and float(current_loss_scale(state)) == 16.0
  inner_before = state.inner_state
  bad = {"w": jnp.array([1.0, jnp.inf, 0.0]), "b": jnp.array(1.0)}
  u, state = update(bad, state, params)
  chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
  chex.assert_trees_all_equal(state.inner_state, inner_before)
  assert float(current_loss_scale(state)) == 8.0
  assert not bool(state.last_finite) and int(state.total_notfinite) == 1
  nan = {"w": jnp.array([jnp.nan, 0.0, 0.0]), "b": jnp.array(1.0)}
  _, state = update(nan, state, params)
  assert float(current_loss_scale(state)) == 4.0 and int(state.total_notfinite) == 2


def test_unscale_happens_before_clipping():
  # True gradient norm 0.5 < clip 1.0, so the update is exactly -g. A wrapper that clipped the
  # *scaled* gradients (norm 0.5 * 2**15) would shrink the update by 2**15.
  g_true = {"w": jnp.array([0.3, 0.4])}  # norm 0.5
  S = 2.0**15
  tx = loss_scaled(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)),
                   StaticLossScale(S))
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  u, _ = tx.update(jax.tree.map(lambda g: g * S, g_true), state, params)
  chex.assert_trees_all_close(u, jax.tree.map(lambda g: -g, g_true), rtol=1e-6)
  # And a gradient whose *true* norm exceeds the limit is clipped to norm 1.
  u, _ = tx.update({"w": jnp.array([3.0, 4.0]) * S}, state, params)
  np.testing.assert_allclose(float(optax.tree.norm(u)), 1.0, rtol=1e-6)


def test_weight_decay_sees_unscaled_gradients_with_adamw():
  S = 2.0**10
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
  tx = loss_scaled(inner, StaticLossScale(S))
  params = _params()
  grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  ref_state, state = inner.init(params), tx.init(params)
  for _ in range(3):
    ref_u, ref_state = inner.update(grads, ref_state, params)
    u, state = tx.update(jax.tree.map(lambda g: g * S, grads), state, params)
    chex.assert_trees_all_close(u, ref_u, rtol=1e-6, atol=1e-9)


def test_fp16_gradients_are_unscaled_in_float32():
  tx = loss_scaled(optax.sgd(1.0), DynamicLossScale(2.0**15))
  params = {"w": jnp.zeros(2, jnp.float16)}
  state = tx.init(params)
  scaled = {"w": jnp.full((2,), 2.0**-10, jnp.float16)}  # true gradient 2**-25: not a float16
  u, state = jax.jit(tx.update)(scaled, state, params)
  assert u["w"].dtype == jnp.float32 and float(u["w"][0]) == -(2.0**-25)
  assert current_loss_scale(state).dtype == jnp.float32


def test_through_multisteps_and_as_jit_carry():
  k = 2
  tx = optax.MultiSteps(loss_scaled(optax.sgd(1.0), DynamicLossScale(2.0**4, period=1)),
                        every_k_schedule=k)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  grads = [{"w": jnp.array([16.0, 32.0])}, {"w": jnp.array([16.0, 32.0])},
           {"w": jnp.array([jnp.inf, 0.0])}, {"w": jnp.array([8.0, 8.0])}]

  @jax.jit
  def run(params, state, grads):
    def body(carry, g):
      p, s = carry
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), current_loss_scale(s)
    return jax.lax.scan(body, (params, state), grads)

  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grads)
  (params, state), scales = run(params, state, stacked)
  # First emit: mean scaled grad [16, 32] / 16 -> [1, 2]; scale grows (period 1) to 32.
  # Second emit: the accumulated mean holds Inf -> skipped, scale halves back to 16.
  np.testing.assert_array_equal(np.asarray(scales), [16.0, 32.0, 32.0, 16.0])
  chex.assert_trees_all_close(params, {"w": jnp.array([-1.0, -2.0])})
  assert isinstance(state.inner_opt_state, LossScaledState)


def test_current_loss_scale_finds_nested_state_and_errors_otherwise():
  tx = optax.chain(optax.identity(), loss_scaled(master_weights(optax.sgd(0.1)), DynamicLossScale()))
  state = tx.init(_params())
  assert float(current_loss_scale(state)) == 2.0**15
  with pytest.raises(ValueError, match="loss_scaled"):
    current_loss_scale(optax.sgd(0.1).init(_params()))


def test_fp16_training_loop_recovers_from_overflow():
  # A float16 loss that overflows at the initial scale: the scale must come down, steps must be
  # skipped meanwhile, and training must then proceed.
  tx = loss_scaled(master_weights(optax.sgd(0.1), param_format=None), DynamicLossScale())
  params = {"w": jnp.full((4,), 2.0, jnp.float16)}
  state = tx.init(params)

  def loss_fn(p):
    return jnp.sum(p["w"].astype(jnp.float16) ** 2) * jnp.float16(100.0)  # grads ~ 400

  @jax.jit
  def step(params, state):
    scale = current_loss_scale(state)
    # The scale enters in float16 (as the model's own loss is): S * 400 overflows at S = 2**15.
    grads = jax.grad(lambda p: loss_fn(p) * scale.astype(jnp.float16))(params)
    u, state = tx.update(grads, state, params)
    return optax.apply_updates(params, u), state

  for _ in range(12):
    params, state = step(params, state)
  assert int(state.total_notfinite) >= 1
  assert float(current_loss_scale(state)) < 2.0**15
  assert params["w"].dtype == jnp.float16 and float(params["w"][0]) < 2.0


# ----------------------------------------------------------------------------------------------
# Replicas: every replica makes the identical decision.

_PMAP_SCRIPT = textwrap.dedent("""
    import os
    import jax, jax.numpy as jnp, numpy as np, optax
    from jdfp._src.optax.scales import DynamicLossScale, all_finite
    from jdfp._src.optax.loss_scaled import loss_scaled, current_loss_scale
    n = jax.local_device_count()
    assert n == 4, n

    def make(axis_name):
      return loss_scaled(optax.sgd(1.0), DynamicLossScale(2.0**8, period=2), axis_name=axis_name)

    params = {"w": jnp.zeros((n, 3))}
    # Each replica holds a different shard of the gradients; only replica 2's overflows.
    grads = {"w": jnp.ones((n, 3)).at[2, 1].set(jnp.inf)}
    for axis_name in ("i", None):
      tx = make(axis_name)
      state = jax.pmap(tx.init)(params)
      u, state = jax.pmap(tx.update, axis_name="i")(grads, state, params)
      scales = np.asarray(current_loss_scale(state))
      print(axis_name, scales.tolist(), np.asarray(state.last_finite).tolist())
      if axis_name == "i":
        assert scales.tolist() == [128.0] * n, scales
        assert np.all(np.asarray(u["w"]) == 0.0)
        assert not np.any(np.asarray(state.last_finite))
      else:  # without axis_name the replicas disagree: the reason the option exists
        assert sorted(set(scales.tolist())) == [128.0, 256.0], scales
    flags = jax.pmap(lambda g: all_finite(g, axis_name="i"), axis_name="i")(grads)
    assert not np.any(np.asarray(flags))

    # shard_map: gradients sharded, state replicated (out_specs P() type-checks only because the
    # decision is invariant across the axis).
    from jax.sharding import Mesh, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ("i",))
    tx = make("i")
    flat_params, flat_grads = {"w": jnp.zeros((2 * n, 3))}, {"w": jnp.ones((2 * n, 3)).at[5, 1].set(jnp.nan)}
    state = tx.init(flat_params)
    f = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=(P("i"), P(), P("i")),
                              out_specs=(P("i"), P())))
    u, state = f(flat_grads, state, flat_params)
    assert float(current_loss_scale(state)) == 128.0 and not bool(state.last_finite)
    assert np.all(np.asarray(u["w"]) == 0.0)
    print("OK")
""")


def test_identical_decisions_on_every_replica_under_pmap_and_shard_map():
  env = dict(os.environ)
  flag = "--xla_force_host_platform_device_count=4"
  if flag not in env.get("XLA_FLAGS", ""):
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", _PMAP_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "OK" in proc.stdout
