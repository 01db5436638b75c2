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

The state layout and the statistics are in `jdfp._src.flax.state`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from jdfp._src.flax.gemm_rewrites import conv_via_dot
from jdfp._src.flax.state import (HISTORY, STATE_DTYPE, empty_state, history_values, is_delayed, natural_blocks,
                                  operand_stats, pack, quantized_stats, role_stats, scale_state, stats_from_block_counts,
                                  unpack)
from jdfp._src.numerics import quantize as qz
from jdfp._src.ops import delayed
from jdfp._src.ops.backend import kernel_quantize, warn_once
from jdfp._src.ops.conv import conv_general_dilated
from jdfp._src.ops.conv_vjp import per_tensor
from jdfp._src.ops.convert import counters_read, counters_wanted, int8_conversions
from jdfp._src.ops.dot import dot_general
from jdfp._src.ops.layout import canonical_dims, result_dtype, to3, views
from jdfp._src.ops.patch_conv import lhs_counts as patch_lhs_counts
from jdfp._src.ops.patch_conv import patch_conv_core
from jdfp._src.ops.policy import Policy, check_backward_key, check_key
from jdfp._src.ops.vjp import perturbed_marker_of, primal_values, split_keys


# ------------------------------------------------------------------------------------------------
# The gradient tap: identity forward; backward emits the new state as the state's cotangent.


@dataclasses.dataclass(frozen=True)
class TapConfig:
  shape3: tuple[int, int, int]
  fmt: Any
  rounding: str
  policy: Policy
  delayed: bool = False
  # shape3 is the output's own shape (a per-tensor conv output), not a 3-D GEMM view: the gradient is
  # then quantized exactly as the conv's backward quantizes it, and XLA merges the two kernel calls.
  natural: bool = False


def as_packed(state):
  """An op's state as its packed array (`state.pack`), whichever view the caller holds."""
  if isinstance(state, dict):
    return pack(state)
  return jnp.asarray(state, STATE_DTYPE)


# ``state`` is the op's packed state array: its cotangent, the new state, is one array too (18 scalar
# cotangents cost 18 pad + add ops to trace and to run).
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grad_tap(out, state, fwd_state, key, cfg):
  del state, fwd_state, key, cfg
  return out


NOT_RECORDED = (
    "jdfp: a quantized model is differentiated, but not its jdfp state, so the gradient statistics (the "
    "'grad' rows of the state) are not recorded. Linen: take the gradient w.r.t. the whole variables "
    "({'params': ..., 'dfp': ...}) and apply it with jdfp.overwrite_state. NNX: "
    "nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.Any(nnx.Param, jdfp.DfpState))), then "
    "jdfp.apply_state_grads(model, grads) (see the README's NNX training step).")


def _grad_tap_fwd(out, state, fwd_state, key, cfg):
  # Symbolic zeros tell whether the state is differentiated: if not, nobody reads the statistics'
  # cotangent, so the backward skips them (and says so once).
  recorded = any(p.perturbed for p in jax.tree.leaves(state, is_leaf=lambda p: isinstance(p, CustomVJPPrimal)))
  if out.perturbed and not recorded:
    warn_once(NOT_RECORDED)
  return out.value, (primal_values(fwd_state), primal_values(key), perturbed_marker_of(recorded))


def _grad_tap_bwd(cfg, res, g):
  fwd_state, key, recorded = res
  if isinstance(g, SymbolicZero):
    return None, None, None, None
  if recorded is None:
    return g, None, None, None
  check_backward_key(cfg.policy, key)
  g3 = g.astype(jnp.float32).reshape(cfg.shape3)
  k_dl = split_keys(key, 2)[0]
  if cfg.delayed:  # as jdfp's delayed backward: exponent from the gradient history, then push max|g|
    qg, hist = delayed.quantize_with_history(g3, cfg.fmt, cfg.rounding, k_dl, fwd_state["grad"][HISTORY])
    grad = {**role_stats(g3, qg, kernel_quantize(cfg.policy)), HISTORY: history_values(hist)}
  elif cfg.natural:
    grad = quantized_stats(g3, cfg.fmt, natural_blocks(cfg.fmt, g3.shape), cfg.rounding, k_dl, cfg.policy)
  else:
    grad = operand_stats(g3, cfg.fmt, 2, cfg.rounding, k_dl, cfg.policy)
  return g, pack({**fwd_state, "grad": grad}), None, None


