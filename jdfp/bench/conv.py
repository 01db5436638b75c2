"""``python -m jdfp.bench conv``: the exact INT16 conv kernel against XLA's convs, per training pass.

Per layer (ResNet-style, NHWC / HWIO) and pass, all jitted in one process:
  forward          xla_f32 lax.conv_general_dilated float32      xla_i16 the same on int16 -> int32
                   jdfp    kernels.conv (int16 in, exact)
  backward-data    xla_f32 the conv's VJP w.r.t. the input       xla_i16 the same transposed conv on int16
                   jdfp    kernels.conv_input_grad
  weight-gradient  xla_f32 the conv's VJP w.r.t. the kernel      xla_i16 the same conv on int16
                   jdfp    kernels.conv_weight_grad
  train (op)       float32 in, both gradients: jax.grad of lax.conv vs jdfp.conv_general_dilated
                   (DFP14, backend ffi; includes quantizing x, w and dy) -- xla_i16 not applicable.
  jdfp_bf16        the same passes on the BF16 conv kernel (vdpbf16ps; bfloat16 in, float32 out),
                   and for train (op) `jdfp.policies.bf16()` -- where the CPU has AVX512_BF16.
  jdfp_bf16_amx    the three passes on the BF16 conv kernel's AMX-BF16 tiles (isa "amx_bf16"), where
                   they are ready (the recipe's train (op) row then runs there too).
GOP/s counts 2 * N * OH * OW * KH * KW * C/G * O for every pass.  xla_f32, jdfp and jdfp_bf16 are
timed round-robin (median of --repeats); XLA's int16 conv is a slow naive loop, timed --i16-repeats
times on its own (0 skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

# name: (batch, H, W, C, KH, KW, O, stride)
LAYERS = {
    "3x3_64_56": (8, 56, 56, 64, 3, 3, 64, 1),
    "3x3_64_28": (16, 28, 28, 64, 3, 3, 64, 1),
    "3x3s2_64_128": (8, 56, 56, 64, 3, 3, 128, 2),
    "1x1_64_256": (8, 56, 56, 64, 1, 1, 256, 1),
    "1x1s2_256_512": (8, 56, 56, 256, 1, 1, 512, 2),
}
PASSES = ("forward", "backward-data", "weight-gradient", "train-op")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS),
                 help="layers to run; default: all")
  p.add_argument("--batch", type=int, default=0, help="override every layer's batch size")
  p.add_argument("--passes", nargs="+", default=list(PASSES), choices=list(PASSES))
  p.add_argument("--bits", type=int, default=14, help="bits of both operands (14 -> chain 32)")
  p.add_argument("--isa", default="auto", help="kernel ISA: auto, scalar, avx2, avx_vnni, avx512_vnni")
  p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--min-time", type=float, default=0.05, help="seconds per timing sample")
  p.add_argument("--i16-repeats", type=int, default=1, help="timings of XLA's int16 conv (0: skip it)")
  p.add_argument("--no-bf16", action="store_true", help="skip the BF16 conv kernel rows")
  p.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def _time_once(fn, repeats):
  fn().block_until_ready()  # compile + warm
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn().block_until_ready()
    ts.append(time.perf_counter() - t0)
  return sorted(ts)[len(ts) // 2]


def main(args: argparse.Namespace) -> int:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  import jdfp
  from jdfp import kernels
  from jdfp._src.ffi.conv import conv_input_grad_setup
  from jdfp.bench._timing import print_table, time_side_by_side

  if not kernels.kernel_available():
    raise kernels.KernelUnavailableError("libjdfp_ffi.so is not built; see README.md (install)")
  bits = args.bits
  q = 2 ** (bits - 1) - 1
  isa = kernels.best_isa() if args.isa == "auto" else args.isa
  policy = jdfp.Policy(lhs=jdfp.DFP(bits), rhs=jdfp.DFP(bits), grad=jdfp.DFP(bits), backend="ffi", isa=isa)
  dn = ("NHWC", "HWIO", "NHWC")
  with_bf16 = not args.no_bf16 and kernels.has_avx512_bf16()
  with_amx = with_bf16 and kernels.amx_bf16_ready()
  rng = np.random.default_rng(0)
  results = []
  for name in args.layers:
    n, h, w_, c, kh, kw, o, s = LAYERS[name]
    n = args.batch or n
    strides = (s, s)
    pads = kernels.conv_padding("SAME", (h, w_), (kh, kw), strides, (1, 1), (1, 1))
    oh, ow = kernels.conv_out_spatial((h, w_), (kh, kw), strides, pads, (1, 1), (1, 1))
    ops = 2.0 * n * oh * ow * kh * kw * c * o
    x16 = jnp.asarray(rng.integers(-q, q + 1, (n, h, w_, c), dtype=np.int16))
    w16 = jnp.asarray(rng.integers(-q, q + 1, (kh, kw, c, o), dtype=np.int16))
    d16 = jnp.asarray(rng.integers(-q, q + 1, (n, oh, ow, o), dtype=np.int16))
    xf = jnp.asarray(rng.standard_normal((n, h, w_, c), dtype=np.float32))
    wf = jnp.asarray(rng.standard_normal((kh, kw, c, o), dtype=np.float32) * 0.05)
    df = jnp.asarray(rng.standard_normal((n, oh, ow, o), dtype=np.float32))
    e = jnp.full((1,), -10, jnp.int32)
    kk = dict(window_strides=strides, padding=pads)
    conv32 = lambda a, b: lax.conv_general_dilated(a, b, strides, pads, dimension_numbers=dn)
    conv16 = lambda a, b, st, pd, ld: lax.conv_general_dilated(
        a, b, st, pd, lhs_dilation=ld, dimension_numbers=dn, preferred_element_type=jnp.int32)
    # backward-data as XLA's transpose rule builds it: dy (lhs-dilated by the strides) * flipped kernel.
    wt16, pads_t = conv_input_grad_setup(w16, (h, w_), strides, pads, (1, 1), (1, 1), 1)
    # weight-gradient as a conv: batch <-> features of x, dy as the kernel, rhs dilation = strides.
    pads_w = tuple((lo, (k - 1) + (od - 1) * s + 1 - i - lo) for (lo, _), k, od, i in
                   zip(pads, (kh, kw), (oh, ow), (h, w_)))
    wgrad16 = lambda a, b: lax.conv_general_dilated(
        a, b, (1, 1), pads_w, rhs_dilation=strides, dimension_numbers=("CHWN", "IHWO", "NHWC"),
        preferred_element_type=jnp.int32)
    cands = {
        "forward": dict(
            xla_f32=(jax.jit(conv32), (xf, wf)),
            xla_i16=(jax.jit(lambda a, b: conv16(a, b, strides, pads, (1, 1))), (x16, w16)),
            jdfp=(jax.jit(lambda a, b: kernels.conv(a, b, e, e, bits_x=bits, bits_w=bits, isa=isa, **kk)),
                  (x16, w16))),
        "backward-data": dict(
            xla_f32=(jax.jit(lambda a, b, d: jax.vjp(lambda t: conv32(t, b), a)[1](d)[0]), (xf, wf, df)),
            xla_i16=(jax.jit(lambda d, b: conv16(d, b, (1, 1), pads_t, strides)), (d16, wt16)),
            jdfp=(jax.jit(lambda d, b: kernels.conv_input_grad(d, b, e, e, input_spatial=(h, w_), bits_dy=bits,
                                                               bits_w=bits, isa=isa, **kk)), (d16, w16))),
        "weight-gradient": dict(
            xla_f32=(jax.jit(lambda a, b, d: jax.vjp(lambda t: conv32(a, t), b)[1](d)[0]), (xf, wf, df)),
            xla_i16=(jax.jit(wgrad16), (x16, d16)),
            jdfp=(jax.jit(lambda a, d: kernels.conv_weight_grad(a, d, e, e, kernel_spatial=(kh, kw), bits_x=bits,
                                                                bits_dy=bits, isa=isa, **kk)), (x16, d16))),
        "train-op": dict(
            xla_f32=(jax.jit(jax.grad(lambda a, b, d: jnp.vdot(conv32(a, b), d), argnums=(0, 1))), (xf, wf, df)),
            jdfp=(jax.jit(jax.grad(lambda a, b, d: jnp.vdot(jdfp.conv_general_dilated(
                a, b, strides, pads, dimension_numbers=dn, policy=policy), d), argnums=(0, 1))), (xf, wf, df))),
    }
    if with_bf16:
      xb, wb, db = xf.astype(jnp.bfloat16), wf.astype(jnp.bfloat16), df.astype(jnp.bfloat16)
      bf16_policy = jdfp.policies.bf16()
      cands["forward"]["jdfp_bf16"] = (jax.jit(lambda a, b: kernels.conv_bf16(a, b, **kk)), (xb, wb))
      cands["backward-data"]["jdfp_bf16"] = (
          jax.jit(lambda d, b: kernels.conv_bf16_input_grad(d, b, input_spatial=(h, w_), **kk)), (db, wb))
      cands["weight-gradient"]["jdfp_bf16"] = (
          jax.jit(lambda a, d: kernels.conv_bf16_weight_grad(a, d, kernel_spatial=(kh, kw), **kk)), (xb, db))
      cands["train-op"]["jdfp_bf16"] = (jax.jit(jax.grad(lambda a, b, d: jnp.vdot(jdfp.conv_general_dilated(
          a, b, strides, pads, dimension_numbers=dn, policy=bf16_policy), d), argnums=(0, 1))), (xf, wf, df))
      if with_amx:  # the same passes on the AMX-BF16 tiles (train-op: the recipe takes them itself)
        ka = dict(kk, isa="amx_bf16")
        cands["forward"]["jdfp_bf16_amx"] = (jax.jit(lambda a, b: kernels.conv_bf16(a, b, **ka)), (xb, wb))
        cands["backward-data"]["jdfp_bf16_amx"] = (
            jax.jit(lambda d, b: kernels.conv_bf16_input_grad(d, b, input_spatial=(h, w_), **ka)), (db, wb))
        cands["weight-gradient"]["jdfp_bf16_amx"] = (
            jax.jit(lambda a, d: kernels.conv_bf16_weight_grad(a, d, kernel_spatial=(kh, kw), **ka)), (xb, db))
    for ps in args.passes:
      cd = cands[ps]
      fns = {k: (lambda f=f, a=a: f(*a)) for k, (f, a) in cd.items() if k != "xla_i16"}
      secs = time_side_by_side(fns, repeats=args.repeats, warmup=args.warmup, min_time=args.min_time)
      if "xla_i16" in cd and args.i16_repeats > 0:
        f, a = cd["xla_i16"]
        secs["xla_i16"] = _time_once(lambda: f(*a), args.i16_repeats)
      ps_ops = ops * (3 if ps == "train-op" else 1)
      row = {"layer": name, "pass": ps, "shape": dict(n=n, h=h, w=w_, c=c, kh=kh, kw=kw, o=o, stride=s),
             "seconds": secs, "gops": {k: ps_ops / t / 1e9 for k, t in secs.items()},
             "jdfp_vs_xla_f32": secs["xla_f32"] / secs["jdfp"]}
      if "xla_i16" in secs:
        row["jdfp_vs_xla_i16"] = secs["xla_i16"] / secs["jdfp"]
      if "jdfp_bf16" in secs:
        row["jdfp_bf16_vs_xla_f32"] = secs["xla_f32"] / secs["jdfp_bf16"]
      if "jdfp_bf16_amx" in secs:
        row["jdfp_bf16_amx_vs_xla_f32"] = secs["xla_f32"] / secs["jdfp_bf16_amx"]
      results.append(row)
      print(f"  {name} {ps}: " + ", ".join(f"{k} {1e3 * t:.1f} ms" for k, t in secs.items()) +
            f" -> jdfp {row['jdfp_vs_xla_f32']:.2f}x xla_f32", flush=True)

  cols = ["layer", "pass", "XLA f32 ms", "XLA i16 ms", "jdfp ms", "jdfp GOP/s", "vs f32", "vs i16"]
  cols += ["bf16 ms", "bf16 vs f32"] if with_bf16 else []
  cols += ["bf16 amx ms", "amx vs f32"] if with_amx else []
  rows = []
  for r in results:
    sc = r["seconds"]
    rows.append([r["layer"], r["pass"], f"{1e3 * sc['xla_f32']:.1f}",
                 f"{1e3 * sc['xla_i16']:.0f}" if "xla_i16" in sc else "-", f"{1e3 * sc['jdfp']:.1f}",
                 f"{r['gops']['jdfp']:.0f}", f"{r['jdfp_vs_xla_f32']:.2f}x",
                 f"{r['jdfp_vs_xla_i16']:.0f}x" if "jdfp_vs_xla_i16" in r else "-"])
    if with_bf16:
      rows[-1] += [f"{1e3 * sc['jdfp_bf16']:.1f}", f"{r['jdfp_bf16_vs_xla_f32']:.2f}x"]
    if with_amx:
      amx = "jdfp_bf16_amx" in sc
      rows[-1] += [f"{1e3 * sc['jdfp_bf16_amx']:.1f}" if amx else "-",
                   f"{r['jdfp_bf16_amx_vs_xla_f32']:.2f}x" if amx else "-"]
  title = (f"jdfp conv, bits {bits} (chain {kernels.safe_chain_length(bits, bits)}), isa {isa}, "
           f"jax {jax.__version__}, {os.cpu_count()} CPUs (median of {args.repeats})")
  print_table(title, cols, rows)
  if args.json:
    from jdfp.bench._timing import cpu_name, host_memory
    meta = {"jax": jax.__version__, "python": platform.python_version(), "isa": isa, "bits": bits,
            "available_isas": list(kernels.available_isas()), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "processor": cpu_name(), "memory": host_memory()}
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {args.json}")
  return 0
