"""The Flax integration's per-op state ("dfp" collection) and the statistics that fill it.

State layout: one Flax variable per quantized op (Linen and NNX alike), a float32 array
``[3, 6]`` (`pack`): rows ``lhs``, ``rhs`` (weights, the forward right operand), ``grad`` (output
gradient, both backward GEMMs); columns ``exponent, exponent_min, saturated, underflow, nonfinite,
size``; with delayed scaling ``[3, 6 + H]``, the amax history after the six fields. One array, not
18 scalars: each leaf of the collection costs an overwrite fusion, an optimizer leaf and an argument
every step (a 2-layer step spent more on them than on its GEMMs). The code works on the dict view
(`unpack`)::

    {"lhs":  {"exponent", "exponent_min", "saturated", "underflow", "nonfinite", "size"[, "amax_history"]},
     "rhs":  {...},
     "grad": {...}}

All fields are floats holding integers. Not int32, because the backward statistics leave
through a cotangent, and JAX gives integer inputs only ``float0`` cotangents (``jax.grad`` refuses
integer inputs outright). Integers up to 2**24 are exact in float32, and `jdfp.overwrite_state`'s
``old + (new - old)`` is then bitwise exact. Counters are per step (the last update), so they stay
below the tensor size; ``size`` is the element count, for rates. ``exponent`` is the largest
exponent over the finite groups (for per-tensor DFP: *the* exponent), ``exponent_min`` the smallest
over groups holding a nonzero finite value; a group with NaN/Inf is counted in ``nonfinite``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jdfp._src.ffi import block_quantize as ffi_block
from jdfp._src.ffi import library
from jdfp._src.ffi.float_stats import float_cast_stats, float_stats
from jdfp._src.ffi import quantize as ffi_quantize
from jdfp._src.numerics import formats
from jdfp._src.numerics import quantize as qz
from jdfp._src.ops import convert, delayed
from jdfp._src.ops.backend import kernel_quantize
from jdfp._src.ops.convert import block_shape3, quantize3
from jdfp._src.ops.policy import Policy

ROLES = ("lhs", "rhs", "grad")


FIELDS = ("exponent", "exponent_min", "saturated", "underflow", "nonfinite", "size")


STATE_DTYPE = jnp.float32

HISTORY = "amax_history"


def is_delayed(policy: Policy | None) -> bool:
  return policy is not None and policy.scaling == "delayed"


def empty_role(policy: Policy | None = None):
  role = {f: jnp.zeros((), STATE_DTYPE) for f in FIELDS}
  if is_delayed(policy):
    role[HISTORY] = jnp.zeros((policy.history_length,), STATE_DTYPE)
  return role


def empty_state(policy: Policy | None = None):
  """The initial value of one op's state variable (all zeros; with delayed scaling each role also
  holds an empty ``amax_history`` of ``policy.history_length`` maxima)."""
  return {r: empty_role(policy) for r in ROLES}


def pack(state: dict):
  """The op's state array ``[3, 6]`` (``[3, 6 + H]`` with delayed scaling) from its dict view."""
  # lax ops, not jnp indexing / stack: pack and unpack run for every op of every traced step.
  def col(v):
    v = v if getattr(v, "dtype", None) == STATE_DTYPE else lax.convert_element_type(v, STATE_DTYPE)
    return lax.broadcast_in_dim(v, jnp.shape(v) + (1,), tuple(range(jnp.ndim(v))))

  def row(r):
    cols = [col(state[r][f]) for f in FIELDS]
    if HISTORY in state[r]:
      cols.append(lax.convert_element_type(state[r][HISTORY], STATE_DTYPE))
    lead = jnp.broadcast_shapes(*(jnp.shape(c)[:-1] for c in cols))
    cols = [c if jnp.shape(c)[:-1] == lead else jnp.broadcast_to(c, lead + jnp.shape(c)[-1:]) for c in cols]
    r_arr = lax.concatenate(cols, len(lead))
    return lax.expand_dims(r_arr, (len(lead),))
  rows = [row(r) for r in ROLES]
  return lax.concatenate(rows, rows[0].ndim - 2)


