"""Philox-4x32-10 in pure JAX (jdfp/_src/numerics/philox.py): the Random123 known answers, the counter
layout of docs/arithmetic.md, key handling, jit/vmap, and the stochastic rounding built on it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jdfp
from jdfp._src.numerics import philox
from jdfp._src.numerics import quantize as qz

# Random123's published known-answer vectors of philox4x32_10: (counter, key, output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_known_answers(ctr, key, want):
  got = philox.philox4x32([np.uint32(c) for c in ctr], [np.uint32(k) for k in key])
  assert tuple(int(g) for g in got) == want
  # The same under jit (traced counters and key).
  got = jax.jit(philox.philox4x32)(tuple(jnp.uint32(c) for c in ctr), tuple(jnp.uint32(k) for k in key))
  assert tuple(int(g) for g in got) == want


def _philox_np(c, k):
  """numpy uint64 reference of one Philox-4x32-10 block."""
  c0, c1, c2, c3 = (int(v) for v in c)
  k0, k1 = (int(v) for v in k)
  m = 0xFFFFFFFF
  for r in range(10):
    if r:
      k0, k1 = (k0 + philox.PHILOX_W0) & m, (k1 + philox.PHILOX_W1) & m
    p0, p1 = philox.PHILOX_M0 * c0, philox.PHILOX_M1 * c2
    c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & m, (p0 >> 32) ^ c3 ^ k1, p0 & m
  return c0, c1, c2, c3


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=6, max_size=6))
def test_matches_a_uint64_reference(words):
  got = philox.philox4x32([np.uint32(w) for w in words[:4]], [np.uint32(w) for w in words[4:]])
  assert tuple(int(g) for g in got) == _philox_np(words[:4], words[4:])


def test_bits_follow_the_counter_contract():
  """Element i is word i % 4 of block (i // 4, 0, 0, 0), row-major over the whole shape."""
  key = jax.random.key(5)
  k = np.asarray(jax.random.key_data(key))
  bits = np.asarray(philox.philox_bits(key, (3, 7)))  # 21 elements: 6 blocks, the last one partial
  flat = bits.reshape(-1)
  for i in range(21):
    assert int(flat[i]) == _philox_np((i // 4, 0, 0, 0), k)[i % 4], i
  assert philox.philox_bits(key, (0, 4)).shape == (0, 4)
  assert philox.philox_bits(key, ()).shape == ()


def test_key_words():
  k = jax.random.key(7)
  np.testing.assert_array_equal(philox.key_words(k), jax.random.key_data(k))
  raw = jax.random.PRNGKey(7)
  np.testing.assert_array_equal(philox.key_words(raw), raw)
  rbg = jax.random.key(7, impl="rbg")  # another impl: two words of its own bits
  np.testing.assert_array_equal(philox.key_words(rbg), jax.random.bits(rbg, (2,), jnp.uint32))
  with pytest.raises(ValueError, match="key"):
    philox.key_words(None)
  with pytest.raises(TypeError, match="key"):
    philox.key_words(jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="single PRNG key"):
    philox.key_words(jax.random.split(k, 3))
  with pytest.raises(ValueError, match="key"):
    philox.key_words(jnp.zeros(3, jnp.uint32))


def test_same_key_same_bits_vmap_gives_distinct_streams():
  keys = jax.random.split(jax.random.key(0), 4)
  batched = jax.jit(jax.vmap(lambda kk: philox.philox_bits(kk, (1001,))))(keys)
  for i in range(4):
    np.testing.assert_array_equal(batched[i], philox.philox_bits(keys[i], (1001,)))
  assert len({bytes(np.asarray(b)) for b in batched}) == 4
  np.testing.assert_array_equal(philox.philox_bits(keys[0], (9,)), philox.philox_bits(keys[0], (9,)))


def test_streams_of_different_keys_are_uncorrelated():
  n = 2**20
  a = np.asarray(philox.philox_bits(jax.random.key(1), (n,)) >> 8).astype(np.float64)
  b = np.asarray(philox.philox_bits(jax.random.key(2), (n,)) >> 8).astype(np.float64)
  # Correlation of independent uniforms: sd 1/sqrt(n) ~ 0.001.
  assert abs(np.corrcoef(a, b)[0, 1]) < 4 / np.sqrt(n)
  # Neighbouring elements (same block, next block) of one stream too.
  assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 4 / np.sqrt(n)
  assert abs(np.corrcoef(a[:-4], a[4:])[0, 1]) < 4 / np.sqrt(n)
  assert abs(a.mean() / 2**24 - 0.5) < 4 * np.sqrt(1 / 12 / n)


# ------------------------------------------------------------------------------------------------
# Stochastic rounding in the pure-JAX quantizer.


@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("frac", [0.5, 1 / 3, 0.01, 0.99, 2.0**-20])
def test_stochastic_rounding_is_unbiased(bits, frac):
  """10^6 samples of low + frac: the mean rounding error is within 4 sigma of 0."""
  n = 10**6
  y = np.float32(3 + frac)
  x = jnp.full((n,), y, jnp.float32)
  fmt = jdfp.DFP(bits)
  q = qz.quantize_given_exponent(x, jnp.zeros((1,), jnp.int32), fmt, "stochastic", jax.random.key(bits), (n,))
  err = np.asarray(q.values, np.float64) - np.float64(y)
  f = np.float64(y) - 3
  sigma = np.sqrt(f * (1 - f) / n)
  assert abs(err.mean()) <= 4 * sigma, (err.mean(), sigma)
  assert set(np.unique(np.asarray(q.values))) <= {3, 4}


@pytest.mark.parametrize("bits", [8, 16])
def test_stochastic_never_exceeds_qmax(bits):
  fmt = jdfp.DFP(bits)
  qm = fmt.qmax
  y = np.array([qm - 0.5, qm - 1e-3, qm, qm + 0.3, qm + 7.9, -(qm - 0.5), -qm - 0.7], np.float32)
  x = jnp.asarray(np.tile(y, 4096))
  q = qz.quantize_given_exponent(x, jnp.zeros((1,), jnp.int32), fmt, "stochastic", jax.random.key(0), x.shape)
  v = np.asarray(q.values).reshape(-1, len(y))
  assert v.max() == qm and v.min() == -qm
  assert (v[:, 0] == qm).any() and (v[:, 0] == qm - 1).any()  # rounds up to qmax, sometimes
  assert (v[:, 2:5] == qm).all()


def test_stochastic_reference_uses_the_philox_stream():
  """round_to_int's stochastic branch compares (philox word >> 8) * 2**-24 with the fraction."""
  y = jnp.asarray(np.random.default_rng(0).uniform(-50, 50, 999).astype(np.float32))
  key = jax.random.key(11)
  got = np.asarray(qz.round_to_int(y, "stochastic", key))
  u = (np.asarray(philox.philox_bits(key, y.shape)) >> 8).astype(np.float32) * np.float32(2.0**-24)
  low = np.floor(np.asarray(y))
  np.testing.assert_array_equal(got, low + (u < np.asarray(y) - low))


def test_split_words_children_are_distinct_keys_and_deterministic():
  from jdfp._src.numerics.philox import fold_in_words, key_words, split_words
  seen = set()
  for seed in range(50):
    parent = jax.random.key(seed)
    kids = split_words(parent, 3)
    grandkids = [g for k in kids for g in split_words(k, 2)]
    words = [tuple(np.asarray(key_words(parent)).tolist())] + [tuple(np.asarray(k).tolist()) for k in kids + tuple(grandkids)]
    assert len(set(words)) == len(words), "a child key equals its parent, a sibling or a cousin"
    seen.update(words)
    for i, k in enumerate(kids):  # fold_in_words(key, i) is child i, alone
      np.testing.assert_array_equal(np.asarray(fold_in_words(parent, i)), np.asarray(k))
    np.testing.assert_array_equal(np.asarray(split_words(parent, 3)[2]), np.asarray(kids[2]))
  assert len(seen) == 50 * 10
  with pytest.raises(ValueError, match="data"):
    fold_in_words(jax.random.key(0), -1)


def test_split_children_give_uncorrelated_streams():
  from jdfp._src.numerics.philox import philox_bits, split_words
  a, b = split_words(jax.random.key(123), 2)
  u = np.asarray(philox_bits(a, (1 << 16,)) >> 8).astype(np.float64)
  v = np.asarray(philox_bits(b, (1 << 16,)) >> 8).astype(np.float64)
  r = np.corrcoef(u, v)[0, 1]
  assert abs(r) < 4 / np.sqrt(u.size)  # 4 sigma of the sample correlation of independent streams
  assert abs(u.mean() / 2**24 - 0.5) < 4 * np.sqrt(1 / 12 / u.size)
