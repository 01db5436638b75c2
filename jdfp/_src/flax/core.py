"""Statistics-tracking wrappers of jdfp's ops, shared by the Linen and NNX integrations.

Every GEMM still runs through `jdfp.dot_general` (its custom VJP, the quantizers and the kernel).
Around it, `tracked_dot_general`:

- recomputes the forward operands' quantization with the op's own block layout, rounding and key
  (so the numbers are exactly those of the op) and reduces them to a handful of scalars per tensor:
  the exponents in use, elements saturated (``|x| > qmax * 2**e``, clipped), elements flushed to zero
  (nonzero ``x`` quantized to 0) and non-finite inputs;
- passes the output through `_grad_tap`, an identity with a custom VJP. Its backward quantizes the
  incoming output gradient exactly as jdfp's backward does (same format, rounding and key), reduces
  it to the same scalars and returns the *new state* as the cotangent of the state input: Flax's
  ``fp8_ops`` OVERWRITE_WITH_GRADIENT convention. `jdfp.overwrite_state` (optax) or a plain
  ``replace`` then installs it.

State layout (one Flax variable per quantized op, value a dict)::

    {"lhs":  {"exponent", "exponent_min", "saturated", "underflow", "nonfinite", "size"},
     "rhs":  {...},   # weights (forward right operand)
     "grad": {...}}   # output gradient (both backward GEMMs)

All leaves are float32 scalars holding integers. Not int32, because the backward statistics leave
through a cotangent, and JAX gives integer inputs only ``float0`` cotangents (``jax.grad`` refuses
integer inputs outright). Integers up to 2**24 are exact in float32, and `jdfp.overwrite_state`'s
``old + (new - old)`` is then bitwise exact. Counters are per step (the last update), so they stay
below the tensor size; ``size`` is the element count, for rates. ``exponent`` is the largest
exponent over the finite groups (for per-tensor DFP: *the* exponent), ``exponent_min`` the smallest
over groups holding a nonzero finite value; a group with NaN/Inf is counted in ``nonfinite``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdfp._src import delayed, formats, kernels, ops
from jdfp._src import quantize as qz
from jdfp._src.policy import Policy

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


def _scale_state(old) -> "delayed.ScaleState":
  """The op's amax histories (constants for the op: their update leaves through the grad tap)."""
  return delayed.ScaleState(*(lax.stop_gradient(old[r][HISTORY]) for r in ROLES))


def needs_key(policy: Policy) -> bool:
  return ((policy.fwd_rounding == "stochastic" and not policy.is_float) or
          (policy.grad_rounding == "stochastic" and policy.grad.is_integer))


# ------------------------------------------------------------------------------------------------
# Statistics of one quantized tensor.

_Q3_HAS_AXIS = "axis_name" in inspect.signature(ops._quantize3).parameters


def _stats3(x3, fmt, c_ax, rounding, key, policy) -> dict:
  """quantized_stats of a physical 3-D GEMM operand (blocks as the op reads them)."""
  if not fmt.is_integer:
    return role_stats(x3, _quantize3(x3, fmt, c_ax, rounding, key, policy))
  return quantized_stats(x3, fmt, ops._block_shape3(x3.shape, fmt, c_ax), rounding, key, policy)


def _quantize3(x3, fmt, c_ax, rounding, key, policy):
  """ops._quantize3 with the policy's data-parallel axis when this version of ops has one."""
  ax = getattr(policy, "axis_name", None)
  if _Q3_HAS_AXIS:
    return ops._quantize3(x3, fmt, c_ax, rounding, key, ax)
  return ops._quantize3(x3, fmt, c_ax, rounding, key)


