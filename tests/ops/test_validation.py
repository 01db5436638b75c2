"""Bad input gets a clear error at construction or trace time; degenerate input gets lax's answer."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jdfp

MATMUL = (((1,), (0,)), ((), ()))
NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("field,value", [("isa", "avx9000"), ("axis_name", 3), ("axis_name", ("d", 2)),
                                         ("backend", "gpu"), ("fwd_rounding", "up"), ("history_length", 0)])
def test_policy_validates_every_field_when_constructed(field, value):
  with pytest.raises(ValueError, match=field):
    jdfp.Policy(**{field: value})


def test_policy_axis_name_list_becomes_hashable_tuple():
  p = jdfp.Policy(axis_name=["a", "b"])
  assert p.axis_name == ("a", "b") and hash(p) == hash(jdfp.Policy(axis_name=("a", "b")))


def test_a_batch_of_keys_is_a_clear_error():
  pol = jdfp.policies.dfp16(fwd_rounding="stochastic")
  x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
  with pytest.raises(ValueError, match=re.escape("key must be one PRNG key")):
    jdfp.dot_general(x, w, MATMUL, policy=pol, key=jax.random.split(jax.random.key(0), 4))
  # one key per call under vmap is the way
  y = jax.vmap(lambda k: jdfp.dot_general(x, w, MATMUL, policy=pol, key=k))(jax.random.split(jax.random.key(0), 4))
  assert y.shape == (4, 4, 3)


def test_unbound_axis_name_says_what_to_do():
  pol = jdfp.Policy(axis_name="wrong")
  f = jax.pmap(lambda x: jdfp.dot_general(x, jnp.ones((8, 3)), MATMUL, policy=pol), axis_name="d")
  with pytest.raises(NameError, match=r"jdfp: axis_name='wrong'.*jax.pmap"):
    f(jnp.ones((1, 4, 8)))


@pytest.mark.parametrize("backend", ["ffi", "reference"])
def test_kernel_larger_than_input_gives_lax_empty_result(backend):
  x, w = jnp.ones((1, 3, 3, 2)), jnp.ones((5, 5, 2, 4))
  want = lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=NHWC)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no misleading warning either
    got = jdfp.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=NHWC, policy=jdfp.Policy(backend=backend))
    g = jax.grad(lambda a: jnp.sum(jdfp.conv_general_dilated(a, w, (1, 1), "VALID", dimension_numbers=NHWC)))(x)
  assert got.shape == want.shape == (1, 0, 0, 4)
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_zero_input_channels_give_zeros_without_a_block_format_warning():
  x, w = jnp.ones((1, 3, 3, 0)), jnp.ones((2, 2, 0, 4))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = jdfp.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=NHWC)
  np.testing.assert_array_equal(np.asarray(got), np.zeros((1, 2, 2, 4), np.float32))


def test_empty_contraction_gives_zeros_like_lax():
  x, w = jnp.ones((3, 0)), jnp.ones((0, 2))
  np.testing.assert_array_equal(np.asarray(jdfp.dot_general(x, w, MATMUL)), np.zeros((3, 2)))
  out, state = jdfp.dot_general(x, w, MATMUL, policy=jdfp.Policy(scaling="delayed"),
                                scale_state=jdfp.init_scale_state(jdfp.Policy(scaling="delayed")))
  assert out.shape == (3, 2)


@pytest.mark.parametrize("dims", [(((4,), (0,)), ((), ())), (((-2,), (0,)), ((), ())), (((1,), (2,)), ((), ())),
                                  (((1, 1), (0, 0)), ((), ())), (((1,), (0,)), ((0,), ()))])
def test_invalid_dimension_numbers_raise_what_lax_raises(dims):
  x, w = jnp.ones((4, 8, 2)), jnp.ones((8, 3))
  with pytest.raises(Exception) as lax_err:
    lax.dot_general(x, w, dims)
  with pytest.raises(type(lax_err.value)):
    jdfp.dot_general(x, w, dims)
