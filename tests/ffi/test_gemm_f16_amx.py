"""The FP16 GEMM on AMX-BF16 tiles (xla_ffi/kernel_amx_f16.cc): each float16 split exactly into two
bfloat16, so every product is exact and the sums are float32 (docs/arithmetic.md, "The FP16 GEMM on
AMX-BF16 tiles").  The tile unit's order of float32 additions is its own (it matches no sequential
rounding model), so the tests check what is defined: exact results wherever every partial sum is
representable, the float32 error bound elsewhere, NaN / Inf never finite, results that do not depend
on tiling or threads, every layout, and the ops' routing."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdfp
from jdfp import kernels
from jdfp._src.ops import explain
from kernel_testing import bits_eq, transposed_conv_reference

pytestmark = pytest.mark.skipif(not (kernels.kernel_available() and kernels.amx_bf16_ready()),
                                reason="no AMX-BF16 tiles on this CPU (or JDFP_AMX=0)")

EDGES = ((1, 1, 1), (16, 16, 16), (15, 17, 33), (32, 31, 32), (33, 100, 47), (70, 300, 130), (130, 1000, 17))


def _call(a, b, ta=False, tb=False):
  return np.asarray(jax.jit(lambda a, b: kernels.gemm_f16(a, b, transpose_a=ta, transpose_b=tb))(a, b))


def _exact(a, b, ta=False, tb=False):
  """float64 a @ b and sum |a| |b| (float16 products are exact in float64; so are these sums to ~2**-30)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if ta:
    a = np.swapaxes(a, -1, -2)
  if tb:
    b = np.swapaxes(b, -1, -2)
  return a @ b, np.abs(a) @ np.abs(b)


def _operands(rng, m, k, n, ta, tb, batch_a=(), batch_b=(), spread=6):
  """Random float16 with exponents spread over +-spread binades (cancellation included)."""
  def draw(shape):
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-spread, spread + 1, shape))
    return x.astype(np.float16)
  a = draw(batch_a + ((k, m) if ta else (m, k)))
  b = draw(batch_b + ((n, k) if tb else (k, n)))
  return a, b


def _check_bound(got, a, b, ta=False, tb=False):
  ref, mag = _exact(a, b, ta, tb)
  k = np.shape(a)[-2] if ta else np.shape(a)[-1]
  # Recursive float32 summation of the 4K exact partial products (hi/lo cross terms) plus the
  # accumulator: gamma_{4K+1} * sum |a| |b|.
  bound = (4 * k + 1) * 2.0**-24 * mag
  err = np.abs(got.astype(np.float64) - ref)
  assert np.all(err <= bound), float(np.max(err / np.maximum(bound, 1e-300)))


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_layouts_edges_batches_within_the_float32_bound(ta, tb):
  rng = np.random.default_rng(0)
  for (m, k, n), (batch_a, batch_b) in zip(EDGES, [((), ()), ((2,), (1,)), ((), (3,)), ((2,), (2,))] * 2):
    a, b = _operands(rng, m, k, n, ta, tb, batch_a, batch_b)
    got = _call(a, b, ta, tb)
    assert got.dtype == np.float32 and got.shape == np.broadcast_shapes(batch_a, batch_b) + (m, n)
    _check_bound(got, a, b, ta, tb)


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_exact_where_every_partial_sum_is_representable(ta, tb):
  # Full 11-bit float16 significands (the split must be exact) times small integers: every partial
  # sum is a multiple of 2**-4 below 2**20 of them, so any float32 order of additions is exact, and
  # so must the result be.  A split that dropped a bit of `lo` would show here.
  rng = np.random.default_rng(1)
  for m, k, n in ((33, 64, 40), (16, 1000, 16), (70, 130, 5)):
    av = rng.integers(-2047, 2048, (m, k)) * 2.0**-4
    bv = rng.integers(-15, 16, (k, n)).astype(np.float64)
    a = (av.T if ta else av).astype(np.float16)
    b = (bv.T if tb else bv).astype(np.float16)
    np.testing.assert_array_equal(a.astype(np.float64), av.T if ta else av)  # the inputs are exact
    got = _call(a, b, ta, tb)
    np.testing.assert_array_equal(got.astype(np.float64), av @ bv)


def test_empty_contraction_is_zero():
  got = _call(np.zeros((35, 0), np.float16), np.zeros((0, 40), np.float16))
  assert got.shape == (35, 40) and not np.any(got)