def role_stats(x, q: qz.QArray, use_kernel: bool = False) -> dict:
  """Scalars (float32 holding integers) describing how ``x`` fared when quantized to ``q``.

  ``use_kernel``: per-tensor integer formats count in one C++ pass (`kernels.quant_stats`) instead
  of XLA's reductions (same numbers; five full reductions per tensor cost more than the GEMM)."""
  x = lax.stop_gradient(jnp.asarray(x, jnp.float32))
  f32 = lambda v: jnp.asarray(v).astype(STATE_DTYPE)
  fmt = q.fmt
  if (use_kernel and fmt.is_integer and x.size and np.size(q.exponent) == 1 and q.values.dtype == jnp.int16
      and kernels.kernel_available()):
    e = lax.stop_gradient(q.exponent).astype(jnp.int32)
    return _stats_from_counts(x, e, kernels.quant_stats(x, lax.stop_gradient(q.values), e, bits=fmt.int_bits))
  finite = jnp.isfinite(x)
  nonzero = finite & (x != 0)
  count = lambda m: f32(jnp.sum(m, dtype=jnp.int32))
  if not fmt.is_integer:  # FP16 / BF16: overflow to Inf, underflow to zero; exponent of the max
    qv = lax.stop_gradient(q.values)
    amax = jnp.max(jnp.where(finite, jnp.abs(x), 0.0)) if x.size else jnp.zeros((), jnp.float32)
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


def _stats_from_counts(x, e, counts) -> dict:
  """role_stats from `kernels.quant_stats` counters (per-tensor integer formats)."""
  f32 = lambda v: jnp.asarray(v).astype(STATE_DTYPE)
  sat, under, nonfin, ok = (lax.stop_gradient(counts[i]) for i in range(4))
  e_stat = f32(jnp.where(ok > 0, lax.stop_gradient(e).reshape(()), 0))
  return {"exponent": e_stat, "exponent_min": e_stat, "saturated": f32(sat), "underflow": f32(under),
          "nonfinite": f32(nonfin), "size": f32(np.size(x))}


def quantized_stats(x, fmt, bshape, rounding, key, policy) -> dict:
  """role_stats of ``x`` quantized as the op quantizes it (``bshape``: its block shape).

  Where the op converts on the C++ kernel (per-tensor DFP, nearest rounding, FFI backend, no
  data-parallel exponent), the statistics come from the *same* kernel call as the op's own
  quantization (`kernels.quantize_dfp_with_stats`; XLA merges the two identical calls), so they
  cost nothing beyond the conversion. Otherwise: quantize, then count (on the kernel where it runs).
  """
  x = lax.stop_gradient(jnp.asarray(x, jnp.float32))
  uk = ops._kernel_quantize(policy)
  ax = getattr(policy, "axis_name", None)
  if uk and ax is None and qz.kernel_convert_available() and qz._kernel_converts(x, fmt, rounding, tuple(bshape)):
    _, e, counts = kernels.quantize_dfp_with_stats(x, bits=fmt.bits)
    return _stats_from_counts(x, e, counts)
  q = qz.quantize_blocks(x, fmt, tuple(bshape), rounding=rounding, key=key, axis_name=ax, use_kernel=uk)
  return role_stats(x, q, uk)


# ------------------------------------------------------------------------------------------------
# The gradient tap: identity forward; backward emits the new state as the state's cotangent.


@dataclasses.dataclass(frozen=True)
class _TapCfg:
  shape3: tuple[int, int, int]
  fmt: Any
  rounding: str
  policy: Policy
  delayed: bool = False
  # shape3 is the output's own shape (a per-tensor conv output), not a 3-D GEMM view: the gradient is
  # then quantized exactly as the conv's backward quantizes it, and XLA merges the two kernel calls.
  natural: bool = False


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grad_tap(out, state, fwd_state, key, cfg):
  del state, fwd_state, key, cfg
  return out


def _grad_tap_fwd(out, state, fwd_state, key, cfg):
  del state
  return out, (fwd_state, key)


