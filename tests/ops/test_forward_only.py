"""Calls that keep no int16 copy: a forward-only op (no gradient), and ``float_residuals`` operands.
Where `convert.lazy_operands` says it pays (tiny GEMMs: both operands; from 1024^3: the "b"
operand), a per-tensor DFP operand gets only its exponent (one kernel call for all of them) and the
GEMM quantizes the float32 operand while packing; results bit-identical to the pure-JAX reference
on every path. While Flax statistics are stored, the op keeps its counting conversions (the very
calls the statistics make, merged by XLA)."""

import re
from collections import Counter

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdfp
from jdfp import kernels
from jdfp._src.ffi import library
from jdfp._src.ops import convert

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="libjdfp_ffi.so not built")

DIMS = (((1,), (0,)), ((), ()))


def _custom_calls(fn, *args) -> Counter:
  text = jax.jit(fn).lower(*args).compile().as_text()
  return Counter(re.findall(r'custom_call_target="([^"]+)"', text))


def _bits(x):
  return np.asarray(x, np.float32).view(np.int32)


def _xw(nan=False):
  x = jax.random.normal(jax.random.key(0), (48, 80)) * 3
  w = jax.random.normal(jax.random.key(1), (80, 40)) * 0.1
  if nan:
    x = x.at[3, 4].set(jnp.nan)
  return x, w


def test_forward_only_custom_calls_by_size():
  lazy_both = Counter({library.TARGET_DFP_EXPONENTS: 1, library.TARGET_Q: 1})
  x, w = jnp.ones((16, 32)), jnp.ones((32, 24))  # 16*32*24 <= 2**15: two calls
  assert _custom_calls(lambda a, b: jdfp.dot_general(a, b, DIMS), x, w) == lazy_both
  assert _custom_calls(lambda a, b: jdfp.einsum("mk,kn->mn", a, b), x, w) == lazy_both
  key = jax.random.key(2)  # dfp16: the forward rounds to nearest, so it takes the same path
  assert _custom_calls(lambda a, b: jdfp.dot_general(a, b, DIMS, policy=jdfp.policies.dfp16(), key=key),
                       x, w) == lazy_both
  x, w = _xw()  # medium: both converted (no counters), int16 GEMM
  assert _custom_calls(lambda a, b: jdfp.dot_general(a, b, DIMS), x, w) == Counter(
      {library.TARGET_QUANTIZE_DFP_NOCOUNT: 2, library.TARGET_I16: 1})
  x, w = jnp.ones((1024, 1024)), jnp.ones((1024, 1024))  # from 1024^3: only the exponent of w
  assert _custom_calls(lambda a, b: jdfp.dot_general(a, b, DIMS), x, w) == Counter(
      {library.TARGET_DFP_EXPONENTS: 1, library.TARGET_QUANTIZE_DFP_NOCOUNT: 1, library.TARGET_Q: 1})


def test_training_keeps_int16_copies_and_counts_only_the_gradient():
  x, w = _xw()
  f = jax.value_and_grad(lambda a, b: jnp.sum(jdfp.dot_general(a, b, DIMS) ** 2), argnums=(0, 1))
  calls = _custom_calls(f, x, w)
  # x and w converted once without counters, the output gradient once with them (the Flax gradient
  # statistics make that same call); forward, backward-data and weight-gradient GEMMs on int16.
  assert calls == Counter({library.TARGET_QUANTIZE_DFP_NOCOUNT: 2, library.TARGET_QUANTIZE_DFP: 1,
                           library.TARGET_I16: 3})
  lean = jdfp.Policy(float_residuals=("rhs",))
  f = jax.value_and_grad(lambda a, b: jnp.sum(jdfp.dot_general(a, b, DIMS, policy=lean) ** 2), argnums=(0, 1))
  calls = _custom_calls(f, jnp.ones((1024, 1024)), jnp.ones((1024, 1024)))
  assert calls[library.TARGET_DFP_EXPONENTS] == 1 and calls[library.TARGET_QUANTIZE_DFP_NOCOUNT] == 1
  assert calls[library.TARGET_Q] == 2 and calls[library.TARGET_I16] == 1  # fwd and dlhs read w as float32


@pytest.mark.parametrize("path", ["both", "b", "none"])
@pytest.mark.parametrize("nan", [False, True])
@pytest.mark.parametrize("case", ["matmul", "transposed", "batched", "vmap", "bits"])
def test_forward_only_is_bit_identical_to_the_reference(case, nan, path, monkeypatch):
  monkeypatch.setattr(convert, "LAZY_BOTH_MAX_WORK", 2**40 if path == "both" else 0)
  monkeypatch.setattr(convert, "LAZY_B_MIN_WORK", 0 if path == "b" else 2**62)
  x, w = _xw(nan)
  ffi, ref = jdfp.Policy(backend="ffi"), jdfp.Policy(backend="reference")
  if case == "bits":
    ffi, ref = (p.replace(lhs=jdfp.DFP(10), rhs=jdfp.DFP(6)) for p in (ffi, ref))
  if case == "transposed":
    f = lambda a, b, p: jdfp.dot_general(a, b, (((0,), (1,)), ((), ())), policy=p)
    args = (x.T, w.T)
  elif case == "batched":
    f = lambda a, b, p: jdfp.dot_general(a, b, (((2,), (1,)), ((0,), (0,))), policy=p)
    args = (x.reshape(2, 24, 80), jnp.stack([w, w * 2]))
  elif case == "vmap":
    f = lambda a, b, p: jax.vmap(lambda u: jdfp.dot_general(u, b, DIMS, policy=p))(a)
    args = (x.reshape(4, 12, 80), w)
  else:
    f = lambda a, b, p: jdfp.dot_general(a, b, DIMS, policy=p)
    args = (x, w)
  got = jax.jit(lambda a, b: f(a, b, ffi))(*args)
  want = jax.jit(lambda a, b: f(a, b, ref))(*args)
  np.testing.assert_array_equal(_bits(got), _bits(want))
  if nan:
    assert np.isnan(np.asarray(got)).any()


def test_flax_statistics_still_ride_on_the_ops_conversions():
  """Forward with the "dfp" collection mutable: the op converts with the counting call, which XLA
  merges with the statistics' own (one conversion per operand, no exponent-only call)."""
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8)(nn.relu(nn.Dense(16)(x)))

  x = jax.random.normal(jax.random.key(0), (4, 12))
  model = jdfp.quantize(MLP())
  v = model.init(jax.random.key(1), x)
  calls = _custom_calls(lambda v, x: model.apply(v, x, mutable=["dfp"]), v, x)
  assert calls == Counter({library.TARGET_QUANTIZE_DFP: 4, library.TARGET_I16: 2})
  # Inference without statistics: the forward-only path (these GEMMs are tiny: exponents only).
  calls = _custom_calls(lambda v, x: model.apply(v, x), v, x)
  assert calls == Counter({library.TARGET_DFP_EXPONENTS: 2, library.TARGET_Q: 2})
  out_stats, _ = jax.jit(lambda v, x: model.apply(v, x, mutable=["dfp"]))(v, x)
  np.testing.assert_array_equal(_bits(out_stats), _bits(jax.jit(model.apply)(v, x)))
