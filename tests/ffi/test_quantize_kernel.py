"""The C++ float32 -> int16 DFP conversion (kernels.quantize / quantize_dfp) against the pure-JAX
quantizer, bit for bit, on every ISA; and its use by the ops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jdfp
from jdfp import kernels
from jdfp._src.ffi import library
from jdfp._src.ops import convert
from jdfp._src.numerics import quantize as qz

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="libjdfp_ffi.so not built")

NONFINITE = 2**30


def _adversarial(rng, n, case):
  """float32 vectors that stress the conversion: huge dynamic range, ties, subnormals, NaN/Inf."""
  x = (rng.standard_normal(n) * 10.0 ** rng.integers(-40, 38, n)).astype(np.float32)
  if case == "ties":  # exact .5 ties on the integer grid (max 32 -> e = 6 - 13 for bits 14)
    x = ((np.arange(n) % 64) - 32 + 0.5).astype(np.float32)
  elif case == "subnormal":
    x = (rng.standard_normal(n) * 1e-39).astype(np.float32)
  elif case == "nan":
    x[n // 2] = np.nan
  elif case == "inf":
    x[n - 1] = -np.inf
  elif case == "zeros":
    x[:] = 0.0
  elif case == "negzero_and_max":
    x[:] = -0.0
    x[0] = np.finfo(np.float32).max
  return jnp.asarray(x)


CASES = ("wide", "ties", "subnormal", "nan", "inf", "zeros", "negzero_and_max")


@pytest.mark.parametrize("bits", [2, 8, 14, 15, 16])
@pytest.mark.parametrize("n", [1, 31, 33, 65537, 200003])  # tails, one chunk, several chunks
def test_quantize_dfp_is_bit_identical_to_pure_jax(isa, bits, n):
  rng = np.random.default_rng(bits * 1000 + n)
  for case in CASES:
    x = _adversarial(rng, n, case)
    want = qz.quantize_array(x, jdfp.DFP(bits))
    v, e = kernels.quantize_dfp(x, bits=bits, isa=isa)
    assert v.dtype == jnp.int16 and e.dtype == jnp.int32 and e.shape == (1,)
    # The counters the same call returns equal the separate statistics pass.
    _, _, counts = kernels.quantize_dfp_with_stats(x, bits=bits, isa=isa)
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(kernels.quant_stats(x, v, e, bits=bits, isa=isa)),
                                  err_msg=case)
    np.testing.assert_array_equal(np.asarray(e), np.asarray(want.exponent), err_msg=case)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(want.values), err_msg=case)
    # Grid membership and the symmetric range: never -2**15, never beyond qmax.
    assert np.abs(np.asarray(v, np.int32)).max(initial=0) <= 2 ** (bits - 1) - 1


def test_quantize_with_given_exponent_saturates_and_zeroes_nan(isa):
  """With an exponent from elsewhere (a cross-replica or history max), larger values saturate at
  +-qmax, NaN converts to 0 and the NONFINITE sentinel gives all zeros, exactly like pure JAX."""
  rng = np.random.default_rng(0)
  x = _adversarial(rng, 70001, "wide").at[3].set(jnp.nan).at[4].set(jnp.inf).at[5].set(-jnp.inf)
  for amax in (1.0, 1e-30, 3e38, jnp.inf):
    want = qz.quantize_given_amax(x, jnp.full((1,), amax, jnp.float32), jdfp.DFP(14), "nearest", None, x.shape)
    got = kernels.quantize(x, want.exponent, bits=14, isa=isa)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want.values), err_msg=str(amax))
  sentinel = kernels.quantize(x, jnp.full((1,), NONFINITE, jnp.int32), bits=14, isa=isa)
  assert not np.asarray(sentinel).any()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=300),
       st.integers(2, 16))
def test_quantize_dfp_property(values, bits):
  x = jnp.asarray(np.array(values, np.float32))
  want = qz.quantize_array(x, jdfp.DFP(bits))
  v, e = kernels.quantize_dfp(x, bits=bits)
  np.testing.assert_array_equal(np.asarray(e), np.asarray(want.exponent))
  np.testing.assert_array_equal(np.asarray(v), np.asarray(want.values))


def test_quantize_rejects_bad_input_at_trace_time():
  x = jnp.ones((4, 4))
  with pytest.raises(TypeError, match="x must have dtype float32"):
    kernels.quantize_dfp(x.astype(jnp.bfloat16), bits=14)
  with pytest.raises(TypeError, match="e must have dtype int32"):
    kernels.quantize(x, jnp.zeros((1,), jnp.float32), bits=14)
  with pytest.raises(ValueError, match="exactly one exponent"):
    kernels.quantize(x, jnp.zeros((4, 1), jnp.int32), bits=14)
  with pytest.raises(ValueError, match="bits"):
    kernels.quantize_dfp(x, bits=17)


def test_handler_validates_and_returns_ffi_errors():
  """Calling the FFI targets directly with bad operands gives an error, never a crash."""
  x = jnp.ones((4, 4), jnp.float32)
  k = jnp.zeros((2,), jnp.uint32)  # the Philox key operand (ignored unless rounding is stochastic)
  attrs = dict(bits=np.int32(14), isa=np.int32(0), rounding=np.int32(0))
  call = jax.ffi.ffi_call(library.TARGET_QUANTIZE, jax.ShapeDtypeStruct((4, 4), jnp.int16))
  with pytest.raises(Exception, match="one exponent"):
    jax.block_until_ready(call(x, jnp.zeros((2,), jnp.int32), k, **attrs))
  with pytest.raises(Exception, match="bits must be in"):
    jax.block_until_ready(call(x, jnp.zeros((1,), jnp.int32), k, **{**attrs, "bits": np.int32(40)}))
  with pytest.raises(Exception, match="rounding must be 0"):
    jax.block_until_ready(call(x, jnp.zeros((1,), jnp.int32), k, **{**attrs, "rounding": np.int32(3)}))
  with pytest.raises(Exception, match="key must be uint32"):
    jax.block_until_ready(call(x, jnp.zeros((1,), jnp.int32), jnp.zeros((3,), jnp.uint32), **attrs))
  bad_shape = jax.ffi.ffi_call(library.TARGET_QUANTIZE, jax.ShapeDtypeStruct((4, 5), jnp.int16))
  with pytest.raises(Exception, match="x's shape"):
    jax.block_until_ready(bad_shape(x, jnp.zeros((1,), jnp.int32), k, **attrs))
  dfp = jax.ffi.ffi_call(library.TARGET_QUANTIZE_DFP, (jax.ShapeDtypeStruct((4, 4), jnp.int16),
                                                      jax.ShapeDtypeStruct((1, 1), jnp.int32),
                                                      jax.ShapeDtypeStruct((4,), jnp.int32)))
  with pytest.raises(Exception, match="x must be float32"):
    jax.block_until_ready(dfp(x.astype(jnp.int32), k, **attrs))
  with pytest.raises(Exception, match="key must be uint32"):
    jax.block_until_ready(dfp(x, k.astype(jnp.int32), **{**attrs, "rounding": np.int32(1)}))
  dfp_bad_counts = jax.ffi.ffi_call(library.TARGET_QUANTIZE_DFP, (jax.ShapeDtypeStruct((4, 4), jnp.int16),
                                                                 jax.ShapeDtypeStruct((1, 1), jnp.int32),
                                                                 jax.ShapeDtypeStruct((3,), jnp.int32)))
  with pytest.raises(Exception, match="counts"):
    jax.block_until_ready(dfp_bad_counts(x, k, **attrs))
  stats = jax.ffi.ffi_call(library.TARGET_QUANT_STATS, jax.ShapeDtypeStruct((4,), jnp.int32))
  q, e = jnp.zeros((4, 4), jnp.int16), jnp.zeros((1,), jnp.int32)
  with pytest.raises(Exception, match="q must be int16"):
    jax.block_until_ready(stats(x, q.astype(jnp.int32), e, bits=np.int32(14), isa=np.int32(0)))
  with pytest.raises(Exception, match="x's shape"):
    jax.block_until_ready(stats(x, jnp.zeros((4, 5), jnp.int16), e, bits=np.int32(14), isa=np.int32(0)))
  with pytest.raises(Exception, match="one int32"):
    jax.block_until_ready(stats(x, q, jnp.zeros((2,), jnp.int32), bits=np.int32(14), isa=np.int32(0)))


def test_ops_convert_on_the_kernel_only_with_the_ffi_backend():
  """The ffi policy converts its per-tensor operands on the kernel (visible in the jaxpr); the
  reference backend stays pure JAX; both give the same bits."""
  x = jax.random.normal(jax.random.key(0), (64, 96))
  w = jax.random.normal(jax.random.key(1), (96, 32))
  dims = (((1,), (0,)), ((), ()))

  def loss(policy):
    return lambda x, w: jnp.sum(jdfp.dot_general(x, w, dims, policy=policy) ** 2)

  ffi, ref = jdfp.Policy(backend="ffi"), jdfp.Policy(backend="reference")
  text_ffi = str(jax.make_jaxpr(jax.grad(loss(ffi), argnums=(0, 1)))(x, w))
  text_ref = str(jax.make_jaxpr(jax.grad(loss(ref), argnums=(0, 1)))(x, w))
  assert text_ffi.count(library.TARGET_QUANTIZE_DFP) == 3  # x, w, and the output gradient once
  assert "jdfp_quantize" not in text_ref
  g_ffi = jax.jit(jax.grad(loss(ffi), argnums=(0, 1)))(x, w)
  g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(x, w)
  for a, b in zip(g_ffi, g_ref):
    np.testing.assert_array_equal(np.asarray(a).view(np.int32), np.asarray(b).view(np.int32))
  # Stochastic gradient rounding converts on the kernel too (the Philox stream), bit-identical.
  stoch = jdfp.Policy(backend="ffi", grad_rounding="stochastic")
  loss_k = lambda pol: (lambda x, w, k: jnp.sum(jdfp.dot_general(x, w, dims, policy=pol, key=k) ** 2))
  text = str(jax.make_jaxpr(jax.grad(loss_k(stoch), argnums=(0, 1)))(x, w, jax.random.key(2)))
  assert text.count(library.TARGET_QUANTIZE_DFP) == 3
  g_ffi = jax.jit(jax.grad(loss_k(stoch), argnums=(0, 1)))(x, w, jax.random.key(2))
  g_ref = jax.jit(jax.grad(loss_k(stoch.replace(backend="reference")), argnums=(0, 1)))(x, w, jax.random.key(2))
  for a, b in zip(g_ffi, g_ref):
    np.testing.assert_array_equal(np.asarray(a).view(np.int32), np.asarray(b).view(np.int32))


def test_axis_name_uses_the_given_exponent_entry():
  """Inside shard_map with a shared exponent (pmax), the conversion takes XLA's exponent."""
  ops_q = convert.quantize3(jnp.ones((1, 4, 4)), jdfp.DFP(14), 2, "nearest", None, None, True)
  assert ops_q.values.dtype == jnp.int16
  from jax.sharding import Mesh, PartitionSpec as P
  try:
    shard_map = jax.shard_map
  except AttributeError:
    from jax.experimental.shard_map import shard_map
  n = min(2, len(jax.devices()))
  mesh = Mesh(np.array(jax.devices()[:n]), ("d",))
  x = jax.random.normal(jax.random.key(3), (n, 8, 16)) * jnp.arange(1, n + 1)[:, None, None]

  def f(x):
    q = convert.quantize_blocks(x, jdfp.DFP(14), x.shape, axis_name="d", use_kernel=True)
    return q.values, q.exponent

  sm = shard_map(f, mesh=mesh, in_specs=P("d"), out_specs=(P("d"), P("d")))
  text = str(jax.make_jaxpr(sm)(x))
  assert library.TARGET_QUANTIZE in text and library.TARGET_QUANTIZE_DFP not in text
  v, e = jax.jit(sm)(x)
  want = qz.quantize_array(x, jdfp.DFP(14))  # the shared exponent is the global one
  assert (np.asarray(e) == np.asarray(want.exponent).ravel()[0]).all()
  np.testing.assert_array_equal(np.asarray(v), np.asarray(want.values))