def test_exact_with_subnormal_and_largest_float16():
  # Subnormal float16 (multiples of 2**-24) and 65504 = the largest: products from 2**-48 to
  # ~2**32, each partial sum exact in float32 by construction (two terms per output).
  a = np.array([[2.0**-24, 65504.0], [1023 * 2.0**-24, -65504.0], [6.1e-5, 1.0]], np.float16)
  b = np.array([[2.0**-14, 3.0], [0.0, 65504.0]], np.float16)
  ref, _ = _exact(a, b)
  got = _call(a, b)
  np.testing.assert_array_equal(got.astype(np.float64), ref.astype(np.float32).astype(np.float64))
  assert got[0, 0] == np.float32(2.0**-38)  # 2**-24 * 2**-14: far below float16, exact in float32


def test_nan_and_inf_never_become_finite_and_inf_stays_inf():
  rng = np.random.default_rng(2)
  a, b = _operands(rng, 40, 50, 36, False, False, spread=2)
  clean = _call(a, b)
  bad = a.copy()
  bad[3, 7] = np.nan
  bad[5, 0] = np.inf
  bad[9, 49] = -np.inf
  got = _call(bad, b)
  for row in (3, 5, 9):
    assert not np.any(np.isfinite(got[row])), row
  # IEEE, as the FP32 dot of the widened operands: NaN propagates, Inf times finite is +-Inf.
  with np.errstate(invalid="ignore"):
    ref = np.asarray(bad, np.float32) @ np.asarray(b, np.float32)
  for row in (3, 5, 9):
    np.testing.assert_array_equal(np.isnan(got[row]), np.isnan(ref[row]))
    np.testing.assert_array_equal(got[row][np.isinf(ref[row])], ref[row][np.isinf(ref[row])])
  assert np.all(np.isnan(got[3])) and np.isinf(got[5]).any()
  others = [i for i in range(40) if i not in (3, 5, 9)]
  bits_eq(got[others], clean[others])  # other rows are untouched, bit for bit
  bad_b = b.copy()
  bad_b[20, 11] = np.inf
  got = _call(a, bad_b)
  assert not np.any(np.isfinite(got[:, 11]))
  with np.errstate(invalid="ignore"):
    np.testing.assert_array_equal(got[:, 11], (np.asarray(a, np.float32) @ np.asarray(bad_b, np.float32))[:, 11])
  bits_eq(np.delete(got, 11, axis=1), np.delete(clean, 11, axis=1))


def _bits_under_envs(code, envs, cwd):
  """What `python -c code` writes to stdout (float32), once per extra environment."""
  outs = []
  for env in envs:
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path, and the source tree of a
    # non-editable install has no built library.
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, cwd=cwd)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    outs.append(np.frombuffer(run.stdout, np.float32))
  return outs


def test_same_bits_for_every_tiling_and_thread_count(tmp_path):
  # Each output is one chain over K (K in chunks whose float32 sums wait in memory, exactly), so
  # neither the tile shape nor the number of threads may change a bit.
  code = ("import numpy as np, jax, sys; from jdfp import kernels; rng = np.random.default_rng(5); "
          "a = (rng.standard_normal((300, 700)) * 4).astype(np.float16); "
          "b = rng.standard_normal((700, 260)).astype(np.float16); "
          "sys.stdout.buffer.write(np.asarray(jax.jit(kernels.gemm_f16)(a, b)).tobytes())")
  outs = _bits_under_envs(code, ({}, {"JDFP_THREADS": "1"}, {"JDFP_TILE_M": "32", "JDFP_TILE_N": "32"},
                                  {"JDFP_TILE_M": "300", "JDFP_TILE_N": "1000"}), tmp_path)
  for o in outs[1:]:
    bits_eq(o, outs[0])
  assert outs[0].size == 300 * 260


def test_conv_forward_same_bits_in_place_and_packed(tmp_path):
  # JDFP_F16_DIRECT=0 gathers the patch rows into panels where the forward would read them in place:
  # the same words, steps and tile products, so the same bits (one thread and two).
  code = ("import numpy as np, jax, sys; from jdfp import kernels; rng = np.random.default_rng(8); "
          "x = rng.standard_normal((6, 12, 12, 32)).astype(np.float16); "
          "w = (rng.standard_normal((3, 3, 32, 48)) * 0.1).astype(np.float16); "
          "f = jax.jit(lambda x, w: kernels.conv_f16(x, w, window_strides=(1, 1), padding='SAME')); "
          "sys.stdout.buffer.write(np.asarray(f(x, w)).tobytes())")
  outs = _bits_under_envs(code, ({}, {"JDFP_F16_DIRECT": "0"}, {"JDFP_THREADS": "1"}, {"JDFP_TILE_M": "96"}), tmp_path)
  for o in outs[1:]:
    bits_eq(o, outs[0])
  assert outs[0].size == 6 * 12 * 12 * 48


