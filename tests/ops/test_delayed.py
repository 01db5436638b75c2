"""Delayed scaling: exponents from a history of maxima, state flow through the backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdfp

M = (((1,), (0,)), ((), ()))
DELAYED = jdfp.Policy(scaling="delayed", history_length=4)


def data():
  return jax.random.normal(jax.random.key(0), (8, 16)), jax.random.normal(jax.random.key(1), (16, 4))


def bits(x):
  return np.asarray(x, np.float32).view(np.int32)


def loss(w, x, s, policy=DELAYED):
  y, ns = jdfp.dot_general(x, w, M, policy=policy, scale_state=s)
  return jnp.sum(jnp.tanh(y) ** 2), ns


def test_empty_history_equals_current_scaling_and_records_maxima():
  x, w = data()
  st = jdfp.init_scale_state(DELAYED)
  (l, ns), (gw, gs) = jax.jit(jax.value_and_grad(loss, argnums=(0, 2), has_aux=True))(w, x, st)
  cur = jdfp.Policy()
  y = jdfp.dot_general(x, w, M, policy=cur)
  np.testing.assert_array_equal(bits(jdfp.dot_general(x, w, M, policy=DELAYED, scale_state=st)[0]), bits(y))
  gw_cur = jax.grad(lambda w: jnp.sum(jnp.tanh(jdfp.dot_general(x, w, M, policy=cur)) ** 2))(w)
  np.testing.assert_array_equal(bits(gw), bits(gw_cur))
  assert float(ns.lhs[0]) == float(jnp.max(jnp.abs(x))) and float(ns.rhs[0]) == float(jnp.max(jnp.abs(w)))
  new = jdfp.delayed_state_update(ns, gs)
  assert float(new.grad[0]) > 0 and np.all(np.asarray(new.grad[1:]) == 0)  # overwrite, not add


def test_history_rolls_and_large_history_max_coarsens_small_one_saturates():
  x, w = data()
  big = jdfp.ScaleState(jnp.array([0.0, 64.0, 0, 0]), jnp.zeros(4), jnp.zeros(4))
  y_big, ns = jdfp.dot_general(x, w, M, policy=DELAYED, scale_state=big)
  assert float(ns.lhs[0]) == float(jnp.max(jnp.abs(x))) and float(ns.lhs[2]) == 64.0  # newest first, rolled
  # with max 64 the step is 2**(7 - 13): coarser than the current max's, same as quantizing x*2**k
  assert not np.array_equal(bits(y_big), bits(jdfp.dot_general(x, w, M)))
  f = jdfp.DFP(14)
  xq = jdfp.dequantize(jdfp._src.numerics.quantize.quantize_given_amax(x[None], jnp.full((1, 1, 1), 64.0), f, "nearest", None,
                                                            (1, 8, 16)))[0]
  np.testing.assert_allclose(y_big, xq @ jdfp.fake_quantize(w, f), rtol=1e-5, atol=1e-5)
  # a stale small history max: large elements saturate at qmax * 2**e (never wrap, never overflow)
  small = jdfp.ScaleState(jnp.array([0.01, 0, 0, 0]), jnp.zeros(4), jnp.zeros(4))
  y_small, _ = jdfp.dot_general(x, w, M, policy=DELAYED, scale_state=small)
  assert np.all(np.isfinite(np.asarray(y_small)))
  assert float(jnp.max(jnp.abs(y_small))) < float(jnp.max(jnp.abs(x @ w)))


@pytest.mark.skipif(not jdfp.kernels.kernel_available(), reason="kernel library not built")
def test_ffi_equals_reference_and_nan_stays_nan():
  x, w = data()
  st = jdfp.ScaleState(jnp.array([3.0, 1, 0, 0]), jnp.array([0.5, 0, 0, 0]), jnp.array([7.0, 0, 0, 0]))
  outs = []
  for backend in ("ffi", "reference"):
    p = DELAYED.replace(backend=backend)
    outs.append(jax.jit(jax.value_and_grad(lambda w, s: loss(w, x, s, p), argnums=(0, 1), has_aux=True))(w, st))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(bits(a), bits(b)), outs[0], outs[1])
  y, _ = jdfp.dot_general(x.at[0, 0].set(jnp.nan), w, M, policy=DELAYED, scale_state=st)
  assert np.all(np.isnan(np.asarray(y)))


def test_errors_are_clear():
  x, w = data()
  with pytest.raises(ValueError, match="scale_state"):
    jdfp.dot_general(x, w, M, policy=DELAYED)
  with pytest.raises(ValueError, match="scale_state"):
    jdfp.dot_general(x, w, M, scale_state=jdfp.init_scale_state(DELAYED))
  with pytest.raises(ValueError, match="per-tensor"):
    jdfp.dot_general(x, w, M, policy=DELAYED.replace(lhs=jdfp.DFP(14, axis=-1)), scale_state=jdfp.init_scale_state(DELAYED))
  with pytest.raises(ValueError, match="scale_state"):
    jdfp.conv_general_dilated(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), (1, 1), "SAME",
                              dimension_numbers=("NHWC", "HWIO", "NHWC"), policy=DELAYED)
  with pytest.raises(ValueError, match="history_length"):
    jdfp.Policy(scaling="delayed", history_length=0)


# ------------------------------------------------------------------------------------------------
# Convolutions


CONV = dict(window_strides=(2, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_data():
  return jax.random.normal(jax.random.key(2), (2, 7, 6, 3)), jax.random.normal(jax.random.key(3), (3, 3, 3, 4))


def conv_loss(w, x, s, policy):
  y, ns = jdfp.conv_general_dilated(x, w, **CONV, policy=policy, scale_state=s, key=jax.random.key(9))
  return jnp.sum(jnp.tanh(y) ** 2), ns


@pytest.mark.parametrize("backend", ["ffi", "reference"])
def test_conv_empty_history_equals_current_scaling_history_flows(backend):
  if backend == "ffi" and not jdfp.kernels.kernel_available():
    pytest.skip("kernel library not built")
  x, w = conv_data()
  pol = jdfp.policies.dfp16(scaling="delayed", history_length=4, backend=backend)  # stochastic gradients
  cur = pol.replace(scaling="current")
  st = jdfp.init_scale_state(pol)
  (l, ns), (gw, gs) = jax.jit(jax.value_and_grad(conv_loss, argnums=(0, 2), has_aux=True),
                              static_argnums=3)(w, x, st, pol)
  # Both jitted: an eager and a jitted float sum may round differently (XLA fuses the reduction).
  l_cur, gw_cur = jax.jit(jax.value_and_grad(lambda w: jnp.sum(jnp.tanh(jdfp.conv_general_dilated(
      x, w, **CONV, policy=cur, key=jax.random.key(9))) ** 2)))(w)
  np.testing.assert_array_equal(bits(l), bits(l_cur))
  np.testing.assert_array_equal(bits(gw), bits(gw_cur))
  assert float(ns.lhs[0]) == float(jnp.max(jnp.abs(x))) and float(ns.rhs[0]) == float(jnp.max(jnp.abs(w)))
  new = jdfp.delayed_state_update(ns, gs)
  assert float(new.grad[0]) > 0 and np.all(np.asarray(new.grad[1:]) == 0)
  # Second step: the history (not this tensor) sets the exponents; x / 64 then keeps x's exponent.
  y2, ns2 = jdfp.conv_general_dilated(x / 64, w, **CONV, policy=pol, scale_state=new, key=jax.random.key(9))
  f = jdfp.DFP(14)
  xq = jdfp.dequantize(jdfp._src.numerics.quantize.quantize_given_amax(x / 64, jnp.full((1,) * 4, ns.lhs[0]), f, "nearest",
                                                              None, x.shape))
  wq = jdfp.dequantize(jdfp._src.numerics.quantize.quantize_given_amax(w, jnp.full((1,) * 4, ns.rhs[0]), f, "nearest", None,
                                                              w.shape))
  np.testing.assert_allclose(y2, jax.lax.conv_general_dilated(xq, wq, **CONV), rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(xq), np.asarray(jdfp.fake_quantize(x / 64, f)))  # coarser than current
  assert float(ns2.lhs[0]) == float(jnp.max(jnp.abs(x / 64))) and float(ns2.lhs[1]) == float(ns.lhs[0])


# ------------------------------------------------------------------------------------------------
# Delayed scaling through jdfp.quantize (Linen and NNX): histories in the "dfp" collection.

import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from flax.training import train_state  # noqa: E402

from jdfp._src.flax import state as core  # noqa: E402
from jdfp._src.flax.state import unpack  # noqa: E402
from jdfp._src.flax import nnx as jnnx  # noqa: E402

H = 3
FLAX_DELAYED = jdfp.policies.dfp16(scaling="delayed", history_length=H)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))


def _rep(m):
  return float(core.history_values(jnp.float32(m)))


def _exp(m):
  return int(jdfp._src.numerics.quantize.group_exponent(jnp.float32(m), jdfp.DFP(14)))


def test_linen_delayed_history_sets_exponents_and_empty_history_is_current_scaling():
  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 2)) * 3
  qd = jdfp.quantize(Net(), FLAX_DELAYED)
  qc = jdfp.quantize(Net(), FLAX_DELAYED.replace(scaling="current"))
  v = jax.jit(qd.init)({"params": jax.random.key(1), "dfp": jax.random.key(2)}, x)
  for op in (("Conv_0", "conv"), ("Dense_0", "dot_general"), ("Dense_1", "dot_general")):
    st = unpack(v["dfp"][op[0]][op[1]])
    for r in core.ROLES:  # created by init, empty: init's batch does not enter the history
      assert st[r][core.HISTORY].shape == (H,) and not np.any(np.asarray(st[r][core.HISTORY]))
  run = jax.jit(lambda m, v, x: m.apply(v, x, rngs={"dfp": jax.random.key(5)}, mutable=["dfp"]), static_argnums=0)
  # Empty history: bit-identical to current scaling.
  y0, upd = run(qd, v, x)
  yc, _ = run(qc, {"params": v["params"]}, x)
  np.testing.assert_array_equal(bits(y0), bits(yc))
  conv = unpack(upd["dfp"]["Conv_0"]["conv"])
  assert float(conv["lhs"][core.HISTORY][0]) == _rep(jnp.max(jnp.abs(x)))
  assert float(conv["lhs"]["exponent"]) == _exp(jnp.max(jnp.abs(x)))
  # Next step on a batch 100x smaller: the exponent in use comes from the history's max.
  v1 = {"params": v["params"], "dfp": upd["dfp"]}
  x_small = x / 100
  y1, upd1 = run(qd, v1, x_small)
  conv1 = unpack(upd1["dfp"]["Conv_0"]["conv"])
  assert float(conv1["lhs"]["exponent"]) == _exp(jnp.max(jnp.abs(x))) > _exp(jnp.max(jnp.abs(x_small)))
  np.testing.assert_array_equal(np.asarray(conv1["lhs"][core.HISTORY]),
                                [_rep(jnp.max(jnp.abs(x_small))), _rep(jnp.max(jnp.abs(x))), 0.0])
  assert not np.array_equal(bits(y1), bits(run(qc, {"params": v["params"]}, x_small)[0]))
  # The same as the op with that history (layers before Dense_1 included): check the first op.
  w = v["params"]["Conv_0"]["kernel"]
  hist = jdfp.ScaleState(*(conv[r][core.HISTORY] for r in core.ROLES))
  pol = FLAX_DELAYED
  yop, _ = jdfp.conv_general_dilated(x_small, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     policy=pol.replace(grad_rounding="nearest"), scale_state=hist)
  xq = jdfp.dequantize(jdfp._src.numerics.quantize.quantize_given_amax(x_small, jnp.full((1,) * 4, jnp.max(jnp.abs(x))),
                                                              jdfp.DFP(14), "nearest", None, x.shape))
  np.testing.assert_allclose(yop, jax.lax.conv_general_dilated(xq, jdfp.fake_quantize(w, jdfp.DFP(14)), (1, 1), "SAME",
                                                               dimension_numbers=("NHWC", "HWIO", "NHWC")),
                             rtol=1e-5, atol=1e-6)
  # Without a mutable "dfp", apply reads the histories and leaves them alone.
  y_ro = qd.apply(v1, x_small, rngs={"dfp": jax.random.key(5)})
  np.testing.assert_array_equal(bits(y_ro), bits(y1))


class TS(train_state.TrainState):
  pass


def test_linen_delayed_training_train_state_overwrite_and_fixed_shapes():
  x = jax.random.normal(jax.random.key(0), (16, 5, 5, 2))
  y = jax.random.randint(jax.random.key(1), (16,), 0, 3)
  qm = jdfp.quantize(Net(), FLAX_DELAYED)
  v = jax.jit(qm.init)({"params": jax.random.key(1), "dfp": jax.random.key(2)}, x)
  tx = jdfp.overwrite_state(optax.adam(1e-2), collections=("dfp",))
  state = TS.create(apply_fn=qm.apply, params={"params": v["params"], "dfp": v["dfp"]}, tx=tx)
  shapes = jax.tree.map(jnp.shape, state.params)

  @jax.jit
  def step(state, key):
    def loss_fn(variables):
      logits, upd = state.apply_fn(variables, x, rngs={"dfp": key}, mutable=["dfp"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), loss, grads["dfp"]

  losses, grad_hist = [], []
  for i in range(10):
    state, loss, gdfp = step(state, jax.random.key(10 + i))
    losses.append(float(loss))
    assert jax.tree.map(jnp.shape, state.params) == shapes  # the train-state pytree keeps its shape
    # overwrite, bitwise (histories included: their entries are exact under old + (new - old))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(bits(a), bits(b)), state.params["dfp"], gdfp)
    grad_hist.append(np.asarray(unpack(state.params["dfp"]["Dense_1"]["dot_general"])["grad"][core.HISTORY]))
  assert losses[-1] < losses[0] - 0.1, losses
  # The gradient history rolls: newest first, the previous step's entry one slot later.
  assert np.all(grad_hist[-1] > 0)
  np.testing.assert_array_equal(grad_hist[-1][1:], grad_hist[-2][:-1])
  # The exponent in use for the output gradient is the history max's (telemetry shows it).
  g = unpack(state.params["dfp"]["Dense_1"]["dot_general"])["grad"]
  assert float(g["exponent"]) == _exp(np.max(grad_hist[-2]))
  rows = jdfp.telemetry(state.params).where("Dense_1", "grad")
  assert rows[0]["exponent"] == int(g["exponent"])
  assert rows[0]["history_max"] == float(np.max(grad_hist[-1])) and rows[0]["history_filled"] == len(grad_hist[-1])
  assert "hist max" in str(jdfp.telemetry(state.params))


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(8, 32, rngs=rngs)
    self.l2 = nnx.Linear(32, 4, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def test_nnx_delayed_training():
  x = jax.random.normal(jax.random.key(0), (16, 8))
  y = jax.random.normal(jax.random.key(1), (16, 4))
  model = jdfp.quantize(MLP(nnx.Rngs(0)), FLAX_DELAYED, rngs=nnx.Rngs(dfp=1))
  assert model.l1.dot_general.state[...].shape == (3, len(core.FIELDS) + H)
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(m, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2),
                                     argnums=nnx.DiffState(0, nnx.Any(nnx.Param, jnnx.DfpState)))(m)
    opt.update(m, jnnx.apply_state_grads(m, grads))
    return loss

  losses = [float(step(model, opt)) for _ in range(8)]
  assert losses[-1] < losses[0], losses
  st = jnnx.state_of(model)["l1/dot_general"]
  assert model.l1.dot_general.state[...].shape == (3, len(core.FIELDS) + H)
  assert np.all(np.asarray(st["grad"][core.HISTORY]) > 0) and np.all(np.asarray(st["lhs"][core.HISTORY]) > 0)
  assert float(st["lhs"]["exponent"]) == _exp(jnp.max(jnp.abs(x)))  # the same batch every step