# ------------------------------------------------------------------------------------------------
# quant_stats: the Flax "dfp" counters in one pass, equal to the pure-JAX reductions.


def _stats_cases(rng, n):
  """(x, QArray) pairs: every adversarial input, quantized with its own max (nearest and
  stochastic), with a too-small exponent (saturation), and with a too-large one (underflow)."""
  from jdfp._src.flax import state as core  # noqa: F401  (the reference reductions live there)
  for case in CASES:
    x = _adversarial(rng, n, case)
    for bits in (8, 14):
      fmt = jdfp.DFP(bits)
      yield case, x, qz.quantize_array(x, fmt)
      yield case + "/stochastic", x, qz.quantize_array(x, fmt, rounding="stochastic", key=jax.random.key(n))
      amax = jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0))
      for scale in (1e-3, 1e3):  # an exponent from another tensor's max (delayed scaling)
        yield f"{case}/amax*{scale}", x, qz.quantize_given_amax(
            x, jnp.full((1,), amax * scale, jnp.float32), fmt, "nearest", None, x.shape)


@pytest.mark.parametrize("n", [1, 33, 65537, 200003])
def test_quant_stats_equals_the_pure_jax_reductions(isa, n):
  from jdfp._src.flax import state as core
  rng = np.random.default_rng(7 + n)
  fields = ("exponent", "exponent_min", "saturated", "underflow", "nonfinite", "size")
  seen_sat = seen_under = False
  for case, x, q in _stats_cases(rng, n):
    want = core.role_stats(x, q)
    sat, under, nonfin, ok = np.asarray(kernels.quant_stats(x, q.values, q.exponent, bits=q.fmt.int_bits, isa=isa))
    got = core.role_stats(x, q, use_kernel=True)
    for f in fields:
      assert float(got[f]) == float(want[f]), (case, f, float(got[f]), float(want[f]))
    assert ok == int(np.sum(np.isfinite(np.asarray(x)) & (np.abs(np.asarray(x)) >= np.float32(2.0**-126)))) or \
        int(np.asarray(q.exponent).reshape(())) == NONFINITE
    seen_sat |= sat > 0
    seen_under |= under > 0
  assert seen_sat and seen_under  # the cases exercise both counters


def test_quant_stats_rejects_bad_input():
  x = jnp.ones((4, 3), jnp.float32)
  q = jnp.ones((4, 3), jnp.int16)
  e = jnp.zeros((1, 1), jnp.int32)
  with pytest.raises(TypeError, match="q must have dtype int16"):
    kernels.quant_stats(x, q.astype(jnp.int32), e, bits=14)
  with pytest.raises(ValueError, match="q must have x's shape"):
    kernels.quant_stats(x, q[:2], e, bits=14)
  with pytest.raises(ValueError, match="one exponent"):
    kernels.quant_stats(x, q, jnp.zeros((2,), jnp.int32), bits=14)
  with pytest.raises(ValueError, match="bits"):
    kernels.quant_stats(x, q, e, bits=17)
