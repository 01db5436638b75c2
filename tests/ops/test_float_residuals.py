"""Policy(float_residuals=...): the backward re-reads an operand from its float input (quantized again
with the forward's exponent) instead of a saved int16 copy. Gradients must be bit-identical to the
default, and the int16 copy must really be gone from the residuals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

import jdfp

DIMS = (((1,), (0,)), ((), ()))
CONV_DN = ("NHWC", "HWIO", "NHWC")
CHOICES = [("lhs",), ("rhs",), ("lhs", "rhs")]
BASES = {
    "dfp_kernel": jdfp.Policy(),
    "dfp_reference": jdfp.Policy(backend="reference"),
    "dfp_biased": jdfp.Policy(fwd_rounding="biased"),
    "hbfp_tiles": jdfp.policies.hbfp8(grad_rounding="nearest"),
    "per_row": jdfp.Policy(lhs=jdfp.DFP(14, axis=-1), rhs=jdfp.DFP(12, axis=-1)),
    "bf16": jdfp.policies.bf16(),
}


def _operands(nan=False):
  k1, k2 = jax.random.split(jax.random.key(3))
  x = jax.random.normal(k1, (40, 72)) * 3.0
  w = jax.random.normal(k2, (72, 56)) * 0.1
  if nan:
    x = x.at[5, 7].set(jnp.nan)
    w = w.at[3, 9].set(jnp.inf)
  return x, w


def _dot_grads(policy, x, w, dims=DIMS):
  loss = lambda x, w: jnp.sum(jnp.sin(jdfp.dot_general(x, w, dims, policy=policy)))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)


def _assert_same(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))  # NaNs compare equal here


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("choice", CHOICES)
def test_dot_gradients_bit_identical(base, choice):
  policy = BASES[base]
  x, w = _operands()
  _assert_same(_dot_grads(policy, x, w), _dot_grads(policy.replace(float_residuals=choice), x, w))


@pytest.mark.parametrize("choice", CHOICES)
def test_dot_transposed_layouts_and_batch_dims(choice):
  # rhs contracted on its last axis and a batch dim: the operand views need transposes.
  k1, k2 = jax.random.split(jax.random.key(5))
  x = jax.random.normal(k1, (3, 24, 40))
  w = jax.random.normal(k2, (3, 32, 40))
  dims = (((2,), (2,)), ((0,), (0,)))
  p = jdfp.Policy()
  _assert_same(_dot_grads(p, x, w, dims), _dot_grads(p.replace(float_residuals=choice), x, w, dims))


@pytest.mark.parametrize("choice", CHOICES)
def test_nonfinite_inputs_stay_nonfinite_and_identical(choice):
  x, w = _operands(nan=True)
  p = jdfp.Policy()
  base = _dot_grads(p, x, w)
  _assert_same(base, _dot_grads(p.replace(float_residuals=choice), x, w))
  assert np.isnan(np.asarray(base[1][0])).any() and np.isnan(np.asarray(base[1][1])).any()


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("choice", CHOICES)
def test_conv_gradients_bit_identical_with_stride_skipping_a_nan(backend, choice):
  k1, k2 = jax.random.split(jax.random.key(7))
  x = jax.random.normal(k1, (2, 10, 10, 3))
  x = x.at[0, 9, 9, 0].set(jnp.nan)  # a stride-2 VALID 3x3 conv never reads row/col 9
  w = jax.random.normal(k2, (3, 3, 3, 5))

  def grads(policy):
    loss = lambda x, w: jnp.sum(jnp.sin(jdfp.conv_general_dilated(
        x, w, (2, 2), "VALID", dimension_numbers=CONV_DN, policy=policy)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)

  p = jdfp.Policy(backend=backend)
  base = grads(p)
  assert np.isfinite(np.asarray(base[1][1])).all()
  _assert_same(base, grads(p.replace(float_residuals=choice)))


def _residual_dtypes(fn, *args):
  return [(str(aval.dtype), tuple(aval.shape), where) for aval, where in saved_residuals(fn, *args)]


def test_int16_copies_leave_the_residuals():
  x, w = _operands()

  def res(policy):
    r = _residual_dtypes(lambda x, w: jnp.sum(jnp.sin(jdfp.dot_general(x, w, DIMS, policy=policy))), x, w)
    return [(dt, shape) for dt, shape, _ in r if dt == "int16"]

  assert sorted(res(jdfp.Policy())) == sorted([("int16", (1, 40, 72)), ("int16", (1, 72, 56))])
  assert res(jdfp.Policy(float_residuals=("rhs",))) == [("int16", (1, 40, 72))]
  assert res(jdfp.Policy(float_residuals=("lhs", "rhs"))) == []
  # What replaces them are the arguments themselves (no new buffers).
  r = _residual_dtypes(lambda x, w: jnp.sum(jnp.sin(jdfp.dot_general(
      x, w, DIMS, policy=jdfp.Policy(float_residuals=("lhs", "rhs"))))), x, w)
  assert {where for dt, shape, where in r if shape in ((40, 72), (72, 56))} == \
      {"from the argument x", "from the argument w"}


def test_conv_int16_copies_leave_the_residuals():
  x = jnp.ones((2, 8, 8, 3))
  w = jnp.ones((3, 3, 3, 4))
  f = lambda p: lambda x, w: jnp.sum(jnp.sin(jdfp.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=CONV_DN, policy=p)))
  ints = lambda p: [r for r in _residual_dtypes(f(p), x, w) if r[0] == "int16"]
  assert len(ints(jdfp.Policy())) == 2
  assert len(ints(jdfp.Policy(float_residuals=("lhs",)))) == 1
  assert ints(jdfp.Policy(float_residuals=("rhs", "lhs"))) == []


def test_policy_validation():
  assert jdfp.Policy(float_residuals=["rhs", "lhs", "rhs"]).float_residuals == ("lhs", "rhs")
  hash(jdfp.Policy(float_residuals=["rhs"]))
  with pytest.raises(ValueError, match="float_residuals must be a tuple of 'lhs' and/or 'rhs'"):
    jdfp.Policy(float_residuals=("weights",))
  with pytest.raises(ValueError, match="float_residuals must be a tuple"):
    jdfp.Policy(float_residuals="lhs")
  with pytest.raises(ValueError, match="deterministic forward rounding"):
    jdfp.Policy(fwd_rounding="stochastic", float_residuals=("lhs",))
  with pytest.raises(ValueError, match="scaling='current'"):
    jdfp.Policy(scaling="delayed", float_residuals=("rhs",))


def test_through_flax_linen_quantize():
  """The policy reaches the ops that jdfp.quantize dispatches: the CNN's kernels (params, alive
  anyway) are re-read in the backward; gradients and the "dfp" statistics are unchanged."""
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(8, (3, 3))(x))
      x = nn.Conv(8, (1, 1), strides=2)(x)
      return nn.Dense(4)(x.reshape(x.shape[0], -1))

  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))

  def grads(policy):
    qm = jdfp.quantize(Net(), policy)
    variables = qm.init(jax.random.key(1), x)

    def loss(params):
      out, state = qm.apply({**variables, "params": params}, x, mutable=["dfp"])
      return jnp.sum(out ** 2), state

    return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])

  _assert_same(grads(jdfp.Policy()), grads(jdfp.Policy(float_residuals=("rhs",))))
