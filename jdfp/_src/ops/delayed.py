"""Delayed scaling: per-tensor exponents from a history of maxima instead of the current max.

`Policy(scaling="delayed", history_length=H)`: each GEMM role (lhs, rhs, output gradient) keeps the
last H maxima in a `ScaleState`. The exponent comes from the largest of them (the current max while
the history is still empty); elements beyond it saturate at qmax (counted as "saturated" by
telemetry in the Flax path). A non-finite current max still makes the result NaN.

State flow (as Flax's fp8_ops): ``out, new_state = jdfp.dot_general(..., scale_state=state)`` (or
``jdfp.conv_general_dilated(..., scale_state=state)``) returns the new lhs/rhs histories; the new gradient history leaves the backward pass as the
*cotangent* of ``state.grad``. So differentiate w.r.t. the state too and take
``new_state = jdfp.delayed_state_update(new_state, state_grads)`` (overwrite, not add).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jdfp._src.numerics import formats
from jdfp._src.numerics import quantize as qz
from jdfp._src.ops.conv_vjp import conv_input_grad_int, conv_int, conv_kernel_eligible, conv_mask, conv_wgrad_int
from jdfp._src.ops.dot_vjp import backward_gemms
from jdfp._src.ops.gemm import gemm
from jdfp._src.ops.layout import out_shape, to3, views
from jdfp._src.ops.policy import check_backward_key, check_key
from jdfp._src.ops.vjp import as_cotangent_of, perturbed_marker, primal_values, split_keys


class ScaleState(NamedTuple):
  """Histories of per-tensor maxima (float32 ``[H]``, newest first) for the three GEMM roles."""

  lhs: jax.Array
  rhs: jax.Array
  grad: jax.Array


def init_scale_state(policy) -> ScaleState:
  h = policy.history_length
  return ScaleState(*(jnp.zeros((h,), jnp.float32) for _ in range(3)))


def delayed_state_update(forward_state: ScaleState, state_grads: ScaleState) -> ScaleState:
  """The next state: forward histories from the op's output, the gradient history from the
  cotangent of ``state.grad`` (which *is* the new history, not an increment)."""
  return ScaleState(forward_state.lhs, forward_state.rhs, state_grads.grad)


def amax(x):
  return jnp.max(jnp.where(jnp.isnan(x), jnp.inf, jnp.abs(x))) if x.size else jnp.float32(0)


def used_amax(hist, current):
  past = jnp.max(hist)
  # Empty history: use the current max. Non-finite current max: keep it (the result must be NaN).
  return jnp.where(jnp.isfinite(current) & (past > 0), jnp.maximum(past, 0.0), current)


def push_history(hist, current):
  return jnp.concatenate([jnp.where(jnp.isfinite(current), current, 0.0)[None], hist[:-1]])


def quantize_with_history(x3, fmt, rounding, key, hist):
  cur = amax(x3)
  used = used_amax(hist, cur)
  q = qz.quantize_given_amax(x3, jnp.full((1, 1, 1), used), fmt, rounding, key, x3.shape)
  return q, push_history(hist, cur)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _core(lhs, rhs, key, hist_fwd, hist_grad, dims, policy, precision, out_dtype):
  out, _ = _fwd(lhs, rhs, key, hist_fwd, hist_grad, dims, policy, precision, out_dtype)
  return out


def _fwd(lhs, rhs, key, hist_fwd, hist_grad, dims, policy, precision, out_dtype):
  lv, rv = views(lhs.shape, rhs.shape, dims)
  k_l, k_r, k_bwd = split_keys(key, 3)
  ql, new_l = quantize_with_history(to3(lhs, lv), policy.lhs, policy.fwd_rounding, k_l, hist_fwd[0])
  qr, new_r = quantize_with_history(to3(rhs, rv), policy.rhs, policy.fwd_rounding, k_r, hist_fwd[1])
  out3 = gemm(ql, lv.c_ax, qr, rv.c_ax, policy, precision)
  out = out3.reshape(out_shape(lhs.shape, rhs.shape, dims)).astype(out_dtype)
  return (out, jnp.stack([new_l, new_r])), (ql, qr, k_bwd, hist_grad, lhs[None][:0], rhs[None][:0])


def _fwd_sz(lhs, rhs, key, hist_fwd, hist_grad, dims, policy, precision, out_dtype):
  return _fwd(lhs.value, rhs.value, primal_values(key), hist_fwd.value, hist_grad.value, dims, policy, precision,
              out_dtype)


def _bwd(dims, policy, precision, out_dtype, res, cts):
  ql, qr, k_bwd, hist_grad, lhs_dt, rhs_dt = res
  g = cts[0]
  if isinstance(g, SymbolicZero):  # output unused: no gradients, the gradient history stays
    return None, None, None, None, hist_grad
  check_backward_key(policy, k_bwd)
  lv, rv = views(lhs_dt.shape[1:], rhs_dt.shape[1:], dims)
  bsz, m, n = lv.shape3[0], lv.shape3[lv.f_ax], rv.shape3[rv.f_ax]
  g3 = g.astype(jnp.float32).reshape(bsz, m, n)
  k_dl, _ = split_keys(k_bwd, 2)
  qg, new_g = quantize_with_history(g3, policy.dlhs, policy.grad_rounding, k_dl, hist_grad)
  dlhs, drhs = backward_gemms(ql, qr, qg, qg, lhs_dt, rhs_dt, dims, policy, precision)
  # The new gradient history leaves as the cotangent of the old one (overwrite semantics).
  return dlhs, drhs, None, None, new_g


_core.defvjp(_fwd_sz, _bwd, symbolic_zeros=True)


def dot_general(lhs, rhs, dims, precision, out_dtype, *, policy, key, scale_state: ScaleState):
  """`jdfp.dot_general` with delayed scaling: returns ``(out, new_state)``."""
  if not isinstance(scale_state, ScaleState):
    raise TypeError("scale_state must be a jdfp.ScaleState (jdfp.init_scale_state(policy)), "
                    f"got {type(scale_state).__name__}")
  _check_policy(policy)
  hist_fwd = jnp.stack([jnp.asarray(scale_state.lhs, jnp.float32), jnp.asarray(scale_state.rhs, jnp.float32)])
  out, new_fwd = _core(lhs, rhs, key, lax.stop_gradient(hist_fwd), jnp.asarray(scale_state.grad, jnp.float32),
                       dims, policy, precision, out_dtype)
  return out, ScaleState(new_fwd[0], new_fwd[1], scale_state.grad)



def _check_policy(policy):
  if policy.dlhs != policy.drhs:
    raise ValueError("delayed scaling keeps one gradient history: dlhs_grad and drhs_grad must agree")
  for f in (policy.lhs, policy.rhs, policy.dlhs):
    if not (f.is_integer and f.axis is None and f.block is None):
      raise ValueError(f"delayed scaling supports per-tensor integer formats only, got {f!r}")


# ------------------------------------------------------------------------------------------------
# Convolutions: ops' implicit-GEMM conv passes (`conv_vjp.conv_int` & co.), operands quantized with
# exponents from the histories. With empty histories this is bit-identical to current scaling.


def _conv_quantize(x, fmt, rounding, key, hist, masks=None):
  """As `conv_vjp.quantize_conv_operand`, with the exponent from ``max(hist)`` (the current max of the
  positions the conv reads while the history is empty). Returns int16 values, the ``(1,)``
  exponent and the new history."""
  x = qz.as_float_input(x)
  ax = jnp.where(jnp.isnan(x), jnp.inf, jnp.abs(x))
  if masks is not None:
    ax = jnp.where(conv_mask(masks), ax, 0.0)
  cur = jnp.max(ax) if x.size else jnp.float32(0)
  e = qz.group_exponent(used_amax(hist, cur), fmt)
  nonfinite = e == formats.NONFINITE_EXPONENT
  xs = jnp.where(nonfinite | ~jnp.isfinite(x), 0.0, x)
  y = formats.scale2(xs, -jnp.where(nonfinite, 0, e))
  i = jnp.clip(qz.round_to_int(y, rounding, key if rounding == "stochastic" else None), -fmt.qmax, fmt.qmax)
  return i.astype(jnp.int16), e.reshape(1), push_history(hist, cur)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _conv_core(x, w, key, hist_fwd, hist_grad, geom, policy, out_dtype):
  out, _ = _conv_fwd(x, w, key, hist_fwd, hist_grad, geom, policy, out_dtype)
  return out


def _conv_fwd(x, w, key, hist_fwd, hist_grad, geom, policy, out_dtype):
  k_x, k_w, k_bwd = split_keys(key, 3)
  xq, ex, new_x = _conv_quantize(x, policy.lhs, policy.fwd_rounding, k_x, hist_fwd[0], geom.covered())
  wq, ew, new_w = _conv_quantize(w, policy.rhs, policy.fwd_rounding, k_w, hist_fwd[1])
  y = conv_int(xq, ex, wq, ew, geom, policy.lhs.int_bits, policy.rhs.int_bits, policy).astype(out_dtype)
  return (y, jnp.stack([new_x, new_w])), (xq, ex, wq, ew, k_bwd, hist_grad, x[None][:0], w[None][:0])


def _conv_fwd_sz(x, w, key, hist_fwd, hist_grad, geom, policy, out_dtype):
  out, res = _conv_fwd(x.value, w.value, primal_values(key), hist_fwd.value, hist_grad.value, geom, policy, out_dtype)
  return out, res + (perturbed_marker(x), perturbed_marker(w))


def _conv_bwd(geom, policy, out_dtype, res, cts):
  xq, ex, wq, ew, k_bwd, hist_grad, x_dt, w_dt, need_x, need_w = res
  g = cts[0]
  if isinstance(g, SymbolicZero):
    return None, None, None, None, hist_grad
  check_backward_key(policy, k_bwd)
  k_dl, k_dr = split_keys(k_bwd, 2)
  k_g = k_dl if need_x is not None else k_dr  # the key current scaling's conv uses (see conv_vjp._conv_bwd)
  gq, eg, new_g = _conv_quantize(g.astype(jnp.float32), policy.dlhs, policy.grad_rounding, k_g, hist_grad)
  dx = dw = None
  if need_x is not None:
    dx = conv_input_grad_int(gq, eg, wq, ew, geom, policy.dlhs.int_bits, policy.rhs.int_bits, policy)
    dx = as_cotangent_of(dx.astype(x_dt.dtype), x_dt)
  if need_w is not None:
    dw = conv_wgrad_int(xq, ex, gq, eg, geom, policy.lhs.int_bits, policy.drhs.int_bits, policy)
    dw = as_cotangent_of(dw.astype(w_dt.dtype), w_dt)
  return dx, dw, None, None, new_g


_conv_core.defvjp(_conv_fwd_sz, _conv_bwd, symbolic_zeros=True)


def conv_general_dilated(x, w, geom, *, policy, key, scale_state, out_dtype):
  """The delayed-scaling conv on canonical layouts (x ``[N, *S, C]``, w ``[*K, C/G, O]``; called by
  `jdfp.conv_general_dilated`, which handles the layouts). Returns ``(out, new_state)``."""
  if scale_state is None:
    raise ValueError("Policy(scaling='delayed') needs scale_state=jdfp.init_scale_state(policy) "
                     "(the call then returns (out, new_state))")
  if policy.scaling != "delayed":
    raise ValueError("scale_state= is for Policy(scaling='delayed'); this policy uses current scaling")
  if not isinstance(scale_state, ScaleState):
    raise TypeError("scale_state must be a jdfp.ScaleState (jdfp.init_scale_state(policy)), "
                    f"got {type(scale_state).__name__}")
  _check_policy(policy)
  if not conv_kernel_eligible(policy, x.shape, w.shape, geom):
    raise NotImplementedError("jdfp.conv_general_dilated: delayed scaling needs 1-3 spatial dims and non-empty "
                              "operands")
  check_key(policy, key)
  hist_fwd = jnp.stack([jnp.asarray(scale_state.lhs, jnp.float32), jnp.asarray(scale_state.rhs, jnp.float32)])
  out, new_fwd = _conv_core(x, w, key, lax.stop_gradient(hist_fwd), jnp.asarray(scale_state.grad, jnp.float32),
                            geom, policy, out_dtype)
  return out, ScaleState(new_fwd[0], new_fwd[1], scale_state.grad)
