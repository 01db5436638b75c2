"""The op keys of `jdfp.quantize` (Linen): `jdfp._src.flax.rng.make_rng` gives the very key
`module.make_rng` gives (same type, same bits), and a quantized step derives its keys without an
XLA loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import jdfp
from jdfp._src.flax import rng


def _model(make):
  """A module tree calling ``make(module, "dfp")`` at the root, in named and auto-named children,
  several times per module (the counter), and inside nn.scan with split keys."""

  class Child(nn.Module):
    @nn.compact
    def __call__(self, x):
      return [make(self, "dfp"), make(self, "dfp")]

  class Body(nn.Module):
    @nn.compact
    def __call__(self, c, _):
      return c, make(self, "dfp")

  class Root(nn.Module):
    @nn.compact
    def __call__(self, x):
      scanned = nn.scan(Body, split_rngs={"dfp": True}, length=3)()(x, None)[1]
      return [make(self, "dfp")] + Child(name="named")(x) + Child()(x) + [scanned, make(self, "dfp")]

  return Root()


def _data(keys):
  return [np.asarray(jax.random.key_data(k) if jnp.issubdtype(k.dtype, jax.dtypes.prng_key) else k) for k in keys]


@pytest.mark.parametrize("key", [jax.random.key(5), jax.random.PRNGKey(7)], ids=["typed", "raw"])
def test_same_keys_as_flax(key):
  want = _model(lambda m, n: m.make_rng(n)).apply({}, 1.0, rngs={"dfp": key})
  ours = _model(rng.make_rng)
  for got in (ours.apply({}, 1.0, rngs={"dfp": key}), jax.jit(lambda k: ours.apply({}, 1.0, rngs={"dfp": k}))(key)):
    assert [type(g) for g in got] == [type(w) for w in want]
    assert [g.dtype for g in got] == [w.dtype for w in want]
    for g, w in zip(_data(got), _data(want)):
      np.testing.assert_array_equal(g, w)


def test_other_prng_impls_keep_flax_key():
  key = jax.random.key(3, impl="rbg")
  want = _model(lambda m, n: m.make_rng(n)).apply({}, 1.0, rngs={"dfp": key})
  got = _model(rng.make_rng).apply({}, 1.0, rngs={"dfp": key})
  for g, w in zip(_data(got), _data(want)):
    np.testing.assert_array_equal(g, w)


def test_quantized_step_has_no_key_loop():
  """The dfp16 recipe's step (stochastic gradients: one key per op) compiles without XLA loops."""

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10)(jax.nn.relu(nn.Dense(32)(x)))

  model = jdfp.quantize(MLP(), jdfp.policies.dfp16())
  x = jnp.ones((8, 16))
  v = model.init({"params": jax.random.key(0), "dfp": jax.random.key(1)}, x)
  tx = jdfp.recipes.optimizer("dfp16", optax.sgd(0.1), collections=("dfp",))
  s = tx.init(dict(v))

  def step(v, s, x, key):
    def lf(v):
      out, _ = model.apply(v, x, rngs={"dfp": key}, mutable=["dfp"])
      return jnp.mean(out ** 2)
    g = jax.grad(lf)(v)
    u, s = tx.update(g, s, v)
    return optax.apply_updates(v, u), s

  hlo = jax.jit(step).lower(v, s, x, jax.random.key(2)).compile().as_text()
  assert "while" not in hlo and " call(" not in hlo


def test_same_keys_with_flax_rng_separator():
  """Flax's `flax_fix_rng_separator` changes how the path is hashed; the keys still match."""
  from flax import config as flax_config

  old = flax_config.flax_fix_rng_separator
  flax_config.update("flax_fix_rng_separator", not old)
  try:
    test_same_keys_as_flax(jax.random.key(11))
  finally:
    flax_config.update("flax_fix_rng_separator", old)


@pytest.mark.parametrize("seed", [jax.random.key(5), 7], ids=["typed", "int"])
def test_nnx_stream_keys_as_flax(seed):
  from flax import nnx

  want_rngs, got_rngs = nnx.Rngs(dfp=seed), nnx.Rngs(dfp=seed)
  want = [want_rngs.dfp() for _ in range(3)]
  got = [rng.stream_key(got_rngs.dfp) for _ in range(3)]
  got += [nnx.jit(lambda r: rng.stream_key(r.dfp))(got_rngs)]
  want += [want_rngs.dfp()]
  for g, w in zip(_data(got), _data(want)):
    np.testing.assert_array_equal(g, w)
  assert int(got_rngs.dfp.count[...]) == int(want_rngs.dfp.count[...]) == 4


@pytest.mark.filterwarnings("ignore:jdfp. a quantized model is differentiated")
def test_nnx_quantized_step_has_no_key_loop():
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1, self.l2 = nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x)))

  model = jdfp.quantize(MLP(nnx.Rngs(0)), jdfp.policies.dfp16(), rngs=nnx.Rngs(dfp=1))
  x = jnp.ones((8, 16))
  graphdef, state = nnx.split(model)

  def step(state, x):
    m = nnx.merge(graphdef, state)
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(m)
    return nnx.state(m), grads

  hlo = jax.jit(step).lower(state, x).compile().as_text()
  assert "while" not in hlo and " call(" not in hlo
