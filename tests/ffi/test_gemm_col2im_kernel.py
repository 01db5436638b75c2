"""The fused backward-data of block-format convs (`jdfp._src.ffi.gemm_i8.gemm_i8_col2im`,
`jdfp._src.ffi.gemm.gemm_col2im`): the INT8 / INT16 GEMM's patch gradient summed into the conv input's
gradient image by image (col2im), bit for bit `gemm_i8` / `gemm` followed by XLA's col2im (`jax.linear_transpose` of `conv_vjp.patches`) and an independent
numpy col2im in the documented order (taps summed last first), on the conv kernel's test geometries
and random ones, every ISA, NaN rows from non-finite exponents; the ops take it where it applies and
stay bit-identical to the reference backend; bad arguments are errors, never crashes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jdfp
from jdfp import kernels
from jdfp._src.ffi import conv as ffi_conv
from jdfp._src.ffi.gemm import gemm, gemm_col2im
from jdfp._src.ffi.gemm_i8 import gemm_i8, gemm_i8_col2im
from jdfp._src.numerics.formats import NONFINITE_EXPONENT
from jdfp._src.ops import conv_vjp
from kernel_testing import bits_eq, draw_conv_geometry
from test_conv_kernel import CASES, _case_id, im2col_np

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="libjdfp_ffi.so not built")


def col2im_np(dp, x_shape, ksp, strides, pads, ld, rd):
  """numpy col2im of dp [N, *O, KK, C] in the contract's order: dx = ((ct[T-1] + ct[T-2]) + ...) + ct[0],
  ct[t] the tap's values scattered to the inputs they were read from, +0.0 elsewhere."""
  n_elems = math.prod(x_shape)
  idx, _ = im2col_np(np.arange(1, n_elems + 1, dtype=np.int64).reshape(x_shape), ksp, strides, pads, ld, rd)
  dp = np.asarray(dp, np.float32)
  acc = None
  for t in reversed(range(dp.shape[-2])):
    ct = np.zeros(n_elems, np.float32)
    src = idx[..., t, :].reshape(-1)
    hit = src > 0
    ct[src[hit] - 1] = dp[..., t, :].reshape(-1)[hit]
    acc = ct if acc is None else (acc + ct).astype(np.float32)
  return (np.zeros(n_elems, np.float32) if acc is None else acc).reshape(x_shape)


# (GEMM, GEMM + col2im, operand bits and dtype) of each kernel.
KERNELS = {"int8": (gemm_i8, gemm_i8_col2im, 8, np.int8), "int16": (gemm, gemm_col2im, 12, np.int16)}


