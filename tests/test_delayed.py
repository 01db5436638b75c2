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
  xq = jdfp.dequantize(jdfp._src.quantize.quantize_given_amax(x[None], jnp.full((1, 1, 1), 64.0), f, "nearest", None,
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
  with pytest.raises(NotImplementedError, match="delayed"):
    jdfp.conv_general_dilated(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), (1, 1), "SAME",
                              dimension_numbers=("NHWC", "HWIO", "NHWC"), policy=DELAYED)
  with pytest.raises(ValueError, match="history_length"):
    jdfp.Policy(scaling="delayed", history_length=0)
