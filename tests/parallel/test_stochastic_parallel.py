"""Stochastic rounding on the kernel under pmap / shard_map: the replicas share the exponent (pmax),
each converts with its own key (a distinct Philox stream), bit-identical to the pure-JAX quantizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import jdfp
from jdfp import kernels
from jdfp._src.ffi import library
from jdfp._src.numerics import quantize as qz
from jdfp._src.ops import convert

try:
  shard_map = jax.shard_map
except AttributeError:  # older jax
  from jax.experimental.shard_map import shard_map

N = jax.device_count()
pytestmark = [pytest.mark.skipif(N < 2, reason="needs several devices (tests/conftest.py simulates 4)"),
              pytest.mark.skipif(not kernels.kernel_available(), reason="libjdfp_ffi.so not built")]
FMT = jdfp.DFP(12)


def _check(values, exps, x, keys):
  """Every replica: the global exponent, its own key's stream, and distinct from the others."""
  want_e = np.asarray(qz.quantize_array(x.reshape(-1), FMT).exponent).ravel()[0]
  assert (np.asarray(exps) == want_e).all()
  for r in range(N):
    want = qz.quantize_given_exponent(x[r], jnp.full((1,) * (x.ndim - 1), want_e, jnp.int32), FMT, "stochastic",
                                      keys[r], x.shape[1:])
    np.testing.assert_array_equal(np.asarray(values[r]), np.asarray(want.values), err_msg=f"replica {r}")
  assert len({bytes(np.asarray(v)) for v in values}) == N


def _quantize(x, k):
  q = convert.quantize_blocks(x, FMT, x.shape, rounding="stochastic", key=k, axis_name="i", use_kernel=True)
  return q.values, q.exponent


def test_pmap_replicas_get_their_own_stream():
  # The same data on every replica (a fraction of 1/2 everywhere but the max) so only the keys differ.
  x = jnp.broadcast_to(jnp.full((300, 7), 2.5 * 2.0**-10).at[0, 0].set(1.0), (N, 300, 7))  # y = 2.5 (e = -10)
  keys = jax.random.split(jax.random.key(0), N)
  f = jax.pmap(_quantize, axis_name="i")
  assert library.TARGET_QUANTIZE in str(jax.make_jaxpr(f)(x, keys))
  v, e = f(x, keys)
  _check(v, e, x, keys)


def test_shard_map_replicas_get_their_own_stream():
  mesh = Mesh(np.array(jax.devices()), ("i",))
  x = jax.random.normal(jax.random.key(1), (N, 64, 33)) * jnp.arange(1, N + 1)[:, None, None]
  keys = jax.random.split(jax.random.key(2), N)

  def f(x, k):
    v, e = _quantize(x[0], k[0])
    return v[None], e[None]

  v, e = jax.jit(shard_map(f, mesh=mesh, in_specs=(P("i"), P("i")), out_specs=(P("i"), P("i"))))(x, keys)
  _check(v, e, x, keys)