def test_bad_input_is_rejected_at_trace_time():
  a = jnp.ones((4, 8), jnp.float16)
  with pytest.raises(TypeError, match="a must have dtype float16, got float32"):
    kernels.gemm_f16(jnp.ones((4, 8)), a.T)
  with pytest.raises(TypeError, match="b must have dtype float16, got bfloat16"):
    kernels.gemm_f16(a, jnp.ones((8, 4), jnp.bfloat16))
  with pytest.raises(ValueError, match="contraction dims differ"):
    kernels.gemm_f16(a, a)
  with pytest.raises(ValueError, match="rank >= 2"):
    kernels.gemm_f16(a, jnp.ones((8,), jnp.float16))
  with pytest.raises(TypeError, match="transpose_b must be a bool"):
    kernels.gemm_f16(a, a, transpose_b=1)


def test_jdfp_amx_0_turns_it_off_and_the_ops_widen_to_fp32(tmp_path):
  code = ("import jax, jax.numpy as jnp, jdfp; from jdfp import kernels; from jdfp._src.ops import explain; "
          "f = lambda a, b: jdfp.dot_general(a, b, (((1,), (0,)), ((), ())), policy=jdfp.policies.fp16()); "
          "r = jdfp.explain(f, jnp.ones((512, 256)), jnp.ones((256, 128))); "
          "print(kernels.kernel_available(), kernels.amx_bf16_ready(), kernels.has_amx_int8(), "
          "r.count(explain.MIXED_F16_KERNEL))")
  env = dict(os.environ, JDFP_AMX="0")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["True", "False", "False", "0"]


def test_amx_bf16_ready_matches_cpuinfo():
  with open("/proc/cpuinfo") as f:
    flags = next(set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags"))
  assert {"amx_tile", "amx_bf16"} <= flags


@pytest.mark.parametrize("dims,shapes", [
    ((((1,), (0,)), ((), ())), ((256, 128), (128, 160))),         # Dense forward
    ((((2,), (2,)), ((0,), (0,))), ((8, 128, 64), (8, 130, 64))),  # attention scores q . k^T
])
def test_fp16_recipe_ops_run_their_three_gemms_on_the_tiles(dims, shapes):
  policy = jdfp.policies.fp16()
  f = lambda x, w: jdfp.dot_general(x, w, dims, policy=policy)
  rng = np.random.default_rng(7)
  x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)
  loss = lambda x, w: jnp.sum(f(x, w) ** 2)
  report = jdfp.explain(jax.grad(loss, argnums=(0, 1)), x, w)
  assert report.count(explain.MIXED_F16_KERNEL) == 3, str(report)
  assert all(op.engine == "AMX-BF16 tiles" for op in report.ops if op.kind == explain.MIXED_F16_KERNEL)
  # The same arithmetic as the FP32 dot of the float16-rounded operands: exact products, float32 sums.
  got = np.asarray(jax.jit(f)(x, w))
  x16, w16 = (np.asarray(v, np.float16) for v in (x, w))
  ref = np.asarray(jax.lax.dot_general(x16.astype(np.float32), w16.astype(np.float32), dims,
                                       precision=jax.lax.Precision.HIGHEST), np.float64)
  k = shapes[0][-1]
  mag = np.asarray(jax.lax.dot_general(np.abs(x16).astype(np.float64), np.abs(w16).astype(np.float64), dims))
  assert np.all(np.abs(got - ref) <= (8 * k + 2) * 2.0**-24 * mag)
  gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gw))


