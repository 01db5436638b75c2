"""FP16 / BF16 convolutions run as convolutions (no im2col patches) with FP32 accumulation: every
pass convolves operands rounded to the format (exact products in float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax._src.ad_checkpoint import saved_residuals

import jdfp

GEOMS = [  # (x shape NHWC-like, kernel spatial + (I, O), strides, padding, lhs_dil, rhs_dil, groups)
    ((2, 9, 9, 8), (3, 3, 4, 6), (2, 1), "SAME", (1, 1), (1, 1), 2),
    ((1, 7, 6, 3), (2, 3, 3, 5), (1, 2), ((1, 0), (2, 1)), (2, 1), (1, 2), 1),
    ((2, 11, 4), (3, 4, 4), (2,), "VALID", (1,), (2,), 1),
    ((1, 4, 5, 3, 2), (2, 2, 2, 2, 3), (1, 1, 1), "SAME", (1, 1, 1), (1, 1, 1), 1),
]
POLICIES = [jdfp.policies.bf16(), jdfp.policies.fp16()]


def _dn(nsp):
  sp = "DHW"[-nsp:] if nsp <= 3 else None
  return ("N" + sp + "C", sp + "IO", "N" + sp + "C")


def _ops(geom, policy):
  xs, ws, strides, pad, ld, rd, g = geom
  dn = _dn(len(xs) - 2)
  kw = dict(window_strides=strides, padding=pad, lhs_dilation=ld, rhs_dilation=rd, dimension_numbers=dn,
            feature_group_count=g)
  ours = lambda x, w: jdfp.conv_general_dilated(x, w, policy=policy, **kw)
  dt = policy.lhs.dtype
  r32 = lambda v: v.astype(dt).astype(jnp.float32)
  conv32 = lambda x, w: lax.conv_general_dilated(x, w, precision=lax.Precision.HIGHEST, **kw)
  return ours, conv32, r32


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: str(g[0]))
def test_matches_conv_of_rounded_operands(geom, policy):
  ours, conv32, r32 = _ops(geom, policy)
  kx, kw_, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, geom[0]) * 3
  w = jax.random.normal(kw_, geom[1])
  y = jax.jit(ours)(x, w)
  np.testing.assert_allclose(y, conv32(r32(x), r32(w)), rtol=2e-6, atol=2e-5)
  # Backward: the output gradient is rounded to the format too, then the conv transposes run in FP32.
  g = jax.random.normal(kg, y.shape)
  _, vjp = jax.vjp(ours, x, w)
  _, vjp_ref = jax.vjp(conv32, r32(x), r32(w))
  for got, want in zip(vjp(g), vjp_ref(r32(g))):
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_no_patches_and_low_precision_residuals(policy):
  ours, _, _ = _ops(GEOMS[0], policy)
  x = jnp.ones(GEOMS[0][0])
  w = jnp.ones(GEOMS[0][1])
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(ours(x, w)), (0, 1)))(x, w))
  assert "conv_general_dilated" in jaxpr
  assert "dot_general" not in jaxpr  # no im2col GEMM
  dtypes = {str(aval.dtype) for aval, _ in saved_residuals(lambda x, w: jnp.sum(ours(x, w)), x, w)
            if np.prod(aval.shape) > 0}
  assert dtypes == {policy.lhs.dtype.name}  # the backward keeps FP16/BF16 copies, half of FP32's bytes


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_nonfinite_stays_nonfinite(policy):
  ours, _, _ = _ops(GEOMS[0], policy)
  x = jnp.ones(GEOMS[0][0]).at[0, 4, 4, 0].set(jnp.nan)
  w = jnp.ones(GEOMS[0][1])
  y = ours(x, w)
  assert bool(jnp.isnan(y).any()) and bool(jnp.isfinite(y[1]).all())
  if policy.lhs == jdfp.FP16:  # beyond FP16's range: Inf, never a finite number
    assert bool(jnp.isinf(ours(jnp.full(GEOMS[0][0], 1e6), w)).all())


def test_input_gradient_skipped_when_not_needed():
  ours, _, _ = _ops(GEOMS[0], POLICIES[0])
  x = jnp.ones(GEOMS[0][0])
  w = jnp.ones(GEOMS[0][1])
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(ours(x, w))))(w))
  assert jaxpr.count("conv_general_dilated") == 2  # forward + weight-gradient only
