"""FP32 master weights (docs/design.md §4), overwrite-style state and the optimizer recipes."""

import functools

import chex
import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from jdfp._src.optax import recipes as recipes_optax
from jdfp._src.numerics.formats import BF16, BFP, DFP, FP16
from jdfp._src.optax.scales import DynamicLossScale, NoOpLossScale
from jdfp._src.optax.loss_scaled import LossScaledState, current_loss_scale, loss_scaled
from jdfp._src.optax.master_weights import (MasterWeightsState, cast_params, master_params,
                                      master_weights)
from jdfp._src.optax.overwrite_state import OverwriteState, overwrite_state
from jdfp._src.numerics.quantize import fake_quantize


def _const_grads(params, value):
  return jax.tree.map(lambda p: jnp.full(p.shape, value, p.dtype), params)


def _run(tx, params, grads, steps):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    u, state = tx.update(grads, state, params)
    return optax.apply_updates(params, u), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


# ----------------------------------------------------------------------------------------------
# Why masters exist: updates below the low-precision step accumulate.


def test_tiny_updates_vanish_in_fp16_but_accumulate_in_the_master():
  params = {"w": jnp.ones((4,), jnp.float16)}
  grads = _const_grads(params, 1.0)
  lr = 1e-4  # < 1/2048 of the weight: rounded away by a float16 add
  plain, _ = _run(optax.sgd(lr), params, grads, 10)
  assert float(plain["w"][0]) == 1.0  # stuck: the failure masters prevent

  mp, state = _run(master_weights(optax.sgd(lr), FP16), params, grads, 10)
  master = master_params(state)["w"]
  assert master.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(master), 1.0 - 10 * lr, rtol=1e-6)
  assert mp["w"].dtype == jnp.float16
  assert float(mp["w"][0]) < 1.0  # the float16 param has moved too
  chex.assert_trees_all_equal(mp["w"], master.astype(jnp.float16))


def test_updates_below_fp16_min_subnormal_accumulate():
  params = {"w": jnp.zeros((2,), jnp.float16)}
  grads = _const_grads(params, -1.0)
  plain, _ = _run(optax.sgd(1e-8), params, grads, 8)
  assert float(plain["w"][0]) == 0.0  # each 1e-8 step vanishes in float16
  p, state = _run(master_weights(optax.sgd(1e-8), FP16), params, grads, 2)
  assert float(p["w"][0]) == 0.0  # 2e-8 < 2**-25 still rounds to 0 in float16
  p, state = _run(master_weights(optax.sgd(1e-8), FP16), params, grads, 4)
  assert float(p["w"][0]) == 2.0**-24  # 4e-8 rounds to the smallest float16 subnormal
  np.testing.assert_allclose(float(master_params(state)["w"][0]), 4e-8, rtol=1e-5)


def test_masters_follow_the_fp32_run_bitwise():
  # With gradients independent of the params, the masters are exactly an FP32 training run that
  # starts from the (rounded) initial params and sees the same (low-precision) gradients.
  params32 = {"w": jnp.linspace(-1, 1, 7), "b": jnp.array(0.25)}
  grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * 3 + i), params32) for i in range(5)]
  inner = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(3e-3, weight_decay=0.01))
  for fmt in (FP16, BF16, DFP(bits=16), BFP(mantissa_bits=15)):
    tx = master_weights(inner, fmt)
    p = cast_params(params32, fmt)
    s = tx.init(p)
    ref_p = jax.tree.map(lambda x: x.astype(jnp.float32), p)
    ref_s = inner.init(ref_p)
    for g in grads:
      g = jax.tree.map(lambda x, q: x.astype(q.dtype), g, p)  # float16 grads for FP16 params
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
      ref_u, ref_s = inner.update(jax.tree.map(lambda x: x.astype(jnp.float32), g), ref_s, ref_p)
      ref_p = optax.apply_updates(ref_p, ref_u)
    chex.assert_trees_all_equal(master_params(s), ref_p)