def test_small_fp16_gemms_and_convs_stay_on_xla():
  # Below F16_MIN_WORK products (and, for convs, 32 channels / F16_CONV_MIN_WORK) XLA's FP32 ops of
  # the widened operands are faster than the custom calls; explain and the HLO say which ran.
  policy = jdfp.policies.fp16()
  dot = lambda x, w: jdfp.dot_general(x, w, (((1,), (0,)), ((), ())), policy=policy)
  r = jdfp.explain(dot, jnp.ones((64, 64)), jnp.ones((64, 128)))  # 2**19 products
  assert r.count(explain.MIXED_F16_KERNEL) == 0 and r.count(explain.MIXED) + len(r.float_ops) >= 1
  conv = lambda x, w: jdfp.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                policy=policy)
  for xs, ws in (((128, 12, 12, 1), (3, 3, 1, 32)), ((64, 8, 8, 16), (3, 3, 16, 32)), ((8, 8, 8, 32), (3, 3, 32, 32))):
    hlo = jax.jit(conv).lower(jnp.ones(xs), jnp.ones(ws)).as_text()
    assert "jdfp_conv_f16" not in hlo, (xs, ws)


# ------------------------------------------------- convolutions on the same tiles (kernel_amx_f16.cc)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from jax import lax  # noqa: E402

from kernel_testing import draw_conv_geometry  # noqa: E402
from test_conv_bf16_kernel import CASES, _case_id, _kw  # noqa: E402
from test_conv_kernel import im2col_np  # noqa: E402


def _f16_values(shape, rng):
  return (rng.standard_normal(shape) * rng.choice([1.0, 2.0**-6, 2.0**6], shape)).astype(np.float16)


def check_conv(xs, ws, strides, padding, ld, rd, seed=0):
  """conv_f16 and its weight-gradient bit for bit against gemm_f16 on a numpy patch matrix (the
  same packed words and the same tiles, so the same sums): any gather mistake shows."""
  rng = np.random.default_rng(seed)
  x, w = _f16_values(xs, rng), _f16_values(ws, rng)
  ksp, o = ws[:-2], ws[-1]
  nsp = len(ksp)
  pads = kernels.conv_padding(padding, xs[1:-1], ksp, strides, ld or (1,) * nsp, rd or (1,) * nsp)
  p, out_sp = im2col_np(x.astype(np.float32), ksp, strides, pads, ld or (1,) * nsp, rd or (1,) * nsp)
  p = p.reshape(-1, p.shape[-2] * p.shape[-1]).astype(np.float16)
  y = np.asarray(kernels.conv_f16(x, w, **_kw(strides, padding, ld, rd)))
  assert y.shape == (xs[0],) + tuple(out_sp) + (o,)
  bits_eq(y, _call(p, w.reshape(-1, o)).reshape(y.shape))
  dy = _f16_values(y.shape, rng)
  dw = np.asarray(kernels.conv_f16_weight_grad(x, dy, kernel_spatial=ksp, **_kw(strides, padding, ld, rd)))
  bits_eq(dw, np.moveaxis(_call(np.ascontiguousarray(dy.reshape(-1, o).T), p).reshape((o,) + ws[:-1]), 0, -1))
  return x, w, dy


# Channels in whole 16-k steps: the forward gathers pre-split words a step at a time (positions
# stepped per tap, or conv_pixel_offset with lhs dilation).
WHOLE_STEP_CASES = [
    ((2, 9, 9, 16), (3, 3, 16, 8), (1, 1), "SAME", None, None),
    ((2, 10, 9, 32), (3, 2, 32, 5), (2, 1), ((2, 0), (1, 3)), None, (2, 1)),
    ((2, 5, 5, 16), (3, 3, 16, 6), (1, 1), ((2, 2), (2, 2)), (2, 2), None),
    ((1, 3, 6, 7, 16), (2, 3, 3, 16, 4), (1, 1, 1), "SAME", None, None),
    # stride 1 on at most 1.5x the output pixels padded: the forward reads its A tiles in place from
    # the padded split input (tile_direct), several tiles per call, rhs dilation
    ((3, 12, 12, 32), (3, 3, 32, 40), (1, 1), "SAME", None, None),
    ((2, 16, 16, 16), (3, 3, 16, 24), (1, 1), "SAME", None, (1, 2)),
    ((2, 14, 10, 48), (3, 2, 48, 8), (1, 1), ((1, 2), (0, 1)), None, None),
]


@pytest.mark.parametrize("case", CASES + WHOLE_STEP_CASES + [((4, 12, 12, 1), (3, 3, 1, 32), (1, 1), "SAME", None, None)],
                         ids=_case_id)
def test_conv_forward_and_weight_grad_are_the_gemm_on_the_patches(case):
  check_conv(*case)


