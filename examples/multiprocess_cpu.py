"""jdfp data-parallel training across processes with `jax.distributed` (CPU collectives over gloo).

Starts N processes on localhost (default 2), each with 2 simulated CPU devices, joins them into one
global mesh, and trains a jdfp MLP with `shard_map`: each process feeds its own shard of the
batch, the kernel runs on every local device, gradients are all-reduced in DFP int16
(`jdfp.parallel.pmean`). Every process prints its final loss; they must agree.

    python examples/multiprocess_cpu.py                 # launcher: spawns the workers
    python examples/multiprocess_cpu.py --worker I ...  # what the launcher runs per process

Set-up on real machines: same command on each host with --coordinator HOST:PORT, --num-processes,
--worker RANK; devices per process come from the hardware instead of --local-devices.
"""

import argparse
import os
import socket
import subprocess
import sys


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(args) -> int:
  coord = args.coordinator or f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), "--coordinator", coord,
                             "--num-processes", str(args.num_processes), "--steps", str(args.steps),
                             "--local-devices", str(args.local_devices)])
           for i in range(args.num_processes)]
  codes = [p.wait(timeout=600) for p in procs]
  return max(codes)


def worker(args) -> None:
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                             process_id=args.worker)
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import jdfp

  try:
    shard_map = jax.shard_map
  except AttributeError:
    from jax.experimental.shard_map import shard_map

  mesh = Mesh(np.array(jax.devices()), ("data",))
  ndev = len(jax.devices())
  policy = jdfp.parallel.data_parallel(jdfp.Policy(), "data")
  dims = (((1,), (0,)), ((), ()))

  def loss_fn(params, x, y):
    h = jax.nn.relu(jdfp.dot_general(x, params["w1"], dims, policy=policy))
    logits = jdfp.dot_general(h, params["w2"], dims, policy=policy)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  def step(params, x, y):
    # Per-replica gradients (params marked varying), all-reduced below in DFP int16. Without the
    # pcast, shard_map's autodiff would psum the gradients of the replicated params in float32.
    local = jax.tree.map(lambda p: jax.lax.pcast(p, "data", to="varying"), params)
    loss, g = jax.value_and_grad(loss_fn)(local, x, y)
    g = jdfp.parallel.pmean(g, "data")
    params = jax.tree.map(lambda p, d: p - 0.1 * d, params, g)
    return params, jax.lax.pmean(loss, "data")

  step = jax.jit(shard_map(step, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P())))

  rng = np.random.default_rng(0)  # same data on every process; each feeds its own rows
  params = {"w1": rng.normal(size=(16, 32)).astype(np.float32) * 0.3,
            "w2": rng.normal(size=(32, 4)).astype(np.float32) * 0.3}
  xs = rng.normal(size=(8 * ndev, 16)).astype(np.float32)
  ys = (xs[:, :4].argmax(1)).astype(np.int32)
  per_proc = xs.shape[0] // args.num_processes
  lo = args.worker * per_proc
  def global_array(a, spec):
    sharding = NamedSharding(mesh, spec)
    local = a[lo:lo + per_proc] if spec == P("data") else a
    return jax.make_array_from_process_local_data(sharding, local, a.shape)
  x = global_array(xs, P("data"))
  y = global_array(ys, P("data"))
  params = jax.tree.map(lambda a: global_array(a, P()), params)
  for _ in range(args.steps):
    params, loss = step(params, x, y)
  report = jdfp.explain(step, params, x, y)
  print(f"process {args.worker}/{args.num_processes}: devices {ndev} (local {jax.local_device_count()}), "
        f"final loss {float(loss):.6f}, kernel calls per step {report.kernel_calls}", flush=True)
  jax.distributed.shutdown()


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--worker", type=int, default=None)
  ap.add_argument("--coordinator", default=None)
  ap.add_argument("--num-processes", type=int, default=2)
  ap.add_argument("--local-devices", type=int, default=2)
  ap.add_argument("--steps", type=int, default=20)
  args = ap.parse_args()
  if args.worker is None:
    sys.exit(launch(args))
  worker(args)


if __name__ == "__main__":
  main()