def _grad_tap_bwd(cfg, res, g):
  fwd_state, key = res
  g3 = g.astype(jnp.float32).reshape(cfg.shape3)
  k_dl = None if key is None else jax.random.split(key, 2)[0]
  if cfg.delayed:  # as jdfp's delayed backward: exponent from the gradient history, then push max|g|
    qg, hist = delayed._quantize3(g3, cfg.fmt, cfg.rounding, k_dl, fwd_state["grad"][HISTORY])
    grad = {**role_stats(g3, qg, ops._kernel_quantize(cfg.policy)), HISTORY: history_values(hist)}
  elif cfg.natural:
    grad = quantized_stats(g3, cfg.fmt, cfg.fmt.block_shape(g3.shape), cfg.rounding, k_dl, cfg.policy)
  else:
    grad = _stats3(g3, cfg.fmt, 2, cfg.rounding, k_dl, cfg.policy)
  new_state = {**fwd_state, "grad": grad}
  zeros = jax.tree.map(jnp.zeros_like, fwd_state)
  return g, new_state, zeros, None


_grad_tap.defvjp(_grad_tap_fwd, _grad_tap_bwd)


# ------------------------------------------------------------------------------------------------
# dot_general with statistics.


def tracked_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                        policy: Policy, key=None, state=None, update_history: bool = True, **kwargs):
  """`jdfp.dot_general` plus statistics. Returns ``(out, new_state)``.

  ``state`` is the op's current state (see the module docstring) or None (no statistics: returns
  ``(out, None)``). ``new_state`` holds this call's forward statistics and the previous gradient
  statistics; the gradient statistics arrive as ``state``'s cotangent.

  Delayed scaling (``policy.scaling == "delayed"``): each role of ``state`` holds an
  ``amax_history``; the op quantizes with exponents from those histories (`jdfp._src.delayed`),
  ``new_state`` carries the lhs/rhs histories with this call's maxima pushed (unless
  ``update_history`` is False, as during Flax ``init``) and the new gradient history leaves, with
  the gradient statistics, as ``state``'s cotangent. Without ``state`` the histories are empty
  (the op then behaves as current scaling).
  """
  if is_delayed(policy):
    return _tracked_delayed_dot(lhs, rhs, dimension_numbers, precision, preferred_element_type, policy=policy,
                                key=key, state=state, update_history=update_history, **kwargs)
  out = ops.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                        policy=policy, key=key, **kwargs)
  if state is None:
    return out, None
  lv, rv, l3, r3, (k_l, k_r, k_bwd) = _operand_views(lhs, rhs, dimension_numbers, key)
  old = jax.tree.map(lambda v: jnp.asarray(v, STATE_DTYPE), state)
  fwd_state = {"lhs": _stats3(l3, policy.lhs, lv.c_ax, policy.fwd_rounding, k_l, policy),
               "rhs": _stats3(r3, policy.rhs, rv.c_ax, policy.fwd_rounding, k_r, policy),
               "grad": jax.tree.map(lax.stop_gradient, old["grad"])}
  bsz, m, n = lv.shape3[0], lv.shape3[lv.f_ax], rv.shape3[rv.f_ax]
  cfg = _TapCfg((bsz, m, n), policy.dlhs, policy.grad_rounding, policy)
  out = _grad_tap(out, old, fwd_state, k_bwd, cfg)
  return out, fwd_state


def _operand_views(lhs, rhs, dimension_numbers, key):
  """The op's physical 3-D operand views (gradient-stopped, for statistics) and its key split."""
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  dims = ops._canonical_dims(dimension_numbers, lhs.ndim, rhs.ndim)
  lv, rv = ops._views(lhs.shape, rhs.shape, dims)
  l3 = lax.stop_gradient(ops._to3(lhs, lv))
  r3 = lax.stop_gradient(ops._to3(rhs, rv))
  return lv, rv, l3, r3, ops._split_keys(key, 3)


