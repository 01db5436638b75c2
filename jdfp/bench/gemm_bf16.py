"""``python -m jdfp.bench gemm_bf16``: the BF16 GEMM kernel (vdpbf16ps) and, on AMX-BF16 CPUs, the FP16
GEMM (float16 = two bfloat16 on the tiles) against XLA's dots, side by side.

Candidates (all jitted, same process, timed round-robin; GFLOP/s counts 2*M*K*N):
  xla_f32       jnp.dot on float32                                  (the baseline)
  xla_bf16_f32  bf16 operands widened to float32, then jnp.dot       (what the BF16 recipe ran before)
  xla_bf16      XLA's own bf16 dot, float32 result                   (on AMX tiles up to jax 0.12.0)
  jdfp_amx_bf16 jdfp kernel on AMX-BF16 tiles, bf16 -> float32        (the recipe's dots on AMX-BF16 CPUs)
  jdfp_bf16     jdfp kernel, bfloat16 operands -> float32            (docs/arithmetic.md, "BF16 GEMM")
  jdfp_f32r     jdfp kernel, float32 operands rounded to bf16 while packing
  xla_f16_f32   float16 operands widened to float32, then jnp.dot    (the FP16 recipe's dots without AMX)
  jdfp_f16      jdfp FP16 GEMM on AMX-BF16 tiles, float16 -> float32 (docs/arithmetic.md; AMX-BF16 CPUs only)
"""

from __future__ import annotations

import argparse
import json
import os

DEFAULT_SIZES = ["512", "1024", "2048", "512x1024x1024"]


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="N (square) or MxKxN; default: %(default)s")
  p.add_argument("--isa", default="auto", help="kernel ISA: auto, scalar, avx512_bf16")
  p.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--min-time", type=float, default=0.05, help="seconds per timing sample")
  p.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def main(args: argparse.Namespace) -> int:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jdfp import kernels
  from jdfp._src.ffi.gemm_bf16 import amx_bf16_ready, gemm_bf16, gemm_f16, has_avx512_bf16
  from jdfp.bench._timing import host_memory, parse_shape, print_table, time_side_by_side

  if not kernels.kernel_available():
    raise kernels.KernelUnavailableError("libjdfp_ffi.so is not built; see README.md (install)")
  rng = np.random.default_rng(0)
  results = []
  for text in args.sizes:
    m, k, n = parse_shape(text)
    af = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
    bf = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32))
    a16, b16 = af.astype(jnp.bfloat16), bf.astype(jnp.bfloat16)
    f_f32 = jax.jit(lambda x, y: jnp.dot(x, y))
    f_wide = jax.jit(lambda x, y: jnp.dot(x.astype(jnp.float32), y.astype(jnp.float32)))
    f_native = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f_k = jax.jit(lambda x, y: gemm_bf16(x, y, isa=args.isa))
    h16, g16 = af.astype(jnp.float16), bf.astype(jnp.float16)
    fns = {
        "xla_f32": lambda: f_f32(af, bf),
        "xla_bf16_f32": lambda: f_wide(a16, b16),
        "xla_bf16": lambda: f_native(a16, b16),
        "jdfp_bf16": lambda: f_k(a16, b16),
        "jdfp_f32r": lambda: f_k(af, bf),
        "xla_f16_f32": lambda: f_wide(h16, g16),
    }
    if amx_bf16_ready():
      f_h = jax.jit(gemm_f16)
      f_t = jax.jit(lambda x, y: gemm_bf16(x, y, isa="amx_bf16"))
      fns["jdfp_f16"] = lambda: f_h(h16, g16)
      fns["jdfp_amx_bf16"] = lambda: f_t(a16, b16)
    secs = time_side_by_side(fns, repeats=args.repeats, warmup=args.warmup, min_time=args.min_time)
    ops = 2.0 * m * k * n
    row = {"m": m, "k": k, "n": n, "seconds": secs, "gflops": {nm: ops / s / 1e9 for nm, s in secs.items()},
           "speedup_vs_xla_f32": {nm: secs["xla_f32"] / s for nm, s in secs.items()}}
    results.append(row)
    print(f"  {m}x{k}x{n}: " + ", ".join(f"{nm} {g:.1f}" for nm, g in row["gflops"].items()) + " GFLOP/s",
          flush=True)
  cols = ["M x K x N", "XLA f32", "XLA bf16->f32", "XLA bf16", "jdfp bf16", "jdfp f32r", "bf16/f32",
          "bf16/XLA bf16->f32", "f32r/f32", "XLA bf16/f32", "jdfp AMX bf16", "AMX bf16/f32", "XLA f16->f32",
          "jdfp f16", "f16/f32"]
  rows = []
  for r in results:
    g, s = r["gflops"], r["speedup_vs_xla_f32"]
    rows.append([f"{r['m']}x{r['k']}x{r['n']}", f"{g['xla_f32']:.1f}", f"{g['xla_bf16_f32']:.1f}",
                 f"{g['xla_bf16']:.1f}", f"{g['jdfp_bf16']:.1f}", f"{g['jdfp_f32r']:.1f}", f"{s['jdfp_bf16']:.2f}x",
                 f"{g['jdfp_bf16'] / g['xla_bf16_f32']:.2f}x", f"{s['jdfp_f32r']:.2f}x", f"{s['xla_bf16']:.2f}x",
                 f"{g['jdfp_amx_bf16']:.1f}" if "jdfp_amx_bf16" in g else "-",
                 f"{s['jdfp_amx_bf16']:.2f}x" if "jdfp_amx_bf16" in s else "-", f"{g['xla_f16_f32']:.1f}", f"{g['jdfp_f16']:.1f}" if "jdfp_f16" in g else "-",
                 f"{s['jdfp_f16']:.2f}x" if "jdfp_f16" in s else "-"])
  isa = args.isa if args.isa != "auto" else ("avx512_bf16" if has_avx512_bf16() else "scalar")
  amx = "AMX-BF16: the recipe's dots run on jdfp's tile path" if amx_bf16_ready() else "no AMX-BF16"
  title = (f"jdfp BF16 GEMM, isa {isa}, {amx}, jax {jax.__version__}, {os.cpu_count()} CPUs -- GFLOP/s "
           f"(median of {args.repeats})")
  print_table(title, cols, rows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": {"jax": jax.__version__, "isa": isa, "amx_bf16": kernels.has_amx_bf16(),
                          "fp16_gemm_on_amx": amx_bf16_ready(),
                          "cpu_count": os.cpu_count(), "memory": host_memory()},
                 "results": results},
                f, indent=2)
    print(f"wrote {args.json}")
  return 0
