"""Operands bound for the INT8 GEMM are converted straight to int8 by the kernels: no narrowing
pass left in XLA's optimized HLO, the same results bit for bit as the reference backend, every
forward rounding, with Flax statistics recorded too (a policy-wide rule); and the int16 path where a format is wider."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdfp
from jdfp._src.numerics import quantize as qz
from jdfp._src.ops import convert

pytestmark = pytest.mark.skipif(not jdfp.kernels.kernel_available(), reason="kernel library not built")
MATMUL = (((1,), (0,)), ((), ()))
MX = jdfp.BFP(7, block=32, axis=-1)


def _s8_converts(hlo: str) -> int:
  """Instructions (fused or not) that convert to int8: the narrowing of an int16 tensor."""
  return len(re.findall(r"= s8\[[^\]]*\]\S* convert\(", hlo))


def _fwd_bwd(policy):
  def f(a, b, g):
    out, vjp = jax.vjp(lambda a, b: jdfp.dot_general(a, b, MATMUL, policy=policy), a, b)
    return out, vjp(g)
  return f


def test_hbfp8_forward_has_no_narrowing_convert():
  a = jax.random.normal(jax.random.key(0), (96, 120))
  b = jax.random.normal(jax.random.key(1), (120, 72))
  g = jax.random.normal(jax.random.key(2), (96, 72))
  pol = jdfp.policies.hbfp8(grad_rounding="nearest", backend="ffi")
  fwd = jax.jit(lambda a, b: jdfp.dot_general(a, b, MATMUL, policy=pol)).lower(a, b).compile().as_text()
  assert _s8_converts(fwd) == 0
  assert len(re.findall(r"\(s8\[[^\]]*\]\S*, s32\[[^\]]*\]\S*\) custom-call\(", fwd)) == 2  # both conversions: int8
  hlo = jax.jit(_fwd_bwd(pol)).lower(a, b, g).compile().as_text()
  # The output gradient's conversion writes int8 too (`int8_conversions`: a policy-wide rule that the
  # Flax statistics' counting call follows as well), so nothing is narrowed in XLA.
  assert _s8_converts(hlo) == 0
  ref = jax.jit(_fwd_bwd(pol.replace(backend="reference")))(a, b, g)
  chex.assert_trees_all_equal(jax.jit(_fwd_bwd(pol))(a, b, g), ref)


@pytest.mark.parametrize("fwd_rounding", ["nearest", "stochastic", "biased"])
@pytest.mark.parametrize("name", ["hbfp8", "mx", "dfp8"])
def test_int8_conversions_match_the_reference_bit_for_bit(name, fwd_rounding):
  make = {"hbfp8": lambda **kw: jdfp.policies.hbfp8(grad_rounding="nearest", **kw),
          "mx": lambda **kw: jdfp.Policy(lhs=MX, rhs=MX, grad=MX, **kw),
          "dfp8": lambda **kw: jdfp.Policy(lhs=jdfp.DFP(8), rhs=jdfp.DFP(8), grad=jdfp.DFP(8), **kw)}[name]
  a = jax.random.normal(jax.random.key(3), (37, 101))  # odd shapes: partial tiles and blocks
  b = jax.random.normal(jax.random.key(4), (101, 29)) * 0.1
  g = jax.random.normal(jax.random.key(5), (37, 29))
  key = jax.random.key(6)

  def run(backend):
    pol = make(backend=backend, fwd_rounding=fwd_rounding)
    def f(a, b, g):
      out, vjp = jax.vjp(lambda a, b: jdfp.dot_general(a, b, MATMUL, policy=pol, key=key), a, b)
      return out, vjp(g)
    return jax.jit(f)(a, b, g)

  chex.assert_trees_all_equal(run("ffi"), run("reference"))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "biased"])
@pytest.mark.parametrize("fmt", [jdfp.BFP(7, block=(24, 24)), MX, jdfp.DFP(8)])
def test_quantize3_int8_values_equal_the_int16_ones(fmt, rounding):
  x3 = jax.random.normal(jax.random.key(7), (2, 50, 70)) * 3
  key = jax.random.key(8)
  q16 = convert.quantize3(x3, fmt, 2, rounding, key, use_kernel=True)
  q8 = convert.quantize3(x3, fmt, 2, rounding, key, use_kernel=True, int8=True)
  assert q16.values.dtype == jnp.int16 and q8.values.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(q8.values), np.asarray(q16.values).astype(np.int8))
  np.testing.assert_array_equal(q8.exponent, q16.exponent)


def test_operands_stay_int16_where_int8_does_not_apply():
  x3 = jax.random.normal(jax.random.key(9), (1, 16, 64))
  ops = lambda fa, fb: [(x3, fa, 2, None), (x3, fb, 2, None)]
  dtypes = lambda qs: [q.values.dtype for q in qs]
  d8 = jdfp.DFP(8)
  assert dtypes(convert.quantize3_operands(ops(d8, d8), "nearest", use_kernel=True)) == [jnp.int8] * 2
  # A 9-bit partner: the INT16 GEMM.
  assert dtypes(convert.quantize3_operands(ops(d8, jdfp.DFP(9)), "nearest", use_kernel=True)) == [jnp.int16] * 2
  # The reference backend (no kernel conversion) and the counting call of the Flax statistics.
  assert dtypes(convert.quantize3_operands(ops(d8, d8), "nearest", use_kernel=False)) == [jnp.int16] * 2
  with convert.counters_read():
    assert dtypes(convert.quantize3_operands(ops(d8, d8), "nearest", use_kernel=True)) == [jnp.int16] * 2
  # A lazy (float32) operand goes to the INT16 GEMM's fused path: the other one stays int16 too.
  qs = convert.quantize3_operands(ops(d8, d8), "nearest", use_kernel=True, lazy=(False, True))
  assert dtypes(qs) == [jnp.int16, jnp.float32]
  assert isinstance(qs[0], qz.QArray)


def test_policy_wide_int8_with_flax_statistics():
  """An all-8-bit policy converts to int8 even while Flax statistics are recorded: the statistics'
  counting calls ask for int8 too, so each operand (and the output gradient, once for both backward
  GEMMs: HBFP's square tiles read the same on both views) is converted by exactly one kernel call,
  and nothing is narrowed in XLA. A policy with a wider format keeps int16 there."""
  import optax
  from flax import linen as nn

  x = jax.random.normal(jax.random.key(0), (48, 72))
  y = jax.random.normal(jax.random.key(1), (48, 40))

  def step_hlo(policy):
    model = jdfp.quantize(nn.Dense(40, use_bias=False), policy)
    variables = model.init({"params": jax.random.key(2), "dfp": jax.random.key(3)}, x)

    def loss(v):
      out, _ = model.apply(v, x, rngs={"dfp": jax.random.key(4)}, mutable=["dfp"])
      return optax.l2_loss(out, y).mean()
    return jax.jit(jax.grad(loss)).lower(dict(variables)).compile().as_text()

  assert convert.int8_conversions(jdfp.policies.hbfp8())
  assert not convert.int8_conversions(jdfp.policies.hbfp8().replace(dlhs_grad=jdfp.BFP(11, block=(24, 24))))
  assert not convert.int8_conversions(jdfp.policies.hbfp8(backend="reference"))
  hlo = step_hlo(jdfp.policies.hbfp8())
  assert _s8_converts(hlo) == 0
  calls = re.findall(r"\((s\d+)\[[^\]]*\]\S*, s32\[[^\]]*\]\S*, s32\[4\]\S*, s32\[2\]\S*\) custom-call\(", hlo)
  assert calls == ["s8"] * 3, calls  # input, kernel, output gradient
  assert len(re.findall(r'custom_call_target="jdfp_gemm_i8"', hlo)) == 2  # forward, weight gradient (x is no param)