_grad_tap.defvjp(_grad_tap_fwd, _grad_tap_bwd, symbolic_zeros=True)


# ------------------------------------------------------------------------------------------------
# dot_general with statistics.


def tracked_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                        policy: Policy, key=None, state=None, update_history: bool = True, **kwargs):
  """`jdfp.dot_general` plus statistics. Returns ``(out, new_state)``.

  ``state`` is the op's current state (its packed array or the dict view, flax/state.py) or None
  (no statistics: returns ``(out, None)``). ``new_state`` holds this call's forward statistics and the previous gradient
  statistics; the gradient statistics arrive as ``state``'s cotangent.

  Delayed scaling (``policy.scaling == "delayed"``): each role of ``state`` holds an
  ``amax_history``; the op quantizes with exponents from those histories (`jdfp._src.ops.delayed`),
  ``new_state`` carries the lhs/rhs histories with this call's maxima pushed (unless
  ``update_history`` is False, as during Flax ``init``) and the new gradient history leaves, with
  the gradient statistics, as ``state``'s cotangent. Without ``state`` the histories are empty
  (the op then behaves as current scaling).
  """
  if is_delayed(policy):
    return _tracked_delayed_dot(lhs, rhs, dimension_numbers, precision, preferred_element_type, policy=policy,
                                key=key, state=state, update_history=update_history, **kwargs)
  # With statistics (unless the caller said nobody stores them), the op's conversions are the
  # statistics' calls, merged by XLA.
  with counters_read(state is not None and counters_wanted(True)):
    out = dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                      policy=policy, key=key, **kwargs)
  if state is None:
    return out, None
  lv, rv, l3, r3, (k_l, k_r, k_bwd) = _operand_views(lhs, rhs, dimension_numbers, key)
  packed = as_packed(state)
  old = unpack(lax.stop_gradient(packed), roles=("grad",))  # the only role read
  fwd_state = {"lhs": operand_stats(l3, policy.lhs, lv.c_ax, policy.fwd_rounding, k_l, policy),
               "rhs": operand_stats(r3, policy.rhs, rv.c_ax, policy.fwd_rounding, k_r, policy),
               "grad": jax.tree.map(lax.stop_gradient, old["grad"])}
  bsz, m, n = lv.shape3[0], lv.shape3[lv.f_ax], rv.shape3[rv.f_ax]
  cfg = TapConfig((bsz, m, n), policy.dlhs, policy.grad_rounding, policy)
  out = _grad_tap(out, packed, fwd_state, k_bwd, cfg)
  return out, fwd_state


def _operand_views(lhs, rhs, dimension_numbers, key):
  """The op's physical 3-D operand views (gradient-stopped, for statistics) and its key split."""
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  dims = canonical_dims(dimension_numbers, lhs.ndim, rhs.ndim)
  lv, rv = views(lhs.shape, rhs.shape, dims)
  l3 = lax.stop_gradient(to3(lhs, lv))
  r3 = lax.stop_gradient(to3(rhs, rv))
  return lv, rv, l3, r3, split_keys(key, 3)