def unpack(arr, roles=ROLES) -> dict:
  """The dict view of a state array (leading axes, e.g. of ``nn.scan``, are kept on every field),
  for ``roles`` (default all)."""
  n, nd, lead = len(FIELDS), arr.ndim, tuple(arr.shape[:-2])
  # lax.slice, not arr[..., i, j]: numpy-style indexing costs ~15x the trace time, and an unpack runs
  # for every op of every traced step.
  cut = lambda i, j0, j1: lax.slice(arr, (0,) * (nd - 2) + (i, j0), lead + (i + 1, j1))
  out = {}
  for i, r in enumerate(ROLES):
    if r not in roles:
      continue
    out[r] = {f: lax.squeeze(cut(i, j, j + 1), (nd - 2, nd - 1)) for j, f in enumerate(FIELDS)}
    if arr.shape[-1] > n:
      out[r][HISTORY] = lax.squeeze(cut(i, n, arr.shape[-1]), (nd - 2,))
  return out


def is_packed(x) -> bool:
  """Whether ``x`` looks like a packed op state (an array ``[..., 3, >= 6]``)."""
  shape = getattr(x, "shape", None)
  return shape is not None and len(shape) >= 2 and shape[-2] == len(ROLES) and shape[-1] >= len(FIELDS)


def empty_packed(policy: Policy | None = None):
  """The initial value of an op's state variable: `pack` of `empty_state`."""
  return pack(empty_state(policy))


def history_values(hist):
  """Amax history entries as stored in the state: each maximum ``m`` replaced by the representative
  of its exponent class, ``m`` itself when it is 0 or a power of two, else ``1.5 * 2**floor(log2 m)``.
  Both DFP's ``floor(log2 m)`` and BFP's ``ceil(log2 m)`` are unchanged (so is the exponent taken from
  the history's max), and every entry is ``3 * 2**j`` or ``2**j``: `jdfp.overwrite_state`'s float32
  ``old + (new - old)`` then reproduces the new history bitwise (arbitrary floats could be off by an
  ulp, and a maximum of exactly 1.0 that comes back as 0.99999994 moves the exponent)."""
  hist = jnp.asarray(hist, STATE_DTYPE)
  safe = jnp.where(hist > 0, hist, 1.0)
  p = formats.scale2(jnp.full_like(safe, 0.5), formats.frexp_exponent(safe))  # 2**floor(log2 m)
  return jnp.where((hist > 0) & (hist != p), 1.5 * p, hist)


def scale_state(old) -> "delayed.ScaleState":
  """The op's amax histories (constants for the op: their update leaves through the grad tap)."""
  return delayed.ScaleState(*(lax.stop_gradient(old[r][HISTORY]) for r in ROLES))


# ------------------------------------------------------------------------------------------------
# Statistics of one quantized tensor.


def operand_stats(x3, fmt, c_ax, rounding, key, policy) -> dict:
  """quantized_stats of a physical 3-D GEMM operand (blocks as the op reads them)."""
  if not fmt.is_integer:
    return cast_stats(x3, fmt, policy)
  return quantized_stats(x3, fmt, block_shape3(x3.shape, fmt, c_ax), rounding, key, policy,
                         int8=convert.int8_conversions(policy))


def counts_on_kernel(policy) -> bool:
  """Whether this policy's statistics count on the C++ kernel (it runs here and the policy does
  not ask for the pure-JAX reference): `kernel_quantize` for integer formats, and the same rule for
  FP16 / BF16 policies, which convert nothing on the kernel but count there."""
  return kernel_quantize(policy) or convert.kernel_casts(policy)


def cast_stats(x, fmt, policy) -> dict:
  """role_stats of an FP16 / BF16 GEMM operand. On the kernel: from `ffi.float_stats.float_cast_stats`,
  the call the op casts with while statistics are recorded (`convert.cast_float`), so XLA merges the
  two and the operand is read once for its cast and its counters. (Convolutions keep XLA's casts,
  which XLA fuses into the producer of an activation, and `quantized_stats`' separate count: measured
  faster on the CNN step, docs/op_costs.md.)"""
  if convert.kernel_cast_applies(x, counts_on_kernel(policy)) and library.kernel_available():
    return stats_from_float_counts(x, float_cast_stats(lax.stop_gradient(x), fmt.dtype)[1])
  return role_stats(x, qz.quantize_array(x, fmt), counts_on_kernel(policy))


