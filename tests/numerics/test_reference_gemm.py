"""The exact reference GEMM: the documented chain/spill order, exactness, and overflow safety."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jdfp
from jdfp._src.numerics import reference
from jdfp._src.numerics.reference import exact_dot_float64, reference_gemm_numpy


def random_operands(rng, bsz, m, k, n, bits_a, bits_b, block_k=None, erange=(-30, 10)):
  qa, qb = 2 ** (bits_a - 1) - 1, 2 ** (bits_b - 1) - 1
  a = rng.integers(-qa, qa + 1, (bsz, m, k)).astype(np.int16)
  b = rng.integers(-qb, qb + 1, (bsz, k, n)).astype(np.int16)
  kb = 1 if block_k is None else max(1, -(-k // block_k))
  ea = rng.integers(*erange, (bsz, m, kb)).astype(np.int32)
  eb = rng.integers(*erange, (bsz, kb, n)).astype(np.int32)
  return a, b, ea, eb


def bits_equal(x, y):
  np.testing.assert_array_equal(np.asarray(x, np.float32).view(np.int32), np.asarray(y, np.float32).view(np.int32))


@pytest.mark.parametrize("bits_a,bits_b,expected", [(16, 16, 2), (15, 15, 8), (14, 14, 32), (13, 13, 128),
                                                   (12, 12, 512), (8, 8, 133144), (16, 8, 516), (2, 2, 2**20)])
def test_safe_chain_length_table(bits_a, bits_b, expected):
  assert jdfp.safe_chain_length(bits_a, bits_b) == expected  # docs/design.md §2's table
  L = expected
  assert L * (2 ** (bits_a - 1) - 1) * (2 ** (bits_b - 1) - 1) <= 2**31 - 1


def test_safe_chain_length_rejects_bad_bits():
  with pytest.raises(ValueError, match="bits_a"):
    jdfp.safe_chain_length(17, 8)
  with pytest.raises(ValueError, match="bits_b"):
    jdfp.safe_chain_length(8, 1)


def test_chain_layout_never_straddles_blocks():
  idx, blk = reference.chain_layout(k=50, block_k=24, chain=8)
  assert idx.shape == (9, 8)  # 3 chains per block of 24 (the last block has 2 elements)
  for c in range(idx.shape[0]):
    ks = idx[c][idx[c] >= 0]
    if ks.size:
      assert len(set(ks // 24)) == 1 and set(ks // 24) == {blk[c]}
  assert sorted(idx[idx >= 0].tolist()) == list(range(50))


@settings(max_examples=25, deadline=None)
@given(bits_a=st.integers(2, 16), bits_b=st.integers(2, 16), m=st.integers(1, 5), k=st.integers(1, 90),
       n=st.integers(1, 5), block_k=st.one_of(st.none(), st.integers(1, 40)), seed=st.integers(0, 2**32 - 1))
def test_jax_reference_equals_numpy_contract(bits_a, bits_b, m, k, n, block_k, seed):
  rng = np.random.default_rng(seed)
  ops = random_operands(rng, 2, m, k, n, bits_a, bits_b, block_k)
  got = jdfp.reference_gemm(*ops, bits_a=bits_a, bits_b=bits_b, block_k=block_k)
  bits_equal(got, reference_gemm_numpy(*ops, bits_a=bits_a, bits_b=bits_b, block_k=block_k))


def test_result_independent_of_scan_chunking():
  rng = np.random.default_rng(0)
  ops = random_operands(rng, 1, 7, 333, 5, 14, 14, block_k=None)
  r1 = jdfp.reference_gemm(*ops, bits_a=14, bits_b=14, chains_per_step=1)
  r2 = jdfp.reference_gemm(*ops, bits_a=14, bits_b=14, chains_per_step=7)
  bits_equal(r1, r2)


@pytest.mark.parametrize("bits", [4, 8, 10])
def test_exact_when_sums_fit_float32(bits):
  """With K * qmax**2 < 2**24 every partial sum is a float32 integer: the result is exact."""
  rng = np.random.default_rng(bits)
  q = 2 ** (bits - 1) - 1
  k = max(1, (2**24 - 1) // (q * q) // 2)
  k = min(k, 4096)
  ops = random_operands(rng, 2, 3, k, 4, bits, bits, erange=(-20, 0))
  got = np.asarray(jdfp.reference_gemm(*ops, bits_a=bits, bits_b=bits), np.float64)
  np.testing.assert_array_equal(got, exact_dot_float64(*ops))


@pytest.mark.parametrize("bits,k", [(16, 2), (16, 3), (16, 4097), (15, 10_001), (14, 65_536), (12, 100_000)])
def test_all_max_inputs_never_wrap(bits, k):
  """Adversarial: every product is qmax**2; a plain int32 sum of K of them would wrap."""
  q = 2 ** (bits - 1) - 1
  a = np.full((1, 2, k), q, np.int16)
  a[0, 1] = -q
  b = np.full((1, k, 3), q, np.int16)
  ea = np.zeros((1, 2, 1), np.int32)
  eb = np.zeros((1, 1, 3), np.int32)
  got = np.asarray(jdfp.reference_gemm(a, b, ea, eb, bits_a=bits, bits_b=bits), np.float64)
  exact = float(k) * q * q
  if k * q * q > 2**31 - 1:
    assert np.int64(k * q * q).astype(np.int32) != k * q * q  # what a wrapping int32 dot would get wrong
  # Each chain sum converts with relative error <= 2**-24, each add likewise: bound (chains+1) ulps.
  chains = -(-k // jdfp.safe_chain_length(bits, bits))
  bound = exact * (chains + 1) * 2.0**-24
  np.testing.assert_allclose(got[0, 0], exact, rtol=0, atol=bound)
  np.testing.assert_allclose(got[0, 1], -exact, rtol=0, atol=bound)


def test_error_bound_random_large_k():
  rng = np.random.default_rng(7)
  ops = random_operands(rng, 1, 8, 4096, 8, 16, 16, erange=(-16, -14))
  got = np.asarray(jdfp.reference_gemm(*ops, bits_a=16, bits_b=16), np.float64)
  exact = exact_dot_float64(*ops)
  a, b, ea, eb = ops
  mag = exact_dot_float64(np.abs(a.astype(np.int64)).astype(np.int16), np.abs(b.astype(np.int64)).astype(np.int16), ea, eb)
  chains = 4096 // 2
  assert np.all(np.abs(got - exact) <= mag * (chains + 1) * 2.0**-24)


def test_blocked_exponents_scale_each_block():
  """KB > 1: block j's products carry 2**(ea_j + eb_j)."""
  a = np.ones((1, 1, 6), np.int16)
  b = np.ones((1, 6, 1), np.int16)
  ea = np.array([[[0, 1, 2]]], np.int32)
  eb = np.array([[[0], [0], [-3]]], np.int32)
  got = float(jdfp.reference_gemm(a, b, ea, eb, bits_a=8, bits_b=8, block_k=2)[0, 0, 0])
  assert got == 2 * 1 + 2 * 2 + 2 * 0.5


