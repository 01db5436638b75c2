"""The FP16 / BF16 cast counters on the kernel (`ffi.float_stats`) equal the pure-JAX statistics of
`jdfp._src.flax.state.role_stats`, on every ISA, including the edge cases of each cast."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdfp
from jdfp._src.ffi.float_stats import float_cast_stats, float_stats
from jdfp._src.flax.state import role_stats, stats_from_float_counts
from jdfp._src.numerics import quantize as qz

FORMATS = [jdfp.FP16, jdfp.BF16]


def _edge_values():
  f16 = np.finfo(np.float16)
  return np.array([0.0, -0.0, 1.0, -3.0, float(f16.max), 65519.0, 65520.0, -7e4, 3e38, -3.4e38, float(f16.tiny),
                   float(f16.smallest_subnormal), 2.98e-8, 2.99e-8, 1e-30, -1e-38, 1e-40, -5e-45,
                   np.inf, -np.inf, np.nan], np.float32)


def _inputs():
  rng = np.random.default_rng(0)
  yield "edges", _edge_values()
  x = rng.standard_normal(70007).astype(np.float32) * np.exp2(rng.integers(-40, 40, 70007)).astype(np.float32)
  x[rng.integers(0, x.size, 50)] = np.inf
  x[rng.integers(0, x.size, 50)] = np.nan
  x[rng.integers(0, x.size, 500)] = 0.0
  yield "wide", x.reshape(7, 10001)
  yield "all_zero", np.zeros((33,), np.float32)
  yield "nonfinite_only", np.array([np.nan, np.inf, -np.inf], np.float32)


@pytest.mark.parametrize("fmt", FORMATS, ids=repr)
@pytest.mark.parametrize("name,x", list(_inputs()), ids=lambda v: v if isinstance(v, str) else "")
def test_kernel_counts_equal_the_reductions(name, x, fmt, isa):
  x = jnp.asarray(x)
  q = qz.quantize_array(x, fmt)
  want = jax.jit(lambda x: role_stats(x, q, use_kernel=False))(x)
  got = jax.jit(lambda x: stats_from_float_counts(x, float_stats(x, q.values, isa=isa)))(x)
  assert set(got) == set(want) == {"exponent", "exponent_min", "saturated", "underflow", "nonfinite", "size"}
  for k in want:
    assert float(got[k]) == float(want[k]), (k, float(got[k]), float(want[k]))
  default = role_stats(x, q, use_kernel=True)  # what the Flax statistics call
  assert {k: float(v) for k, v in default.items()} == {k: float(v) for k, v in want.items()}


def test_counts_by_hand():
  x = jnp.array([0.0, 1e-40, -3.0, 7e4, -1e-9, np.inf, np.nan, 2.5e-8, 1e-30], jnp.float32)
  amax, amin, sat, under, nonfin = np.asarray(float_stats(x, x.astype(jnp.float16)))
  assert np.array([amax, amin], np.int32).view(np.float32).tolist() == [np.float32(7e4), np.float32(1e-30)]
  assert (sat, under, nonfin) == (1, 3, 2)  # 7e4 -> Inf; -1e-9, 2.5e-8, 1e-30 -> 0; NaN, Inf
  _, _, sat, under, _ = np.asarray(float_stats(x, x.astype(jnp.bfloat16)))
  assert (sat, under) == (0, 0)  # bfloat16 has float32's range


def test_bad_input():
  x = jnp.ones((4,))
  with pytest.raises(TypeError, match="q must have dtype float16 or bfloat16"):
    float_stats(x, x)
  with pytest.raises(ValueError, match="q must have x's shape"):
    float_stats(x, jnp.ones((5,), jnp.bfloat16))
  with pytest.raises(TypeError, match="x must have dtype float32"):
    float_stats(x.astype(jnp.bfloat16), x.astype(jnp.bfloat16))


def _adversarial_bits():
  """float32 bit patterns: every exponent with significands at the casts' rounding ties and their
  neighbours (both signs), NaN payloads, subnormals, a stride over all 2**32 patterns, random ones."""
  exps = np.arange(256, dtype=np.uint32) << 23
  mants = np.array([0, 1, 2, 0x7FFF, 0x8000, 0x8001, 0x17FFF, 0x18000, 0x18001, 0xFFF, 0x1000, 0x1001, 0x2FFF,
                    0x3000, 0x3001, 0x7FFFFF, 0x7FFFFE, 0x400000, 0x400001, 0x3FFFFF, 0x7F8000, 0x7FF000], np.uint32)
  grid = (exps[:, None] | mants[None, :]).ravel()
  stride = np.arange(0, 2**32, 65537, dtype=np.uint64).astype(np.uint32)
  rand = np.random.default_rng(1).integers(0, 2**32, 2**16, dtype=np.uint64).astype(np.uint32)
  return np.concatenate([grid, grid | 0x80000000, stride, rand]).view(np.float32)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_cast_is_xla_convert_bit_for_bit(dtype, isa):
  """float_cast_stats' cast equals XLA:CPU's convert on every float32 class (ties, overflow, float16
  subnormal results, float32 subnormals, NaN payloads), plain and inside a fusion; its counters equal
  float_stats of that cast."""
  x = jnp.asarray(_adversarial_bits())
  q, counts = jax.jit(lambda a: float_cast_stats(a, dtype, isa=isa))(x)
  bits = lambda v: np.asarray(v).view(np.uint16)
  np.testing.assert_array_equal(bits(q), bits(jax.jit(lambda a: a.astype(dtype))(x)))
  fused = jax.jit(lambda a: jnp.where(a == a, a, a).astype(dtype))(x)
  np.testing.assert_array_equal(bits(q), bits(fused))
  np.testing.assert_array_equal(np.asarray(counts), np.asarray(float_stats(x, x.astype(dtype), isa=isa)))


def test_cast_stats_bad_input():
  with pytest.raises(TypeError, match="x must have dtype float32"):
    float_cast_stats(jnp.ones((4,), jnp.bfloat16), jnp.float16)
  with pytest.raises(TypeError, match="dtype must be float16 or bfloat16"):
    float_cast_stats(jnp.ones((4,)), jnp.int8)
  q, c = float_cast_stats(jnp.ones((0, 3)), jnp.bfloat16)
  assert q.shape == (0, 3) and q.dtype == jnp.bfloat16 and np.asarray(c).tolist() == [0, 0x7F800000, 0, 0, 0]
