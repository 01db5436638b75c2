"""Stochastic and biased rounding on the C++ conversion kernels (xla_ffi/philox.h, quantize_*.cc):
bit for bit the pure-JAX quantizer on every ISA, the Philox stream read back through the kernel,
unbiasedness, the qmax bound, keys under vmap, and argument errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdfp
from jdfp import kernels
from jdfp._src.ffi import quantize as fq
from jdfp._src.numerics import philox
from jdfp._src.numerics import quantize as qz
from jdfp._src.numerics.formats import NONFINITE_EXPONENT

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="libjdfp_ffi.so not built")

ROUNDINGS = ("stochastic", "biased")
# Odd sizes (not multiples of 4 / 16 / 64), and sizes past one 64 Ki chunk so several threads convert
# chunks of one tensor (the counters must follow the global index across chunk boundaries).
SHAPES = [(1,), (3,), (5, 7), (64,), (67,), (4, 33), (3, 65537), (262147,)]
CASES = ("normal", "quarters", "nan", "inf", "zeros")


@functools.lru_cache(maxsize=None)
def _input(shape, case) -> np.ndarray:
  n = int(np.prod(shape))
  rng = np.random.default_rng(n)
  x = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)).astype(np.float32)
  if case == "quarters":  # fractions right at the biased rule's 1/4 and on the stochastic grid
    x = ((np.arange(n) % 64) - 32 + (np.arange(n) % 4) * 0.25).astype(np.float32)
  elif case == "nan":
    x[n // 2] = np.nan
  elif case == "inf":
    x[n - 1] = -np.inf
  elif case == "zeros":
    x[:] = 0.0
  return x.reshape(shape)


@functools.lru_cache(maxsize=None)
def _reference(shape, case, bits, rounding):
  """(values, exponent) of the pure-JAX quantizer: exponent from the max, and with a given exponent
  two steps too small (saturation)."""
  x = jnp.asarray(_input(shape, case))
  key = jax.random.key(sum(shape) + bits) if rounding == "stochastic" else None
  q = qz.quantize_array(x, jdfp.DFP(bits), rounding=rounding, key=key)
  e_small = jnp.where(q.exponent == NONFINITE_EXPONENT, q.exponent, q.exponent - 2)
  q_small = qz.quantize_given_exponent(x, e_small, jdfp.DFP(bits), rounding, key, x.shape)
  return key, np.asarray(q.values), np.asarray(q.exponent), np.asarray(e_small), np.asarray(q_small.values)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_kernel_equals_reference_bit_for_bit(isa, shape, rounding):
  bit_set = (8, 12, 14, 16) if int(np.prod(shape)) < 2**16 else (8, 16)
  for case in CASES:
    x = jnp.asarray(_input(shape, case))
    for bits in bit_set:
      key, want, e_want, e_small, want_small = _reference(shape, case, bits, rounding)
      v, e = fq.quantize_dfp(x, bits=bits, isa=isa, rounding=rounding, key=key)
      np.testing.assert_array_equal(np.asarray(e), e_want, err_msg=f"{case} bits={bits}")
      np.testing.assert_array_equal(np.asarray(v), want, err_msg=f"{case} bits={bits}")
      v2, e2, counts = fq.quantize_dfp_with_stats(x, bits=bits, isa=isa, rounding=rounding, key=key)
      np.testing.assert_array_equal(np.asarray(v2), want)
      np.testing.assert_array_equal(np.asarray(counts), np.asarray(
          kernels.quant_stats(x, jnp.asarray(want), jnp.asarray(e_want), bits=bits, isa="scalar")))
      # Exponent given (the pmap / shard_map and delayed-scaling entry), here one that saturates.
      v3 = fq.quantize(x, jnp.asarray(e_small), bits=bits, isa=isa, rounding=rounding, key=key)
      np.testing.assert_array_equal(np.asarray(v3), want_small, err_msg=f"{case} bits={bits} (given)")
      if case in ("nan", "inf"):
        assert e_want.ravel()[0] == NONFINITE_EXPONENT and not want.any()


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_chunk_boundaries_and_unaligned_ranges(isas, rounding):
  """A tensor of 3 chunks + 13: every ISA gives the scalar kernel's values (which read the global
  element index), so no chunk restarts the stream."""
  x = jnp.asarray(np.random.default_rng(3).uniform(-100, 100, 3 * 2**16 + 13).astype(np.float32))
  key = jax.random.key(9)
  outs = [np.asarray(fq.quantize_dfp(x, bits=12, isa=i, rounding=rounding, key=key)[0]) for i in isas]
  for o in outs[1:]:
    np.testing.assert_array_equal(o, outs[0])
  # A slice of the tensor is not a chunk of it: its elements draw other counters (stochastic).
  head = np.asarray(fq.quantize(x[2**16:], jnp.full((1,), -4, jnp.int32), bits=12, isa=isas[-1],
                                rounding=rounding, key=key))
  full = np.asarray(fq.quantize(x, jnp.full((1,), -4, jnp.int32), bits=12, isa=isas[-1], rounding=rounding, key=key))
  if rounding == "stochastic":
    assert (head != full[2**16:]).any()
  else:
    np.testing.assert_array_equal(head, full[2**16:])


def test_kernel_reproduces_the_philox_known_answer(isas):
  """Read the top 24 bits of the words back through the kernel by bisection: element i rounds up
  iff (word_i >> 8) < t_i for y_i = t_i * 2**-24. Key (0, 0), block 0 is Random123's first KAT."""
  n = 8
  key = jnp.zeros((2,), jnp.uint32)
  want = np.asarray(philox.philox_bits(key, (n,))) >> 8
  assert [int(w) for w in want[:4]] == [v >> 8 for v in (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)]
  e = jnp.full((1,), 24, jnp.int32)  # y = x * 2**-24
  for isa in isas:
    lo, hi = np.zeros(n, np.int64), np.full(n, 2**24, np.int64)  # w24 + 1 in (lo, hi]
    while (hi - lo > 1).any():
      t = (lo + hi) // 2
      up = np.asarray(fq.quantize(jnp.asarray(t.astype(np.float32)), e, bits=16, isa=isa, rounding="stochastic",
                                  key=key)) == 1
      hi, lo = np.where(up, t, hi), np.where(up, lo, t)
    np.testing.assert_array_equal(hi - 1, want, err_msg=isa)