def _tracked_delayed_dot(lhs, rhs, dimension_numbers, precision, preferred_element_type, *, policy, key, state,
                         update_history, **kwargs):
  old = None if state is None else jax.tree.map(lambda v: jnp.asarray(v, STATE_DTYPE), state)
  hist = _scale_state(old if old is not None else empty_state(policy))
  out, new_hist = ops.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                                  policy=policy, key=key, scale_state=hist, **kwargs)
  if old is None:
    return out, None
  lv, rv, l3, r3, (k_l, k_r, k_bwd) = _operand_views(lhs, rhs, dimension_numbers, key)
  # The same quantization as the op's forward (same history, rounding and key): exact statistics.
  ql, _ = delayed._quantize3(l3, policy.lhs, policy.fwd_rounding, k_l, hist.lhs)
  qr, _ = delayed._quantize3(r3, policy.rhs, policy.fwd_rounding, k_r, hist.rhs)
  keep = lambda new, r: lax.stop_gradient(history_values(new) if update_history else old[r][HISTORY])
  uk = ops._kernel_quantize(policy)
  fwd_state = {"lhs": {**role_stats(l3, ql, uk), HISTORY: keep(new_hist.lhs, "lhs")},
               "rhs": {**role_stats(r3, qr, uk), HISTORY: keep(new_hist.rhs, "rhs")},
               "grad": jax.tree.map(lax.stop_gradient, old["grad"])}
  bsz, m, n = lv.shape3[0], lv.shape3[lv.f_ax], rv.shape3[rv.f_ax]
  cfg = _TapCfg((bsz, m, n), policy.dlhs, policy.grad_rounding, policy, delayed=True)
  return _grad_tap(out, old, fwd_state, k_bwd, cfg), fwd_state


# ------------------------------------------------------------------------------------------------
# Convolutions with statistics: on jdfp's conv kernel when the formats are per-tensor.


def conv(dot, args):
  """A quantized op's convolution. ``dot`` is the op's tracked dot function (with ``.policy`` and
  ``.tracked_call``); ``args`` are `lax.conv_general_dilated`'s positional arguments.

  Per-tensor integer formats run `jdfp.conv_general_dilated` (the implicit-GEMM conv kernel for all
  three passes) with statistics of its input, kernel and output gradient; other formats take the
  im2col arrangement through ``dot`` (as `jdfp.conv_general_dilated` does for them)."""
  policy = dot.policy
  per_tensor = all(ops._per_tensor(f) for f in (policy.lhs, policy.rhs, policy.dlhs, policy.drhs))
  if not per_tensor or args[8] != 1:
    return conv_via_dot(dot, *args)
  upd = getattr(dot, "update_history", True)
  return dot.tracked_call(lambda state, key: tracked_conv(args, policy=policy, key=key, state=state,
                                                         update_history=upd))


def tracked_conv(args, *, policy: Policy, key=None, state=None, update_history: bool = True):
  """`jdfp.conv_general_dilated` plus statistics, as `tracked_dot_general`. Returns ``(out, new_state)``."""
  if is_delayed(policy):
    return _tracked_delayed_conv(args, policy=policy, key=key, state=state, update_history=update_history)
  out = ops.conv_general_dilated(*args, policy=policy, key=key)
  if state is None:
    return out, None
  lhs, rhs = (lax.stop_gradient(qz.as_float_input(a)) for a in args[:2])
  k_l, k_r, k_bwd = ops._split_keys(key, 3)
  stoch = policy.fwd_rounding == "stochastic"
  stats = lambda x, fmt, k: quantized_stats(x, fmt, fmt.block_shape(x.shape), policy.fwd_rounding,
                                            k if stoch else None, policy)
  old = jax.tree.map(lambda v: jnp.asarray(v, STATE_DTYPE), state)
  fwd_state = {"lhs": stats(lhs, policy.lhs, k_l), "rhs": stats(rhs, policy.rhs, k_r),
               "grad": jax.tree.map(lax.stop_gradient, old["grad"])}
  cfg = _TapCfg(tuple(out.shape), policy.dlhs, policy.grad_rounding, policy, natural=True)
  return _grad_tap(out, old, fwd_state, k_bwd, cfg), fwd_state


