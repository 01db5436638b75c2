"""``python -m jdfp.bench ops``: the drop-in ops exactly as users call them, against the lax ops.

Every candidate is one jitted function of float32 inputs, timed round-robin in the same process:
  lax      ``lax.dot_general`` / ``jnp.einsum`` / ``lax.conv_general_dilated`` in FP32 (the baseline)
  jdfp     ``jdfp.dot_general`` / ``jdfp.einsum`` / ``jdfp.conv_general_dilated``, default ``jdfp.Policy()``
  dfp16    the same with ``jdfp.policies.dfp16()`` (stochastic gradients: the op takes a key)
  hbfp8, hbfp12, fp16, bf16   the other recipes of ``jdfp.policies``, on request (``--candidates``)
Passes:
  fwd      the op alone
  fwd+bwd  the output and both input gradients: ``out, vjp = jax.vjp(op, a, b); vjp(ct)``
Cases (``--cases``; names below, ``small`` / ``square`` / ``train`` / ``conv`` select groups):
  dot     M x K x N: square 256-2048 (``sq256`` ...), training-shaped (``mlp_in``: batch 512 through a
          1024 -> 1024 Dense, ``wide``: 4096 x 512 x 1024), small ``s16`` ... ``s128`` (M = N = K)
  einsum  ``attn``: "bqd,bkd->bqk", 8 x 256 x 256 x 64; plus the dot cases as "mk,kn->mn"
  conv    NHWC / HWIO, SAME: ``c3x3_28``: 16 x 28 x 28, 64 -> 64; small ``cs16`` ... ``cs128``: 1x1
          convs with M = N = K (batch 1, H*W = C = O); ``digits``: the README demo's 3x3 16 -> 16 on
          8 x 8, batch 64
Reported: median microseconds per call and the ratio lax / jdfp (> 1: jdfp faster).

``--parts N [N ...]``: instead, the pieces of one forward ``jdfp.dot_general`` at N x N x N, timed
side by side (docs/op_costs.md): the op, lax, each kernel call alone (counting / plain conversion,
exponent-only call, int16 and float32-input GEMM), a jitted no-op, and the custom calls in the HLO.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

# name: (M, K, N)
DOT_CASES = {
    "sq256": (256, 256, 256), "sq512": (512, 512, 512), "sq1024": (1024, 1024, 1024),
    "sq2048": (2048, 2048, 2048), "mlp_in": (512, 1024, 1024), "wide": (4096, 512, 1024),
    "s16": (16, 16, 16), "s32": (32, 32, 32), "s64": (64, 64, 64), "s128": (128, 128, 128),
}
# name: (batch, H, W, C, KH, KW, O)
CONV_CASES = {
    "c3x3_28": (16, 28, 28, 64, 3, 3, 64), "digits": (64, 8, 8, 16, 3, 3, 16),
    "cs16": (1, 4, 4, 16, 1, 1, 16), "cs32": (1, 4, 8, 32, 1, 1, 32), "cs64": (1, 8, 8, 64, 1, 1, 64),
    "cs128": (1, 8, 16, 128, 1, 1, 128),
}
GROUPS = {
    "square": ["dot:sq256", "dot:sq512", "dot:sq1024", "dot:sq2048"],
    "train": ["dot:mlp_in", "dot:wide", "einsum:attn", "einsum:mlp_in", "conv:c3x3_28", "conv:digits"],
    "small": ["dot:s16", "dot:s32", "dot:s64", "dot:s128", "einsum:s64", "conv:cs16", "conv:cs64",
              "conv:cs128"],
}
DEFAULT_CASES = ["square", "train", "small"]
RECIPES = ("dfp16", "hbfp8", "hbfp12", "fp16", "bf16")
OPS = ("lax", "jdfp") + RECIPES
DEFAULT_OPS = ("lax", "jdfp", "dfp16")
PASSES = ("fwd", "fwd+bwd")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--cases", nargs="+", default=DEFAULT_CASES,
                 help="groups (square, train, small) or op:name (dot:sq1024, einsum:attn, conv:digits); "
                      "default: %(default)s")
  p.add_argument("--passes", nargs="+", default=list(PASSES), choices=list(PASSES))
  p.add_argument("--candidates", nargs="+", default=list(DEFAULT_OPS), choices=list(OPS),
                 help="default: %(default)s")
  p.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--min-time", type=float, default=0.05, help="seconds per timing sample")
  p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  p.add_argument("--parts", nargs="+", type=int, metavar="N", help="time the pieces of the op at N^3 instead")


def expand_cases(names) -> list[str]:
  out = []
  for n in names:
    for c in GROUPS.get(n, [n]):
      op, _, case = c.partition(":")
      known = CONV_CASES if op == "conv" else DOT_CASES if op == "dot" else {**DOT_CASES, "attn": None}
      if op not in ("dot", "einsum", "conv") or case not in known:
        raise SystemExit(f"unknown case {c!r}: use a group {sorted(GROUPS)} or dot:/einsum:/conv:<name>")
      if c not in out:
        out.append(c)
  return out


def make_case(case: str, rng, candidates=OPS):
  """(operands, {candidate: op(a, b, key)}, flops of the forward, shape text) of one case."""
  import jax.numpy as jnp
  from jax import lax

  import jdfp

  op, _, name = case.partition(":")
  normal = lambda shape, scale=1.0: jnp.asarray(rng.standard_normal(shape, dtype="float32") * scale)
  policies = {c: jdfp.Policy() if c == "jdfp" else getattr(jdfp.policies, c)() for c in candidates if c != "lax"}
  keyed = lambda pol: pol.grad_rounding == "stochastic" or pol.fwd_rounding == "stochastic"
  fns = {}
  if op == "conv":
    n, h, w, c, kh, kw, o = CONV_CASES[name]
    a, b = normal((n, h, w, c)), normal((kh, kw, c, o), (kh * kw * c) ** -0.5)
    conv_kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    fns["lax"] = lambda x, y, k: lax.conv_general_dilated(x, y, **conv_kw)
    for cand, pol in policies.items():
      fns[cand] = (lambda x, y, k, pol=pol: jdfp.conv_general_dilated(
          x, y, **conv_kw, policy=pol, key=k if keyed(pol) else None))
    return (a, b), fns, 2.0 * n * h * w * kh * kw * c * o, f"{n}x{h}x{w}x{c} * {kh}x{kw}x{c}x{o}"
  if name == "attn":
    bq, q, kk, d = 8, 256, 256, 64
    a, b = normal((bq, q, d)), normal((bq, kk, d))
    spec, flops, text = "bqd,bkd->bqk", 2.0 * bq * q * kk * d, f"{bq}x{q}x{d} . {bq}x{kk}x{d}"
  else:
    m, k, nn = DOT_CASES[name]
    a, b = normal((m, k)), normal((k, nn), k ** -0.5)
    spec, flops, text = "mk,kn->mn", 2.0 * m * k * nn, f"{m}x{k}x{nn}"
  if op == "einsum":
    fns["lax"] = lambda x, y, k: jnp.einsum(spec, x, y)
    for cand, pol in policies.items():
      fns[cand] = lambda x, y, k, pol=pol: jdfp.einsum(spec, x, y, policy=pol, key=k if keyed(pol) else None)
  else:
    dn = (((1,), (0,)), ((), ()))
    fns["lax"] = lambda x, y, k: lax.dot_general(x, y, dn)
    for cand, pol in policies.items():
      fns[cand] = lambda x, y, k, pol=pol: jdfp.dot_general(x, y, dn, policy=pol, key=k if keyed(pol) else None)
  return (a, b), fns, flops, text


def jitted(fn, pass_: str, ct):
  """The jitted callable of one candidate and pass: fwd, or out + both gradients."""
  import jax

  if pass_ == "fwd":
    return jax.jit(fn)

  def fwd_bwd(a, b, k, g):
    out, vjp = jax.vjp(lambda x, y: fn(x, y, k), a, b)
    return (out,) + tuple(vjp(g))
  return lambda a, b, k, f=jax.jit(fwd_bwd): f(a, b, k, ct)


def custom_calls(fn, *args) -> dict[str, int]:
  """Custom calls in the optimized HLO of ``jax.jit(fn)(*args)``, by target."""
  import re
  from collections import Counter

  import jax
  return dict(Counter(re.findall(r'custom_call_target="([^"]+)"', jax.jit(fn).lower(*args).compile().as_text())))


def parts(args, rng) -> list[dict]:
  """The pieces of a forward jdfp.dot_general, timed side by side at each N^3."""
  import jax
  import jax.numpy as jnp
  from jax import lax

  import jdfp
  from jdfp import kernels
  from jdfp._src.ffi import quantize as ffi_quantize
  from jdfp.bench._timing import print_table, time_side_by_side

  dn = (((1,), (0,)), ((), ()))
  rows, out = [], []

  def int16_path(a, b):  # the op's path before the exponent-only call: convert both, int16 GEMM
    (qa, ea), (qb, eb) = kernels.quantize_dfp(a, bits=14), kernels.quantize_dfp(b, bits=14)
    return kernels.gemm(qa, qb, ea, eb, bits_a=14, bits_b=14)

  for n in args.parts:
    a = jnp.asarray(rng.standard_normal((n, n), dtype="float32"))
    b = jnp.asarray(rng.standard_normal((n, n), dtype="float32"))
    qa, ea = kernels.quantize_dfp(a, bits=14)
    qb, eb = kernels.quantize_dfp(b, bits=14)
    first = lambda f: (lambda *x: jax.tree.leaves(f(*x))[0])
    fns = {
        "noop": (jax.jit(lambda a: a[:1, :1] + 1.0), (a,)),
        "lax": (jax.jit(lambda a, b: lax.dot_general(a, b, dn)), (a, b)),
        "jdfp_op": (jax.jit(lambda a, b: jdfp.dot_general(a, b, dn)), (a, b)),
        "int16_path": (jax.jit(int16_path), (a, b)),
        "convert_counted": (jax.jit(first(lambda a: kernels.quantize_dfp(a, bits=14, counted=True))), (a,)),
        "convert": (jax.jit(first(lambda a: kernels.quantize_dfp(a, bits=14))), (a,)),
        "exponents_ab": (jax.jit(first(lambda a, b: ffi_quantize.dfp_exponents(a, b, bits=14))), (a, b)),
        "gemm_i16": (jax.jit(lambda x, y, u, v: kernels.gemm(x, y, u, v, bits_a=14, bits_b=14)), (qa, qb, ea, eb)),
        "gemm_q": (jax.jit(lambda x, y, u, v: kernels.gemm(x, y, u, v, bits_a=14, bits_b=14)), (a, b, ea, eb)),
    }
    secs = time_side_by_side({k: (lambda f=f, x=x: f(*x)) for k, (f, x) in fns.items()},
                             repeats=args.repeats, warmup=args.warmup, min_time=args.min_time)
    calls = custom_calls(lambda a, b: jdfp.dot_general(a, b, dn), a, b)
    calls_bwd = custom_calls(lambda a, b, g: jax.vjp(lambda x, y: jdfp.dot_general(x, y, dn), a, b)[1](g), a, b, a)
    out.append({"n": n, "us": {k: 1e6 * v for k, v in secs.items()}, "custom_calls_fwd": calls,
                "custom_calls_fwd_bwd": calls_bwd})
    rows.append([str(n)] + [f"{1e6 * secs[k]:.0f}" for k in fns] + [str(sum(calls.values())),
                                                                   str(sum(calls_bwd.values()))])
  print_table(f"pieces of a forward jdfp.dot_general at N^3, us (median of {args.repeats}), jax {jax.__version__}",
              ["N"] + list(fns) + ["calls fwd", "calls fwd+bwd"], rows)
  return out


def main(args: argparse.Namespace) -> int:
  import jax
  import numpy as np

  from jdfp import kernels
  from jdfp.bench._timing import cpu_name, host_memory, isa_label, print_table, time_side_by_side

  if not kernels.kernel_available():
    raise kernels.KernelUnavailableError("libjdfp_ffi.so is not built; see README.md (install)")
  rng = np.random.default_rng(0)
  key = jax.random.key(0)
  results = []
  if args.parts:
    results = parts(args, rng)
  for case in ([] if args.parts else expand_cases(args.cases)):
    (a, b), fns, flops, text = make_case(case, rng, args.candidates)
    out_shape = jax.eval_shape(lambda x, y: fns["lax"](x, y, None), a, b).shape
    ct = jax.numpy.asarray(rng.standard_normal(out_shape, dtype="float32"))
    for pass_ in args.passes:
      calls = {}
      for cand in args.candidates:
        f = jitted(fns[cand], pass_, ct)
        calls[cand] = (lambda f=f: f(a, b, key))
      secs = time_side_by_side(calls, repeats=args.repeats, warmup=args.warmup, min_time=args.min_time)
      row = {"case": case, "shape": text, "pass": pass_, "flops_fwd": flops,
             "us": {c: 1e6 * s for c, s in secs.items()}}
      if "lax" in secs:
        row["vs_lax"] = {c: secs["lax"] / s for c, s in secs.items() if c != "lax"}
      results.append(row)
      print(f"  {case} {pass_}: " + ", ".join(f"{c} {1e6 * s:.1f} us" for c, s in secs.items()) +
            ("; " + ", ".join(f"{c} {r:.2f}x lax" for c, r in row.get("vs_lax", {}).items())), flush=True)

  others = [c for c in args.candidates if c != "lax"]
  cols = (["case", "shape", "pass"] + [f"{c} us" for c in args.candidates] +
          ([f"{c} vs lax" for c in others] if "lax" in args.candidates else []))
  rows = []
  for r in ([] if args.parts else results):
    rows.append([r["case"], r["shape"], r["pass"]] + [f"{r['us'][c]:.1f}" for c in args.candidates] +
                [f"{r['vs_lax'][c]:.2f}x" for c in others if "vs_lax" in r])
  title = (f"jdfp ops vs lax, float32 inputs, jitted; isa {isa_label()}, jax {jax.__version__}, "
           f"{os.cpu_count()} CPUs (median of {args.repeats}; vs lax > 1: jdfp faster)")
  if rows:
    print_table(title, cols, rows)
  if args.json:
    meta = {"jax": jax.__version__, "python": platform.python_version(), "isa": isa_label(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": cpu_name(),
            "memory": host_memory()}
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {args.json}")
  return 0