@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("frac", [0.5, 1 / 3, 0.01, 0.99])
def test_kernel_stochastic_is_unbiased(bits, frac):
  n = 10**6
  y = np.float32(-5 - frac)
  x = jnp.full((n,), y, jnp.float32)
  v = np.asarray(fq.quantize(x, jnp.zeros((1,), jnp.int32), bits=bits, rounding="stochastic",
                             key=jax.random.key(bits)), np.float64)
  f = 6 - abs(np.float64(y))
  sigma = np.sqrt(f * (1 - f) / n)
  assert abs((v - np.float64(y)).mean()) <= 4 * sigma
  assert set(np.unique(v)) <= {-6.0, -5.0}


@pytest.mark.parametrize("bits", [8, 16])
def test_kernel_never_exceeds_qmax(isa, bits):
  qm = jdfp.DFP(bits).qmax
  y = np.array([qm - 0.5, qm - 2.0**-10, qm, qm + 0.3, -(qm - 0.5), -qm - 0.7, np.inf, -np.inf], np.float32)
  x = jnp.asarray(np.tile(y, 2048))
  for rounding in ROUNDINGS:
    v = np.asarray(fq.quantize(x, jnp.zeros((1,), jnp.int32), bits=bits, isa=isa, rounding=rounding,
                               key=jax.random.key(0))).reshape(-1, len(y))
    assert v.max() == qm and v.min() == -qm
    assert (v[:, 2:4] == qm).all() and (v[:, 6] == qm).all() and (v[:, 7] == -qm).all()
  assert (v[:, 0] == qm).all()  # biased: a fraction of 1/2 rounds the magnitude up


