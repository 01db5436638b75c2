"""Number formats and quantization: grid membership, rounding rules, exponent rule, edge cases."""

import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jdfp
from jdfp._src.numerics import formats

finite_f32 = st.floats(-2.0**100, 2.0**100, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)


def f32_arrays(min_side=1, max_side=12, ndim=(1, 3)):
  return hnp.arrays(np.float32, hnp.array_shapes(min_dims=ndim[0], max_dims=ndim[1], min_side=min_side, max_side=max_side),
                    elements=finite_f32)


def dfp_exponent_numpy(m, bits):
  """docs/design.md §1 with numpy's frexp: m = f * 2**k, f in [0.5, 1) -> e = k - (bits - 1)."""
  if m == 0 or m < 2.0**-126:  # XLA:CPU reads subnormals as zero (docs/arithmetic.md)
    return formats.ZERO_EXPONENT
  _, k = math.frexp(float(m))
  return k - (bits - 1)


def bfp_exponent_numpy(m, mbits):
  if m == 0 or m < 2.0**-126:
    return formats.ZERO_EXPONENT
  return math.ceil(math.log2(float(m))) - mbits if float(m) != 2.0 ** math.floor(math.log2(float(m))) else int(math.log2(float(m))) - mbits


FORMATS = [
    jdfp.DFP(2), jdfp.DFP(8), jdfp.DFP(14), jdfp.DFP(16), jdfp.DFP(12, axis=-1), jdfp.DFP(10, axis=-1, block=4),
    jdfp.DFP(16, axis=0), jdfp.BFP(7), jdfp.BFP(11, block=(3, 5)), jdfp.BFP(7, block=None, axis=-1),
    jdfp.BFP(15, block=8, axis=-1), jdfp.BFP(1),
]


# ---------------------------------------------------------------- formats as configs

def test_formats_are_frozen_hashable_and_readable():
  f = jdfp.DFP(14)
  assert hash(f) == hash(jdfp.DFP(14)) and f == jdfp.DFP(bits=14)
  assert repr(f) == "DFP(bits=14)"
  assert "block=(24, 24)" in repr(jdfp.BFP(7))
  assert repr(jdfp.FP16) == "FP16" and repr(jdfp.BF16) == "BF16"
  with pytest.raises(Exception):
    f.bits = 3  # frozen
  # usable as a static argument
  g = jax.jit(lambda x, fmt: jdfp.fake_quantize(x, fmt), static_argnums=1)
  np.testing.assert_array_equal(g(jnp.ones(3), jdfp.DFP(8)), jnp.ones(3))


@pytest.mark.parametrize("bad", [1, 17, 0, -3])
def test_bad_bits_named(bad):
  with pytest.raises(ValueError, match="bits"):
    jdfp.DFP(bad)


def test_bad_arguments_named():
  with pytest.raises(TypeError, match="bits"):
    jdfp.DFP(8.0)
  with pytest.raises(ValueError, match="mantissa_bits"):
    jdfp.BFP(16)
  with pytest.raises(ValueError, match="block"):
    jdfp.BFP(7, block=0)
  with pytest.raises(ValueError, match="rounding"):
    jdfp.quantize_array(jnp.ones(3), jdfp.DFP(8), rounding="up")
  with pytest.raises(ValueError, match="key"):
    jdfp.quantize_array(jnp.ones(3), jdfp.DFP(8), rounding="stochastic")
  with pytest.raises(TypeError, match="fmt"):
    jdfp.quantize_array(jnp.ones(3), "dfp16")
  with pytest.raises(TypeError, match="x must be a real float"):
    jdfp.quantize_array(jnp.ones(3, bool), jdfp.DFP(8))
  with pytest.raises(TypeError, match="x must be a real float"):
    jdfp.quantize_array(jnp.ones(3, jnp.complex64), jdfp.DFP(8))
  with pytest.raises(ValueError, match="axis"):
    jdfp.quantize_array(jnp.ones((2, 3)), jdfp.DFP(8, axis=2))
  with pytest.raises(TypeError, match="QArray"):
    jdfp.dequantize(jnp.ones(3))
  with pytest.raises(ValueError, match="rounding"):
    jdfp.quantize_array(jnp.ones(3), jdfp.FP16, rounding="stochastic", key=jax.random.key(0))


# ---------------------------------------------------------------- grid membership and bounds

@settings(max_examples=25, deadline=None)
@given(x=f32_arrays(ndim=(2, 3)), fmt=st.sampled_from(FORMATS), rounding=st.sampled_from(jdfp._src.numerics.formats.ROUNDING_MODES),
       seed=st.integers(0, 2**31 - 1))