def _tracked_delayed_conv(args, *, policy: Policy, key, state, update_history):
  old = None if state is None else jax.tree.map(lambda v: jnp.asarray(v, STATE_DTYPE), state)
  hist = _scale_state(old if old is not None else empty_state(policy))
  out, new_hist = ops.conv_general_dilated(*args, policy=policy, key=key, scale_state=hist)
  if old is None:
    return out, None
  lhs, rhs = (lax.stop_gradient(qz.as_float_input(a)) for a in args[:2])
  k_l, k_r, k_bwd = ops._split_keys(key, 3)
  stoch = policy.fwd_rounding == "stochastic"

  def quant(x, fmt, k, h, new_h):
    # The op's max over the positions the conv reads is new_h[0] (0 when it is not finite).
    cur = jnp.where(new_h[0] > 0, new_h[0], delayed._amax(x))
    amax = delayed._used_amax(h, cur)
    return qz.quantize_given_amax(x, jnp.full((1,) * x.ndim, amax), fmt, policy.fwd_rounding,
                                  k if stoch else None, x.shape)

  keep = lambda new, r: lax.stop_gradient(history_values(new) if update_history else old[r][HISTORY])
  uk = ops._kernel_quantize(policy)
  fwd_state = {"lhs": {**role_stats(lhs, quant(lhs, policy.lhs, k_l, hist.lhs, new_hist.lhs), uk),
                       HISTORY: keep(new_hist.lhs, "lhs")},
               "rhs": {**role_stats(rhs, quant(rhs, policy.rhs, k_r, hist.rhs, new_hist.rhs), uk),
                       HISTORY: keep(new_hist.rhs, "rhs")},
               "grad": jax.tree.map(lax.stop_gradient, old["grad"])}
  cfg = _TapCfg((1, 1, int(np.prod(out.shape))), policy.dlhs, policy.grad_rounding, policy, delayed=True)
  return _grad_tap(out, old, fwd_state, k_bwd, cfg), fwd_state


# ------------------------------------------------------------------------------------------------
# Convolutions: the im2col arrangement of `jdfp.conv_general_dilated`, with any dot function.


def conv_via_dot(dot_fn, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                 precision=None, preferred_element_type=None):
  """`jdfp.conv_general_dilated`'s im2col arrangement with ``dot_fn`` as the GEMM;
  ``dot_fn(p, w, dims, precision, preferred_element_type)`` returns the product. With
  `jdfp.dot_general` this is bit-identical to the op's im2col path (tested)."""
  return ops.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                  feature_group_count, batch_group_count, precision, preferred_element_type,
                                  _dot_general=dot_fn)


def conv_transpose_via(conv_fn, lhs, rhs, strides, padding, rhs_dilation=None, dimension_numbers=None,
                       transpose_kernel=False, precision=None, preferred_element_type=None, **kw):
  """`jax.lax.conv_transpose` with its inner `conv_general_dilated` replaced by ``conv_fn``.

  jax's conv_transpose computes the padding and calls ``conv_general_dilated`` (a global of
  ``jax._src.lax.convolution``); that global is swapped for the duration of the call.
  """
  from jax._src.lax import convolution as conv_mod  # pylint: disable=import-outside-toplevel
  orig = conv_mod.conv_general_dilated
  conv_mod.conv_general_dilated = conv_fn
  try:
    return _ORIG_CONV_TRANSPOSE(lhs, rhs, strides, padding, rhs_dilation=rhs_dilation,
                                dimension_numbers=dimension_numbers, transpose_kernel=transpose_kernel,
                                precision=precision, preferred_element_type=preferred_element_type, **kw)
  finally:
    conv_mod.conv_general_dilated = orig


