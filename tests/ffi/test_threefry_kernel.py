"""The threefry fold-in kernel (`JdfpThreefryFoldIn`): bit for bit `jax.random.fold_in`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdfp._src.ffi import threefry as ffi_threefry
from jdfp._src.numerics import threefry

pytestmark = pytest.mark.skipif(not ffi_threefry.runs_here(), reason="needs the C++ kernel on CPU")


def _jax_fold_in(words, data):
  key = jax.random.wrap_key_data(jnp.asarray(words, jnp.uint32), impl="threefry2x32")
  return np.asarray(jax.random.key_data(jax.random.fold_in(key, data)))


@pytest.mark.parametrize("seed", range(4))
def test_matches_jax_fold_in(seed):
  rng = np.random.default_rng(seed)
  edges = [0, 1, 2**31 - 1, 2**31, 2**32 - 1]
  for words in [rng.integers(0, 2**32, 2, dtype=np.uint64).astype(np.uint32), np.zeros(2, np.uint32),
                np.full(2, 2**32 - 1, np.uint32)]:
    for data in edges + [int(d) for d in rng.integers(0, 2**32, 8, dtype=np.uint64)]:
      got = np.asarray(jax.jit(ffi_threefry.fold_in_words, static_argnums=1)(words, data))
      np.testing.assert_array_equal(got, _jax_fold_in(words, data))
      np.testing.assert_array_equal(got, np.asarray(threefry.fold_in_words(words, data)))


def test_traced_data_and_key_under_jit_and_vmap():
  rng = np.random.default_rng(7)
  keys = rng.integers(0, 2**32, (6, 2), dtype=np.uint64).astype(np.uint32)
  data = rng.integers(0, 2**32, 6, dtype=np.uint64).astype(np.uint32)
  want = np.stack([_jax_fold_in(k, int(d)) for k, d in zip(keys, data)])
  got = jax.jit(jax.vmap(ffi_threefry.fold_in_words))(keys, data)
  np.testing.assert_array_equal(np.asarray(got), want)
  # a batched key with one data word, and one key with batched data
  got = jax.vmap(lambda k: ffi_threefry.fold_in_words(k, jnp.uint32(5)))(keys)
  np.testing.assert_array_equal(np.asarray(got), np.stack([_jax_fold_in(k, 5) for k in keys]))
  got = jax.vmap(lambda d: ffi_threefry.fold_in_words(keys[0], d))(data)
  np.testing.assert_array_equal(np.asarray(got), np.stack([_jax_fold_in(keys[0], int(d)) for d in data]))


def test_distinct_data_give_distinct_keys():
  words = np.array([123, 456], np.uint32)
  outs = {tuple(np.asarray(ffi_threefry.fold_in_words(words, d)).tolist()) for d in range(256)}
  assert len(outs) == 256


def test_bad_input():
  with pytest.raises(ValueError, match="data must be in"):
    ffi_threefry.fold_in_words(np.zeros(2, np.uint32), -1)
  with pytest.raises(ValueError, match="data must be an int or a uint32 scalar"):
    ffi_threefry.fold_in_words(np.zeros(2, np.uint32), jnp.zeros((2,), jnp.uint32))
  with pytest.raises(ValueError, match="words must be uint32\\[2\\]"):
    ffi_threefry.fold_in_words(np.zeros(3, np.uint32), 1)


def test_kernel_rejects_bad_shapes():
  # The FFI handler's own checks, reached by calling the target directly.
  from jdfp._src.ffi.library import TARGET_THREEFRY_FOLD_IN
  call = jax.ffi.ffi_call(TARGET_THREEFRY_FOLD_IN, jax.ShapeDtypeStruct((3,), jnp.uint32))
  with pytest.raises(Exception, match="key must be uint32 \\[..., 2\\]"):
    jax.block_until_ready(call(jnp.zeros((3,), jnp.uint32), jnp.uint32(1)))
  call = jax.ffi.ffi_call(TARGET_THREEFRY_FOLD_IN, jax.ShapeDtypeStruct((2, 2), jnp.uint32))
  with pytest.raises(Exception, match="data must have one element or one per key"):
    jax.block_until_ready(call(jnp.zeros((2, 2), jnp.uint32), jnp.zeros((3,), jnp.uint32)))
  call = jax.ffi.ffi_call(TARGET_THREEFRY_FOLD_IN, jax.ShapeDtypeStruct((2,), jnp.uint32))
  with pytest.raises(Exception, match="must be uint32"):
    jax.block_until_ready(call(jnp.zeros((2,), jnp.int32), jnp.uint32(1)))
