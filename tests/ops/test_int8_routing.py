"""GEMMs of integer formats with at most 8 bits run on the INT8 kernel (backend "ffi"): hbfp8,
MX-style 1-D blocks, DFP(8); forward and both backward GEMMs, bit for bit as the reference backend."""

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
    # The forward GEMM contracts along the blocks.  (The backward GEMMs reuse the forward's operands,
    # whose blocks then lie across their contraction: block_k = 1, exact but one block per product.)
    fwd = lambda x, w: jdfp.dot_general(x, w, MATMUL, policy=make(backend="ffi"))
    assert jax.jit(fwd).lower(x, w).as_text().count("block_k = 32") == 1
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
