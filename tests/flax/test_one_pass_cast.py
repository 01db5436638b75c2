"""FP16 / BF16 recipes with Flax statistics: the one-pass kernel cast (`convert.cast_float`, merged
with the statistics' call) gives the same outputs, gradients and statistics as XLA's casts with
separate counting, bit for bit, and leaves no separate count of a GEMM operand in the compiled step
(convolutions keep XLA's casts and their count)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jdfp
from jdfp._src.ops import convert, dot_vjp


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(5)(nn.relu(nn.Dense(16)(x)))


def _step(recipe):
  model = jdfp.quantize(_Net(), jdfp.policies.get(recipe))
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3)) * 300.0  # fp16 saturates a few
  x = x.at[0, 0, 0, 0].set(1e-9)  # and underflows one
  v = model.init({"params": jax.random.key(1), "dfp": jax.random.key(2)}, x)

  def loss(v):
    out, new = model.apply(v, x, rngs={"dfp": jax.random.key(3)}, mutable=["dfp"])
    return jnp.sum(out ** 2), (out, new)

  return jax.jit(jax.grad(loss, has_aux=True)), v


@pytest.mark.parametrize("recipe", ["fp16", "bf16"])
def test_one_pass_equals_separate_casts(recipe, monkeypatch):
  step, v = _step(recipe)
  got = step(v)
  hlo = step.lower(v).compile().as_text()
  # The Dense layers' operands: one counting cast each (x, w, h, the gradient) and no separate count;
  # the conv keeps XLA's casts and its count (1 + 1 + 1 for input, kernel and gradient).
  assert hlo.count('"jdfp_float_cast_stats"') == 6 and hlo.count('"jdfp_float_stats"') == 3
  for mod in (convert, dot_vjp):  # XLA's casts, pure-JAX counts: the computation before
    monkeypatch.setattr(mod, "kernel_casts", lambda policy: False)
  step_old, _ = _step(recipe)
  want = step_old(v)
  assert "jdfp_float_cast_stats" not in step_old.lower(v).compile().as_text()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("recipe", ["fp16", "bf16"])
def test_without_statistics_the_ops_cast_with_xla(recipe):
  """Plain `jdfp.dot_general` / `jdfp.conv_general_dilated` (no Flax statistics): forward and backward
  casts stay XLA's converts; no counters are computed that nobody reads."""
  policy = jdfp.policies.get(recipe)
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
  v = jax.random.normal(jax.random.key(2), (144, 5))

  def loss(w, v):
    h = jdfp.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), policy=policy)
    return jnp.sum(jdfp.dot_general(h.reshape(2, -1), v, (((1,), (0,)), ((), ())), policy=policy) ** 2)

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w, v).compile().as_text()
  assert "jdfp_float_cast_stats" not in hlo and "jdfp_float_stats" not in hlo
