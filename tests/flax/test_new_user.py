"""What a new user runs into with the Flax integration: the one-liner quantizes, re-quantizing is an
error, the plain NNX loop says when statistics are not recorded, names agree between reports."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jdfp
from jdfp._src.flax.tracked import NOT_RECORDED


class Linen(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.relu(nn.Dense(16)(x)))


class NNX(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(8, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


X = jnp.ones((2, 8))


def test_quantize_without_policy_uses_the_default_policy():
  qm = jdfp.quantize(Linen())
  qm.init(jax.random.key(0), X)
  report = jdfp.quantize_report(qm)
  assert report.sites and all(s.policy == jdfp.Policy() for s in report.sites.values())
  nm = jdfp.quantize(NNX(nnx.Rngs(0)))
  assert all(s.policy == jdfp.Policy() for s in jdfp.quantize_report(nm).sites.values())


def test_fp32_is_an_explicit_choice():
  qm = jdfp.quantize(Linen(), policy=None, rules=[jdfp.Rule("Dense_1", jdfp.Policy())])
  qm.init(jax.random.key(0), X)
  quantized = {s.path for s in jdfp.quantize_report(qm).sites.values() if s.policy is not None}
  assert quantized == {"Dense_1"}


def test_quantizing_twice_is_an_error():
  with pytest.raises(ValueError, match="already quantized"):
    jdfp.quantize(jdfp.quantize(Linen()), jdfp.policies.bf16())
  with pytest.raises(ValueError, match="already quantized"):
    jdfp.quantize(jdfp.quantize(NNX(nnx.Rngs(0))), jdfp.policies.bf16())


def test_plain_nnx_loop_warns_once_that_gradient_statistics_are_not_recorded():
  model = jdfp.quantize(NNX(nnx.Rngs(0)), jdfp.Policy())
  opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(X) ** 2))(model)
    opt.update(model, grads)
    return loss

  from jdfp._src.ops import backend  # pylint: disable=import-outside-toplevel
  backend._warned.discard(NOT_RECORDED)
  with pytest.warns(RuntimeWarning, match="gradient statistics"):
    step(model, opt)
  assert NOT_RECORDED in backend.fallback_log
  # The documented step records them, without the warning.
  backend._warned.discard(NOT_RECORDED)
  diff = nnx.DiffState(0, nnx.Any(nnx.Param, jdfp.DfpState))
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    _, grads = nnx.value_and_grad(lambda m: jnp.mean(m(X) ** 2), argnums=diff)(model)
  jdfp.apply_state_grads(model, grads)
  rows = jdfp.telemetry(model).where(role="grad").rows
  assert rows and all(r["size"] > 0 for r in rows)


def test_nnx_names_agree_between_report_telemetry_and_explain():
  model = jdfp.quantize(NNX(nnx.Rngs(0)), jdfp.Policy())
  model(X)
  report_names = {f"{s.path}/{s.name}" for s in jdfp.quantize_report(model).sites.values()}
  telemetry_names = {r["path"] for r in jdfp.telemetry(model).rows}
  assert report_names == telemetry_names == {"l1/dot_general", "l2/dot_general"}
  text = str(jdfp.explain(model, X))
  assert "[l1]" in text and "[l2]" in text


def test_linen_inference_needs_no_key_for_nearest_forward():
  qm = jdfp.quantize(Linen(), jdfp.policies.dfp16())
  v = qm.init(jax.random.key(0), X)
  y = qm.apply(v, X)  # no rngs: the forward rounds to nearest
  np.testing.assert_array_equal(np.asarray(y), np.asarray(qm.apply(v, X, rngs={"dfp": jax.random.key(3)})))