def role_stats(x, q: qz.QArray, use_kernel: bool = False) -> dict:
  """Scalars (float32 holding integers) describing how ``x`` fared when quantized to ``q``.

  ``use_kernel``: per-tensor integer formats count in one C++ pass (`ffi.quantize.quant_stats`), FP16 /
  BF16 casts in another (`ffi.float_stats.float_stats`), instead of XLA's reductions (same numbers;
  five full reductions per tensor cost more than the GEMM)."""
  x = lax.stop_gradient(jnp.asarray(x, jnp.float32))
  f32 = lambda v: jnp.asarray(v).astype(STATE_DTYPE)
  fmt = q.fmt
  if use_kernel and not fmt.is_integer and x.size and library.kernel_available():
    return stats_from_float_counts(x, float_stats(x, lax.stop_gradient(q.values)))
  if (use_kernel and fmt.is_integer and x.size and np.size(q.exponent) == 1 and q.values.dtype == jnp.int16
      and library.kernel_available()):
    e = lax.stop_gradient(q.exponent).astype(jnp.int32)
    return stats_from_counts(x, e, ffi_quantize.quant_stats(x, lax.stop_gradient(q.values), e, bits=fmt.int_bits))
  finite = jnp.isfinite(x)
  nonzero = finite & (x != 0)
  count = lambda m: f32(jnp.sum(m, dtype=jnp.int32))
  if not fmt.is_integer:  # FP16 / BF16: overflow to Inf, underflow to zero; exponent of the max
    # Subnormal float32 inputs read as zero, as XLA:CPU's arithmetic (DAZ) and the kernel read them.
    nonzero = finite & (jnp.abs(x) >= np.float32(2.0**-126))
    qv = lax.stop_gradient(q.values)
    amax = jnp.max(jnp.where(nonzero, jnp.abs(x), 0.0)) if x.size else jnp.zeros((), jnp.float32)
    e = jnp.where(amax > 0, formats.frexp_exponent(jnp.where(amax > 0, amax, 1.0)) - 1, 0)
    amin = jnp.min(jnp.where(nonzero, jnp.abs(x), jnp.inf)) if x.size else jnp.inf
    e_min = jnp.where(jnp.isfinite(amin), formats.frexp_exponent(jnp.where(jnp.isfinite(amin), amin, 1.0)) - 1, 0)
    return {"exponent": f32(e), "exponent_min": f32(e_min),
            "saturated": count(finite & ~jnp.isfinite(qv)),
            "underflow": count(nonzero & (qv == 0)),
            "nonfinite": count(~finite), "size": f32(x.size)}
  e_grid = lax.stop_gradient(q.exponent)
  e_full = formats.expand_blocks(e_grid, q.block_shape, x.shape)
  group_finite = e_full != formats.NONFINITE_EXPONENT
  e_safe = jnp.where(group_finite, e_full, 0)
  ok = nonzero & group_finite
  scaled = formats.scale2(jnp.where(ok, jnp.abs(x), 0.0), -e_safe)
  big = jnp.iinfo(jnp.int32).max
  # The largest exponent among elements that hold a value: all-zero blocks (exponent 0 by
  # convention, e.g. masked attention tiles) must not count.
  e_max = jnp.max(jnp.where(ok, e_full, -big))
  e_max = jnp.where(jnp.any(ok), e_max, 0)
  e_min = jnp.min(jnp.where(ok, e_full, big))
  e_min = jnp.where(jnp.any(ok), e_min, 0)
  return {"exponent": f32(e_max), "exponent_min": f32(e_min),
          "saturated": count(ok & (scaled > fmt.qmax)),
          "underflow": count(ok & (lax.stop_gradient(q.values) == 0)),
          "nonfinite": count(~finite), "size": f32(x.size)}