def test_params_equal_rounded_masters_after_every_step():
  params32 = {"w": jax.random.normal(jax.random.key(0), (30, 30)), "b": jnp.zeros((30,))}
  for fmt in (FP16, BF16, DFP(bits=16), DFP(bits=12, axis=-1), BFP(mantissa_bits=15),
              BFP(mantissa_bits=7, block=(24, 24))):
    tx = master_weights(optax.adam(1e-2), fmt)
    p = cast_params(params32, fmt)
    s = tx.init(p)
    upd = jax.jit(tx.update)
    for i in range(3):
      g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(i), x.shape).astype(x.dtype), p)
      u, s = upd(g, s, p)
      p = optax.apply_updates(p, u)
      if isinstance(fmt, (DFP, BFP)):
        expect = jax.tree.map(lambda m: fake_quantize(m, fmt), master_params(s))
        assert p["w"].dtype == jnp.float32
      else:
        expect = jax.tree.map(lambda m: m.astype(fmt.dtype), master_params(s))
        assert p["w"].dtype == fmt.dtype
      chex.assert_trees_all_equal(p, expect)
      if isinstance(fmt, (DFP, BFP)):  # the params stay on the format's grid
        chex.assert_trees_all_equal(jax.tree.map(lambda x: fake_quantize(x, fmt), p), p)


# ----------------------------------------------------------------------------------------------
# Exactness of optax.apply_updates(params, updates) == lowp(master).


@functools.partial(jax.jit, static_argnums=0)
def _apply_with_target(fmt, p, target32):
  """One master_weights step whose inner does nothing: the master is target32, params p."""
  tx = master_weights(optax.set_to_zero(), fmt)
  state = MasterWeightsState(master=target32, inner_state=tx.init(p).inner_state)
  u, _ = tx.update(jnp.zeros_like(p), state, p)
  return optax.apply_updates(p, u)


def _random_pairs(dtype, seed, n=20000):
  """n random (param, float32 target) pairs of finite `dtype` values, all bit patterns alike.

  bfloat16 magnitudes below 2**-100 are left out: XLA on CPU flushes float32 subnormals
  (< 2**-126) to zero, so differences of such tiny values (and float32 masters holding them)
  are not exact. float16 values are all float32 normals."""
  rng = np.random.default_rng(seed)
  bits = rng.integers(0, 2**16, size=(2, 4 * n), dtype=np.uint16)
  p, t = bits[0].view(dtype), bits[1].view(dtype)
  p32, t32 = p.astype(np.float32), t.astype(np.float32)
  keep = np.isfinite(p32) & np.isfinite(t32) & (np.abs(p32) < 1e30) & (np.abs(t32) < 1e30)
  for x in (p32, t32):
    keep &= (x == 0) | (np.abs(x) >= 2.0**-100)
  return jnp.asarray(p[keep][:n]), jnp.asarray(t32[keep][:n])


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), which=st.sampled_from(["float16", "bfloat16"]))
def test_apply_updates_is_exact_unless_the_weight_collapses(seed, which):
  dtype = np.float16 if which == "float16" else ml_dtypes.bfloat16
  fmt = FP16 if which == "float16" else BF16
  p, t = _random_pairs(dtype, seed)
  applied = _apply_with_target(fmt, p, t)
  assert applied.dtype == p.dtype
  a32, p32, t32 = (np.asarray(x, np.float32) for x in (applied, p, t))
  exact = a32 == t32
  # Exact whenever |p| <= 2**13 |t| (the 11- or 8-bit significands fit float32's 24 with room).
  assert np.all(exact[np.abs(p32) <= 2.0**13 * np.abs(t32)])
  # Otherwise within 2**-24 |p|, and the next step (computed from the current params) is exact.
  assert np.all(np.abs(a32 - t32) <= 2.0**-24 * np.abs(p32))
  again = np.asarray(_apply_with_target(fmt, applied, t), np.float32)
  np.testing.assert_array_equal(again, t32)


def test_apply_updates_is_exact_on_dfp_and_bfp_grids():
  key = jax.random.key(1)
  for fmt in (DFP(bits=16), DFP(bits=8, axis=-1), BFP(mantissa_bits=15), BFP(mantissa_bits=7)):
    for i in range(5):
      k1, k2, key = jax.random.split(key, 3)
      scale = 10.0 ** (i - 2)
      p = fake_quantize(jax.random.normal(k1, (48, 40)) * scale, fmt)
      t = jax.random.normal(k2, (48, 40)) * scale * (1 + i)  # includes exponent changes
      applied = _apply_with_target(fmt, p, t)
      chex.assert_trees_all_equal(applied, fake_quantize(t, fmt))


