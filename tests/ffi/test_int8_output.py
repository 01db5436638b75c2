"""int8 results of the conversion kernels (per-tensor DFP and block formats of <= 8 bits, every
rounding, every ISA): bit for bit the int16 results narrowed, the same exponents and counters; and
clear errors for an int8 result of a wider format."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdfp import kernels
from jdfp._src.ffi import block_quantize as bq
from jdfp._src.ffi import library
from jdfp._src.ffi import quantize as fq
from jdfp._src.numerics.formats import BFP, DFP

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="libjdfp_ffi.so not built")

ROUNDINGS = ("nearest", "stochastic", "biased")


def _data(shape, seed=0):
  """Wide range plus zeros, a subnormal, NaN and Inf (NaN/Inf only where asked: they zero a tensor)."""
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(shape) * np.float32(2.0) ** rng.integers(-12, 12, shape)).astype(np.float32)
  x.reshape(-1)[::53] = 0.0
  x.reshape(-1)[3 % x.size] = 1e-40
  return x


def _with_nonfinite(x):
  x = x.copy()
  x.reshape(-1)[7 % x.size] = np.nan
  x.reshape(-1)[-1] = -np.inf
  return x


def _same(a8, a16):
  assert a8.dtype == jnp.int8 and a16.dtype == jnp.int16
  np.testing.assert_array_equal(np.asarray(a8), np.asarray(a16).astype(np.int8))
  assert np.abs(np.asarray(a16)).max(initial=0) <= 127


# Odd sizes: partial SIMD steps, chunks of 64 Ki (and 4 Ki narrowing segments) with a tail.
@pytest.mark.parametrize("shape", [(1,), (37, 29), (3, 4099), (70000,)])
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("bits", [8, 4])
def test_per_tensor_int8_is_the_int16_result_narrowed(isas, shape, rounding, bits):
  x = jnp.asarray(_data(shape, seed=len(shape) + bits))
  key = jax.random.key(3)
  for isa in isas:
    kw = dict(bits=bits, isa=isa, rounding=rounding, key=key)
    v16, e16 = fq.quantize_dfp(x, **kw)
    v8, e8 = fq.quantize_dfp(x, out_dtype=jnp.int8, **kw)
    _same(v8, v16)
    np.testing.assert_array_equal(e8, e16)
    s16 = fq.quantize_dfp_with_stats(x, **kw)
    s8 = fq.quantize_dfp_with_stats(x, out_dtype=jnp.int8, **kw)
    _same(s8[0], s16[0])
    np.testing.assert_array_equal(s8[1], s16[1])
    np.testing.assert_array_equal(s8[2], s16[2])  # the counters: identical
    e = jnp.full((1,), -3, jnp.int32)  # a given exponent: saturates most of x
    _same(fq.quantize(x, e, out_dtype=jnp.int8, **kw), fq.quantize(x, e, **kw))


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_per_tensor_int8_nonfinite_gives_zeros(isas, rounding):
  x = jnp.asarray(_with_nonfinite(_data((5, 77))))
  for isa in isas:
    v8, e8, c8 = fq.quantize_dfp_with_stats(x, bits=8, isa=isa, rounding=rounding, key=jax.random.key(0),
                                            out_dtype=jnp.int8)
    _, e16, c16 = fq.quantize_dfp_with_stats(x, bits=8, isa=isa, rounding=rounding, key=jax.random.key(0))
    assert not np.asarray(v8).any()
    np.testing.assert_array_equal(e8, e16)
    np.testing.assert_array_equal(c8, c16)


# hbfp8 tiles 24x24 with partial edges, MX-style 1-D blocks of 32 along rows, per-row DFP(8).
GEOMETRIES = (((1, 50, 70), (1, 24, 24)), ((2, 48, 48), (1, 24, 24)), ((3, 5, 100), (1, 1, 32)),
              ((1, 7, 1030), (1, 1, 32)), ((1, 9, 33), (1, 1, 33)), ((4, 9, 31), (2, 4, 8)))
BLOCK_FORMATS = (BFP(7), DFP(8), BFP(3))


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("nonfinite", [False, True])
def test_block_int8_is_the_int16_result_narrowed(isas, geometry, rounding, fmt, nonfinite):
  shape, block = geometry
  x = _data(shape, seed=shape[2])
  x = jnp.asarray(_with_nonfinite(x) if nonfinite else x)
  bfp = isinstance(fmt, BFP)
  bits = fmt.mantissa_bits if bfp else fmt.bits
  for isa in isas:
    kw = dict(bfp=bfp, bits=bits, rounding=rounding, key=jax.random.key(1), isa=isa)
    v16, e16, c16, r16 = bq.block_quantize_with_stats(x, block, **kw)
    v8, e8, c8, r8 = bq.block_quantize_with_stats(x, block, out_dtype=jnp.int8, **kw)
    _same(v8, v16)
    np.testing.assert_array_equal(e8, e16)
    np.testing.assert_array_equal(c8, c16)
    np.testing.assert_array_equal(r8, r16)
    p8, pe8 = bq.block_quantize(x, block, out_dtype=jnp.int8, **kw)
    _same(p8, v16)
    np.testing.assert_array_equal(pe8, e16)


def test_int8_output_of_a_wide_format_is_rejected():
  x = jnp.ones((4, 4), jnp.float32)
  with pytest.raises(ValueError, match="<= 8 bits"):
    fq.quantize_dfp(x, bits=9, out_dtype=jnp.int8)
  with pytest.raises(TypeError, match="int16 or int8"):
    fq.quantize_dfp(x, bits=8, out_dtype=jnp.int32)
  with pytest.raises(ValueError, match="<= 8 bits"):
    bq.block_quantize(x[None], (1, 4, 4), bfp=True, bits=8, out_dtype=jnp.int8)


def test_handlers_reject_a_bad_output_dtype():
  """The FFI targets called directly: an FFI error naming `out`, never a crash."""
  x = jnp.ones((4, 4), jnp.float32)
  k = jnp.zeros((2,), jnp.uint32)
  attrs = dict(isa=np.int32(0), rounding=np.int32(0))
  i8 = jax.ffi.ffi_call(library.TARGET_QUANTIZE, jax.ShapeDtypeStruct((4, 4), jnp.int8))
  with pytest.raises(Exception, match="int8 only for bits <= 8"):
    jax.block_until_ready(i8(x, jnp.zeros((1,), jnp.int32), k, bits=np.int32(9), **attrs))
  i32 = jax.ffi.ffi_call(library.TARGET_QUANTIZE_DFP_NOCOUNT, (jax.ShapeDtypeStruct((4, 4), jnp.int32),
                                                               jax.ShapeDtypeStruct((1, 1), jnp.int32)))
  with pytest.raises(Exception, match="out must be int16 or int8"):
    jax.block_until_ready(i32(x, k, bits=np.int32(8), **attrs))
  blk = dict(block=np.asarray((1, 4, 4), np.int64), rounding=np.int32(0), isa=np.int32(0))
  b8 = jax.ffi.ffi_call(library.TARGET_BLOCK_QUANTIZE, (jax.ShapeDtypeStruct((1, 4, 4), jnp.int8),
                                                        jax.ShapeDtypeStruct((1, 1, 1), jnp.int32)))
  with pytest.raises(Exception, match="BFP mantissa bits <= 7"):
    jax.block_until_ready(b8(x[None], k, kind=np.int32(1), bits=np.int32(8), **blk))
  with pytest.raises(Exception, match="DFP bits <= 8"):
    jax.block_until_ready(b8(x[None], k, kind=np.int32(0), bits=np.int32(9), **blk))
  b32 = jax.ffi.ffi_call(library.TARGET_BLOCK_QUANTIZE, (jax.ShapeDtypeStruct((1, 4, 4), jnp.int32),
                                                         jax.ShapeDtypeStruct((1, 1, 1), jnp.int32)))
  with pytest.raises(Exception, match="out must be int16 or int8"):
    jax.block_until_ready(b32(x[None], k, kind=np.int32(0), bits=np.int32(8), **blk))
