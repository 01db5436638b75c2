"""Data-parallel jdfp training on 8 simulated CPU devices: pmap and shard_map vs one device.

Trains a DFP16 MLP on scikit-learn's digits with the same global batch three ways and compares:
- single device, the whole batch;
- `jax.pmap`, one shard per device, gradients all-reduced in DFP int16 (`jdfp.parallel.pmean`);
- `jax.shard_map` over a 1-D mesh, the same.
Exponents are shared across replicas (`jdfp.parallel.data_parallel(policy, axis)`), so the forward
pass is bit-identical to the single-device one; the differences come from the order of the
weight-gradient sums and the int16 all-reduce (bound: `jdfp.parallel.error_bound`).

    python examples/data_parallel.py [--devices 8] [--steps 100]
"""

import argparse
import os
import sys


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--steps", type=int, default=100)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--backend", default="auto", choices=("auto", "ffi", "reference"))
  ap.add_argument("--tolerance", type=float, default=2e-2, help="max relative parameter difference allowed")
  args = ap.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, PartitionSpec as P
  from sklearn.datasets import load_digits

  import jdfp

  try:
    shard_map = jax.shard_map
  except AttributeError:
    from jax.experimental.shard_map import shard_map

  n = jax.device_count()
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  y = y.astype(np.int32)
  rng = np.random.default_rng(0)
  sizes = [64, 256, 256, 10]
  params0 = [jnp.asarray(rng.normal(size=(a, b)).astype(np.float32) * np.sqrt(2 / a)) for a, b in zip(sizes[:-1], sizes[1:])]
  batches = [rng.integers(0, len(x), args.batch) for _ in range(args.steps)]
  dims = (((1,), (0,)), ((), ()))
  lr = 0.1

  def make_loss(policy):
    def loss_fn(params, xb, yb):
      h = xb
      for i, w in enumerate(params):
        h = jdfp.dot_general(h, w, dims, policy=policy)
        if i < len(params) - 1:
          h = jax.nn.relu(h)
      logp = jax.nn.log_softmax(h)
      return -jnp.sum(jnp.take_along_axis(logp, yb[:, None], 1)) / args.batch  # global-batch mean
    return loss_fn

  single_loss = make_loss(jdfp.Policy())
  @jax.jit
  def single_step(params, xb, yb):
    loss, g = jax.value_and_grad(single_loss)(params, xb, yb)
    return [p - lr * d for p, d in zip(params, g)], loss

  dp_loss = make_loss(jdfp.parallel.data_parallel(jdfp.Policy(backend=args.backend), "data"))
  def dp_step(params, xb, yb, local=None):
    loss, g = jax.value_and_grad(dp_loss)(params if local is None else local, xb, yb)
    g = jdfp.parallel.psum(g, "data")  # per-shard sums of the global mean -> DFP int16 all-reduce
    return [p - lr * d for p, d in zip(params, g)], jax.lax.psum(loss, "data")

  pmap_step = jax.pmap(dp_step, axis_name="data", in_axes=(None, 0, 0), out_axes=(None, None))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  def sm_body(params, xb, yb):
    local = jax.tree.map(lambda p: jax.lax.pcast(p, "data", to="varying"), params)
    return dp_step(params, xb, yb, local)
  sm_step = jax.jit(shard_map(sm_body, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P())))

  results = {}
  for name in ("single", "pmap", "shard_map"):
    params = params0
    for idx in batches:
      xb, yb = x[idx], y[idx]
      if name == "single":
        params, loss = single_step(params, xb, yb)
      elif name == "pmap":
        params, loss = pmap_step(params, xb.reshape(n, -1, 64), yb.reshape(n, -1))
      else:
        params, loss = sm_step(params, xb, yb)
      # One step in flight at a time: with 8 simulated devices on 2 cores, letting XLA:CPU queue
      # many multi-device steps that hold FFI calls and collectives has been seen to starve its
      # rendezvous (a 40 s abort). Real devices, or fewer simulated ones, don't need this.
      jax.block_until_ready(params)
    acc = float(jnp.mean(jnp.argmax(jax.nn.relu(jax.nn.relu(x @ params[0]) @ params[1]) @ params[2], -1) == y))
    results[name] = (params, float(loss), acc)

  base = results["single"][0]
  ok = True
  print(f"{'run':<10} {'final loss':>10} {'train acc':>9} {'max rel param diff vs single':>30}")
  for name, (params, loss, acc) in results.items():
    diff = max(float(jnp.max(jnp.abs(p - b)) / jnp.max(jnp.abs(b))) for p, b in zip(params, base))
    ok &= diff <= args.tolerance
    print(f"{name:<10} {loss:>10.5f} {acc:>9.4f} {diff:>30.2e}")
  print(f"devices {n}; tolerance {args.tolerance:g}: {'OK' if ok else 'EXCEEDED'}")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