def test_fp16_params_saturate_instead_of_overflowing():
  params = {"w": jnp.array([65000.0, -65000.0], jnp.float16)}
  p, state = _run(master_weights(optax.sgd(1000.0), FP16), params,
                  {"w": jnp.array([-1.0, 1.0], jnp.float16)}, 3)
  assert float(p["w"][0]) == 65504.0 and float(p["w"][1]) == -65504.0
  assert float(master_params(state)["w"][0]) == float(jnp.float16(65000.0)) + 3000.0


# ----------------------------------------------------------------------------------------------
# Composition with optax.


def test_chain_clip_adamw_and_inject_hyperparams():
  params = cast_params({"w": jnp.linspace(-1, 1, 5)}, BF16)
  inner = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=0.1)
  tx = optax.chain(optax.clip_by_global_norm(1.0), master_weights(inner, BF16))
  state = tx.init(params)
  g = _const_grads(params, 3.0)
  u, state = jax.jit(tx.update)(g, state, params)
  params = optax.apply_updates(params, u)
  mw = state[1]
  assert isinstance(mw, MasterWeightsState)
  assert float(mw.inner_state.hyperparams["learning_rate"]) == pytest.approx(1e-2)
  # Changing the injected learning rate through the state changes the step.
  mw = mw._replace(inner_state=mw.inner_state._replace(
      hyperparams={**mw.inner_state.hyperparams, "learning_rate": jnp.array(0.0)}))
  state = (state[0], mw)
  before = master_params(state)
  u, state = tx.update(g, state, params)
  wd_only = jax.tree.map(lambda a, b: a - b, master_params(state), before)
  chex.assert_trees_all_close(wd_only, jax.tree.map(jnp.zeros_like, before), atol=0)


def test_multisteps_accumulates_before_updating_the_master():
  params = {"w": jnp.ones((3,), jnp.float16)}
  tx = optax.MultiSteps(master_weights(optax.sgd(0.5), FP16), every_k_schedule=2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  u, state = step({"w": jnp.full((3,), 1.0, jnp.float16)}, state, params)
  params = optax.apply_updates(params, u)
  assert float(params["w"][0]) == 1.0  # no update on the first mini-step
  u, state = step({"w": jnp.full((3,), 3.0, jnp.float16)}, state, params)
  params = optax.apply_updates(params, u)
  assert float(params["w"][0]) == 0.0  # 1 - 0.5 * mean(1, 3)
  assert float(master_params(state)["w"][0]) == 0.0


def test_apply_if_finite_inside_and_outside():
  # Inside (master_weights sees float16 grads, apply_if_finite sees their float32 casts).
  params = {"w": jnp.ones((2,), jnp.float16)}
  tx = master_weights(optax.apply_if_finite(optax.sgd(0.25), max_consecutive_errors=5), FP16)
  state = tx.init(params)
  u, state = tx.update({"w": jnp.array([jnp.nan, 1.0], jnp.float16)}, state, params)
  chex.assert_trees_all_equal(optax.apply_updates(params, u), params)
  chex.assert_trees_all_equal(master_params(state)["w"], jnp.ones((2,)))
  # Outside, with float32 grads (the DFP/HBFP recipes keep float32 params).
  params = cast_params({"w": jnp.linspace(0.1, 1, 4)}, DFP(bits=16))
  tx = optax.apply_if_finite(master_weights(optax.sgd(0.25), DFP(bits=16)), 5)
  state = tx.init(params)
  u, state = jax.jit(tx.update)({"w": jnp.array([jnp.inf, 1, 1, 1])}, state, params)
  chex.assert_trees_all_equal(optax.apply_updates(params, u), params)
  u, state = jax.jit(tx.update)({"w": jnp.ones(4)}, state, params)
  assert float(optax.apply_updates(params, u)["w"][-1]) == pytest.approx(0.75, abs=1e-4)


def test_loss_scaled_master_weights_skips_without_touching_the_master():
  params = {"w": jnp.ones((2,), jnp.float16)}
  tx = loss_scaled(master_weights(optax.adam(1e-3), FP16), DynamicLossScale())
  state = tx.init(params)
  u, state = tx.update({"w": jnp.array([jnp.inf, 1.0], jnp.float16)}, state, params)
  chex.assert_trees_all_equal(master_params(state)["w"], jnp.ones((2,)))
  assert float(current_loss_scale(state)) == 2.0**14


def test_stochastic_rounding_needs_a_key_and_is_reproducible():
  params = cast_params({"w": jnp.linspace(-1, 1, 50)}, DFP(bits=8))
  grads = _const_grads(params, 1e-3)
  tx = master_weights(optax.sgd(1.0), DFP(bits=8), rounding="stochastic",
                      key=jax.random.PRNGKey(0))
  a, sa = _run(tx, params, grads, 3)
  b, _ = _run(tx, params, grads, 3)
  chex.assert_trees_all_equal(a, b)
  chex.assert_trees_all_equal(jax.tree.map(lambda x: fake_quantize(x, DFP(bits=8)), a), a)
  assert sa.key is not None


def test_integer_leaves_pass_through():
  params = {"w": jnp.ones((2,), jnp.float16), "step": jnp.int32(7)}
  tx = master_weights(optax.sgd(0.5), FP16)
  state = tx.init(params)
  grads = {"w": jnp.ones((2,), jnp.float16), "step": jnp.int32(0)}
  u, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, u)
  assert int(new["step"]) == 7 and float(new["w"][0]) == 0.5