def stats_from_float_counts(x, counts) -> dict:
  """role_stats from `ffi.float_stats.float_stats` counters (FP16 / BF16 casts)."""
  counts = lax.stop_gradient(counts)
  # floor(log2 m) of a normal float32 m from its bits; 0 when there is no such value (0 or Inf's bits).
  # Both exponents at once and lax ops throughout: this runs per operand of every traced op.
  bits = lax.slice(counts, (0,), (2,))
  normal = (bits > 0) & (bits < np.int32(0x7F800000))
  exps = lax.convert_element_type(lax.select(normal, (bits >> np.int32(23)) - np.int32(127), lax.full_like(bits, 0)),
                                  STATE_DTYPE)
  cf = lax.convert_element_type(counts, STATE_DTYPE)
  at = lambda v, i: lax.index_in_dim(v, i, 0, keepdims=False)
  return {"exponent": at(exps, 0), "exponent_min": at(exps, 1), "saturated": at(cf, 2), "underflow": at(cf, 3),
          "nonfinite": at(cf, 4), "size": jnp.asarray(np.float32(np.size(x)))}


def stats_from_counts(x, e, counts) -> dict:
  """role_stats from `ffi.quantize.quant_stats` counters (per-tensor integer formats)."""
  f32 = lambda v: lax.convert_element_type(v, STATE_DTYPE)
  sat, under, nonfin, ok = (lax.index_in_dim(lax.stop_gradient(counts), i, 0, keepdims=False) for i in range(4))
  e_stat = f32(jnp.where(ok > 0, lax.stop_gradient(e).reshape(()), 0))
  return {"exponent": e_stat, "exponent_min": e_stat, "saturated": f32(sat), "underflow": f32(under),
          "nonfinite": f32(nonfin), "size": f32(np.float32(np.size(x)))}


def natural_blocks(fmt, shape) -> tuple[int, ...]:
  """The block shape of a tensor quantized whole (a conv operand): the format's, or the shape itself
  for FP16/BF16 (no exponents)."""
  return tuple(fmt.block_shape(tuple(shape))) if fmt.is_integer else tuple(shape)


def stats_from_block_counts(x, counts, erange) -> dict:
  """role_stats from `ffi.block_quantize.block_quantize_with_stats` (block integer formats)."""
  f32 = lambda v: lax.stop_gradient(lax.convert_element_type(v, STATE_DTYPE))
  at = lambda v, i: lax.index_in_dim(v, i, 0, keepdims=False)
  return {"exponent": f32(at(erange, 0)), "exponent_min": f32(at(erange, 1)), "saturated": f32(at(counts, 0)),
          "underflow": f32(at(counts, 1)), "nonfinite": f32(at(counts, 2)), "size": f32(np.float32(np.size(x)))}


def quantized_stats(x, fmt, bshape, rounding, key, policy, int8: bool = False) -> dict:
  """role_stats of ``x`` quantized as the op quantizes it (``bshape``: its block shape).

  Where the op converts on the C++ kernel (per-tensor DFP, or DFP / BFP blocks; FFI backend, no
  data-parallel exponent), the statistics come from the *same*
  kernel call as the op's own quantization (`ffi.quantize.quantize_dfp_with_stats`,
  `ffi.block_quantize.block_quantize_with_stats`; XLA merges the two identical calls), so they
  cost nothing beyond the conversion. Otherwise: quantize, then count (on the kernel where it runs).
  ``int8``: the op's call writes int8 (`jdfp._src.ops.convert.int8_conversions`; GEMM operands), so
  this one does too.
  """
  x = lax.stop_gradient(jnp.asarray(x, jnp.float32))
  uk = counts_on_kernel(policy)
  ax = getattr(policy, "axis_name", None)
  if uk and ax is None and convert.kernel_convert_available() and convert.kernel_converts(x, fmt, rounding, tuple(bshape)):
    # (The kernels read ``key`` for stochastic rounding only.)
    out_dtype = jnp.int8 if int8 else jnp.int16
    _, e, counts = ffi_quantize.quantize_dfp_with_stats(x, bits=fmt.bits, rounding=rounding, key=key, out_dtype=out_dtype)
    return stats_from_counts(x, e, counts)
  if uk and ax is None and convert.kernel_convert_available() and convert.kernel_converts_blocks(
      x, fmt, rounding, tuple(bshape)):
    _, _, counts, erange = ffi_block.quantize_blocks_with_stats(x, fmt, tuple(bshape), rounding=rounding, key=key,
                                                                out_dtype=jnp.int8 if int8 else jnp.int16)
    return stats_from_block_counts(x, counts, erange)
  q = convert.quantize_blocks(x, fmt, tuple(bshape), rounding=rounding, key=key, axis_name=ax, use_kernel=uk)
  return role_stats(x, q, uk)