def test_grid_membership(x, fmt, rounding, seed):
  """Every dequantized value is i * 2**e with |i| <= qmax and e its block's exponent."""
  q = jdfp.quantize_array(x, fmt, rounding=rounding, key=jax.random.key(seed))
  assert q.values.dtype == jnp.int16 and q.exponent.dtype == jnp.int32
  vals = np.asarray(q.values, np.int64)
  assert np.all(np.abs(vals) <= fmt.qmax)
  e_full = np.asarray(formats.expand_blocks(q.exponent, q.block_shape, x.shape), np.float64)
  deq = np.asarray(jdfp.dequantize(q), np.float64)
  np.testing.assert_array_equal(deq, (vals * np.exp2(e_full)).astype(np.float32))
  # round-tripping a grid value is the identity for DFP. (Not for BFP: its ceil(log2) rule clips a
  # power-of-two block max to 2**E - d, so re-quantizing can shrink it; that is docs/design.md §3's formula.)
  if not isinstance(fmt, jdfp.DFP):
    return
  q2 = jdfp.quantize_array(deq.astype(np.float32), fmt)
  np.testing.assert_array_equal(np.asarray(jdfp.dequantize(q2)), deq.astype(np.float32))


@settings(max_examples=25, deadline=None)
@given(x=f32_arrays(), bits=st.integers(2, 16))
def test_dfp_exponent_rule_and_nearest_error(x, bits):
  fmt = jdfp.DFP(bits)
  q = jdfp.quantize_array(x, fmt)
  m = float(np.max(np.abs(x)))
  assert int(q.exponent.reshape(())) == dfp_exponent_numpy(m, bits)
  if m >= 2.0**-126:
    e = int(q.exponent.reshape(()))
    step = 2.0**e
    err = np.abs(np.asarray(jdfp.dequantize(q), np.float64) - x.astype(np.float64))
    # nearest: half a step, except the clip of the largest element to qmax (< one step)
    clipped = np.abs(x.astype(np.float64)) > (fmt.qmax + 0.5) * step
    assert np.all(err[~clipped] <= 0.5 * step * (1 + 1e-6))
    assert np.all(err[clipped] <= step)


@settings(max_examples=30, deadline=None)
@given(x=f32_arrays(ndim=(2, 2)), mbits=st.integers(1, 15))
def test_bfp_exponent_rule_per_row(x, mbits):
  fmt = jdfp.BFP(mbits, block=None, axis=-1)
  q = jdfp.quantize_array(x, fmt)
  for r in range(x.shape[0]):
    assert int(q.exponent[r, 0]) == bfp_exponent_numpy(np.max(np.abs(x[r])), mbits)


def test_exponent_adversarial():
  """Powers of two, values just below them, the float32 extremes."""
  for m in [1.0, 2.0, 0.5, np.nextafter(np.float32(1), np.float32(0)), np.float32(3.4028235e38), 2.0**-126, 1.5]:
    x = jnp.array([m, -m / 3], jnp.float32)
    for bits in (2, 8, 14, 16):
      q = jdfp.quantize_array(x, jdfp.DFP(bits))
      assert int(q.exponent[0]) == dfp_exponent_numpy(np.float32(m), bits)
      assert abs(int(q.values[0])) >= 2 ** (bits - 2) or bits == 2  # largest lands in the top binade
    q = jdfp.quantize_array(x, jdfp.BFP(7, block=None))
    assert int(q.exponent[0]) == bfp_exponent_numpy(np.float32(m), 7)
  q = jdfp.quantize_array(jnp.array([3.4028235e38, -3.4028235e38]), jdfp.DFP(16))
  assert np.all(np.isfinite(np.asarray(jdfp.dequantize(q))))


# ---------------------------------------------------------------- rounding modes

def test_nearest_is_half_to_even():
  x = jnp.array([0.5, 1.5, 2.5, -0.5, -1.5, 100.0], jnp.float32)  # e = 0 for DFP(8): max 100 -> [64,128)
  q = jdfp.quantize_array(x, jdfp.DFP(8))
  assert int(q.exponent[0]) == 0
  np.testing.assert_array_equal(q.values, [0, 2, 2, 0, -2, 100])


def test_biased_rounding_rule():
  x = jnp.array([0.2, 0.25, 0.3, 1.24, 1.25, -0.25, -1.2, -1.26, 100.0], jnp.float32)
  q = jdfp.quantize_array(x, jdfp.DFP(8), rounding="biased")
  np.testing.assert_array_equal(q.values, [0, 1, 1, 1, 2, -1, -1, -2, 100])


def test_stochastic_unbiased_reproducible_and_key_dependent():
  x = jnp.full((200_000,), 0.3, jnp.float32).at[0].set(100.0)  # e = 0: 0.3 sits between 0 and 1
  q1 = jdfp.quantize_array(x, jdfp.DFP(8), rounding="stochastic", key=jax.random.key(1))
  q1b = jdfp.quantize_array(x, jdfp.DFP(8), rounding="stochastic", key=jax.random.key(1))
  q2 = jdfp.quantize_array(x, jdfp.DFP(8), rounding="stochastic", key=jax.random.key(2))
  chex.assert_trees_all_equal(q1, q1b)
  assert not np.array_equal(q1.values, q2.values)
  v = np.asarray(q1.values[1:], np.float64)
  assert set(np.unique(v)) <= {0.0, 1.0}
  # mean error -> 0: |mean - 0.3| within 5 standard errors of a Bernoulli(0.3) mean
  se = math.sqrt(0.3 * 0.7 / v.size)
  assert abs(v.mean() - 0.3) < 5 * se
  # nearest would be biased here (always 0)
  assert float(jnp.mean(jdfp.quantize_array(x, jdfp.DFP(8)).values[1:])) == 0.0


