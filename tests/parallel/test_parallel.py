"""Data parallel: DFP int16 all-reduce (bound, unbiasedness, overflow safety), synced exponents,
pmap / shard_map steps equal the single-device step, and two processes under jax.distributed."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

import jdfp

try:
  shard_map = jax.shard_map
except AttributeError:  # older jax
  from jax.experimental.shard_map import shard_map

N = jax.device_count()
multi = pytest.mark.skipif(N < 2, reason="needs several devices (tests/conftest.py simulates 4)")
MATMUL = (((1,), (0,)), ((), ()))


@multi
def test_psum_error_within_bound_and_int16_on_the_wire():
  g = {"w": jax.random.normal(jax.random.key(0), (N, 64, 33)) * 5, "b": jax.random.normal(jax.random.key(1), (N, 7))}
  f = jax.pmap(lambda t: jdfp.parallel.psum(t, "i"), axis_name="i")
  out = f(g)
  for k in g:
    exact = np.asarray(g[k], np.float64).sum(0)
    bound = jdfp.parallel.error_bound(float(jnp.max(jnp.abs(g[k]))), N)
    err = np.abs(np.asarray(out[k][0], np.float64) - exact).max()
    assert err <= bound, (k, err, bound)
    np.testing.assert_array_equal(out[k][0], out[k][-1])  # identical on every replica
  hlo = jax.jit(f).lower(g).compile().as_text()
  reduces = [line for line in hlo.splitlines() if "all-reduce(" in line or "all-reduce-start(" in line]
  # the tensors travel as int16 (the scalar maxes as f32)
  assert any("s16[" in line for line in reduces), reduces
  assert not any("f32[64,33]" in line for line in reduces)


@multi
def test_psum_adversarial_all_max_never_overflows():
  """Every replica holds +max everywhere: the int16 sum is R * qmax <= 32767, no wrap."""
  g = jnp.full((N, 100), 3.0e4)
  out = jax.pmap(lambda t: jdfp.parallel.psum(t, "i"), axis_name="i")(g)
  np.testing.assert_allclose(out[0], N * 3.0e4, rtol=2.0 ** -(jdfp.parallel.allreduce_bits(N) - 2))
  with pytest.raises(ValueError, match="bits"):
    jax.pmap(lambda t: jdfp.parallel.psum(t, "i", bits=16), axis_name="i")(g)


@multi
def test_psum_stochastic_is_unbiased_and_nan_propagates():
  g = jnp.broadcast_to(jnp.linspace(-1, 1, 4001) * 1e-3, (N, 4001)).at[:, 0].set(1.0)  # tiny values vs the max
  keys = jax.random.split(jax.random.key(0), 64)
  step = jax.pmap(lambda t, kk: jdfp.parallel.psum(t, "i", rounding="stochastic",
                                                  key=jax.random.fold_in(kk, lax.axis_index("i"))),
                  axis_name="i", in_axes=(0, None))
  def one(k):
    return step(g, k)[0]
  mean = np.mean([np.asarray(one(k)) for k in keys[:32]], axis=0)
  exact = np.asarray(g.sum(0))
  nearest = np.asarray(jax.pmap(lambda t: jdfp.parallel.psum(t, "i"), axis_name="i")(g)[0])
  # stochastic: the mean error shrinks well below nearest's systematic error on sub-step values
  assert np.abs(mean - exact)[1:].mean() < 0.5 * np.abs(nearest - exact)[1:].mean()
  bad = g.at[1, 5].set(jnp.nan)
  out = jax.pmap(lambda t: jdfp.parallel.psum(t, "i"), axis_name="i")(bad)
  assert np.isnan(np.asarray(out)).all()


@multi
def test_synced_exponents_identical_on_every_replica():
  x = jax.random.normal(jax.random.key(0), (N, 8, 16)) * jnp.arange(1, N + 1)[:, None, None]
  q = jax.pmap(lambda v: jdfp.quantize_array(v, jdfp.DFP(14), axis_name="i"), axis_name="i")(x)
  e = np.asarray(q.exponent)
  assert (e == e[0]).all()
  assert int(e[0].reshape(())) == int(jdfp.quantize_array(x, jdfp.DFP(14)).exponent.reshape(()))


def _mlp_loss(policy, batch_size):
  def loss(params, x, y):
    h = jax.nn.relu(jdfp.dot_general(x, params["w1"], MATMUL, policy=policy))
    logits = jdfp.dot_general(h, params["w2"], MATMUL, policy=policy)
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)) / batch_size
  return loss


@multi
@pytest.mark.parametrize("backend", ["ffi", "reference"])
def test_pmap_and_shard_map_step_equal_single_device(backend):
  if backend == "ffi" and not jdfp.kernels.kernel_available():
    pytest.skip("kernel library not built")
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(16, 32)).astype(np.float32)),
            "w2": jnp.asarray(rng.normal(size=(32, 4)).astype(np.float32))}
  x = jnp.asarray(rng.normal(size=(8 * N, 16)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 4, 8 * N).astype(np.int32))
  base = jdfp.Policy(backend=backend)
  g_single = jax.jit(jax.grad(_mlp_loss(base, x.shape[0])))(params, x, y)
  dp = jdfp.parallel.data_parallel(base, "i")
  loss = _mlp_loss(dp, x.shape[0])

  # forward is bit-identical: every replica uses the global-batch exponents
  fwd = jax.pmap(lambda xs: jdfp.dot_general(xs, params["w1"], MATMUL, policy=dp), axis_name="i")(x.reshape(N, -1, 16))
  np.testing.assert_array_equal(np.asarray(fwd).reshape(-1, 32),
                                np.asarray(jdfp.dot_general(x, params["w1"], MATMUL, policy=base)))

  g_pmap = jax.pmap(lambda xs, ys: lax.psum(jax.grad(loss)(params, xs, ys), "i"), axis_name="i")(
      x.reshape(N, 8, 16), y.reshape(N, 8))
  g_pmap = jax.tree.map(lambda t: t[0], g_pmap)
  mesh = Mesh(np.array(jax.devices()), ("i",))
  def sm(p, xs, ys):
    local = jax.tree.map(lambda t: lax.pcast(t, "i", to="varying"), p)
    return jdfp.parallel.psum(jax.grad(loss)(local, xs, ys), "i")
  g_sm = jax.jit(shard_map(sm, mesh=mesh, in_specs=(P(), P("i"), P("i")), out_specs=P()))(params, x, y)
  for k in params:
    scale = float(jnp.max(jnp.abs(g_single[k])))
    # weight-gradient sums are split across replicas: FP32 reassociation only
    np.testing.assert_allclose(g_pmap[k], g_single[k], atol=1e-5 * scale)
    # plus the int16 all-reduce's bound
    bound = jdfp.parallel.error_bound(scale, N) + 1e-5 * scale
    assert float(jnp.max(jnp.abs(g_sm[k] - g_single[k]))) <= bound


def test_two_processes_with_jax_distributed():
  script = Path(__file__).resolve().parents[2] / "examples" / "multiprocess_cpu.py"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, str(script), "--num-processes", "2", "--steps", "3"], capture_output=True,
                     text=True, timeout=300, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  # the two workers share stdout, so their lines may interleave
  found = re.findall(r"process (\d)/2: devices 4 \(local 2\), final loss ([\d.]+), kernel calls per step (\d+)", r.stdout)
  assert sorted(f[0] for f in found) == ["0", "1"], r.stdout
  assert len({f[1] for f in found}) == 1  # both processes agree on the loss
  assert all(f[2] == "5" for f in found)  # 2 forward + 3 backward GEMMs (no gradient for the input batch)


def test_soak_script_queues_steps_and_keeps_replicas_identical():
  """A short run of examples/soak_data_parallel.py (the full soak is 1000+ steps; see the README)."""
  script = Path(__file__).resolve().parents[2] / "examples" / "soak_data_parallel.py"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, str(script), "--devices", "8", "--steps", "30"], capture_output=True,
                     text=True, timeout=300, env=env)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert "30 queued pmap steps on 8 devices" in r.stdout and "replicas identical: True, finite: True" in r.stdout
