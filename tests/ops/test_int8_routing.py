"""GEMMs of integer formats with at most 8 bits run on the INT8 kernel (backend "ffi"): hbfp8,
MX-style 1-D blocks, DFP(8); forward and both backward GEMMs, bit for bit as the reference backend."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdfp
from jdfp._src.ops import explain as explain_mod

needs_kernel = pytest.mark.skipif(not jdfp.kernels.kernel_available(), reason="kernel library not built")
MATMUL = (((1,), (0,)), ((), ()))
MX = jdfp.BFP(7, block=32, axis=-1)


def bits_equal(a, b):
  chex.assert_trees_all_equal(jax.tree.map(lambda x: np.asarray(x).view(np.int32), a),
                              jax.tree.map(lambda x: np.asarray(x).view(np.int32), b))


def _loss(policy, x, w):
  return jnp.sum(jnp.tanh(jdfp.dot_general(x, w, MATMUL, policy=policy)) ** 2)


POLICIES = {
    "hbfp8": lambda **kw: jdfp.policies.hbfp8(grad_rounding="nearest", **kw),
    # MX style: 1-D blocks of 32 along each GEMM's contraction axis (block_k = 32 in every GEMM).
    "mx": lambda **kw: jdfp.Policy(lhs=MX, rhs=MX, grad=MX, **kw),
    "dfp8": lambda **kw: jdfp.Policy(lhs=jdfp.DFP(8), rhs=jdfp.DFP(8), grad=jdfp.DFP(8), **kw),
}


@needs_kernel
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_int8_kernel_runs_and_matches_reference(name):
  make = POLICIES[name]
  x = jax.random.normal(jax.random.key(0), (40, 100))
  w = jax.random.normal(jax.random.key(1), (100, 30)) * 0.1
  grad = jax.grad(_loss, argnums=(1, 2))
  report = jdfp.explain(lambda x, w: grad(make(backend="ffi"), x, w), x, w)
  assert report.count(explain_mod.KERNEL_I8) == 3 and report.count(explain_mod.KERNEL) == 0
  assert report.kernel_calls == 3 and "int8 x int8" in str(report)
  if name == "mx":
    # Every GEMM contracts along its operands' blocks: the backward re-quantizes the forward operands
    # along its own contraction axis (MX style), never block_k = 1.
    hlo = jax.jit(lambda x, w: grad(make(backend="ffi"), x, w)).lower(x, w).as_text()
    # (Backward-data contracts over N = 30 < 32: one block, i.e. no block_k attribute.)
    assert re.findall(r"block_k = (\d+)", hlo) == ["32", "32"]
  got = jax.jit(lambda x, w: (jdfp.dot_general(x, w, MATMUL, policy=make(backend="ffi")),
                              grad(make(backend="ffi"), x, w)))(x, w)
  want = jax.jit(lambda x, w: (jdfp.dot_general(x, w, MATMUL, policy=make(backend="reference")),
                               grad(make(backend="reference"), x, w)))(x, w)
  bits_equal(got, want)


@needs_kernel
def test_wider_formats_stay_on_int16_kernel():
  x = jax.random.normal(jax.random.key(0), (8, 16))
  w = jax.random.normal(jax.random.key(1), (16, 4))
  for pol in (jdfp.policies.dfp16(backend="ffi"),
              jdfp.Policy(lhs=jdfp.DFP(8), rhs=jdfp.DFP(9), grad=jdfp.DFP(8), backend="ffi")):
    r = jdfp.explain(lambda x, w: jdfp.dot_general(x, w, MATMUL, policy=pol), x, w)
    assert r.count(explain_mod.KERNEL) == 1 and r.count(explain_mod.KERNEL_I8) == 0


@needs_kernel
def test_int8_residuals_half_the_bytes():
  from jax._src.ad_checkpoint import saved_residuals

  x = jax.random.normal(jax.random.key(0), (40, 72))
  w = jax.random.normal(jax.random.key(1), (72, 56))
  ints = lambda pol: sorted((str(a.dtype), tuple(a.shape)) for a, _ in saved_residuals(lambda x, w: _loss(pol, x, w), x, w)
                            if a.dtype in (jnp.int8, jnp.int16) and a.ndim == 3)
  assert ints(POLICIES["dfp8"](backend="ffi")) == [("int8", (1, 40, 72)), ("int8", (1, 72, 56))]
  assert ints(POLICIES["dfp8"](backend="reference")) == [("int16", (1, 40, 72)), ("int16", (1, 72, 56))]
  # A wider gradient format: the backward GEMMs run on the INT16 kernel from the int8 residuals.
  pol = jdfp.Policy(lhs=jdfp.DFP(8), rhs=jdfp.DFP(7), grad=jdfp.DFP(14))
  grad = jax.grad(_loss, argnums=(1, 2))
  bits_equal(jax.jit(lambda x, w: grad(pol.replace(backend="ffi"), x, w))(x, w),
             jax.jit(lambda x, w: grad(pol.replace(backend="reference"), x, w))(x, w))
  r = jdfp.explain(lambda x, w: grad(pol.replace(backend="ffi"), x, w), x, w)
  assert r.count(explain_mod.KERNEL_I8) == 1 and r.count(explain_mod.KERNEL) == 2


@pytest.mark.parametrize("float_residuals", [(), ("lhs", "rhs")])
def test_mx_backward_requantizes_along_its_contraction(float_residuals):
  """MX: each backward GEMM re-quantizes the forward operand along the backward's contraction axis,
  from the float input when it is kept (float_residuals), else from the forward's dequantized values."""
  x = jax.random.normal(jax.random.key(2), (64, 96))
  w = jax.random.normal(jax.random.key(3), (96, 48)) * 0.1
  g = jax.random.normal(jax.random.key(4), (64, 48))
  policy = jdfp.Policy(lhs=MX, rhs=MX, grad=MX, backend="reference", float_residuals=float_residuals)
  _, vjp = jax.vjp(lambda x, w: jdfp.dot_general(x, w, MATMUL, policy=policy), x, w)
  dx, dw = vjp(g)
  fq = lambda a, axis: jdfp.fake_quantize(a, jdfp.BFP(7, block=32, axis=axis))
  src_x = x if "lhs" in float_residuals else fq(x, -1)  # forward: x blocks along K (its last axis)
  src_w = w if "rhs" in float_residuals else fq(w, 0)  # forward: w blocks along K (its first axis)
  hi = jax.lax.Precision.HIGHEST
  # dx = g . w^T contracts over N: g blocked along its rows' N axis, w along N (its last axis).
  want_dx = jnp.dot(fq(g, -1), fq(src_w, -1).T, precision=hi)
  # dw = x^T . g contracts over M: x blocked along M (axis 0), g along M (axis 0).
  want_dw = jnp.dot(fq(src_x, 0).T, fq(g, 0), precision=hi)
  np.testing.assert_allclose(dx, want_dx, rtol=2e-5, atol=2e-5 * float(jnp.abs(want_dx).max()))
  np.testing.assert_allclose(dw, want_dw, rtol=2e-5, atol=2e-5 * float(jnp.abs(want_dw).max()))
  # And far from the forward-grid-only result when the grids differ (the re-quantization is real).
  stale = jnp.dot(fq(g, -1), fq(w, 0).T, precision=hi)
  assert float(jnp.abs(dx - stale).max()) > 1e-4 * float(jnp.abs(stale).max())