def operands(rows, cols, o, bk, seed, nonfinite_row=None, bits=8, dtype=np.int8):
  rng = np.random.default_rng(seed)
  q = 2 ** (bits - 1) - 1
  a = rng.integers(-q, q + 1, (1, rows, o)).astype(dtype)
  b = rng.integers(-q, q + 1, (1, cols, o)).astype(dtype)
  kb = -(-o // bk) if o else 0
  ea = rng.integers(-20, 4, (1, rows, kb)).astype(np.int32)
  eb = rng.integers(-20, 4, (1, kb, cols)).astype(np.int32)
  if nonfinite_row is not None and rows and kb:
    ea[0, nonfinite_row % rows, 0] = NONFINITE_EXPONENT
  return a, b, ea, eb


def check(x_shape, ksp, strides, padding, ld=None, rd=None, o=20, bk=24, isa="auto", seed=0, nonfinite_row=None,
          kernel="int8"):
  gemm_fn, fused_fn, bits, dtype = KERNELS[kernel]
  nsp = len(x_shape) - 2
  ld, rd = ld or (1,) * nsp, rd or (1,) * nsp
  pads = ffi_conv.conv_padding(padding, x_shape[1:-1], ksp, strides, ld, rd)
  out_sp = ffi_conv.conv_out_spatial(x_shape[1:-1], ksp, strides, pads, ld, rd)
  rows, cols = x_shape[0] * math.prod(out_sp), math.prod(ksp) * x_shape[-1]
  a, b, ea, eb = operands(rows, cols, o, bk, seed, nonfinite_row, bits, dtype)
  kw = dict(bits_a=bits, bits_b=bits, block_k=bk, transpose_b=True, isa=isa)
  got = fused_fn(a, b, ea, eb, x_shape=x_shape, kernel_spatial=ksp, window_strides=strides, padding=pads,
                       lhs_dilation=ld, rhs_dilation=rd, **kw)
  assert got.shape == x_shape and got.dtype == jnp.float32
  dp = np.asarray(gemm_fn(a, b, ea, eb, **kw)).reshape((x_shape[0],) + tuple(out_sp) + (math.prod(ksp), x_shape[-1]))
  bits_eq(got, col2im_np(dp, x_shape, ksp, strides, pads, ld, rd))
  padded = [(s - 1) * d + 1 + lo + hi for s, d, (lo, hi) in zip(x_shape[1:-1], ld, pads)]
  if rows and min(padded) >= 0:  # (XLA's slices are never asked for degenerate geometries)
    f = lambda x: conv_vjp.patches(x, ksp, strides, pads, ld, rd)[0]
    (xla,) = jax.linear_transpose(f, jax.ShapeDtypeStruct(x_shape, jnp.float32))(jnp.asarray(dp))
    bits_eq(got, xla)
  return got


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("case", [c for c in CASES if c[6] == 1], ids=_case_id)
def test_bit_exact_on_conv_geometries(case, kernel, isas):
  xs, ws, strides, padding, ld, rd = case[:6]
  for i, isa in enumerate(isas):
    check(xs, ws[:-2], strides, padding, ld, rd, o=ws[-1], isa=isa, seed=i, kernel=kernel)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_bit_exact_random_geometries(data):
  xs, ksp, strides, pads, ld, rd = draw_conv_geometry(data, max_images=5)
  o, bk = data.draw(st.integers(0, 40)), data.draw(st.integers(1, 30))
  check(xs, ksp, strides, pads, ld, rd, o=o, bk=bk, seed=data.draw(st.integers(0, 2**16)),
        nonfinite_row=data.draw(st.none() | st.integers(0, 50)), kernel=data.draw(st.sampled_from(sorted(KERNELS))))


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_nonfinite_exponent_rows_are_nan(kernel, isas):
  for isa in isas:
    got = np.asarray(check((4, 6, 6, 3), (3, 3), (1, 1), "SAME", o=30, isa=isa, nonfinite_row=7, kernel=kernel))
    assert np.isnan(got).any() and np.isfinite(got).any()


def test_errors_not_crashes():
  a, b, ea, eb = operands(4 * 36, 9 * 3, 8, 8, 0)
  geo = dict(kernel_spatial=(3, 3), window_strides=(1, 1), padding="SAME", bits_a=8, bits_b=8, block_k=8,
             transpose_b=True)
  with pytest.raises(ValueError, match="rows, taps"):
    gemm_i8_col2im(a, b, ea, eb, x_shape=(4, 6, 6, 4), **geo)
  with pytest.raises(ValueError, match="bits_a"):
    gemm_i8_col2im(a, b, ea, eb, x_shape=(4, 6, 6, 3), **{**geo, "bits_a": 9})
  bad = a.copy()
  bad[0, 5, 3] = -128  # never a valid int8 operand value
  with pytest.raises(Exception, match="gemm_i8_col2im.*outside"):
    jax.block_until_ready(gemm_i8_col2im(bad, b, ea, eb, x_shape=(4, 6, 6, 3), **geo))
  a16, b16, _, _ = operands(4 * 36, 9 * 3, 8, 8, 0, bits=12, dtype=np.int16)
  a16[0, 2, 1] = 2047 + 1  # beyond qmax of bits_a = 12
  with pytest.raises(Exception, match="gemm_col2im.*outside"):
    jax.block_until_ready(gemm_col2im(a16, b16, ea, eb, x_shape=(4, 6, 6, 3), **{**geo, "bits_a": 12, "bits_b": 12}))
  from jdfp._src.ffi.library import TARGET_I8_COL2IM
  attrs = dict(bits_a=np.int32(8), bits_b=np.int32(8), block_k=np.int64(8), transpose_a=False, transpose_b=True,
               isa=np.int32(0), window_strides=np.ones(3, np.int64), padding_lo=np.array([0, 1, 1], np.int64),
               padding_hi=np.array([0, 1, 1], np.int64), lhs_dilation=np.ones(3, np.int64),
               rhs_dilation=np.ones(3, np.int64), kernel_spatial=np.array([1, 3, 3], np.int64))
  out = jax.ShapeDtypeStruct((4, 1, 6, 6, 3), jnp.float32)
  jax.block_until_ready(jax.ffi.ffi_call(TARGET_I8_COL2IM, out)(a, b, ea, eb, **attrs))
  for kw, msg in (({"kernel_spatial": np.array([1, 3, 2], np.int64)}, "patch gradient"),
                  ({"window_strides": np.array([1, 0, 1], np.int64)}, "must be >= 1"),
                  ({"kernel_spatial": np.array([3, 3], np.int64)}, "kernel_spatial must have 3")):
    with pytest.raises(Exception, match=msg):
      jax.block_until_ready(jax.ffi.ffi_call(TARGET_I8_COL2IM, out)(a, b, ea, eb, **{**attrs, **kw}))


@pytest.mark.parametrize("recipe,target", [("hbfp8", "jdfp_gemm_i8_col2im"), ("hbfp12", "jdfp_gemm_i16_col2im")])
@pytest.mark.parametrize("images", [2, 5])
def test_op_takes_it_where_it_applies(images, recipe, target):
  """HBFP convs: the backward-data is one fused call from 4 images on (the float32 patch gradient is
  never an XLA buffer), the GEMM + XLA's col2im below; both bit-identical to the reference backend."""
  pol = jdfp.policies.get(recipe)
  x = jax.random.normal(jax.random.key(0), (images, 9, 8, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 20)) * 0.2
  ct = jax.random.normal(jax.random.key(2), (images, 9, 8, 20))

  def vjp(policy):
    f = lambda x, w: jdfp.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                               policy=policy, key=jax.random.key(3))
    y, back = jax.vjp(f, x, w)
    return (y,) + back(ct)

  f = jax.jit(lambda: vjp(pol))
  hlo = f.lower().compile().as_text()
  patch_grad = f"f32[1,{images * 72},144]"
  if images >= 4:
    assert f'custom_call_target="{target}"' in hlo and patch_grad not in hlo
  else:
    assert "col2im\"" not in hlo and patch_grad in hlo
  want = jax.jit(lambda: vjp(pol.replace(backend="reference")))()
  for got_i, want_i in zip(f(), want):
    bits_eq(got_i, want_i)