def test_nonfinite_exponent_gives_nan():
  rng = np.random.default_rng(1)
  a, b, ea, eb = random_operands(rng, 1, 3, 10, 4, 8, 8)
  ea[0, 1, 0] = jdfp.NONFINITE_EXPONENT
  eb[0, 0, 2] = jdfp.NONFINITE_EXPONENT
  got = np.asarray(jdfp.reference_gemm(a, b, ea, eb, bits_a=8, bits_b=8))
  assert np.all(np.isnan(got[0, 1])) and np.all(np.isnan(got[0, :, 2]))
  assert np.all(np.isfinite(np.delete(np.delete(got[0], 1, 0), 2, 1)))


def test_extreme_exponents_scale_in_two_steps():
  a = np.full((1, 1, 2), 3, np.int16)
  b = np.full((1, 2, 1), 5, np.int16)
  for e, expected in [(-140, 30 * 2.0**-140), (-200, 0.0), (100, 30 * 2.0**100), (200, np.inf)]:
    ea = np.array([[[e // 2]]], np.int32)
    eb = np.array([[[e - e // 2]]], np.int32)
    got = float(jdfp.reference_gemm(a, b, ea, eb, bits_a=8, bits_b=8)[0, 0, 0])
    # XLA:CPU flushes subnormal results to zero.
    if 0 < abs(expected) < 2.0**-126:
      expected = 0.0
    assert got == np.float32(expected)


def test_bad_arguments():
  a = jnp.zeros((1, 2, 3), jnp.int16)
  b = jnp.zeros((1, 3, 4), jnp.int16)
  ea = jnp.zeros((1, 2, 1), jnp.int32)
  eb = jnp.zeros((1, 1, 4), jnp.int32)
  with pytest.raises(TypeError, match="a must be int16"):
    jdfp.reference_gemm(a.astype(jnp.float32), b, ea, eb, bits_a=8, bits_b=8)
  with pytest.raises(ValueError, match="b must have shape"):
    jdfp.reference_gemm(a, b[:, :2], ea, eb, bits_a=8, bits_b=8)
  with pytest.raises(ValueError, match="ea must have shape"):
    jdfp.reference_gemm(a, b, ea, eb, bits_a=8, bits_b=8, block_k=1)
  with pytest.raises(ValueError, match="bits_a"):
    jdfp.reference_gemm(a, b, ea, eb, bits_a=20, bits_b=8)