def _tracked_delayed_dot(lhs, rhs, dimension_numbers, precision, preferred_element_type, *, policy, key, state,
                         update_history, **kwargs):
  packed = None if state is None else as_packed(state)
  old = None if packed is None else unpack(lax.stop_gradient(packed))
  hist = scale_state(old if old is not None else empty_state(policy))
  out, new_hist = dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                                  policy=policy, key=key, scale_state=hist, **kwargs)
  if old is None:
    return out, None
  lv, rv, l3, r3, (k_l, k_r, k_bwd) = _operand_views(lhs, rhs, dimension_numbers, key)
  # The same quantization as the op's forward (same history, rounding and key): exact statistics.
  ql, _ = delayed.quantize_with_history(l3, policy.lhs, policy.fwd_rounding, k_l, hist.lhs)
  qr, _ = delayed.quantize_with_history(r3, policy.rhs, policy.fwd_rounding, k_r, hist.rhs)
  keep = lambda new, r: lax.stop_gradient(history_values(new) if update_history else old[r][HISTORY])
  uk = kernel_quantize(policy)
  fwd_state = {"lhs": {**role_stats(l3, ql, uk), HISTORY: keep(new_hist.lhs, "lhs")},
               "rhs": {**role_stats(r3, qr, uk), HISTORY: keep(new_hist.rhs, "rhs")},
               "grad": jax.tree.map(lax.stop_gradient, old["grad"])}
  bsz, m, n = lv.shape3[0], lv.shape3[lv.f_ax], rv.shape3[rv.f_ax]
  cfg = TapConfig((bsz, m, n), policy.dlhs, policy.grad_rounding, policy, delayed=True)
  return _grad_tap(out, packed, fwd_state, k_bwd, cfg), fwd_state


# ------------------------------------------------------------------------------------------------
# Convolutions with statistics: on jdfp's conv kernel when the formats are per-tensor.


def conv(dot, args):
  """A quantized op's convolution. ``dot`` is the op's tracked dot function (with ``.policy`` and
  ``.tracked_call``); ``args`` are `lax.conv_general_dilated`'s positional arguments.

  Per-tensor integer formats (the implicit-GEMM conv kernel for all three passes) and FP16/BF16 (XLA
  convolutions with FP32 accumulation) run `jdfp.conv_general_dilated` with statistics of its input,
  kernel and output gradient; block formats take the im2col arrangement through ``dot`` (as
  `jdfp.conv_general_dilated` does for them)."""
  policy = dot.policy
  all_per_tensor = all(per_tensor(f) or not f.is_integer for f in (policy.lhs, policy.rhs, policy.dlhs, policy.drhs))
  if not all_per_tensor or args[8] != 1:
    return conv_via_dot(dot, *args, patch_conv=functools.partial(_tracked_patch_conv_call, dot))
  upd = getattr(dot, "update_history", True)
  return dot.tracked_call(lambda state, key: tracked_conv(args, policy=policy, key=key, state=state,
                                                         update_history=upd))


def _tracked_patch_conv_call(dot, x, w3, geom, precision, preferred_element_type):
  return dot.tracked_call(lambda state, key: tracked_patch_conv(x, w3, geom, precision, preferred_element_type,
                                                               policy=dot.policy, key=key, state=state))


def tracked_patch_conv(x, w3, geom, precision, preferred_element_type, *, policy: Policy, key=None, state=None):
  """`jdfp._src.ops.patch_conv.patch_conv_core` (a block-format conv whose lhs conversion gathers its
  patch matrix) plus statistics, exactly as `tracked_dot_general` on that matrix records them: the
  lhs statistics come from the same patch-conversion call as the op's (XLA merges the two), the rhs
  and gradient ones as the dot's. Returns ``(out [1, rows, O], new_state)``."""
  out_dtype = result_dtype(x, w3, preferred_element_type)
  with counters_read(state is not None and counters_wanted(True)):
    check_key(policy, key)
    out = patch_conv_core(x, w3, key, geom, policy, precision, out_dtype)
  if state is None:
    return out, None
  k_l, k_r, k_bwd = split_keys(key, 3)
  xs, w3s = lax.stop_gradient(x), lax.stop_gradient(w3)
  packed = as_packed(state)
  old = unpack(lax.stop_gradient(packed), roles=("grad",))
  # The op's own counting call (the same arguments, so XLA merges the two).
  with counters_read(True):
    lhs_counts = patch_lhs_counts(xs, w3s, key, geom, policy)
  fwd_state = {"lhs": stats_from_block_counts(jax.ShapeDtypeStruct(geom.shape3, jnp.float32), *lhs_counts),
               "rhs": operand_stats(w3s, policy.rhs, 1, policy.fwd_rounding, k_r, policy),
               "grad": jax.tree.map(lax.stop_gradient, old["grad"])}
  cfg = TapConfig((1, geom.shape3[1], w3.shape[-1]), policy.dlhs, policy.grad_rounding, policy)
  return _grad_tap(out, packed, fwd_state, k_bwd, cfg), fwd_state