_ORIG_CONV_TRANSPOSE = lax.conv_transpose


# ------------------------------------------------------------------------------------------------
# Two-operand einsum as one dot_general (no jit inside, so state updates stay in the caller's trace).


def _parse_einsum(subscripts: str, lhs_ndim: int, rhs_ndim: int):
  """``(dims, out_perm, lhs_sum_axes, rhs_sum_axes)`` for a two-operand einsum, or None when it is
  not a plain contraction (repeated letters in an operand, etc.)."""
  s = subscripts.replace(" ", "")
  if "->" in s:
    ins, out = s.split("->")
  else:
    ins, out = s, None
  parts = ins.split(",")
  if len(parts) != 2:
    return None
  ndims = (lhs_ndim, rhs_ndim)
  letters_used = set(c for c in s if c.isalpha())
  free_letters = [c for c in string.ascii_letters if c not in letters_used]
  n_ell = 0
  for part, nd in zip(parts, ndims):
    if "..." in part:
      n_ell = max(n_ell, nd - (len(part) - 3))
  if n_ell > len(free_letters):
    return None
  ell = "".join(free_letters[:n_ell])
  specs = []
  for part, nd in zip(parts, ndims):
    if "..." in part:
      k = nd - (len(part) - 3)
      if k < 0:
        return None
      # Broadcast ellipsis dims of differing rank: only allow equal ellipsis ranks.
      if k != n_ell:
        return None
      part = part.replace("...", ell[n_ell - k:])
    if len(part) != nd or not all(c.isalpha() for c in part) or len(set(part)) != len(part):
      return None
    specs.append(part)
  a, b = specs
  if out is None:
    counts = {c: (a + b).count(c) for c in set(a + b)}
    out = ell + "".join(sorted(c for c in counts if counts[c] == 1 and c not in ell))
  else:
    if "..." in out:
      out = out.replace("...", ell)
    if not all(c.isalpha() for c in out) or len(set(out)) != len(out) or any(c not in a + b for c in out):
      return None
  lhs_sum = tuple(i for i, c in enumerate(a) if c not in b and c not in out)
  rhs_sum = tuple(i for i, c in enumerate(b) if c not in a and c not in out)
  a2 = "".join(c for c in a if c in b or c in out)
  b2 = "".join(c for c in b if c in a or c in out)
  batch = [c for c in a2 if c in b2 and c in out]
  contract = [c for c in a2 if c in b2 and c not in out]
  dims = ((tuple(a2.index(c) for c in contract), tuple(b2.index(c) for c in contract)),
          (tuple(a2.index(c) for c in batch), tuple(b2.index(c) for c in batch)))
  res = batch + [c for c in a2 if c not in b2] + [c for c in b2 if c not in a2]
  if sorted(res) != sorted(out):
    return None
  perm = tuple(res.index(c) for c in out)
  return dims, perm, lhs_sum, rhs_sum


def einsum_via_dot(dot_fn, subscripts, lhs, rhs, precision=None, preferred_element_type=None):
  """A two-operand einsum through ``dot_fn``; None when the expression is not a plain contraction
  (the caller then falls back to `jdfp.einsum`)."""
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  parsed = _parse_einsum(subscripts, lhs.ndim, rhs.ndim)
  if parsed is None:
    return None
  dims, perm, lsum, rsum = parsed
  if lsum:
    lhs = jnp.sum(lhs, axis=lsum)
  if rsum:
    rhs = jnp.sum(rhs, axis=rsum)
  (lc, rc), (lb, rb) = dims
  for x, y in zip(lc + lb, rc + rb):
    if lhs.shape[x] != rhs.shape[y]:
      return None  # broadcasting of size-1 dims: leave to jnp.einsum
  y = dot_fn(lhs, rhs, dims, precision, preferred_element_type)
  if perm != tuple(range(len(perm))):
    y = jnp.transpose(y, perm)
  return y
