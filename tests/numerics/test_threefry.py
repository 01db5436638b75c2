"""Threefry-2x32 in straight-line uint32 ops (jdfp/_src/numerics/threefry.py): the same bits as
`jax.random.fold_in` of a threefry key, eager and under jit, and no XLA loop."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jdfp._src.numerics import threefry

WORD = st.integers(0, 2**32 - 1)


def _jax_fold_in(words, data):
  key = jax.random.wrap_key_data(np.asarray(words, np.uint32), impl="threefry2x32")
  return np.asarray(jax.random.key_data(jax.random.fold_in(key, data)))


@settings(max_examples=60, deadline=None)
@given(k0=WORD, k1=WORD, data=WORD)
def test_fold_in_matches_jax(k0, k1, data):
  words = np.array([k0, k1], np.uint32)
  np.testing.assert_array_equal(np.asarray(threefry.fold_in_words(words, data)), _jax_fold_in(words, data))


@pytest.mark.parametrize("data", [0, 1, 2**31, 2**32 - 1])
def test_fold_in_under_jit_and_vmap(data):
  keys = np.random.default_rng(0).integers(0, 2**32, (5, 2), dtype=np.uint64).astype(np.uint32)
  got = jax.jit(jax.vmap(lambda w: threefry.fold_in_words(w, data)))(keys)
  np.testing.assert_array_equal(np.asarray(got), np.stack([_jax_fold_in(k, data) for k in keys]))


def test_no_loop_in_the_compiled_key():
  hlo = jax.jit(lambda w: threefry.fold_in_words(w, 12345)).lower(np.zeros(2, np.uint32)).compile().as_text()
  assert "while" not in hlo and " call(" not in hlo


@pytest.mark.parametrize("data", [-1, 2**32])
def test_data_out_of_range_is_an_error(data):
  with pytest.raises(ValueError, match="data must be in"):
    threefry.fold_in_words(np.zeros(2, np.uint32), data)


def test_words_of_the_wrong_shape_is_an_error():
  with pytest.raises(ValueError, match="words must be uint32"):
    threefry.fold_in_words(np.zeros(4, np.uint32), 1)


@pytest.mark.parametrize("data", [0, 7, 2**32 - 1])
def test_fold_in_of_a_traced_count(data):
  """NNX folds in its stream's count, a traced uint32 scalar."""
  words = np.array([123, 456], np.uint32)
  got = jax.jit(threefry.fold_in_words)(words, np.uint32(data))
  np.testing.assert_array_equal(np.asarray(got), _jax_fold_in(words, data))


def test_data_of_another_dtype_is_an_error():
  with pytest.raises(ValueError, match="uint32 scalar"):
    threefry.fold_in_words(np.zeros(2, np.uint32), np.float32(1))
