"""Soak test of data-parallel training: many queued pmap steps on simulated CPU devices.

Each step runs jdfp ops (a DFP16 MLP whose exponents are shared across replicas) and averages the
gradients with `jdfp.parallel.pmean` (int16 on the wire). The steps are dispatched back to back with
no per-step synchronisation, so XLA queues them and its collectives' rendezvous see deep queues.
At the end every replica must hold the same parameters, bit for bit, and they must be finite.

    python examples/soak_data_parallel.py                 # 8 devices, 1000 steps
    python examples/soak_data_parallel.py --steps 5000
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (default 8)")
  p.add_argument("--steps", type=int, default=1000, help="queued pmap steps (default 1000)")
  p.add_argument("--batch", type=int, default=16, help="examples per device per step")
  args = p.parse_args(argv)
  # Must precede JAX's start-up.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}").strip()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  import jdfp  # pylint: disable=import-outside-toplevel

  n = jax.local_device_count()
  if n != args.devices:
    print(f"expected {args.devices} devices, JAX has {n}", file=sys.stderr)
    return 2
  policy = jdfp.parallel.data_parallel(jdfp.policies.dfp16(), "d")
  dims = (((1,), (0,)), ((), ()))

  def loss(params, x, y, key):
    k1, k2 = jax.random.split(key)
    h = jax.nn.relu(jdfp.dot_general(x, params["w1"], dims, policy=policy, key=k1))
    out = jdfp.dot_general(h, params["w2"], dims, policy=policy, key=k2)
    return jnp.mean((out - y) ** 2)

  def step(params, x, y, i):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(1), i), jax.lax.axis_index("d"))  # per replica
    g = jax.grad(loss)(params, x, y, key)
    g = jdfp.parallel.pmean(g, "d")  # int16 all-reduce
    return jax.tree.map(lambda p_, g_: p_ - 0.05 * g_, params, g)

  pstep = jax.pmap(step, axis_name="d")
  k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
  params = {"w1": jax.random.normal(k0, (32, 64)) * 0.2, "w2": jax.random.normal(k1, (64, 8)) * 0.2}
  params = jax.tree.map(lambda v: jnp.broadcast_to(v, (n,) + v.shape), params)  # one copy per replica
  x = jax.random.normal(k2, (n, args.batch, 32))
  y = jnp.tanh(x[..., :8])

  start = time.perf_counter()
  params = jax.block_until_ready(pstep(params, x, y, np.zeros((n,), np.int32)))  # compiles
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for i in range(1, args.steps):  # no block_until_ready: the steps queue up
    params = pstep(params, x, y, np.full((n,), i, np.int32))
  jax.block_until_ready(params)
  elapsed = time.perf_counter() - start

  leaves = [np.asarray(v) for v in jax.tree.leaves(params)]
  identical = all(np.array_equal(v[0], v[r]) for v in leaves for r in range(1, n))
  finite = all(np.isfinite(v).all() for v in leaves)
  print(f"{args.steps} queued pmap steps on {n} devices in {compile_s + elapsed:.1f} s (first step with "
        f"compilation {compile_s:.1f} s, then {(args.steps - 1) / max(elapsed, 1e-9):.1f} steps/s): "
        f"replicas identical: {identical}, finite: {finite}")
  return 0 if identical and finite else 1


if __name__ == "__main__":
  sys.exit(main())