@settings(max_examples=15, deadline=None)
@given(y=st.floats(-1000, 1000, width=32, allow_subnormal=False), seed=st.integers(0, 2**31 - 1))
def test_stochastic_mean_property(y, seed):
  """E[round(y)] = y for any y on a fine grid: averaged over 4096 draws, within 6 standard errors."""
  x = jnp.full((4096,), y, jnp.float32).at[0].set(2000.0)  # DFP(12): e = 0, step 1
  q = jdfp.quantize_array(x, jdfp.DFP(12), rounding="stochastic", key=jax.random.key(seed))
  v = np.asarray(q.values[1:], np.float64)
  frac = float(y) - math.floor(float(y))
  assert np.all((v == math.floor(y)) | (v == math.floor(y) + 1))
  se = math.sqrt(max(frac * (1 - frac), 1e-12) / v.size)
  assert abs(v.mean() - float(y)) <= 6 * se + 1e-9


# ---------------------------------------------------------------- edge cases

def test_all_zero_and_empty_and_int_inputs():
  q = jdfp.quantize_array(jnp.zeros((3, 4)), jdfp.DFP(16))
  assert int(q.exponent.reshape(())) == formats.ZERO_EXPONENT
  np.testing.assert_array_equal(jdfp.dequantize(q), np.zeros((3, 4)))
  q = jdfp.quantize_array(jnp.zeros((0, 5)), jdfp.DFP(8, axis=-1))
  assert q.values.shape == (0, 5) and jdfp.dequantize(q).shape == (0, 5)
  q = jdfp.quantize_array(jnp.arange(10, dtype=jnp.int32), jdfp.DFP(16))
  np.testing.assert_array_equal(jdfp.dequantize(q), np.arange(10, dtype=np.float32))
  # subnormals read as zero, as everywhere on XLA:CPU (FTZ/DAZ)
  np.testing.assert_array_equal(jdfp.fake_quantize(jnp.array([1e-45, 1e-40], jnp.float32), jdfp.DFP(16)), [0, 0])


@pytest.mark.parametrize("fmt", FORMATS + [jdfp.FP16, jdfp.BF16])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_never_becomes_finite(fmt, bad):
  x = jnp.arange(48, dtype=jnp.float32).reshape(6, 8).at[2, 3].set(bad)
  deq = np.asarray(jdfp.fake_quantize(x, fmt))
  assert not np.isfinite(deq[2, 3])
  if fmt.is_integer:
    q = jdfp.quantize_array(x, fmt)
    assert int(jnp.sum(q.exponent == jdfp.NONFINITE_EXPONENT)) >= 1


def test_float_formats_cast():
  x = jnp.array([1.0, 1e-8, 70000.0, 1 / 3])
  np.testing.assert_array_equal(jdfp.fake_quantize(x, jdfp.FP16), x.astype(jnp.float16).astype(jnp.float32))
  np.testing.assert_array_equal(jdfp.fake_quantize(x, jdfp.BF16), x.astype(jnp.bfloat16).astype(jnp.float32))
  assert jdfp.quantize_array(x, jdfp.BF16).values.dtype == jnp.bfloat16


def test_block_layouts():
  x = jnp.arange(1, 61, dtype=jnp.float32).reshape(6, 10)
  assert jdfp.quantize_array(x, jdfp.BFP(7, block=(4, 4))).exponent.shape == (2, 3)
  assert jdfp.quantize_array(x, jdfp.BFP(7)).exponent.shape == (1, 1)
  assert jdfp.quantize_array(x, jdfp.DFP(8, axis=-1, block=3)).exponent.shape == (6, 4)
  assert jdfp.quantize_array(x, jdfp.DFP(8, axis=0)).exponent.shape == (1, 10)
  # a 2-D tile format on a 1-D tensor falls back to 1-D blocks of the tile's width
  assert jdfp.quantize_array(jnp.ones(50), jdfp.BFP(7)).exponent.shape == (3,)


def test_jit_vmap_grad_friendly():
  fmt = jdfp.DFP(8, axis=-1)
  x = jax.random.normal(jax.random.key(0), (4, 5, 6))
  a = jax.jit(jax.vmap(lambda v: jdfp.fake_quantize(v, fmt)))(x)
  np.testing.assert_array_equal(a, jdfp.fake_quantize(x, fmt))
  q = jax.jit(jdfp.quantize_array, static_argnums=1)(x, fmt)
  assert isinstance(q, jdfp.QArray)
  leaves = jax.tree_util.tree_leaves(q)
  assert len(leaves) == 2
