"""The BF16 convolutions and GEMM on the AMX-BF16 tiles (`isa="amx_bf16"`, xla_ffi/kernel_amx_f16.cc
without the float16 split): bfloat16 operands as they are, exact products, float32 sums in the tile
unit's order (docs/arithmetic.md, "BF16 on AMX-BF16 tiles").  That order matches no sequential
rounding model, so the tests check what is defined: the GEMM within the float32 summation bound of
the exact float64 result and exact where every partial sum is representable; each conv pass bit for
bit the tile GEMM on a numpy patch matrix (any gather mistake shows); NaN / Inf as IEEE; and the
BF16 recipe's routing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jdfp
from jdfp import kernels
from jdfp._src.ops import explain, float_conv
from kernel_testing import bits_eq, draw_conv_geometry, transposed_conv_reference
from test_conv_bf16_kernel import CASES, _bf16_values, _case_id, _kw, _loss, _patches

pytestmark = pytest.mark.skipif(not (kernels.kernel_available() and kernels.amx_bf16_ready()),
                                reason="no AMX-BF16 tiles on this CPU (or JDFP_AMX=0)")

if kernels.kernel_available():
  from jdfp._src.ffi.gemm_bf16 import conv_bf16, conv_bf16_input_grad, conv_bf16_weight_grad, gemm_bf16

AMX = dict(isa="amx_bf16")


def _gemm(a, b, ta=False, tb=False):
  return np.asarray(gemm_bf16(a, b, transpose_a=ta, transpose_b=tb, **AMX))


def _check_bound(got, a, b, ta=False, tb=False):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)  # bf16 products are exact in float64
  a = np.swapaxes(a, -1, -2) if ta else a
  b = np.swapaxes(b, -1, -2) if tb else b
  k = a.shape[-1]
  bound = (k + 2) * 2.0**-24 * (np.abs(a) @ np.abs(b))  # float32 sums of k exact products
  err = np.abs(np.asarray(got, np.float64) - a @ b)
  assert np.all(err <= bound), float(np.max(err / np.maximum(bound, 1e-300)))


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (15, 17, 33), (32, 64, 32), (33, 100, 47), (70, 1100, 130)])
def test_gemm_within_the_float32_bound_every_layout(m, k, n, ta, tb):
  rng = np.random.default_rng(m + k + n)
  a = jnp.asarray(_bf16_values((k, m) if ta else (m, k), rng), jnp.bfloat16)
  b = jnp.asarray(_bf16_values((n, k) if tb else (k, n), rng), jnp.bfloat16)
  _check_bound(_gemm(a, b, ta, tb), a, b, ta, tb)


def test_gemm_exact_where_every_partial_sum_is_representable():
  # Full 8-bit significands times small integers: every partial sum is a multiple of 2**-7 below
  # 2**16, so any float32 order of additions is exact, and so must the result be (an odd k, K padding).
  rng = np.random.default_rng(5)
  a = (rng.integers(-127, 128, (40, 333)) * 2.0**-7).astype(np.float32)
  b = rng.integers(-4, 5, (333, 50)).astype(np.float32)
  got = _gemm(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16))
  np.testing.assert_array_equal(got, (a.astype(np.float64) @ b).astype(np.float32))


def test_gemm_nonfinite_as_ieee_and_float32_operands_refused():
  a = np.ones((20, 40), np.float32)
  b = np.ones((40, 18), np.float32)
  a[3, 5], a[4, 6], b[7, 2] = np.nan, np.inf, 0.0
  a[4, 7], b[6, 9] = 0.0, -np.inf  # row 4: Inf * 1 and 0 * (-Inf) in column 9
  got = _gemm(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16))
  want = a.astype(np.float64) @ b
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  fin = np.isfinite(want)
  np.testing.assert_array_equal(got[fin], want[fin])
  with pytest.raises(Exception, match="bfloat16 operands"):
    gemm_bf16(jnp.asarray(a), jnp.asarray(b, jnp.bfloat16), **AMX).block_until_ready()


def check_conv(xs, ws, strides, padding, ld, rd, *, seed=0, specials=False):
  """Forward and weight-gradient bit for bit the tile GEMM on the numpy patch matrix."""
  rng = np.random.default_rng(seed)
  x, w = _bf16_values(xs, rng, specials), _bf16_values(ws, rng, specials)
  ksp, o = ws[:-2], ws[-1]
  p, out_sp = _patches(x, ksp, strides, padding, ld, rd)
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  y = conv_bf16(xb, wb, **AMX, **_kw(strides, padding, ld, rd))
  assert y.shape == (xs[0],) + tuple(out_sp) + (o,)
  bits_eq(y, _gemm(p, wb.reshape(-1, o)).reshape(y.shape))
  dy = jnp.asarray(_bf16_values(y.shape, rng, specials), jnp.bfloat16)
  dw = conv_bf16_weight_grad(xb, dy, kernel_spatial=ksp, **AMX, **_kw(strides, padding, ld, rd))
  bits_eq(dw, np.moveaxis(_gemm(dy.reshape(-1, o).T, p).reshape((o,) + ws[:-1]), 0, -1))
  return y, dw


@pytest.mark.parametrize("case", CASES + [((4, 12, 12, 1), (3, 3, 1, 32), (1, 1), "SAME", None, None),
                                          ((2, 12, 12, 33), (3, 3, 33, 17), (2, 2), "SAME", None, None)],
                         ids=_case_id)
def test_conv_forward_and_weight_grad_are_the_tile_gemm_on_the_patches(case):
  check_conv(*case)


@pytest.mark.parametrize("case", CASES[:6], ids=_case_id)
def test_conv_nonfinite_and_subnormal_values(case):
  y, dw = check_conv(*case, specials=True, seed=3)
  if case is CASES[0]:  # SAME, stride 1: every input is read, so the NaN reaches outputs and dw
    assert np.isnan(np.asarray(y)).any() and np.isnan(np.asarray(dw)).any()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_conv_random_geometries(data):
  xs, ksp, strides, pads, ld, rd = draw_conv_geometry(data)
  check_conv(xs, ksp + (xs[-1], data.draw(st.integers(1, 40))), strides, pads, ld, rd,
             seed=data.draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_conv_input_grad_within_the_bound_of_xla_transpose(case):
  xs, ws, strides, padding, ld, rd = case
  rng = np.random.default_rng(1)
  x, w = _bf16_values(xs, rng), _bf16_values(ws, rng)
  y_shape = jax.eval_shape(lambda: conv_bf16(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16),
                                             **AMX, **_kw(strides, padding, ld, rd))).shape
  dy = _bf16_values(y_shape, rng)
  want, absum = transposed_conv_reference(x, w, dy, strides, padding, ld, rd)
  got = np.asarray(conv_bf16_input_grad(jnp.asarray(dy, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16),
                                        input_spatial=xs[1:-1], **AMX, **_kw(strides, padding, ld, rd)))
  k = int(np.prod(ws[:-2])) * ws[-1]
  assert np.all(np.abs(got - want) <= (2 * k + 2) * 2.0**-24 * absum + 1e-30)


def test_results_do_not_depend_on_threads_or_tiles():
  rng = np.random.default_rng(9)
  x = jnp.asarray(_bf16_values((8, 16, 16, 64), rng), jnp.bfloat16)
  w = jnp.asarray(_bf16_values((3, 3, 64, 96), rng), jnp.bfloat16)
  kw = dict(window_strides=(1, 1), padding="SAME", **AMX)
  whole = conv_bf16(x, w, **kw)
  bits_eq(jnp.concatenate([conv_bf16(x[i:i + 1], w, **kw) for i in range(8)]), whole)  # other tiles, one thread


def test_bf16_recipe_runs_its_convs_on_the_tiles():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 10, 10, 16)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 16, 8)), jnp.float32)
  policy = jdfp.policies.bf16()
  assert float_conv.bf16_conv_isa(policy) == "amx_bf16"
  assert float_conv.bf16_conv_isa(jdfp.policies.bf16(isa="avx512_vnni")) == "auto"
  report = jdfp.explain(jax.grad(_loss(policy), (0, 1)), x, w)
  assert report.count(explain.MIXED_AMX_KERNEL) == 3, str(report)
  assert all(op.engine == explain.AMX_BF16 for op in report.ops if op.kind == explain.MIXED_AMX_KERNEL)
  # Against the float path of the recipe (XLA's FP32 conv on the rounded operands): the same products.
  gx, gw = jax.jit(jax.grad(_loss(policy), (0, 1)))(x, w)
  rx, rw = jax.grad(_loss(jdfp.policies.bf16(backend="reference")), (0, 1))(x, w)
  np.testing.assert_allclose(gx, rx, rtol=0, atol=1e-3 * float(jnp.abs(rx).max()))
  np.testing.assert_allclose(gw, rw, rtol=0, atol=1e-3 * float(jnp.abs(rw).max()))
