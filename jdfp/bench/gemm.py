"""``python -m jdfp.bench gemm``: the exact INT16 GEMM kernel against XLA's dots, side by side.

Candidates (all jitted, same process, timed round-robin; GOP/s counts 2*M*K*N):
  xla_f32    jnp.dot on float32                       (the baseline)
  xla_i16    lax.dot int16 x int16 -> int32           (XLA's integer path; wraps, not exact)
  jdfp_i16   jdfp kernel, int16 inputs                (exact, docs/arithmetic.md)
  jdfp_f32q  jdfp kernel, float32 inputs quantized while packing (no int16 copy)
  jdfp_i16b24 jdfp kernel, int16 inputs with HBFP12's operands: 12-bit values, exponent blocks of 24
             along K as its 24x24 tiles give them (rows and columns alike in groups of 24); every
             block's sum is scaled into a float32 accumulator (docs/arithmetic.md)
  jdfp_i8    jdfp INT8 kernel (vpdpbusd), int8 inputs, per-tensor DFP(8) exponents
  jdfp_i8b24 the same with exponent blocks of 24 along K, as HBFP8's 24x24 tiles give them (rows
             and columns alike in groups of 24)
  jdfp_i8b32 the same with blocks of 32 and an exponent per (row, block) and (block, column) (MX
             style: `BFP(7, block=32, axis=-1)`)
"""

from __future__ import annotations

import argparse
import json
import os
import platform

DEFAULT_SIZES = ["256", "512", "1024", "2048", "512x1024x1024", "512x4096x1024"]


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES,
                 help="N (square) or MxKxN; default: %(default)s")
  p.add_argument("--bits", type=int, default=14, help="bits of both operands (14 -> chain 32)")
  p.add_argument("--isa", default="auto", help="kernel ISA: auto, scalar, avx2, avx_vnni, avx512_vnni")
  p.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--min-time", type=float, default=0.05, help="seconds per timing sample")
  p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  p.add_argument("--no-int8", action="store_true", help="skip the INT8 kernel rows (8-bit operands)")


def main(args: argparse.Namespace) -> int:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  from jdfp import kernels
  from jdfp.bench._timing import cpu_name, host_memory, isa_label, parse_shape, print_table, time_side_by_side

  if not kernels.kernel_available():
    raise kernels.KernelUnavailableError("libjdfp_ffi.so is not built; see README.md (install)")
  bits = args.bits
  qmax = 2 ** (bits - 1) - 1
  isa = args.isa
  # What "auto" runs: the INT16 GEMM goes to the AMX-INT8 tiles where the CPU has them.
  amx = isa == "auto" and kernels.has_amx_int8()
  isa_text = f"auto = {isa_label()}" if isa == "auto" else isa
  rng = np.random.default_rng(0)
  results = []
  for text in args.sizes:
    m, k, n = parse_shape(text)
    a16 = jnp.asarray(rng.integers(-qmax, qmax + 1, (m, k), dtype=np.int16))
    b16 = jnp.asarray(rng.integers(-qmax, qmax + 1, (k, n), dtype=np.int16))
    ea = jnp.full((1, 1), -10, jnp.int32)  # per-tensor exponents, broadcast over rows / columns
    eb = jnp.full((1, 1), -12, jnp.int32)
    af = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
    bf = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32))
    ea_f = jnp.full((1, 1), -(bits - 3), jnp.int32)  # |x| < 4 -> fits qmax
    eb_f = jnp.full((1, 1), -(bits - 3), jnp.int32)
    kw = dict(bits_a=bits, bits_b=bits, isa=isa)
    f_f32 = jax.jit(lambda x, y: jnp.dot(x, y))
    f_i16 = jax.jit(lambda x, y: lax.dot(x, y, preferred_element_type=jnp.int32))
    f_k16 = jax.jit(lambda x, y, ex, ey: kernels.gemm(x, y, ex, ey, **kw))
    fns = {
        "xla_f32": lambda: f_f32(af, bf),
        "xla_i16": lambda: f_i16(a16, b16),
        "jdfp_i16": lambda: f_k16(a16, b16, ea, eb),
        "jdfp_f32q": lambda: f_k16(af, bf, ea_f, eb_f),
        "jdfp_i16b24": hbfp12_candidate(rng, m, k, n, isa),
    }
    if not args.no_int8:
      fns.update(int8_candidates(rng, m, k, n, isa))
    secs = time_side_by_side(fns, repeats=args.repeats, warmup=args.warmup, min_time=args.min_time)
    ops = 2.0 * m * k * n
    row = {"m": m, "k": k, "n": n, "seconds": secs,
           "gops": {name: ops / s / 1e9 for name, s in secs.items()}}
    row["speedup_vs_xla_f32"] = {name: secs["xla_f32"] / s for name, s in secs.items()}
    row["speedup_vs_xla_i16"] = {name: secs["xla_i16"] / s for name, s in secs.items()}
    results.append(row)
    print(f"  {m}x{k}x{n}: " + ", ".join(f"{nm} {g:.1f}" for nm, g in row["gops"].items()) + " GOP/s",
          flush=True)

  cols = ["M x K x N", "XLA f32", "XLA i16", "jdfp i16", "jdfp f32q", "i16/f32", "i16/XLA i16",
          "f32q/f32", "i16 b24/f32"]
  int8 = ("jdfp_i8", "jdfp_i8b24", "jdfp_i8b32")
  if not args.no_int8:
    cols += ["jdfp i8", "i8/f32", "i8 b24/f32", "i8 b32/f32"]
  rows = []
  for r in results:
    g = r["gops"]
    rows.append([f"{r['m']}x{r['k']}x{r['n']}", f"{g['xla_f32']:.1f}", f"{g['xla_i16']:.1f}",
                 f"{g['jdfp_i16']:.1f}", f"{g['jdfp_f32q']:.1f}",
                 f"{r['speedup_vs_xla_f32']['jdfp_i16']:.2f}x",
                 f"{r['speedup_vs_xla_i16']['jdfp_i16']:.2f}x",
                 f"{r['speedup_vs_xla_f32']['jdfp_f32q']:.2f}x",
                 f"{r['speedup_vs_xla_f32']['jdfp_i16b24']:.2f}x"])
    if not args.no_int8:
      rows[-1] += [f"{g['jdfp_i8']:.1f}"] + [f"{r['speedup_vs_xla_f32'][c]:.2f}x" for c in int8]
  title = (f"jdfp GEMM, bits {bits} (chain {kernels.safe_chain_length(bits, bits)}), isa {isa_text}, "
           f"jax {jax.__version__}, {os.cpu_count()} CPUs -- GOP/s (median of {args.repeats})")
  print_table(title, cols, rows)
  if args.json:
    meta = {"jax": jax.__version__, "python": platform.python_version(), "isa": isa_text, "amx_int8": amx,
            "bits": bits,
            "available_isas": list(kernels.available_isas()), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "processor": cpu_name(), "memory": host_memory()}
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {args.json}")
  return 0