@pytest.mark.parametrize("call, exc, word", [
    (lambda: master_weights(optax.sgd(1.0), "fp16"), TypeError, "param_format"),
    (lambda: master_weights(optax.sgd(1.0), DFP(), rounding="up"), ValueError, "rounding"),
    (lambda: master_weights(optax.sgd(1.0), DFP(), rounding="stochastic"), ValueError, "key"),
    (lambda: master_weights(optax.sgd(1.0), FP16, rounding="stochastic", key=jax.random.PRNGKey(0)),
     ValueError, "param_format"),
    (lambda: master_weights(optax.sgd, FP16), TypeError, "inner"),
    (lambda: master_weights(optax.sgd(1.0), FP16).update({"w": jnp.ones(1)}, None), ValueError,
     "params"),
    (lambda: master_params(optax.sgd(1.0).init({"w": jnp.ones(1)})), ValueError, "master_weights"),
])
def test_bad_arguments(call, exc, word):
  with pytest.raises(exc, match=word):
    call()


# ----------------------------------------------------------------------------------------------
# overwrite_state.


def _variables():
  return {"params": {"w": jnp.ones((3,), jnp.float32)},
          "dfp": {"amax": jnp.array([1.0, 2.0, 4.0]), "exp": jnp.array([-3, 5], jnp.int32)}}


def test_overwrite_state_replaces_the_collection_and_trains_the_rest():
  variables = _variables()
  tx = overwrite_state(optax.adamw(0.1, weight_decay=0.5))
  state = tx.init(variables)
  assert isinstance(state, OverwriteState)
  assert set(state.inner_state[0].mu) == {"params"}  # adam's moments exist only for "params"
  new_dfp = {"amax": jnp.array([1.5, 3.0, 2.5]), "exp": jnp.array([2**31 - 1, -2**31], jnp.int32)}
  grads = {"params": {"w": jnp.ones((3,))}, "dfp": new_dfp}
  u, state = jax.jit(tx.update)(grads, state, variables)
  out = optax.apply_updates(variables, u)
  chex.assert_trees_all_equal(out["dfp"], new_dfp)  # bitwise, ints wrap exactly
  assert float(out["params"]["w"][0]) < 1.0  # trained, and no weight decay on "dfp"


def test_overwrite_state_with_master_weights_and_frozendict():
  variables = flax.core.freeze({"params": {"w": jnp.ones((3,), jnp.float16)},
                                "dfp": {"amax": jnp.array([1.0, 2.0, 4.0])}})
  tx = overwrite_state(master_weights(optax.sgd(1e-4), FP16), collections=("dfp",))
  state = tx.init(variables)
  grads = flax.core.freeze({"params": {"w": jnp.ones((3,), jnp.float16)},
                            "dfp": {"amax": jnp.array([0.75, 3.0, 5.0])}})
  for _ in range(5):
    u, state = tx.update(grads, state, variables)
    variables = optax.apply_updates(variables, u)
  chex.assert_trees_all_equal(variables["dfp"], grads["dfp"])
  np.testing.assert_allclose(np.asarray(master_params(state)["params"]["w"]), 1 - 5e-4, rtol=1e-6)


