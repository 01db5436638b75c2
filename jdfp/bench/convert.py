"""``python -m jdfp.bench convert``: the per-tensor DFP conversion (max, exponent, float32 -> int16),
kernel vs XLA, for each rounding, timed side by side.

Candidates (each one jitted function of a float32 tensor):
  kernel:<rounding>   `jdfp._src.ffi.quantize.quantize_dfp` (one C++ call), rounding nearest /
                      stochastic (Philox) / biased
  xla:<rounding>      the pure-JAX quantizer (`quantize_array`), the same roundings
  xla:stochastic-old  the pure-JAX quantizer's former stochastic rounding: `jax.random.bits`
                      (threefry) per element, then the same float ops (what ran before the kernel
                      took stochastic rounding)
Reported: median milliseconds per call and GB/s of float32 read.
"""

from __future__ import annotations

import argparse

CANDIDATES = ("kernel:nearest", "kernel:stochastic", "kernel:biased", "xla:nearest", "xla:stochastic",
              "xla:biased", "xla:stochastic-old")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--sizes", nargs="+", type=int, default=[2**20, 2**24], help="elements (default: 1M, 16M)")
  p.add_argument("--bits", type=int, default=16)
  p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
  p.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
  p.add_argument("--min-time", type=float, default=0.1, help="seconds per timing sample")


def _old_stochastic(x, key, fmt):
  """The former XLA path: exponent from the max, threefry bits, floor + Bernoulli(frac), clip."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jdfp._src.numerics import formats
  from jdfp._src.numerics import quantize as qz
  e = qz.group_exponent(jnp.max(jnp.where(jnp.isnan(x), jnp.inf, jnp.abs(x))), fmt)
  nonfinite = e == formats.NONFINITE_EXPONENT
  y = formats.scale2(jnp.where(nonfinite, 0.0, x), -jnp.where(nonfinite, 0, e))
  low = jnp.floor(y)
  u = (jax.random.bits(key, y.shape, jnp.uint32) >> 8).astype(jnp.float32) * np.float32(2.0**-24)
  i = jnp.clip(low + (u < y - low).astype(y.dtype), -fmt.qmax, fmt.qmax)
  return i.astype(jnp.int16), e


def make_candidate(name: str, fmt):
  import jax

  from jdfp._src.ffi import quantize as fq
  from jdfp._src.numerics import quantize as qz
  where, rounding = name.split(":")
  if rounding == "stochastic-old":
    return jax.jit(lambda x, k: _old_stochastic(x, k, fmt))
  if where == "kernel":
    return jax.jit(lambda x, k: fq.quantize_dfp(x, bits=fmt.bits, rounding=rounding, key=k))
  return jax.jit(lambda x, k: (lambda q: (q.values, q.exponent))(qz.quantize_array(x, fmt, rounding=rounding, key=k)))


def main(args) -> int:
  import jax
  import numpy as np

  import jdfp
  from jdfp.bench._timing import cpu_name, print_table, time_side_by_side
  fmt = jdfp.DFP(args.bits)
  key = jax.random.key(0)
  print(f"# {cpu_name()}, jax {jax.__version__}, DFP({args.bits}), {len(jax.devices())} device(s)")
  for n in args.sizes:
    x = jax.device_put(np.random.default_rng(0).standard_normal(n).astype(np.float32))
    fns = {c: (lambda f=make_candidate(c, fmt): f(x, key)) for c in args.candidates}
    t = time_side_by_side(fns, repeats=args.repeats, min_time=args.min_time)
    rows = [[c, f"{t[c] * 1e3:.3f}", f"{4 * n / t[c] / 1e9:.2f}"] for c in args.candidates]
    print_table(f"conversion of {n} float32 elements", ["candidate", "ms", "GB/s"], rows)
  return 0
