"""`explain`: which dots and convolutions of a traced program run in low precision, and where.

The proof a user needs that the low-precision path really ran: every `dot_general`, convolution
and jdfp FFI call in the jaxpr (nested jaxprs of jit, custom_vjp, scan, cond, remat, shard_map
included) is listed and classified.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.extend  # noqa: F401  (jax.extend.core.Jaxpr types)
import jax.numpy as jnp
import numpy as np

from jdfp._src.ffi.gemm import conv_runs_on_amx, runs_on_amx
from jdfp._src.ffi.gemm_bf16 import BF16_ISA_NAMES
from jdfp._src.ffi.library import (TARGET_BLOCK_PATCH_GEMM, TARGET_BLOCK_PATCH_GEMM_STATS, TARGET_CONV_FWD,
                                   TARGET_I8, TARGET_I16, TARGET_Q)


KERNEL = "jdfp kernel (FFI, int16 x int16 -> int32 chains)"
KERNEL_I8 = "jdfp kernel (FFI, int8 x int8 -> int32 chains, vpdpbusd)"
REFERENCE = "jdfp reference (exact int32 chains in XLA)"
MIXED = "mixed precision (fp16/bf16 operands, fp32 accumulation)"
MIXED_KERNEL = "mixed precision on the jdfp BF16 kernel (FFI, vdpbf16ps)"
MIXED_AMX_KERNEL = "mixed precision on the jdfp BF16 kernel (FFI, AMX-BF16 tiles)"
MIXED_F16_KERNEL = "mixed precision on the jdfp FP16 GEMM (FFI, fp16 = 2 x bf16)"
FLOAT = "float (not quantized)"
INTEGER = "integer dot (XLA)"


AMX = "AMX-INT8 tiles"
AMX_BLOCKS = "AMX-INT8 tiles unless an exponent is extreme or NONFINITE"
AMX_BF16 = "AMX-BF16 tiles"


@dataclasses.dataclass(frozen=True)
class Op:
  primitive: str
  path: str
  kind: str
  operands: str
  # Where a kernel call's arithmetic runs when that is not the ISA's own kernel: `AMX` (`AMX_BLOCKS`)
  # for INT16 / INT8 GEMMs that isa="auto" sends to the AMX-INT8 tiles on this CPU (the same result
  # bit for bit); `AMX_BF16` for the FP16 GEMM, which runs only there.
  engine: str = ""


@dataclasses.dataclass(frozen=True)
class Report:
  ops: tuple[Op, ...]

  def count(self, kind: str) -> int:
    return sum(op.kind == kind for op in self.ops)

  @property
  def kernel_calls(self) -> int:
    """jdfp FFI GEMM / conv calls, INT16 and INT8 kernels together."""
    return self.count(KERNEL) + self.count(KERNEL_I8)

  @property
  def float_ops(self) -> tuple[Op, ...]:
    return tuple(op for op in self.ops if op.kind == FLOAT)

  def summary(self) -> dict[str, int]:
    return dict(collections.Counter(op.kind for op in self.ops))

  def __str__(self) -> str:
    lines = [f"{'primitive':<22} {'kind':<58} operands   [where]"]
    for op in self.ops:
      engine = f" ({op.engine})" if op.engine else ""
      lines.append(f"{op.primitive:<22} {op.kind:<58} {op.operands}{engine}   [{op.path}]")
    lines.append("summary: " + ", ".join(f"{k}: {v}" for k, v in self.summary().items()))
    return "\n".join(lines)


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    vals = v if isinstance(v, (tuple, list)) else (v,)
    for x in vals:
      if isinstance(x, jax.extend.core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jax.extend.core.Jaxpr):
        yield x


def _dtype_str(vars_):
  return " x ".join(str(getattr(v.aval, "dtype", "?")) for v in vars_)


PATCH_GEMMS = (TARGET_BLOCK_PATCH_GEMM, TARGET_BLOCK_PATCH_GEMM_STATS)


def _patch_gemm_int8(eqn) -> bool:
  """A fused HBFP conv forward (`JdfpBlockPatchGemm`) runs the INT8 kernel when its b is int8."""
  return eqn.invars[2].aval.dtype == jnp.int8


def _engine(target, eqn) -> str:
  attrs = dict(eqn.params.get("attributes", ()))
  if target in PATCH_GEMMS:  # x, key, b [1, K, N], eb [1, KB, N or 1]; the patch matrix's blocks
    k, kb = eqn.invars[2].aval.shape[-2], eqn.invars[3].aval.shape[-2]
    block_k, int8 = min(int(np.asarray(getattr(attrs["block"], "val", attrs["block"]))[2]), k), _patch_gemm_int8(eqn)
  elif target in (TARGET_I16, TARGET_Q, TARGET_I8):
    shape = eqn.invars[0].aval.shape
    k = shape[-2] if attrs.get("transpose_a") else shape[-1]
    kb = eqn.invars[2].aval.shape[-1]
    block_k = int(attrs.get("block_k", -1))
    block_k, int8 = k if block_k == -1 else block_k, target == TARGET_I8
  elif target == TARGET_CONV_FWD:  # x, w, ex, ew as 5-D; forward or backward-data
    shapes = (eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape)
    return AMX if conv_runs_on_amx(*shapes, int(np.asarray(getattr(attrs["isa"], "val", attrs["isa"])))) else ""
  else:
    return ""
  if not runs_on_amx(k, kb, block_k, int(attrs.get("isa", -1)), int8=int8):
    return ""
  return AMX if kb == 1 else AMX_BLOCKS


def _walk(jaxpr, path, in_reference, out):
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    # The name stack carries jax.named_scope / named_call names (and Flax module paths).
    stack = str(getattr(eqn.source_info, "name_stack", "") or "")
    here = "/".join(p for p in (path, stack) if p)
    ref = in_reference or "jdfp_reference_gemm" in here
    if name == "ffi_call" or "custom_call" in name:
      target = str(eqn.params.get("target_name", eqn.params.get("call_target_name", "")))
      if target in ("jdfp_gemm_bf16", "jdfp_conv_bf16"):
        tiles = int(dict(eqn.params.get("attributes", ())).get("isa", 0)) == BF16_ISA_NAMES.index("amx_bf16")
        out.append(Op(f"{name}:{target}", here, MIXED_AMX_KERNEL if tiles else MIXED_KERNEL, _dtype_str(eqn.invars),
                      AMX_BF16 if tiles else ""))
      elif target in ("jdfp_gemm_f16", "jdfp_conv_f16"):
        out.append(Op(f"{name}:{target}", here, MIXED_F16_KERNEL, _dtype_str(eqn.invars), AMX_BF16))
      elif target.startswith(("jdfp_gemm", "jdfp_conv")) or target in PATCH_GEMMS:  # not the conversion calls
        # (jdfp_gemm_i8_col2im, an HBFP8 conv's backward-data, is the INT8 kernel too.)
        int8 = target.startswith("jdfp_gemm_i8") or (target in PATCH_GEMMS and _patch_gemm_int8(eqn))
        out.append(Op(f"{name}:{target}", here, KERNEL_I8 if int8 else KERNEL, _dtype_str(eqn.invars),
                      _engine(target, eqn)))
    elif name in ("dot_general", "conv_general_dilated"):
      dts = [v.aval.dtype for v in eqn.invars]
      if ref and all(jnp.issubdtype(d, jnp.integer) for d in dts):
        kind = REFERENCE
      elif all(jnp.issubdtype(d, jnp.integer) for d in dts):
        kind = INTEGER
      elif all(d in (jnp.float16, jnp.bfloat16) for d in dts):
        kind = MIXED
      else:
        kind = FLOAT
      out.append(Op(name, here, kind, _dtype_str(eqn.invars)))
    for sub in _sub_jaxprs(eqn):
      _walk(sub, here, ref, out)


def _nnx_module_type():
  try:
    from flax import nnx
  except ImportError:  # flax is a dependency, but explain itself needs only jax
    return None
  return nnx.Module


def explain(fn, *args, **kwargs) -> Report:
  """Trace ``fn(*args, **kwargs)`` and classify every dot/conv in it.

  ``fn`` may also be a Flax NNX module: ``jdfp.explain(model, x)`` traces ``model(x)`` (through
  ``nnx.jit``, so the module's RNG streams and ``"dfp"`` state can update while tracing).

  Returns a `Report` (print it for a table); ``report.kernel_calls`` counts jdfp FFI kernel calls and
  ``report.float_ops`` lists the dots that run in plain float.
  """
  module_type = _nnx_module_type()
  if module_type is not None and isinstance(fn, module_type):
    from flax import nnx
    args = (fn,) + args
    fn = nnx.jit(lambda m, *a, **k: m(*a, **k))
  try:
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
  except Exception as e:
    if type(e).__name__ != "TraceContextError":
      raise
    raise TypeError(
        "jdfp.explain: an NNX module was closed over by `fn` and its state (RNG stream or 'dfp' "
        "statistics) cannot change inside explain's trace. Pass the module itself, "
        "`jdfp.explain(model, x)`, or an nnx.jit function with the module as an argument, "
        "`jdfp.explain(nnx.jit(lambda m, x: m(x)), model, x)`.") from e
  ops: list[Op] = []
  _walk(closed.jaxpr, "", False, ops)
  return Report(tuple(ops))


