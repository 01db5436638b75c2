"""The C++ block conversion (ffi.block_quantize: DFP / BFP with per-row, 1-D block, 2-D tile and
per-tensor exponents) against the pure-JAX quantizer, bit for bit, on every ISA; and its use by the
ops and the optimizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jdfp import kernels
from jdfp._src.ffi import block_quantize as bq
from jdfp._src.numerics import quantize as qz
from jdfp._src.numerics.formats import BFP, DFP, NONFINITE_EXPONENT
from jdfp._src.ops import convert

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="libjdfp_ffi.so not built")

FORMATS = (BFP(7), BFP(11), BFP(15), BFP(1), DFP(16), DFP(8), DFP(2))
# (shape, block): partial edge tiles, per-row, 1-D blocks, tiles along a batch, per-tensor, odd sizes;
# rows of 1001 (starts off the 4-element Philox blocks, many 64-element steps and 24-wide blocks per
# row: the per-column-scale row kernels); bands of an odd row count with several blocks per 16 columns
# (the band maxima, one call per band).
GEOMETRIES = (((1, 50, 70), (1, 24, 24)), ((1, 26, 1001), (1, 24, 24)), ((3, 5, 100), (1, 1, 24)), ((2, 33, 7), (1, 33, 7)),
              ((4, 9, 31), (2, 4, 8)), ((1, 1, 1), (1, 24, 24)), ((2, 48, 48), (1, 24, 24)),
              ((1, 7, 130), (1, 1, 130)), ((5, 3, 17), (5, 3, 17)), ((1, 51, 70), (1, 25, 5)))


def _adversarial(rng, shape, case):
  """Wide dynamic range per block, plus the special values of ``case``."""
  x = (rng.standard_normal(shape) * np.float32(2.0) ** rng.integers(-30, 30, shape)).astype(np.float32)
  flat = x.reshape(-1)
  if case == "special":
    flat[::97] = 0.0
    flat[5 % flat.size] = np.nan
    flat[301 % flat.size] = -np.inf
    flat[7 % flat.size] = 1e-40  # subnormal: reads as zero (DAZ), in both
    flat[11::200] = 2.0**-3  # exact powers of two: the BFP ceil(log2) edge
  elif case == "subnormal_block":
    x[..., :] = 1e-39
  elif case == "zeros":
    x[...] = 0.0
  elif case == "ties":  # quarter and half steps: where nearest and biased rounding differ
    flat[:] = ((np.arange(flat.size) % 64) - 32).astype(np.float32) * np.float32(0.25)
  return x


KEY = jax.random.key(7)


def _check(x, fmt, block, rounding, isa, key=KEY):
  key = key if rounding == "stochastic" else None
  ref = qz.quantize_blocks(x, fmt, block, rounding=rounding, key=key)
  v, e = bq.quantize_blocks(jnp.asarray(x), fmt, block, rounding=rounding, key=key, isa=isa)
  np.testing.assert_array_equal(np.asarray(e), np.asarray(ref.exponent))
  np.testing.assert_array_equal(np.asarray(v), np.asarray(ref.values))


@pytest.mark.parametrize("case", ["plain", "special", "subnormal_block", "zeros", "ties"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "biased"])
@pytest.mark.parametrize("fmt", FORMATS, ids=repr)
def test_block_quantize_is_bit_identical_to_pure_jax(isa, fmt, rounding, case):
  rng = np.random.default_rng(hash((repr(fmt), rounding, case)) % 2**32)
  for shape, block in GEOMETRIES:
    _check(_adversarial(rng, shape, case), fmt, block, rounding, isa)


def test_nonfinite_blocks_get_the_sentinel_and_zeros(isa):
  x = np.ones((1, 48, 48), np.float32)
  x[0, 3, 30] = np.nan
  x[0, 30, 3] = np.inf
  v, e = bq.block_quantize(jnp.asarray(x), (1, 24, 24), bfp=True, bits=7, isa=isa)
  assert np.asarray(e).tolist() == [[[-7, NONFINITE_EXPONENT], [NONFINITE_EXPONENT, -7]]]
  assert not np.asarray(v)[0, :24, 24:].any() and not np.asarray(v)[0, 24:, :24].any()


@pytest.mark.parametrize("shape,bshape", [((4, 6, 50), (1, 24, 24)), ((2, 3, 4, 40), (1, 1, 1, 40)),
                                          ((30, 40), (30, 8)), ((5, 6, 7), (5, 1, 1)), ((6, 7), (1, 1))])
def test_n_d_shapes_fold_into_a_3d_view(shape, bshape):
  rng = np.random.default_rng(1)
  x = rng.standard_normal(shape).astype(np.float32)
  _check(x, BFP(7), bshape, "nearest", "auto")


def test_block_view3():
  assert bq.block_view3((2, 3, 4, 40), (1, 1, 1, 40)) == ((1, 1, 960), (1, 1, 40))  # rows of 40 in a row
  assert bq.block_view3((2, 30, 40), (1, 24, 24)) == ((2, 30, 40), (1, 24, 24))
  assert bq.block_view3((5, 6, 7), (5, 6, 7)) == ((1, 1, 210), (1, 1, 210))
  assert bq.block_view3((2, 3, 4, 5), (1, 2, 1, 2)) is None  # four unmergeable axes


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=90),
       st.sampled_from(FORMATS), st.sampled_from(["nearest", "stochastic", "biased"]), st.integers(1, 30))
def test_block_quantize_property(values, fmt, rounding, bc):
  x = np.asarray(values, np.float32).reshape(1, 1, -1)
  _check(x, fmt, (1, 1, bc), rounding, "auto")


def test_rejects_bad_input():
  x = jnp.ones((1, 4, 4), jnp.float32)
  with pytest.raises(TypeError, match="x must have dtype float32"):
    bq.block_quantize(x.astype(jnp.float16), (1, 2, 2), bfp=True, bits=7)
  with pytest.raises(ValueError, match="x must be 3-D"):
    bq.block_quantize(x[0], (1, 2, 2), bfp=True, bits=7)
  with pytest.raises(ValueError, match="block must be three ints"):
    bq.block_quantize(x, (1, 0, 2), bfp=True, bits=7)
  with pytest.raises(ValueError, match="bits must be an int in 1..15 for BFP"):
    bq.block_quantize(x, (1, 2, 2), bfp=True, bits=16)
  with pytest.raises(ValueError, match="rounding must be one of"):
    bq.block_quantize(x, (1, 2, 2), bfp=False, bits=8, rounding="up")
  with pytest.raises(ValueError, match="needs a PRNG key"):
    bq.block_quantize(x, (1, 2, 2), bfp=False, bits=8, rounding="stochastic")
  with pytest.raises(ValueError, match="isa must be one of"):
    bq.block_quantize(x, (1, 2, 2), bfp=False, bits=8, isa="sse")


def test_empty_tensor():
  v, e = bq.block_quantize(jnp.zeros((0, 4, 4), jnp.float32), (1, 2, 2), bfp=True, bits=7)
  assert v.shape == (0, 4, 4) and e.shape == (0, 2, 2)


def test_ops_convert_blocks_on_the_kernel():
  """The ops' quantizer takes the block kernel for BFP tiles with every rounding (one custom call,
  no XLA reduce-window, no random bits drawn in XLA)."""
  x = jax.random.normal(jax.random.key(0), (1, 50, 70))
  fmt = BFP(7)
  for rounding in ("nearest", "stochastic", "biased"):
    key = KEY if rounding == "stochastic" else None
    assert convert.kernel_converts_blocks(x, fmt, rounding, (1, 24, 24))
    f = lambda x: convert.quantize_blocks(x, fmt, (1, 24, 24), rounding=rounding, key=key, use_kernel=True)
    hlo = jax.jit(f).lower(x).as_text()
    assert "jdfp_block_quantize" in hlo and "reduce_window" not in hlo and "threefry" not in hlo
    q, ref = f(x), qz.quantize_blocks(x, fmt, (1, 24, 24), rounding=rounding, key=key)
    np.testing.assert_array_equal(np.asarray(q.values), np.asarray(ref.values))
    np.testing.assert_array_equal(np.asarray(q.exponent), np.asarray(ref.exponent))
  assert not convert.kernel_converts_blocks(x, DFP(16, axis=1), "nearest", (1, 50, 1))  # 1-wide blocks: XLA


def test_handler_returns_ffi_errors():
  """Bad buffers reaching the C++ handler give an error naming the argument, never a crash."""
  from jdfp._src.ffi.library import TARGET_BLOCK_QUANTIZE
  x = jnp.ones((1, 4, 4), jnp.float32)
  attrs = dict(kind=np.int32(1), bits=np.int32(7), rounding=np.int32(0), isa=np.int32(0))
  key = jnp.zeros((2,), jnp.uint32)
  for block, grid, match in (((1, 2, 2), (1, 3, 2), "e must be the block grid"),
                             ((1, 2), (1, 2, 2), "block must be three ints")):
    call = jax.ffi.ffi_call(TARGET_BLOCK_QUANTIZE, (jax.ShapeDtypeStruct(x.shape, jnp.int16),
                                                    jax.ShapeDtypeStruct(grid, jnp.int32)))
    with pytest.raises(Exception, match=match):
      jax.block_until_ready(call(x, key, block=np.asarray(block, np.int64), **attrs))
  call = jax.ffi.ffi_call(TARGET_BLOCK_QUANTIZE, (jax.ShapeDtypeStruct(x.shape, jnp.int16),
                                                  jax.ShapeDtypeStruct((1, 2, 2), jnp.int32)))
  with pytest.raises(Exception, match="kind must be 0"):
    jax.block_until_ready(call(x, key, block=np.asarray((1, 2, 2), np.int64), **{**attrs, "kind": np.int32(5)}))
  with pytest.raises(Exception, match="key must be uint32"):
    jax.block_until_ready(call(x, key[:1], block=np.asarray((1, 2, 2), np.int64), **attrs))
  with pytest.raises(Exception, match="rounding must be 0"):
    jax.block_until_ready(call(x, key, block=np.asarray((1, 2, 2), np.int64), **{**attrs, "rounding": np.int32(3)}))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "biased"])
@pytest.mark.parametrize("fmt", (BFP(7), BFP(15), DFP(12)), ids=repr)
def test_block_stats_equal_the_pure_jax_reductions(isa, fmt, rounding):
  """The statistics variant: same values and exponents, and the Flax counters of `role_stats`."""
  from jdfp._src.flax import state
  rng = np.random.default_rng(3)
  for case in ("plain", "special", "zeros", "subnormal_block"):
    for shape, block in GEOMETRIES:
      x = _adversarial(rng, shape, case)
      key = KEY if rounding == "stochastic" else None
      ref = qz.quantize_blocks(x, fmt, block, rounding=rounding, key=key)
      v, e, counts, erange = bq.quantize_blocks_with_stats(jnp.asarray(x), fmt, block, rounding=rounding, key=key,
                                                           isa=isa)
      np.testing.assert_array_equal(np.asarray(v), np.asarray(ref.values))
      np.testing.assert_array_equal(np.asarray(e), np.asarray(ref.exponent))
      want = state.role_stats(jnp.asarray(x), ref)
      got = state.stats_from_block_counts(x, counts, erange)
      assert {k: float(v) for k, v in got.items()} == {k: float(v) for k, v in want.items()}, (case, shape)


@pytest.mark.parametrize("rounding", ["nearest", "biased"])
def test_fake_quantize_blocks_equals_dequantize_of_quantize(isa, rounding):
  """The optimizer's re-quantization onto the params' grid, in one pass returning float32."""
  rng = np.random.default_rng(4)
  for fmt in (BFP(15), BFP(7), DFP(16, axis=-1)):
    for case in ("plain", "special", "zeros"):
      for shape, block in GEOMETRIES:
        x = _adversarial(rng, shape, case)
        want = qz.dequantize(qz.quantize_blocks(x, fmt, block, rounding=rounding))
        got = bq.quantize_blocks_with_stats(jnp.asarray(x), fmt, block, rounding=rounding, isa=isa, stats=False,
                                            fake=True)[0]
        np.testing.assert_array_equal(np.asarray(got).view(np.int32), np.asarray(want).view(np.int32))


def test_convert_fake_quantize_takes_the_kernel():
  x = jax.random.normal(jax.random.key(1), (100, 70)) * 3
  fmt = BFP(15)
  hlo = jax.jit(lambda x: convert.fake_quantize(x, fmt)).lower(x).as_text()
  assert "jdfp_block_fake_quantize" in hlo
  np.testing.assert_array_equal(np.asarray(convert.fake_quantize(x, fmt)), np.asarray(qz.fake_quantize(x, fmt)))


def test_stochastic_blocks_follow_the_tensor_stream_and_stay_unbiased():
  """Block stochastic rounding draws element i's bits from its row-major index (the per-tensor
  stream): a tensor whose blocks all share one exponent rounds exactly as per-tensor DFP does; and
  the rounding is unbiased (mean error of 10^6 samples within 4 sigma)."""
  from jdfp._src.ffi import quantize as ffi_quantize
  x = jnp.full((1, 96, 96), 0.3, jnp.float32).at[0, 0, 0].set(1.0)  # every 24x24 tile's max sets its exponent
  x = x.at[0, ::24, ::24].set(1.0)
  v, e = bq.quantize_blocks(x, DFP(8), (1, 24, 24), rounding="stochastic", key=KEY)
  assert np.unique(np.asarray(e)).size == 1
  v_tensor, _ = ffi_quantize.quantize_dfp(x, bits=8, rounding="stochastic", key=KEY)
  np.testing.assert_array_equal(np.asarray(v), np.asarray(v_tensor))
  y = jnp.full((1, 1000, 1032), 0.3, jnp.float32).at[0, :, ::24].set(1.0)  # one 1.0 per block: one exponent
  q, e = bq.quantize_blocks(y, DFP(8), (1, 1, 24), rounding="stochastic", key=KEY)
  assert np.unique(np.asarray(e)).size == 1
  keep = np.arange(1032) % 24 != 0
  got = np.asarray(q, np.float64)[0][:, keep] * 2.0 ** float(np.asarray(e)[0, 0, 0])
  frac = 0.3 / 2.0 ** float(np.asarray(e)[0, 0, 0]) % 1.0
  sigma = np.sqrt(frac * (1 - frac) / got.size) * 2.0 ** float(np.asarray(e)[0, 0, 0])
  assert abs(got.mean() - 0.3) < 4 * sigma
