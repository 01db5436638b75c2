"""Block-format convolutions whose lhs conversion gathers the patch matrix from the conv input
(`jdfp._src.ops.patch_conv`, the kernel call `quantize_patches_with_stats`): bit for bit the im2col
arrangement (`quantize_blocks_with_stats` of the stored patch matrix, `jdfp.dot_general` on it) and
the pure-JAX reference backend, for every rounding, ISA, int8 / int16 output, odd geometry and
special value; with Flax statistics, one merged kernel call per conv and the same state."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jdfp
from jdfp import kernels
from jdfp._src.ffi import block_quantize as ffi_block
from jdfp._src.ffi import conv as ffi_conv
from jdfp._src.numerics.formats import BFP, DFP

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="libjdfp_ffi.so not built")


def special_input(shape, seed):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(shape) * np.exp2(rng.integers(-3, 4, shape))).astype(np.float32)
  flat = x.reshape(-1)
  specials = np.array([0x7FC00001, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001, 0x807FFFFF],
                      np.uint32).view(np.float32)
  idx = rng.choice(flat.size, size=min(flat.size, 2), replace=False)
  flat[idx] = specials[rng.integers(0, specials.size, idx.size)]
  return jnp.asarray(x)


def assert_same(got, want):
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def patch_call_equals_materialized(x, geo, fmt, bshape, rounding, isa, out_dtype):
  key = jax.random.key(7) if rounding == "stochastic" else None
  p = ffi_conv.im2col(x, **geo)
  p3 = p.reshape(1, -1, p.shape[-2] * p.shape[-1])
  want = ffi_block.quantize_blocks_with_stats(p3, fmt, bshape, rounding=rounding, key=key, isa=isa,
                                              out_dtype=out_dtype)
  got = ffi_block.quantize_patches_with_stats(x, fmt, bshape, rounding=rounding, key=key, isa=isa,
                                              out_dtype=out_dtype, **geo)
  assert got[0].shape == p3.shape
  assert_same(got, want)


@pytest.mark.parametrize("isa", kernels.available_isas())
@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "biased"])
@pytest.mark.parametrize("fmt,bshape,out_dtype", [
    (BFP(7, block=(24, 24)), (1, 24, 24), jnp.int8),
    (BFP(11, block=(24, 24)), (1, 24, 24), jnp.int16),
    (BFP(7, block=32, axis=-1), (1, 1, 32), jnp.int16),
    (DFP(10), (1, 5, 16), jnp.int16),
])
def test_kernel_call_equals_materialized_patches(fmt, bshape, out_dtype, rounding, isa):
  x = special_input((3, 9, 10, 7), 0)
  geo = dict(kernel_spatial=(3, 3), window_strides=(2, 1), padding=((1, 2), (0, 1)), lhs_dilation=(1, 1),
             rhs_dilation=(1, 2))
  patch_call_equals_materialized(x, geo, fmt, bshape, rounding, isa, out_dtype)


def draw_geometry(data):
  """A random conv input shape (1 to 3 spatial dims) and its patch geometry (strides, padding that may
  crop, dilations)."""
  nsp = data.draw(st.integers(1, 3))
  xs = (data.draw(st.integers(1, 3)),) + tuple(data.draw(st.integers(1, 8)) for _ in range(nsp)) \
      + (data.draw(st.integers(1, 9)),)
  ksp = tuple(data.draw(st.integers(1, 3)) for _ in range(nsp))
  geo = dict(kernel_spatial=ksp, window_strides=tuple(data.draw(st.integers(1, 2)) for _ in range(nsp)),
             padding=tuple((data.draw(st.integers(-1, 2)), data.draw(st.integers(-1, 2))) for _ in range(nsp)),
             lhs_dilation=tuple(data.draw(st.integers(1, 2)) for _ in range(nsp)),
             rhs_dilation=tuple(data.draw(st.integers(1, 2)) for _ in range(nsp)))
  return xs, geo


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_kernel_call_random_geometries(data):
  xs, geo = draw_geometry(data)
  bshape = (1, data.draw(st.integers(1, 30)), data.draw(st.integers(1, 30)))
  rounding = data.draw(st.sampled_from(["nearest", "stochastic", "biased"]))
  x = special_input(xs, data.draw(st.integers(0, 2**16)))
  patch_call_equals_materialized(x, geo, BFP(7, block=bshape[1:]), bshape, rounding, "auto", jnp.int8)


def patch_gemm_equals_two_calls(x, geo, fmt, bshape, rounding, isa, stats, n_out=13, eb_cols=True, seed=0):
  """`patch_gemm` against `quantize_patches_with_stats` followed by the INT16 GEMM on its result."""
  from jdfp._src.ffi import gemm as ffi_gemm
  rng = np.random.default_rng(seed)
  v, e, *cnt = ffi_block.quantize_patches_with_stats(x, fmt, bshape, rounding=rounding, isa=isa, stats=True, **geo)
  k = v.shape[2]
  kb = -(-k // bshape[2])
  bits_b = 12
  b = jnp.asarray(rng.integers(-2047, 2048, (1, k, n_out)), jnp.int16)
  eb = jnp.asarray(rng.integers(-30, 10, (1, kb, n_out if eb_cols else 1)), jnp.int32)
  ea = jnp.repeat(e, bshape[1], axis=1)[:, :v.shape[1]]
  want = ffi_gemm.gemm(v, b, ea, eb, bits_a=fmt.int_bits, bits_b=bits_b, block_k=bshape[2] if kb > 1 else None,
                       isa=isa)
  got = jax.jit(lambda x, b, eb: ffi_block.patch_gemm(x, fmt, bshape, b, eb, bits_b=bits_b, rounding=rounding,
                                                      isa=isa, stats=stats, **geo))(x, b, eb)
  assert got[0].shape == want.shape and len(got) == (4 if stats else 2)
  assert_same(got, (want, e) + (tuple(cnt) if stats else ()))


@pytest.mark.parametrize("isa", kernels.available_isas())
@pytest.mark.parametrize("exps", [(-30, 10), (-3, -1)])
def test_patch_gemm_int8_equals_conversion_then_gemm_i8(isa, exps):
  """int8 b: the patch matrix converted to int8 and multiplied on the INT8 kernel (on AMX-INT8 tiles
  where the rows' block scales are exact, ``exps`` (-3, -1); VNNI otherwise), bit for bit the int8
  conversion call followed by `gemm_i8`, statistics included."""
  from jdfp._src.ffi import gemm_i8 as ffi_gemm_i8
  rng = np.random.default_rng(3)
  fmt, bshape = BFP(7, block=(24, 24)), (1, 24, 24)
  # Finite inputs of one scale for the tiles' exact scales; NaN/Inf/subnormals for the VNNI rows.
  x = special_input((40, 8, 8, 16), 4) if exps[0] < -10 else jax.random.normal(jax.random.key(4), (40, 8, 8, 16))
  geo = dict(kernel_spatial=(3, 3), window_strides=(1, 1), padding=((1, 1), (1, 1)))
  v, e, *cnt = ffi_block.quantize_patches_with_stats(x, fmt, bshape, isa=isa, stats=True, out_dtype=jnp.int8, **geo)
  k, kb = v.shape[2], -(-v.shape[2] // 24)
  b = jnp.asarray(rng.integers(-127, 128, (1, k, 48)), jnp.int8)
  eb = jnp.asarray(rng.integers(*exps, (1, kb, 48)), jnp.int32)
  want = ffi_gemm_i8.gemm_i8(v, b, jnp.repeat(e, 24, axis=1)[:, :v.shape[1]], eb, bits_a=8, bits_b=8, block_k=24,
                             isa=isa)
  got = ffi_block.patch_gemm(x, fmt, bshape, b, eb, bits_b=8, isa=isa, **geo)
  assert_same(got, (want, e) + tuple(cnt))
  with pytest.raises(Exception, match="outside"):
    jax.block_until_ready(ffi_block.patch_gemm(x, fmt, bshape, b.at[0, 5, 5].set(-128), eb, bits_b=8, isa=isa, **geo))
  with pytest.raises(Exception, match="<= 8 bits"):
    jax.block_until_ready(ffi_block.patch_gemm(x, BFP(9, block=(24, 24)), bshape, b, eb, bits_b=8, isa=isa, **geo))


@pytest.mark.parametrize("isa", kernels.available_isas())
@pytest.mark.parametrize("rounding", ["nearest", "biased"])
@pytest.mark.parametrize("fmt,bshape", [
    (BFP(11, block=(24, 24)), (1, 24, 24)),
    (BFP(9, block=32, axis=-1), (1, 1, 32)),
    (DFP(12), (1, 5, 16)),
    (DFP(16), (1, 7, 1000)),  # one block along K
])
def test_patch_gemm_equals_conversion_then_gemm(fmt, bshape, rounding, isa):
  """The fused forward call (conversion of each row band, then its GEMM, in one work item) is bit for
  bit the two calls, statistics included, with NaN/Inf/subnormal inputs, on every ISA."""
  x = special_input((3, 9, 10, 7), 1)
  geo = dict(kernel_spatial=(3, 3), window_strides=(2, 1), padding=((1, 2), (0, 1)), lhs_dilation=(1, 1),
             rhs_dilation=(1, 2))
  for stats in (False, True):
    patch_gemm_equals_two_calls(x, geo, fmt, bshape, rounding, isa, stats)
  patch_gemm_equals_two_calls(x, geo, fmt, bshape, rounding, isa, True, n_out=40, eb_cols=False)


def test_patch_gemm_many_bands():
  """The demo's 32-channel 3x3 conv at batch 128: many work items on both threads (rows of several
  items, the last one short), exact against the two calls."""
  x = jax.random.normal(jax.random.key(0), (128, 12, 12, 32)) * 3
  geo = dict(kernel_spatial=(3, 3), window_strides=(1, 1), padding=((1, 1), (1, 1)))
  patch_gemm_equals_two_calls(x, geo, BFP(11, block=(24, 24)), (1, 24, 24), "nearest", "auto", True, n_out=32)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_patch_gemm_random_geometries(data):
  xs, geo = draw_geometry(data)
  out_sp = ffi_conv.patch_geometry(xs, **geo)[2]
  if not all(o > 0 for o in out_sp):
    return  # an empty patch matrix: the op never calls the fused kernel for it
  bshape = (1, data.draw(st.integers(1, 30)), data.draw(st.integers(8, 30)))
  x = special_input(xs, data.draw(st.integers(0, 2**16)))
  patch_gemm_equals_two_calls(x, geo, BFP(11, block=bshape[1:]), bshape, data.draw(st.sampled_from(["nearest", "biased"])),
                              "auto", data.draw(st.booleans()), n_out=data.draw(st.integers(1, 20)))


def test_patch_gemm_bad_input():
  x = jnp.ones((2, 5, 5, 3))
  geo = dict(kernel_spatial=(3, 3), window_strides=(1, 1), padding=((1, 1), (1, 1)))
  fmt, bshape = BFP(11, block=(24, 24)), (1, 24, 24)
  b, eb = jnp.zeros((1, 27, 4), jnp.int16), jnp.zeros((1, 2, 4), jnp.int32)
  call = lambda **kw: jax.block_until_ready(ffi_block.patch_gemm(**{**dict(x=x, fmt=fmt, bshape=bshape, b=b, eb=eb,
                                                                            bits_b=12, **geo), **kw}))
  with pytest.raises(ValueError, match="nearest or biased"):
    call(rounding="stochastic")
  with pytest.raises(TypeError, match="b must be int16"):
    call(b=b.astype(jnp.float32))
  with pytest.raises(TypeError, match="eb must be int32"):
    call(eb=eb[0])
  # The kernel's own checks: an FFI error, never a crash.
  with pytest.raises(Exception, match="outside"):
    call(b=b.at[0, 3, 1].set(-32768))
  with pytest.raises(Exception, match="eb must be"):
    call(eb=jnp.zeros((1, 3, 4), jnp.int32))
  with pytest.raises(Exception, match="contraction dims differ"):
    call(b=jnp.zeros((1, 26, 4), jnp.int16))
  with pytest.raises(Exception, match="no columns"):
    call(b=jnp.zeros((1, 27, 0), jnp.int16), eb=jnp.zeros((1, 2, 0), jnp.int32))


def patch_wgrad_equals_conversion_then_gemm(x, geo, fmt, tiles, block_k, isa, n_out=13, eb_cols=True, seed=0,
                                            nonfinite_eb=False):
  """`gemm_patch_wgrad` / `gemm_i8_patch_wgrad` (formats of <= 8 bits: int8 b, the INT8 kernel) (P
  converted from x on the forward's exponents, a kc block at a time) against
  `quantize_patches_with_stats` followed by the INT16 / INT8 GEMM on its result, A transposed."""
  from jdfp._src.ffi import gemm as ffi_gemm
  from jdfp._src.ffi import gemm_i8 as ffi_gemm_i8
  from jdfp._src.numerics.quantize import NONFINITE_EXPONENT
  rng = np.random.default_rng(seed)
  br, bc = tiles
  i8 = fmt.int_bits <= 8
  bits_b, dt = (8, jnp.int8) if i8 else (12, jnp.int16)
  v, e = ffi_block.quantize_patches_with_stats(x, fmt, (1, br, bc), isa=isa, stats=False, out_dtype=dt, **geo)
  rows, k = v.shape[1:]
  kb = 1 if block_k is None else -(-rows // block_k)
  qb = 2 ** (bits_b - 1) - 1
  b = jnp.asarray(rng.integers(-qb, qb + 1, (1, rows, n_out)), dt)
  eb = rng.integers(-30, 10, (1, kb, n_out if eb_cols else 1))
  if nonfinite_eb:
    eb[0, kb // 2, 0] = NONFINITE_EXPONENT
  eb = jnp.asarray(eb, jnp.int32)
  # ea [1, K, KB]: row m of P^T, block j of rows -> P's tile (row of block j, column tile of m).
  j_rows = np.minimum(np.arange(kb) * (block_k or rows) // br, e.shape[1] - 1)
  ea = jnp.transpose(e[:, j_rows][:, :, np.arange(k) // bc], (0, 2, 1))
  gemm, fused = ((ffi_gemm_i8.gemm_i8, ffi_gemm_i8.gemm_i8_patch_wgrad) if i8
                 else (ffi_gemm.gemm, ffi_gemm.gemm_patch_wgrad))
  want = gemm(v, b, ea, eb, bits_a=fmt.int_bits, bits_b=bits_b, block_k=block_k, transpose_a=True, isa=isa)
  got = jax.jit(lambda x, e, b, eb: fused(x, e, b, eb, tiles=tiles, bits_a=fmt.int_bits, bits_b=bits_b,
                                          block_k=block_k, isa=isa, **geo))(x, e, b, eb)
  assert got.shape == (1, k, n_out)
  assert_same((got,), (want,))


@pytest.mark.parametrize("isa", kernels.available_isas())
@pytest.mark.parametrize("mantissa", [11, 7])
@pytest.mark.parametrize("channels", [7, 20])
@pytest.mark.parametrize("tiles,block_k,n_out,eb_cols", [
    ((24, 24), 24, 13, True),
    ((24, 24), 8, 40, False),  # the gradient's blocks finer than P's tile rows
    ((8, 5), 8, 3, True),  # column tiles that split the taps' channel runs
    ((500, 24), None, 17, True),  # one tile row: one block along the rows
])
def test_patch_wgrad_equals_conversion_then_gemm(tiles, block_k, n_out, eb_cols, channels, mantissa, isa):
  """The fused weight gradient (INT16 kernel for BFP(11), INT8 for BFP(7)) is bit for bit the
  conversion call followed by the GEMM on the stored patch matrix, with NaN/Inf/subnormal inputs and
  a NONFINITE gradient exponent, on every ISA, for strided, padded and dilated geometry, with channel
  runs gathered into rows (7 channels) or converted straight from x (20)."""
  x = special_input((3, 9, 10, channels), 1)
  geo = dict(kernel_spatial=(3, 3), window_strides=(2, 1), padding=((1, 2), (0, 1)), lhs_dilation=(1, 1),
             rhs_dilation=(1, 2))
  patch_wgrad_equals_conversion_then_gemm(x, geo, BFP(mantissa, block=tiles), tiles, block_k, isa, n_out, eb_cols,
                                          nonfinite_eb=True)


@pytest.mark.parametrize("mantissa", [11, 7])
@pytest.mark.parametrize("shape,n_out", [((32, 32, 32, 64), 64), ((128, 12, 12, 32), 32)])
def test_patch_wgrad_deep(shape, n_out, mantissa):
  """The CNN's 64-channel and the demo's 32-channel weight gradients (K >> M, N: one tile per worker,
  many kc blocks, each converted into the worker's buffer), HBFP12 and HBFP8: exact against the two
  calls."""
  x = jax.random.normal(jax.random.key(0), shape) * 3
  geo = dict(kernel_spatial=(3, 3), window_strides=(1, 1), padding=((1, 1), (1, 1)))
  patch_wgrad_equals_conversion_then_gemm(x, geo, BFP(mantissa, block=(24, 24)), (24, 24), 24, "auto", n_out)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_patch_wgrad_random_geometries(data):
  xs, geo = draw_geometry(data)
  out_sp = ffi_conv.patch_geometry(xs, **geo)[2]
  if not all(o > 0 for o in out_sp):
    return  # an empty patch matrix: the op never calls the kernel for it
  tiles = (data.draw(st.integers(1, 30)), data.draw(st.integers(1, 30)))
  rows = xs[0] * int(np.prod(out_sp))
  divisors = [d for d in range(1, tiles[0] + 1) if tiles[0] % d == 0]
  block_k = None if tiles[0] >= rows else data.draw(st.sampled_from(divisors))
  x = special_input(xs, data.draw(st.integers(0, 2**16)))
  patch_wgrad_equals_conversion_then_gemm(x, geo, BFP(data.draw(st.integers(2, 15)), block=tiles), tiles, block_k,
                                          "auto", data.draw(st.integers(1, 20)), data.draw(st.booleans()),
                                          seed=data.draw(st.integers(0, 99)))


def test_patch_wgrad_bad_input():
  from jdfp._src.ffi import gemm as ffi_gemm
  from jdfp._src.ffi.library import TARGET_I16_PATCH_WGRAD
  x = jnp.ones((2, 5, 5, 3))
  geo = dict(kernel_spatial=(3, 3), window_strides=(1, 1), padding=((1, 1), (1, 1)))
  e, b, eb = jnp.zeros((1, 5, 2), jnp.int32), jnp.zeros((1, 50, 4), jnp.int16), jnp.zeros((1, 3, 4), jnp.int32)
  kw = dict(tiles=(10, 24), bits_a=12, bits_b=12, block_k=20)
  call = lambda **over: jax.block_until_ready(ffi_gemm.gemm_patch_wgrad(**{**dict(x=x, e=e, b=b, eb=eb, **geo, **kw),
                                                                          **over}))
  call(block_k=10, eb=jnp.zeros((1, 5, 4), jnp.int32))  # a valid call
  with pytest.raises(TypeError, match="x must be float32"):
    call(x=x.astype(jnp.float16))
  with pytest.raises(TypeError, match="b must be int16"):
    call(b=b.astype(jnp.int8))
  with pytest.raises(ValueError, match="e must be the tile grid"):
    call(e=jnp.zeros((1, 5, 3), jnp.int32))
  with pytest.raises(ValueError, match="contraction dims differ"):
    call(b=jnp.zeros((1, 49, 4), jnp.int16))
  with pytest.raises(ValueError, match="eb must have shape"):
    call(eb=jnp.zeros((1, 2, 4), jnp.int32))
  # The kernel's own checks (past the Python ones): an FFI error, never a crash.
  raw = lambda e, b, eb, block_k, block=(10, 24): jax.block_until_ready(jax.ffi.ffi_call(
      TARGET_I16_PATCH_WGRAD, jax.ShapeDtypeStruct((1, 27, 4), jnp.float32))(
          x.reshape(2, 1, 5, 5, 3), e, b, eb, bits_a=np.int32(12), bits_b=np.int32(12), block_k=np.int64(block_k),
          block=np.asarray(block, np.int64), isa=np.int32(0), window_strides=np.ones(3, np.int64),
          padding_lo=np.array([0, 1, 1]), padding_hi=np.array([0, 1, 1]), lhs_dilation=np.ones(3, np.int64),
          rhs_dilation=np.ones(3, np.int64), kernel_spatial=np.array([1, 3, 3])))
  with pytest.raises(Exception, match="block_k must divide"):
    raw(e, b, eb, 20)
  with pytest.raises(Exception, match="e must be the patch matrix's tile grid"):
    raw(jnp.zeros((1, 4, 2), jnp.int32), b, jnp.zeros((1, 5, 4), jnp.int32), 10)
  with pytest.raises(Exception, match="block must be two ints"):
    raw(e, b, jnp.zeros((1, 5, 4), jnp.int32), 10, block=(10, 24, 1))
  with pytest.raises(Exception, match="outside"):
    raw(e, b.at[0, 7, 1].set(-32768), jnp.zeros((1, 5, 4), jnp.int32), 10)
  from jdfp._src.ffi import gemm_i8 as ffi_gemm_i8
  call8 = lambda **over: jax.block_until_ready(ffi_gemm_i8.gemm_i8_patch_wgrad(**{
      **dict(x=x, e=e, b=b.astype(jnp.int8), eb=jnp.zeros((1, 5, 4), jnp.int32), **geo,
             **{**kw, "bits_a": 8, "bits_b": 8, "block_k": 10}), **over}))
  call8()
  with pytest.raises(ValueError, match="bits_a must be an int in 2..8"):
    call8(bits_a=12)
  with pytest.raises(TypeError, match="b must be int8"):
    call8(b=b)
  with pytest.raises(Exception, match="outside"):
    call8(b=b.astype(jnp.int8).at[0, 7, 1].set(-128))


@pytest.mark.parametrize("name,wgrad", [("hbfp12", "jdfp_gemm_i16_patch_wgrad"), ("hbfp8", "jdfp_gemm_i8_patch_wgrad")])
def test_hbfp_conv_never_stores_the_patch_matrix(name, wgrad):
  """`policies.hbfp12()` / `hbfp8()`'s 3x3 conv: the forward is one `patch_gemm` call (no patch matrix
  in the program's forward), the backward keeps x and the forward's exponents and its weight gradient
  is one `gemm_patch_wgrad` call on the INT16 / INT8 kernel (no second conversion, no patch matrix in
  the program at all); bit for bit the reference."""
  pol = POLICIES[name]
  x = jax.random.normal(jax.random.key(0), (4, 10, 10, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 24)) * 0.1
  ct = jax.random.normal(jax.random.key(2), (4, 10, 10, 24))
  kw = dict(window_strides=(1, 1), padding="SAME")
  fwd = jax.jit(lambda x, w: jdfp.conv_general_dilated(x, w, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                       policy=pol, **kw))
  hlo = fwd.lower(x, w).compile().as_text()
  assert 'custom_call_target="jdfp_block_patch_gemm"' in hlo
  assert "jdfp_block_quantize_patches" not in hlo and "jdfp_gemm_i16" not in hlo
  assert residual_bytes(pol, x, w, **kw) < x.nbytes + 4 * 10 * 10 * 9 * 16 // 2  # x, not the patches
  bwd_hlo = jax.jit(lambda x, w, ct: conv_vjp(pol, x, w, ct, **kw)).lower(x, w, ct).compile().as_text()
  assert f'custom_call_target="{wgrad}"' in bwd_hlo
  assert "jdfp_block_quantize_patches" not in bwd_hlo
  assert_same(jax.jit(lambda x, w, ct: conv_vjp(pol, x, w, ct, **kw))(x, w, ct),
              jax.jit(lambda x, w, ct: conv_vjp(pol.replace(backend="reference"), x, w, ct, **kw))(x, w, ct))


@pytest.mark.parametrize("name", ["hbfp8", "hbfp12"])
def test_explain_counts_the_fused_forward(name):
  """`jdfp.explain` reports the fused forward as a call of the INT8 (HBFP8) / INT16 (HBFP12) kernel:
  forward, backward-data (with col2im) and weight gradient, three kernel GEMMs per conv."""
  from jdfp._src.ops import explain as explain_mod
  pol = POLICIES[name]
  x = jax.random.normal(jax.random.key(0), (4, 10, 10, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 24)) * 0.1
  f = lambda x, w: jnp.sum(jdfp.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                     policy=pol, key=jax.random.key(3)) ** 2)
  report = jdfp.explain(jax.grad(f, argnums=(0, 1)), x, w)
  kind = explain_mod.KERNEL_I8 if name == "hbfp8" else explain_mod.KERNEL
  assert report.count(kind) == 3 and report.kernel_calls == 3, str(report)
  assert "jdfp_block_patch_gemm" in str(report)


POLICIES = {
    "hbfp8": jdfp.policies.hbfp8(),
    "hbfp12": jdfp.policies.hbfp12(),
    "mx": jdfp.Policy(lhs=BFP(7, block=16, axis=-1), rhs=BFP(7, block=16, axis=0), grad=BFP(7, block=16, axis=-1)),
    "stochastic_fwd": jdfp.policies.hbfp12(tile=8, fwd_rounding="stochastic"),
    "float_rhs": jdfp.policies.hbfp8(float_residuals=("rhs",)),
    "float_both": jdfp.policies.hbfp12(float_residuals=("lhs", "rhs"), grad_rounding="nearest"),
}


def conv_vjp(policy, x, w, ct, **kw):
  f = lambda x, w: jdfp.conv_general_dilated(x, w, dimension_numbers=("NHWC", "HWIO", "NHWC"), policy=policy,
                                             key=jax.random.key(3), **kw)
  y, vjp = jax.vjp(f, x, w)
  return (y,) + vjp(ct)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_op_bit_identical_to_reference(name):
  """Forward and both gradients of the drop-in conv equal the pure-JAX reference (XLA patches + the
  reference quantizer and GEMM), and the kernel path never stores the patch matrix."""
  pol = POLICIES[name]
  x = jax.random.normal(jax.random.key(0), (4, 11, 10, 9))
  w = jax.random.normal(jax.random.key(1), (3, 3, 9, 12)) * 0.2
  kw = dict(window_strides=(2, 1), padding=((1, 1), (2, 0)), rhs_dilation=(1, 2))
  ct = jax.random.normal(jax.random.key(2), (4, 6, 8, 12))
  f = jax.jit(lambda x, w, ct: conv_vjp(pol, x, w, ct, **kw))
  hlo = f.lower(x, w, ct).as_text()
  gathers = ("jdfp_block_quantize_patches", "jdfp_block_patch_gemm", "jdfp_gemm_i16_patch_wgrad")
  assert any(t in hlo for t in gathers) and "jdfp_im2col" not in hlo
  want = jax.jit(lambda x, w, ct: conv_vjp(pol.replace(backend="reference"), x, w, ct, **kw))(x, w, ct)
  assert_same(f(x, w, ct), want)


def test_groups_keep_the_materialized_patches():
  pol = jdfp.policies.hbfp8()
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 8))
  ct = jnp.ones((2, 8, 8, 8))
  f = jax.jit(lambda x, w, ct: conv_vjp(pol, x, w, ct, window_strides=(1, 1), padding="SAME",
                                        feature_group_count=2))
  hlo = f.lower(x, w, ct).as_text()
  assert "jdfp_block_quantize_patches" not in hlo and "jdfp_im2col" in hlo
  want = conv_vjp(pol.replace(backend="reference"), x, w, ct, window_strides=(1, 1), padding="SAME",
                  feature_group_count=2)
  assert_same(f(x, w, ct), want)


class SmallCnn(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.Conv(24, (3, 3), strides=2)(x)
    return jnp.mean(x, axis=(1, 2))


@pytest.mark.parametrize("name", ["hbfp8", "hbfp12"])
def test_flax_statistics_merged_and_equal(name):
  """Through `jdfp.quantize` with statistics: one patch-conversion call per conv (the op's and the
  statistics' merged), no patch matrix stored, and loss, parameter gradients and the new "dfp" state
  (the statistics) equal the reference backend's."""
  x = jax.random.normal(jax.random.key(0), (8, 12, 12, 3))

  def grads(policy):
    m = jdfp.quantize(SmallCnn(), policy)
    v = m.init({"params": jax.random.key(1), "dfp": jax.random.key(2)}, x)

    def loss(v):
      y = m.apply(v, x, rngs={"dfp": jax.random.key(3)}, mutable=["dfp"])[0]
      return jnp.sum(y * y)
    f = jax.jit(jax.grad(loss))
    return f, v

  f, v = grads(POLICIES[name])
  compiled = f.lower(v).compile().as_text()
  # A forward whose backward keeps x converts and multiplies in one call (patch_gemm): both HBFP12
  # convs; for HBFP8 the first (the stride-2 conv's int8 patches are smaller than its x, so they are
  # kept). Either way one counting call per conv.
  fused = compiled.count('custom_call_target="jdfp_block_patch_gemm_stats"')
  assert fused == (2 if name == "hbfp12" else 1)
  assert compiled.count('custom_call_target="jdfp_block_quantize_patches_stats"') + fused == 2
  assert "jdfp_im2col" not in compiled
  f_ref, v_ref = grads(POLICIES[name].replace(backend="reference"))
  got, want = jax.tree.leaves(f(v)), jax.tree.leaves(f_ref(v_ref))
  assert len(got) == len(want)
  assert_same(got, want)


def test_ffi_errors_not_crashes():
  from jdfp._src.ffi.library import TARGET_BLOCK_QUANTIZE_PATCHES
  x = jnp.zeros((1, 1, 4, 4, 2), jnp.float32)
  attrs = dict(block=np.array([1, 4, 4], np.int64), kind=np.int32(1), bits=np.int32(7), rounding=np.int32(0),
               isa=np.int32(0), window_strides=np.ones(3, np.int64), padding_lo=np.zeros(3, np.int64),
               padding_hi=np.zeros(3, np.int64), lhs_dilation=np.ones(3, np.int64),
               rhs_dilation=np.ones(3, np.int64), kernel_spatial=np.array([1, 3, 3], np.int64))
  key = jnp.zeros((2,), jnp.uint32)
  ok = (jax.ShapeDtypeStruct((1, 4, 18), jnp.int16), jax.ShapeDtypeStruct((1, 1, 5), jnp.int32))
  jax.block_until_ready(jax.ffi.ffi_call(TARGET_BLOCK_QUANTIZE_PATCHES, ok)(x, key, **attrs))
  for outs, kw, msg in (
      ((jax.ShapeDtypeStruct((1, 4, 17), jnp.int16), ok[1]), {}, "patch matrix"),
      (ok, {"window_strides": np.array([1, 0, 1], np.int64)}, "must be >= 1"),
      (ok, {"kernel_spatial": np.array([3, 3], np.int64)}, "kernel_spatial must have 3"),
  ):
    with pytest.raises(Exception, match=msg):
      jax.block_until_ready(jax.ffi.ffi_call(TARGET_BLOCK_QUANTIZE_PATCHES, outs)(x, key, **{**attrs, **kw}))


def residual_bytes(policy, x, w, **kw):
  f = lambda x, w: jdfp.conv_general_dilated(x, w, dimension_numbers=("NHWC", "HWIO", "NHWC"), policy=policy,
                                             key=jax.random.key(3), **kw)
  _, vjp = jax.vjp(f, x, w)
  return sum(np.asarray(t).nbytes for t in jax.tree.leaves(vjp))


@pytest.mark.parametrize("lean", [False, True])
def test_lhs_residual_is_the_input_where_smaller(lean):
  """A 3x3 conv's patch matrix holds 9x x's elements: by default (deterministic forward rounding) the
  backward keeps x, not the patch matrix's integers, and converts it again, as with
  ``Policy(float_residuals=("lhs",))``: gradients bit-identical to the reference backend."""
  x = jax.random.normal(jax.random.key(0), (4, 10, 10, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 24)) * 0.1
  ct = jax.random.normal(jax.random.key(2), (4, 10, 10, 24))
  kw = dict(window_strides=(1, 1), padding="SAME")
  pol = jdfp.policies.hbfp8(float_residuals=("lhs",) if lean else ())
  patch_ints = 4 * 10 * 10 * 9 * 16  # int8 patch matrix
  assert residual_bytes(pol, x, w, **kw) < x.nbytes + patch_ints // 4
  assert_same(jax.jit(lambda x, w, ct: conv_vjp(pol, x, w, ct, **kw))(x, w, ct),
              jax.jit(lambda x, w, ct: conv_vjp(pol.replace(backend="reference"), x, w, ct, **kw))(x, w, ct))


@pytest.mark.parametrize("case", ["1x1_stride2", "stochastic_fwd"])
def test_lhs_residual_is_the_patch_matrix_otherwise(case):
  """The patch matrix is kept where it is the smaller residual (a 1x1 stride-2 projection reads a
  quarter of x's pixels) or where the forward rounds stochastically (a second conversion would
  draw other bits); gradients bit-identical to the reference backend either way."""
  x = jax.random.normal(jax.random.key(0), (4, 10, 10, 16))
  if case == "1x1_stride2":
    pol, w, kw = jdfp.policies.hbfp8(), jax.random.normal(jax.random.key(1), (1, 1, 16, 24)) * 0.1, \
        dict(window_strides=(2, 2), padding="VALID")
    patch_ints, ct = 4 * 5 * 5 * 16, jnp.ones((4, 5, 5, 24))
  else:
    pol, w, kw = jdfp.policies.hbfp8(fwd_rounding="stochastic"), \
        jax.random.normal(jax.random.key(1), (3, 3, 16, 24)) * 0.1, dict(window_strides=(1, 1), padding="SAME")
    patch_ints, ct = 4 * 10 * 10 * 9 * 16, jnp.ones((4, 10, 10, 24))
  got = residual_bytes(pol, x, w, **kw)
  assert patch_ints <= got < x.nbytes + patch_ints
  assert_same(jax.jit(lambda x, w, ct: conv_vjp(pol, x, w, ct, **kw))(x, w, ct),
              jax.jit(lambda x, w, ct: conv_vjp(pol.replace(backend="reference"), x, w, ct, **kw))(x, w, ct))


def test_backward_conversion_waits_for_the_output_gradient():
  """Where the weight gradient needs x converted again (MX-style 1-D blocks along K, which the
  backward re-blocks; HBFP tiles go to `gemm_patch_wgrad` instead), that second conversion reads the
  op's output gradient (as the key operand that nearest rounding ignores), so XLA cannot hoist it
  into the forward, where every layer's patch matrix would be alive at once: in the optimized HLO
  its key operand is not a constant."""
  import re
  x = jax.random.normal(jax.random.key(0), (4, 10, 10, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 24)) * 0.1
  ct = jax.random.normal(jax.random.key(2), (4, 10, 10, 24))
  f = jax.jit(lambda x, w, ct: conv_vjp(POLICIES["mx"], x, w, ct, window_strides=(1, 1), padding="SAME"))
  hlo = f.lower(x, w, ct).compile().as_text()
  calls = [l for l in hlo.splitlines()
           if 'custom_call_target="jdfp_block_quantize_patches' in l or 'custom_call_target="jdfp_block_patch_gemm' in l]
  assert len(calls) == 2, calls  # the forward's (fused with its GEMM) and the backward's
  keys = [re.search(r"custom-call\(%[\w.-]+, %([\w.-]+)[,)]", l).group(1) for l in calls]
  defs = {m.group(1): m.group(2) for m in re.finditer(r"^\s*(?:ROOT )?%([\w.-]+) = (.*)$", hlo, re.M)}
  from_constants = [k for k in keys if re.fullmatch(r"[^(]*\((%constant[\w.-]*(, )?)*\).*", defs[k]) or
                    " constant(" in defs[k]]
  assert len(from_constants) == 1, [defs[k] for k in keys]  # the forward's zeros; the backward's reads ct


def test_after_leaves_the_conversion_unchanged():
  from jdfp._src.ffi import block_quantize as ffi_block
  from jdfp._src.numerics.formats import BFP
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 5))
  kw = dict(kernel_spatial=(3, 3), window_strides=(1, 1), padding=((1, 1), (1, 1)))
  fmt, bshape = BFP(7, block=(8, 8)), (1, 8, 8)
  want = ffi_block.quantize_patches_with_stats(x, fmt, bshape, **kw)
  for after in (jnp.float32(jnp.nan), jnp.full((3, 2), -jnp.inf), jnp.arange(4, dtype=jnp.int8)):
    assert_same(ffi_block.quantize_patches_with_stats(x, fmt, bshape, after=after, **kw), want)
  with pytest.raises(ValueError, match="deterministic rounding"):
    ffi_block.quantize_patches_with_stats(x, fmt, bshape, rounding="stochastic", key=jax.random.key(0),
                                          after=jnp.ones(2), **kw)
  with pytest.raises(ValueError, match="at least one element"):
    ffi_block.quantize_patches_with_stats(x, fmt, bshape, after=jnp.ones((0,)), **kw)


@pytest.mark.parametrize("batch", [4, 16])
@pytest.mark.parametrize("ksize", [3, 1])
def test_shard_map_per_shard_equals_single_device(batch, ksize):
  """Under shard_map (batch split over the devices, check_vma on), each shard's forward and input
  gradient equal the op on that shard alone, and the weight gradient (of the replicated kernel:
  summed over the shards by shard_map's transpose) the sum of theirs: with 1 image per
  device (the GEMM, then XLA's col2im) and with 4 (the fused GEMM + col2im kernel); x converted
  again in the backward (3x3) or the patch matrix kept (1x1, stride 2)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  shard_map = getattr(jax, "shard_map", None)
  if shard_map is None:
    from jax.experimental.shard_map import shard_map
  mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
  pol = jdfp.policies.hbfp8()
  x = jax.random.normal(jax.random.key(0), (batch, 8, 8, 16))
  w = jax.random.normal(jax.random.key(1), (ksize, ksize, 16, 8)) * 0.1
  out_hw = 8 if ksize == 3 else 4
  ct = jax.random.normal(jax.random.key(2), (batch, out_hw, out_hw, 8))
  kw = dict(window_strides=(1, 1), padding="SAME") if ksize == 3 else dict(window_strides=(2, 2), padding="VALID")

  spec = (P("d"), P(), P("d"))
  f = jax.jit(shard_map(lambda x, w, ct: conv_vjp(pol, x, w, ct, **kw), mesh=mesh, in_specs=spec, out_specs=(P("d"), P("d"), P())))
  y, dx, dw = f(*(jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip((x, w, ct), spec)))
  parts = [jax.jit(lambda x, w, ct: conv_vjp(pol, x, w, ct, **kw))(xs, w, cs)
           for xs, cs in zip(jnp.split(x, 4), jnp.split(ct, 4))]
  assert_same(y, jnp.concatenate([p[0] for p in parts]))
  assert_same(dx, jnp.concatenate([p[1] for p in parts]))
  np.testing.assert_allclose(dw, sum(p[2] for p in parts), rtol=1e-6, atol=1e-6)