@pytest.mark.parametrize("channels, size", [(4, 8), (32, 8), (32, 12)])
def test_conv_forward_nonfinite_through_the_split_input(channels, size):
  """NaN and Inf in a conv input that is split once and gathered (both gathers), or read in place
  padded (32 channels on 12 x 12): IEEE results where XLA's float32 conv of the same values has them,
  every other output as the tiles sum it."""
  rng = np.random.default_rng(6)
  x = _f16_values((2, size, size, channels), rng)
  w = _f16_values((3, 3, channels, 5), rng)
  x[0, 3, 4, 1], x[1, 6, 0, channels - 1] = np.inf, np.nan
  got = np.asarray(kernels.conv_f16(x, w, window_strides=(1, 1), padding="SAME"))
  ref = np.asarray(lax.conv_general_dilated(x.astype(np.float32), w.astype(np.float32), (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")))
  assert np.isnan(ref).any() and np.isinf(ref).any()
  np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
  np.testing.assert_array_equal(got[np.isinf(ref)], ref[np.isinf(ref)])
  fin = np.isfinite(ref)
  np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-3, atol=1e-3 * np.abs(ref[fin]).max())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_conv_bit_exact_random_geometries(data):
  xs, ksp, strides, pads, ld, rd = draw_conv_geometry(data)
  check_conv(xs, ksp + (xs[-1], data.draw(st.integers(1, 40))), strides, pads, ld, rd,
             seed=data.draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_conv_input_grad_is_the_transposed_conv(case):
  xs, ws, strides, padding, ld, rd = case
  rng = np.random.default_rng(1)
  x, w = _f16_values(xs, rng), _f16_values(ws, rng)
  y_shape = jax.eval_shape(lambda: kernels.conv_f16(x, w, **_kw(strides, padding, ld, rd))).shape
  dy = _f16_values(y_shape, rng)
  want, absum = transposed_conv_reference(x, w, dy, strides, padding, ld, rd)
  got = np.asarray(kernels.conv_f16_input_grad(dy, w, input_spatial=xs[1:-1], **_kw(strides, padding, ld, rd)))
  k = int(np.prod(ws[:-2])) * ws[-1]
  assert np.all(np.abs(got - want) <= (4 * k + 2) * 2.0**-23 * absum + 1e-30)


@pytest.mark.parametrize("transposed", [False, True])
def test_nonfinite_in_transposed_layouts_and_conv_gathers(transposed):
  rng = np.random.default_rng(4)
  a, b = _operands(rng, 37, 40, 35, transposed, transposed, spread=1)
  a[(7, 3) if transposed else (3, 7)] = np.inf
  b[(20, 2) if transposed else (2, 20)] = -np.inf
  got = _call(a, b, transposed, transposed)
  A, B = (np.swapaxes(v, -1, -2) if transposed else v for v in (a, b))
  with np.errstate(invalid="ignore"):  # Inf - Inf in the reference is the point
    ref = A.astype(np.float32) @ B.astype(np.float32)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
  np.testing.assert_array_equal(got[~np.isfinite(ref)], ref[~np.isfinite(ref)])
  # A conv whose input overflows float16: +-Inf outputs, as XLA's FP32 conv of the rounded values.
  x = np.full((1, 6, 6, 4), np.inf, np.float16)  # what 1e5 rounds to
  w = np.ones((3, 3, 4, 2), np.float16)
  y = np.asarray(kernels.conv_f16(x, w, window_strides=(1, 1), padding="SAME"))
  assert np.all(np.isposinf(y))
  dw = np.asarray(kernels.conv_f16_weight_grad(x, np.ones((1, 6, 6, 2), np.float16), kernel_spatial=(3, 3),
                                               window_strides=(1, 1), padding="SAME"))
  assert np.all(np.isposinf(dw))


def test_weight_grad_nonfinite_in_an_early_k_chunk():
  """The weight gradient packs its operands a K chunk (512 pixels) at a time; a NaN / Inf met in an
  early chunk must still send its outputs to the IEEE path at the last one."""
  rng = np.random.default_rng(5)
  x = _f16_values((1, 48, 48, 4), rng)  # 2304 pixels: five chunks
  dy = _f16_values((1, 48, 48, 3), rng)
  x[0, 2, 5, 1] = np.inf  # pixel 101 (chunk 0): the Inf meets nonzero dy, Inf - Inf where signs differ
  dy[0, 20, 7, 2] = np.nan  # pixel 967 (chunk 1): row 2 of dw^T all NaN
  got = np.asarray(kernels.conv_f16_weight_grad(x, dy, kernel_spatial=(3, 3), window_strides=(1, 1),
                                                padding="SAME"))
  p, _ = im2col_np(x.astype(np.float32), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1))
  p = p.reshape(-1, p.shape[-2] * p.shape[-1])
  with np.errstate(invalid="ignore"):
    ref = np.moveaxis((dy.reshape(-1, 3).T.astype(np.float32) @ p).reshape(3, 3, 3, 4), 0, -1)
  assert not np.isfinite(ref).all() and np.isfinite(ref).any()
  np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
  np.testing.assert_array_equal(got[np.isinf(ref)], ref[np.isinf(ref)])


def test_conv_errors_name_the_argument():
  x = jnp.zeros((2, 6, 6, 4), jnp.float16)
  w = jnp.zeros((3, 3, 4, 5), jnp.float16)
  with pytest.raises(TypeError, match="x must have dtype float16, got float32"):
    kernels.conv_f16(x.astype(jnp.float32), w, window_strides=(1, 1), padding="SAME")
  with pytest.raises(TypeError, match="dy must have dtype float16, got bfloat16"):
    kernels.conv_f16_weight_grad(x, jnp.zeros((2, 6, 6, 5), jnp.bfloat16), kernel_spatial=(3, 3),
                                 window_strides=(1, 1), padding="SAME")
  with pytest.raises(ValueError, match="one group"):
    kernels.conv_f16(x, jnp.zeros((3, 3, 2, 5), jnp.float16), window_strides=(1, 1), padding="SAME")


def test_fp16_recipe_convs_run_on_the_tiles():
  policy = jdfp.policies.fp16()
  conv = lambda x, w: jdfp.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                policy=policy)
  rng = np.random.default_rng(3)
  x, w = jnp.asarray(rng.standard_normal((8, 16, 16, 32)), jnp.float32), jnp.asarray(rng.standard_normal((3, 3, 32, 32)),
                                                                                    jnp.float32)
  loss = lambda x, w: jnp.sum(conv(x, w) ** 2)
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
  assert hlo.count("jdfp_conv_f16") == 3, hlo.count("jdfp_conv_f16")
  report = jdfp.explain(jax.grad(loss, argnums=(0, 1)), x, w)  # named as the FP16 GEMM's, not the INT16 kernel's
  assert report.count(explain.MIXED_F16_KERNEL) == 3 and report.kernel_calls == 0, str(report)
  assert all(op.engine == explain.AMX_BF16 for op in report.ops if op.kind == explain.MIXED_F16_KERNEL)
  want = lax.conv_general_dilated(x.astype(jnp.float16).astype(jnp.float32), w.astype(jnp.float16).astype(jnp.float32),
                                  (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  precision=lax.Precision.HIGHEST)
  mag = lax.conv_general_dilated(jnp.abs(x.astype(jnp.float16).astype(jnp.float32)),
                                 jnp.abs(w.astype(jnp.float16).astype(jnp.float32)), (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert bool(jnp.all(jnp.abs(jax.jit(conv)(x, w) - want) <= (4 * 288 + 2) * 2.0**-24 * mag))


def test_grouped_fp16_conv_warns_once_and_runs_on_xla():
  """What the tiles cannot take (feature groups) is said once, recorded, and computed as XLA's FP32
  conv of the float16-rounded operands; a conv below the size bounds is XLA's by choice, silently."""
  import warnings
  from jdfp._src.ops import backend
  policy = jdfp.policies.fp16()
  conv = lambda x, w: jdfp.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                feature_group_count=2, policy=policy)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((16, 16, 16, 64)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 32, 64)), jnp.float32)
  backend._warned.discard(next((m for m in backend._warned if "FP16 conv with 2 feature groups" in m), ""))
  with pytest.warns(RuntimeWarning, match="FP16 conv with 2 feature groups is not on the FP16 tiles"):
    got = jax.jit(conv)(x, w)
  assert any("FP16 conv with 2 feature groups" in m for m in backend.fallback_log)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.jit(conv)(x[:8], w)  # retraced: said once
    small = lambda x, w: jdfp.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                   policy=policy)
    jax.jit(small)(jnp.ones((4, 8, 8, 16)), jnp.ones((3, 3, 16, 16)))
  r16 = lambda a: a.astype(jnp.float16).astype(jnp.float32)
  want = lax.conv_general_dilated(r16(x), r16(w), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=2, precision=lax.Precision.HIGHEST)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