def test_keys_under_vmap_give_distinct_streams():
  x = jnp.full((4097,), 0.5, jnp.float32)
  e = jnp.zeros((1,), jnp.int32)
  keys = jax.random.split(jax.random.key(1), 3)
  f = jax.jit(jax.vmap(lambda k: fq.quantize(x, e, bits=8, rounding="stochastic", key=k)))
  out = np.asarray(f(keys))
  g = jax.vmap(lambda k: fq.quantize_dfp(x, bits=8, rounding="stochastic", key=k)[0])(keys)
  for i in range(3):
    np.testing.assert_array_equal(out[i], np.asarray(fq.quantize(x, e, bits=8, rounding="stochastic", key=keys[i])))
    np.testing.assert_array_equal(np.asarray(g[i]), np.asarray(
        qz.quantize_array(x, jdfp.DFP(8), rounding="stochastic", key=keys[i]).values))
  assert len({bytes(o) for o in out}) == 3
  # Independent: the round-up indicators of two keys are uncorrelated.
  n = 10**6
  ups = [np.asarray(fq.quantize(jnp.full((n,), 0.5, jnp.float32), e, bits=8, rounding="stochastic", key=k),
                    np.float64) for k in keys[:2]]
  assert abs(np.corrcoef(*ups)[0, 1]) < 4 / np.sqrt(n)


def test_same_key_same_bits_and_raw_keys():
  x = jnp.asarray(_input((1000,), "normal"))
  a = fq.quantize_dfp(x, bits=14, rounding="stochastic", key=jax.random.key(4))[0]
  b = fq.quantize_dfp(x, bits=14, rounding="stochastic", key=jax.random.key(4))[0]
  c = fq.quantize_dfp(x, bits=14, rounding="stochastic", key=jax.random.PRNGKey(4))[0]  # same two words
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, c)


def test_arguments():
  x = jnp.ones((10,), jnp.float32)
  e = jnp.zeros((1,), jnp.int32)
  with pytest.raises(ValueError, match="rounding must be one of"):
    fq.quantize(x, e, bits=8, rounding="up")
  with pytest.raises(ValueError, match="needs a PRNG key"):
    fq.quantize_dfp(x, bits=8, rounding="stochastic")
  with pytest.raises(ValueError, match="needs a PRNG key"):
    fq.quantize_dfp_with_stats(x, bits=8, rounding="stochastic")
  with pytest.raises(TypeError, match="key"):
    fq.quantize(x, e, bits=8, rounding="stochastic", key=jnp.zeros(2, jnp.float32))
  # Nearest and biased ignore a key (a policy's key may be passed whatever the rounding).
  for r in ("nearest", "biased"):
    np.testing.assert_array_equal(fq.quantize(x * 0.3, e, bits=8, rounding=r, key=jax.random.key(0)),
                                  fq.quantize(x * 0.3, e, bits=8, rounding=r))


def test_ops_convert_stochastic_on_the_kernel():
  """The ops' conversion takes the kernel for stochastic / biased per-tensor DFP, bit-identical."""
  from jdfp._src.ffi import library
  from jdfp._src.ops import convert
  x = jnp.asarray(_input((6, 50), "normal"))
  key = jax.random.key(2)
  for r in ROUNDINGS:
    k = key if r == "stochastic" else None
    f = lambda x: convert.quantize_blocks(x, jdfp.DFP(14), x.shape, rounding=r, key=k, use_kernel=True).values
    assert library.TARGET_QUANTIZE_DFP_NOCOUNT in str(jax.make_jaxpr(f)(x))
    np.testing.assert_array_equal(f(x), qz.quantize_array(x, jdfp.DFP(14), rounding=r, key=k).values)