def tile_exponents(rng, m, k, n, block):
  """Exponents [m, KB] and [KB, n] of ``block`` x ``block`` tiles: one per ``block`` rows (columns)
  of each K block, as HBFP's tiles give them to the GEMM."""
  import jax.numpy as jnp

  kb = -(-k // block)
  ea = rng.integers(-12, -8, (-(-m // block), kb)).astype("int32")
  eb = rng.integers(-12, -8, (kb, -(-n // block))).astype("int32")
  return (jnp.asarray(ea.repeat(block, axis=0)[:m]), jnp.asarray(eb.repeat(block, axis=1)[:, :n]))


def hbfp12_candidate(rng, m, k, n, isa):
  """The INT16 kernel as HBFP12 runs it: 12-bit values (qmax 2047), 24 x 24 tile exponents."""
  import jax
  import jax.numpy as jnp

  from jdfp import kernels

  a = jnp.asarray(rng.integers(-2047, 2048, (m, k)).astype("int16"))
  b = jnp.asarray(rng.integers(-2047, 2048, (k, n)).astype("int16"))
  ea, eb = tile_exponents(rng, m, k, n, 24)
  f = jax.jit(lambda x, y, ex, ey: kernels.gemm(x, y, ex, ey, bits_a=12, bits_b=12, block_k=24, isa=isa))
  return lambda: f(a, b, ea, eb)


def int8_candidates(rng, m, k, n, isa):
  """The INT8 kernel's candidates: 8-bit values (qmax 127) as int8, per-tensor and block exponents."""
  import jax
  import jax.numpy as jnp

  from jdfp import kernels

  a8 = jnp.asarray(rng.integers(-127, 128, (m, k)).astype("int8"))
  b8 = jnp.asarray(rng.integers(-127, 128, (k, n)).astype("int8"))
  e1 = jnp.full((1, 1), -10, jnp.int32)
  fns = {}
  for name, bk in (("jdfp_i8", None), ("jdfp_i8b24", 24), ("jdfp_i8b32", 32)):
    kb = 1 if bk is None else -(-k // bk)
    ea = e1 if bk is None else jnp.asarray(rng.integers(-12, -8, (m, kb)).astype("int32"))
    eb = e1 if bk is None else jnp.asarray(rng.integers(-12, -8, (kb, n)).astype("int32"))
    if bk == 24:  # HBFP tiles: one exponent per 24 rows (columns) of each block
      ea, eb = tile_exponents(rng, m, k, n, 24)
    f = jax.jit(lambda x, y, ex, ey, bk=bk: kernels.gemm_i8(x, y, ex, ey, bits_a=8, bits_b=8, block_k=bk, isa=isa))
    fns[name] = lambda f=f, ea=ea, eb=eb: f(a8, b8, ea, eb)
  return fns