def test_overwrite_state_errors():
  tx = overwrite_state(optax.sgd(1.0))
  v = _variables()
  with pytest.raises(TypeError, match="mapping"):
    tx.init([jnp.ones(2)])
  with pytest.raises(ValueError, match="keys"):
    tx.update({"params": v["params"]}, tx.init(v), v)
  with pytest.raises(ValueError, match="params"):
    tx.update(v, tx.init(v), None)
  with pytest.raises(ValueError, match="collections"):
    overwrite_state(optax.sgd(1.0), collections=())


# ----------------------------------------------------------------------------------------------
# Recipes.


def test_recipes_build_and_train():
  params32 = {"w": jnp.linspace(-1, 1, 30).reshape(5, 6), "b": jnp.zeros((6,))}
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
  for name in recipes_optax.RECIPES:
    tx = recipes_optax.optimizer(name, inner)
    fmt = recipes_optax.param_format(name)
    params = recipes_optax.optimizer_params(name, params32)
    state = tx.init(params)
    scaled = name == "fp16"

    @jax.jit
    def step(params, state):
      scale = current_loss_scale(state) if scaled else 1.0
      grads = jax.grad(lambda p: jnp.sum(p["w"].astype(jnp.float32) ** 2) * scale)(params)
      u, state = tx.update(grads, state, params)
      return optax.apply_updates(params, u), state

    for _ in range(2):
      params, state = step(params, state)
    assert float(jnp.abs(params["w"]).sum()) < float(jnp.abs(params32["w"]).sum())
    has_master = any(isinstance(x, MasterWeightsState) for x in jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, MasterWeightsState)))
    assert has_master == (name != "fp32")
    if isinstance(fmt, (DFP, BFP)):
      chex.assert_trees_all_equal(jax.tree.map(lambda x: fake_quantize(x, fmt), params), params)
    elif fmt is not None:
      assert params["w"].dtype == fmt.dtype
    has_ls = any(isinstance(x, LossScaledState) for x in jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, LossScaledState)))
    assert has_ls == scaled


def test_recipe_options_and_errors():
  tx = recipes_optax.optimizer("BF16", optax.sgd(0.1), loss_scale=NoOpLossScale(), axis_name="i")
  assert isinstance(tx.init({"w": jnp.ones(2, jnp.bfloat16)}), LossScaledState)
  assert recipes_optax.param_format("hbfp8") == BFP(mantissa_bits=15, block=(24, 24))
  with pytest.raises(ValueError, match="recipe"):
    recipes_optax.optimizer("int8", optax.sgd(0.1))
  with pytest.raises(TypeError, match="name"):
    recipes_optax.optimizer(None, optax.sgd(0.1))
  with pytest.raises(TypeError, match="loss_scale"):
    recipes_optax.optimizer("fp16", optax.sgd(0.1), loss_scale=128.0)
  with pytest.raises(ValueError, match="axis_name"):
    recipes_optax.optimizer("bf16", optax.sgd(0.1), axis_name="i")


@pytest.mark.parametrize("recipe", ["fp32", "fp16", "bf16", "dfp16", "hbfp8"])
def test_params_and_state_can_be_donated_together(recipe):
  """`jit(step, donate_argnums=(params, opt_state))` is the usual training loop; the state must not
  share buffers with the params (XLA refuses to donate one buffer twice)."""
  params = {"w": jnp.linspace(-1.0, 1.0, 16).reshape(4, 4), "b": jnp.zeros((4,))}
  tx = recipes_optax.optimizer(recipe, optax.adam(1e-2))
  state = tx.init(params)
  own = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(params)}
  assert not any(x.unsafe_buffer_pointer() in own for x in jax.tree.leaves(state) if hasattr(x, "unsafe_buffer_pointer"))

  def step(p, s):
    u, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
    return optax.apply_updates(p, u), s

  donated = jax.jit(step, donate_argnums=(0, 1))
  ref_p, ref_s = jax.jit(step)(params, state)
  p, s = donated(params, state)  # straight from init: no buffer may appear twice
  p, s = donated(p, s)  # the outputs can be donated again
  ref_p, ref_s = jax.jit(step)(ref_p, ref_s)
  chex.assert_trees_all_equal(p, ref_p)