def tracked_conv(args, *, policy: Policy, key=None, state=None, update_history: bool = True):
  """`jdfp.conv_general_dilated` plus statistics, as `tracked_dot_general`. Returns ``(out, new_state)``."""
  if is_delayed(policy):
    return _tracked_delayed_conv(args, policy=policy, key=key, state=state, update_history=update_history)
  with counters_read(state is not None and counters_wanted(True)):
    out = conv_general_dilated(*args, policy=policy, key=key)
  if state is None:
    return out, None
  lhs, rhs = (lax.stop_gradient(qz.as_float_input(a)) for a in args[:2])
  k_l, k_r, k_bwd = split_keys(key, 3)
  stoch = policy.fwd_rounding == "stochastic"
  stats = lambda x, fmt, k: quantized_stats(x, fmt, natural_blocks(fmt, x.shape), policy.fwd_rounding,
                                            k if stoch else None, policy)
  packed = as_packed(state)
  old = unpack(lax.stop_gradient(packed), roles=("grad",))  # the only role read
  fwd_state = {"lhs": stats(lhs, policy.lhs, k_l), "rhs": stats(rhs, policy.rhs, k_r),
               "grad": jax.tree.map(lax.stop_gradient, old["grad"])}
  cfg = TapConfig(tuple(out.shape), policy.dlhs, policy.grad_rounding, policy, natural=True)
  return _grad_tap(out, packed, fwd_state, k_bwd, cfg), fwd_state


def _tracked_delayed_conv(args, *, policy: Policy, key, state, update_history):
  packed = None if state is None else as_packed(state)
  old = None if packed is None else unpack(lax.stop_gradient(packed))
  hist = scale_state(old if old is not None else empty_state(policy))
  out, new_hist = conv_general_dilated(*args, policy=policy, key=key, scale_state=hist)
  if old is None:
    return out, None
  lhs, rhs = (lax.stop_gradient(qz.as_float_input(a)) for a in args[:2])
  k_l, k_r, k_bwd = split_keys(key, 3)
  stoch = policy.fwd_rounding == "stochastic"

  def quant(x, fmt, k, h, new_h):
    # The op's max over the positions the conv reads is new_h[0] (0 when it is not finite).
    cur = jnp.where(new_h[0] > 0, new_h[0], delayed.amax(x))
    amax = delayed.used_amax(h, cur)
    return qz.quantize_given_amax(x, jnp.full((1,) * x.ndim, amax), fmt, policy.fwd_rounding,
                                  k if stoch else None, x.shape)

  keep = lambda new, r: lax.stop_gradient(history_values(new) if update_history else old[r][HISTORY])
  uk = kernel_quantize(policy)
  fwd_state = {"lhs": {**role_stats(lhs, quant(lhs, policy.lhs, k_l, hist.lhs, new_hist.lhs), uk),
                       HISTORY: keep(new_hist.lhs, "lhs")},
               "rhs": {**role_stats(rhs, quant(rhs, policy.rhs, k_r, hist.rhs, new_hist.rhs), uk),
                       HISTORY: keep(new_hist.rhs, "rhs")},
               "grad": jax.tree.map(lax.stop_gradient, old["grad"])}
  cfg = TapConfig((1, 1, int(np.prod(out.shape))), policy.dlhs, policy.grad_rounding, policy, delayed=True)
  return _grad_tap(out, packed, fwd_state, k_bwd, cfg), fwd_state
