"""``python -m jdfp.bench train``: end-to-end training steps, FP32 vs jdfp, side by side.

Workloads (jitted step = forward + backward + optax SGD-momentum update):
  mlp   3 x Dense(1024) on [512, 1024] inputs
  cnn   ResNet-style CNN on 32x32x3, batch 32: conv 3x3 3->64, 2 residual blocks (3x3 64->64),
        a stride-2 block to 128 with a 1x1 projection, global pooling, Dense(10)
  small 64-128-10 MLP (Dense 64 -> 128, ReLU, Dense 128 -> 10, softmax cross-entropy), batch 64:
        where the per-op fixed costs show
  demo  the README demo's ResNet at its size (`examples/demo.py`, without its BatchNorm scales):
        12x12x1 inputs, batch 128, conv 3x3 1->32, one residual block (3x3 32->32), a stride-2 block
        to 64 with a 1x1 projection, pooling, Dense(10)
  digits  the earlier demo's ResNet (`examples/train_cnn.py`'s default): 8x8x1 inputs, batch 64,
        widths 16 and 32: a model small enough for the per-op fixed costs to show
  transformer  a 2-layer causal transformer LM, d=256, 4 heads, seq 128, batch 16, vocabulary 256:
        pre-norm blocks of causal attention (QKV, scores, weighted values, output projection: all
        jdfp GEMMs) and a 4x GELU MLP, a vocabulary head, next-token cross-entropy

Candidates (default: fp32, every recipe:NAME, dfp16_flax; the others on request):
  fp32        lax.dot_general / lax.conv_general_dilated (the baseline)
  dfp16       jdfp ops on the FFI kernel, DFP 14 effective bits (chains of 32), nearest rounding
  dfp16_lean  dfp16 with `Policy(float_residuals=...)` for operands that stay alive anyway (weights,
              and the input batch for the first layer): no int16 copies of them are kept for the
              backward (gradients bit-identical to dfp16; the backward GEMMs quantize them again)
  dfp16_ref   jdfp ops on the pure-JAX exact reference path (same bits as dfp16)
  dfp16_flax  the user's path: the same forward as one Flax Linen module calling `lax.dot_general` /
              `lax.conv_general_dilated`, wrapped with `jdfp.quantize(module, <dfp16's policy>)`; every step
              also updates the "dfp" statistics collection (exponents, saturation, underflow of every
              operand and gradient), applied with `jdfp.overwrite_state`
  bf16        jdfp BF16 mixed precision (bf16 operands, fp32 accumulation; the vdpbf16ps kernel where
              the CPU has AVX512_BF16, else XLA dots; on AMX-BF16 CPUs the GEMM's and the conv
              kernel's tiles)
  recipe:NAME the recipes as users run them (NAME: dfp16, hbfp8, hbfp12, fp16, bf16): the Flax module
              of dfp16_flax through `jdfp.quantize(module, jdfp.policies.NAME())`, RNG stream "dfp"
              for stochastic rounding, optimizer `jdfp.recipes.optimizer(NAME, sgd, loss_scale=None,
              collections=("dfp",))` (FP32 masters; loss scaling left out so every step does the same
              work)

Reported: median step time, ratio to fp32 (>1 is faster), the step's trace + compile time and its
ratio to fp32's (`jit(step).lower(...).compile()`, once per process; the recipes' RNG key is a step
argument, as in a training loop), XLA's peak temp memory of the compiled
step, and the bytes saved for the backward pass (JAX's residual list, see `_saved_bytes`): the
activations (everything but weight copies), the part of them that are GEMM/conv operands (what jdfp
stores in int16; the rest are ReLU masks, BN and loss residuals, FP32 in every recipe), and weight
copies (jdfp's int16 weights).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
import warnings
from typing import Callable, NamedTuple

RECIPES = tuple(f"recipe:{r}" for r in ("dfp16", "hbfp8", "hbfp12", "fp16", "bf16"))
OP_CANDIDATES = ("dfp16", "dfp16_lean", "dfp16_ref", "bf16")
# The default: what users run (every recipe through jdfp.quantize, plus Policy()), beside FP32.
CANDIDATES = ("fp32",) + RECIPES + ("dfp16_flax",)
GEMM_OPERAND = "bench_gemm_operand"  # checkpoint_name of the activations that GEMMs/convs read


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
  p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES + OP_CANDIDATES))
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--min-time", type=float, default=0.2)
  p.add_argument("--json", metavar="PATH")


class Ops(NamedTuple):
  """The GEMM functions a workload calls; ``*_in`` for the layer that reads the input batch."""
  dot: Callable
  conv: Callable
  dot_in: Callable
  conv_in: Callable


def _ops(name) -> Ops:
  import jax.lax as lax

  import jdfp

  if name == "fp32":
    return Ops(lax.dot_general, lax.conv_general_dilated, lax.dot_general, lax.conv_general_dilated)
  if name == "dfp16_lean":
    policy = jdfp.Policy(backend="ffi", float_residuals=("rhs",))  # the weights are params: alive
    policy_in = policy.replace(float_residuals=("lhs", "rhs"))  # and so is the input batch
  else:
    policy_in = policy = {"dfp16": jdfp.Policy(backend="ffi"), "dfp16_ref": jdfp.Policy(backend="reference"),
                          "bf16": jdfp.policies.bf16()}[name]
  dot = lambda p: functools.partial(jdfp.dot_general, policy=p)
  conv = lambda p: functools.partial(jdfp.conv_general_dilated, policy=p)
  return Ops(dot(policy), conv(policy), dot(policy_in), conv(policy_in))


def _lax_at_call_time(name: str) -> Callable:
  """``jax.lax.<name>`` looked up at each call: inside `jdfp.quantize`'s frame that is its
  dispatcher (the dfp16_flax candidate), elsewhere plain lax."""
  def call(*args, **kwargs):
    import jax
    return getattr(jax.lax, name)(*args, **kwargs)
  return call


_LAX_AT_CALL_TIME = Ops(*(_lax_at_call_time(n) for n in ("dot_general", "conv_general_dilated") * 2))


def _flax_step(loss, params, batch, tx, recipe=None):
  """A training step of the workload as a Linen module through `jdfp.quantize`, statistics on:
  with `jdfp.Policy()` (nearest everywhere), or with ``recipe``'s policy and optimizer.

  Returns (step to jit, taking (variables, optimizer state, *batch, key), its initial (variables,
  optimizer state), function of the params for `_saved_bytes`)."""
  import jax
  from flax import linen as nn

  import jdfp

  class Workload(nn.Module):  # the workload's forward and loss; its GEMMs are found by module path
    @nn.compact
    def __call__(self, x, y):
      return loss(self.param("w", lambda _: params), x, y, _LAX_AT_CALL_TIME)

  if recipe is None:
    model = jdfp.quantize(Workload(), jdfp.Policy(backend="ffi"))
    otx = jdfp.overwrite_state(tx, collections=("dfp",))
  else:
    model = jdfp.quantize(Workload(), jdfp.policies.get(recipe))
    otx = jdfp.recipes.optimizer(recipe, tx, loss_scale=None, collections=("dfp",))
  variables = model.init({"params": jax.random.key(1), "dfp": jax.random.key(2)}, *batch)

  def step(v, s, x, y, key):
    # The key is an argument, as a training loop passes it: a constant key would let XLA fold the
    # per-op key derivation away and under-state the compile time of stochastic recipes.
    def lf(v):
      val, _ = model.apply(v, x, y, rngs={"dfp": key}, mutable=["dfp"])
      return val
    val, g = jax.value_and_grad(lf)(v)
    u, s = otx.update(g, s, v)
    return jax.tree.map(lambda a, b: a + b, v, u), s, val

  saved_fn = lambda p: model.apply({"params": {"w": p}, "dfp": variables["dfp"]}, *batch, rngs={"dfp": jax.random.key(3)},
                                  mutable=["dfp"])[0]
  return step, (dict(variables), otx.init(dict(variables))), saved_fn


def _operand(h):
  """Marks an activation GEMMs read (once per activation: a second name would be a second residual),
  so `_saved_bytes` can tell GEMM operands from other residuals."""
  from jax.ad_checkpoint import checkpoint_name
  return checkpoint_name(h, GEMM_OPERAND)


def _mlp(key):
  import jax
  import jax.numpy as jnp

  keys = jax.random.split(key, 5)
  params = [jax.random.normal(k, (1024, 1024)) * (2 / 1024) ** 0.5 for k in keys[:3]]
  x = jax.random.normal(keys[3], (512, 1024))
  y = jax.random.normal(keys[4], (512, 1024))
  dims = (((1,), (0,)), ((), ()))

  def loss(params, x, y, ops):
    h = x
    for i, w in enumerate(params):
      h = ops.dot_in(h, w, dims) if i == 0 else ops.dot(_operand(h), w, dims)
      if i < len(params) - 1:
        h = jax.nn.relu(h)
    return jnp.mean((h - y) ** 2)

  return params, (x, y), loss


def _small_mlp(key):
  import jax
  import jax.numpy as jnp

  k1, k2, k3, k4 = jax.random.split(key, 4)
  params = [jax.random.normal(k1, (64, 128)) * (2 / 64) ** 0.5, jax.random.normal(k2, (128, 10)) * 0.1]
  x = jax.random.normal(k3, (64, 64))
  y = jax.random.randint(k4, (64,), 0, 10)
  dims = (((1,), (0,)), ((), ()))

  def loss(params, x, y, ops):
    h = _operand(jax.nn.relu(ops.dot_in(x, params[0], dims)))
    logits = ops.dot(h, params[1], dims)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  return params, (x, y), loss


def _cnn(key, batch=32, hw=32, cin=3, width=64, blocks=2):
  """ResNet-style: stem, `blocks` residual blocks at `width`, a stride-2 block to 2 * width."""
  import jax
  import jax.numpy as jnp

  ks = iter(jax.random.split(key, 16))
  he = lambda shape: jax.random.normal(next(ks), shape) * (2 / (shape[0] * shape[1] * shape[2])) ** 0.5
  w2 = 2 * width
  params = {"stem": he((3, 3, cin, width))}
  for i in range(1, blocks + 1):
    params.update({f"b{i}a": he((3, 3, width, width)), f"b{i}b": he((3, 3, width, width))})
  params.update({"b3a": he((3, 3, width, w2)), "b3b": he((3, 3, w2, w2)), "b3p": he((1, 1, width, w2)),
                 "fc": jax.random.normal(next(ks), (w2, 10)) * 0.05})
  x = jax.random.normal(next(ks), (batch, hw, hw, cin))
  y = jax.random.randint(next(ks), (batch,), 0, 10)
  dn = ("NHWC", "HWIO", "NHWC")

  def norm(h):  # a parameter-free batch norm in FP32 (BN runs in FP32 in every recipe)
    c = h - jnp.mean(h, axis=(0, 1, 2))  # centred once: one f32 residual, as a fused BN keeps
    return c * jax.lax.rsqrt(jnp.mean(c * c, axis=(0, 1, 2)) + 1e-5)

  def loss(p, x, y, ops):
    c = lambda h, w, s=1: ops.conv(h, w, (s, s), "SAME", dimension_numbers=dn)
    act = lambda h: _operand(jax.nn.relu(h))  # every activation below is read by a conv or the FC
    h = act(norm(ops.conv_in(x, p["stem"], (1, 1), "SAME", dimension_numbers=dn)))
    for blk in (f"b{i}" for i in range(1, blocks + 1)):
      r = act(norm(c(h, p[blk + "a"])))
      h = act(h + norm(c(r, p[blk + "b"])))
    r = act(norm(c(h, p["b3a"], 2)))
    h = jax.nn.relu(norm(c(r, p["b3b"])) + norm(c(h, p["b3p"], 2)))
    h = _operand(jnp.mean(h, axis=(1, 2)))
    logits = ops.dot(h, p["fc"], (((1,), (0,)), ((), ())))
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  return params, (x, y), loss


def _transformer(key, batch=16, seq=128, d=256, heads=4, layers=2, vocab=256):
  """A causal transformer LM: token embedding, `layers` pre-norm blocks (multi-head causal
  attention, 4x MLP), a vocabulary head; next-token cross-entropy on random tokens."""
  import jax
  import jax.numpy as jnp

  ks = iter(jax.random.split(key, 4 * layers + 4))
  init = lambda shape: jax.random.normal(next(ks), shape) * shape[0] ** -0.5
  params = {"embed": jax.random.normal(next(ks), (vocab, d)) * 0.02, "head": init((d, vocab))}
  for i in range(layers):
    params.update({f"l{i}_qkv": init((d, 3 * d)), f"l{i}_o": init((d, d)), f"l{i}_up": init((d, 4 * d)),
                   f"l{i}_down": init((4 * d, d))})
  tokens = jax.random.randint(next(ks), (batch, seq + 1), 0, vocab)
  x, y = tokens[:, :-1], tokens[:, 1:]
  dh = d // heads
  mm = (((2,), (0,)), ((), ()))  # [B, T, D] x [D, F]
  qk = (((3,), (3,)), ((0, 1), (0, 1)))  # [B, H, T, dh] x [B, H, S, dh] -> [B, H, T, S]
  av = (((3,), (2,)), ((0, 1), (0, 1)))  # [B, H, T, S] x [B, H, S, dh] -> [B, H, T, dh]
  causal = jnp.tril(jnp.ones((seq, seq), bool))

  def norm(h):  # parameter-free layer norm, FP32 in every recipe
    c = h - jnp.mean(h, axis=-1, keepdims=True)
    return c * jax.lax.rsqrt(jnp.mean(c * c, axis=-1, keepdims=True) + 1e-5)

  def loss(p, x, y, ops):
    h = p["embed"][x]
    split = lambda t: t.reshape(batch, seq, heads, dh).transpose(0, 2, 1, 3)
    for i in range(layers):
      q, k, v = jnp.split(ops.dot(_operand(norm(h)), p[f"l{i}_qkv"], mm), 3, axis=-1)
      s = ops.dot(split(q) * dh ** -0.5, split(k), qk)
      a = jax.nn.softmax(jnp.where(causal, s, -1e9), axis=-1)
      o = ops.dot(a, split(v), av).transpose(0, 2, 1, 3).reshape(batch, seq, d)
      h = h + ops.dot(_operand(o), p[f"l{i}_o"], mm)
      u = _operand(jax.nn.gelu(ops.dot(_operand(norm(h)), p[f"l{i}_up"], mm)))
      h = h + ops.dot(u, p[f"l{i}_down"], mm)
    logits = ops.dot(_operand(norm(h)), p["head"], mm)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1))

  return params, (x, y), loss


WORKLOADS = {
    "mlp": _mlp,
    "cnn": _cnn,
    "transformer": _transformer,
    "small": _small_mlp,
    "demo": functools.partial(_cnn, batch=128, hw=12, cin=1, width=32, blocks=1),
    "digits": functools.partial(_cnn, batch=64, hw=8, cin=1, width=16, blocks=1),
}


def _saved_bytes(fn, params) -> dict[str, int]:
  """Bytes the backward pass keeps, from JAX's own list of the residuals of ``fn`` (as
  `jax.ad_checkpoint.print_saved_residuals` shows them), split into:

  - ``activations``: every residual that is not a weight copy (GEMM/conv inputs, ReLU masks, BN and
    loss residuals): what grows with the batch;
  - ``gemm_operands``: the part of ``activations`` that GEMMs/convs read: jdfp's int16 operand
    copies (int16, or bf16/fp16 for the float recipes), or in FP32 the activations the workload
    marked with `_operand`;
  - ``weight_copies``: residuals shaped like a parameter (jdfp's int16 weights; FP32 reuses the params);

  not counting the params and batch themselves (they exist anyway) or broadcasts of constants
  (XLA rematerializes them; eager tracing materializes them).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax._src.ad_checkpoint import saved_residuals

  param_shapes = {tuple(np.shape(p)) for p in jax.tree.leaves(params)}
  out = {"activations": 0, "gemm_operands": 0, "weight_copies": 0}
  for aval, where in saved_residuals(fn, params):
    if where.startswith(("from the argument", "from a constant", "from a literal")) or \
        where.startswith("output of broadcast_in_dim"):
      continue
    nbytes = int(np.prod(aval.shape)) * aval.dtype.itemsize
    squeezed = tuple(aval.shape)
    while len(squeezed) > 1 and squeezed[0] == 1:  # jdfp's [1, K, N] operand views
      squeezed = squeezed[1:]
    if nbytes and squeezed in param_shapes:
      out["weight_copies"] += nbytes
      continue
    out["activations"] += nbytes
    low = aval.dtype in (np.int16, np.int8, jnp.bfloat16, jnp.float16)  # jdfp's quantized copies
    if low or where.startswith(f"named '{GEMM_OPERAND}'"):
      out["gemm_operands"] += nbytes
  return out


def main(args: argparse.Namespace) -> int:
  import jax
  import optax

  import jdfp
  from jdfp.bench._timing import host_memory, isa_label, print_table, time_side_by_side

  results = {"jax": jax.__version__, "python": platform.python_version(),
             "isa": isa_label(),
             "memory": host_memory(), "workloads": {}}
  jax.jit(lambda a: a * 2 + 1).lower(1.0).compile()  # XLA's one-time start-up is nobody's compile time
  for wl in args.workloads:
    params, batch, loss = WORKLOADS[wl](jax.random.key(0))
    tx = optax.sgd(1e-3, momentum=0.9)
    fns, stats = {}, {}
    for name in args.candidates:
      if name == "dfp16_flax" or name in RECIPES:
        recipe = name.split(":", 1)[1] if name in RECIPES else None
        step, (p0, state), saved_fn = _flax_step(loss, params, batch, tx, recipe)
        step_args = (p0, state) + tuple(batch) + (jax.random.key(3),)
      else:
        ops = _ops(name)

        def step(p, s, x, y, ops=ops):
          val, g = jax.value_and_grad(loss)(p, x, y, ops)
          u, s = tx.update(g, s, p)
          return optax.apply_updates(p, u), s, val

        p0, state = params, tx.init(params)
        saved_fn = lambda p, _ops=ops: loss(p, *batch, _ops)
        step_args = (p0, state) + tuple(batch)
      t0 = time.perf_counter()
      compiled = jax.jit(step).lower(*step_args).compile()
      compile_s = time.perf_counter() - t0
      mem = compiled.memory_analysis()
      with warnings.catch_warnings():  # saved_fn differentiates the params alone, on purpose: no statistics
        warnings.filterwarnings("ignore", message="jdfp: a quantized model is differentiated, but not its jdfp state")
        saved = _saved_bytes(saved_fn, params)
      stats[name] = {"compile_s": compile_s, "peak_temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0)) if mem else None,
                     "saved_activation_bytes": saved["activations"],
                     "saved_gemm_operand_bytes": saved["gemm_operands"],
                     "saved_weight_copy_bytes": saved["weight_copies"]}
      fns[name] = functools.partial(lambda f, a: jax.tree.leaves(f(*a))[-1], compiled, step_args)
    times = time_side_by_side(fns, repeats=args.repeats, warmup=args.warmup, min_time=args.min_time)
    rows = []
    mib = lambda b: f"{b / 2**20:.2f}"
    for name in args.candidates:
      st = stats[name]
      st["step_ms"] = times[name] * 1e3
      st["speedup_vs_fp32"] = times.get("fp32", float("nan")) / times[name]
      ref = stats.get("fp32", st)
      st["compile_vs_fp32"] = st["compile_s"] / ref["compile_s"]
      ratio = lambda k: st[k] / ref[k] if ref[k] else float("nan")
      st["saved_activations_vs_fp32"] = ratio("saved_activation_bytes")
      st["saved_gemm_operands_vs_fp32"] = ratio("saved_gemm_operand_bytes")
      rows.append([name, f"{st['step_ms']:.3f}", f"{st['speedup_vs_fp32']:.2f}x", f"{st['compile_s']:.2f}",
                   f"{st['compile_vs_fp32']:.2f}x",
                   mib(st["peak_temp_bytes"] or 0), mib(st["saved_activation_bytes"]),
                   f"{st['saved_activations_vs_fp32']:.2f}", mib(st["saved_gemm_operand_bytes"]),
                   f"{st['saved_gemm_operands_vs_fp32']:.2f}", mib(st["saved_weight_copy_bytes"])])
    results["workloads"][wl] = stats
    print_table(f"train step: {wl} (jax {jax.__version__}, {results['isa']}, "
                f"malloc huge pages {'on' if results['memory']['malloc_hugepages'] else 'off'})",
                ["candidate", "step ms", "vs fp32", "compile s", "vs fp32", "peak temp MiB", "saved activations MiB", "vs fp32",
                 "of which GEMM operands MiB", "vs fp32", "weight copies MiB"], rows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return 0
