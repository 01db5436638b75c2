"""Delayed scaling: per-tensor exponents from a history of maxima instead of the current max.

`Policy(scaling="delayed", history_length=H)`: each GEMM role (lhs, rhs, output gradient) keeps the
last H maxima in a `ScaleState`. The exponent comes from the largest of them (the current max while
the history is still empty); elements beyond it saturate at qmax (counted as "saturated" by
telemetry in the Flax path). A non-finite current max still makes the result NaN.

State flow (as Flax's fp8_ops): ``out, new_state = jdfp.dot_general(..., scale_state=state)``
returns the new lhs/rhs histories; the new gradient history leaves the backward pass as the
*cotangent* of ``state.grad``. So differentiate w.r.t. the state too and take
``new_state = jdfp.delayed_state_update(new_state, state_grads)`` (overwrite, not add).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from jdfp._src import formats
from jdfp._src import ops
from jdfp._src import quantize as qz


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


def _amax(x):
  return jnp.max(jnp.where(jnp.isnan(x), jnp.inf, jnp.abs(x))) if x.size else jnp.float32(0)


def _used_amax(hist, current):
  past = jnp.max(hist)
  # Empty history: use the current max. Non-finite current max: keep it (the result must be NaN).
  return jnp.where(jnp.isfinite(current) & (past > 0), jnp.maximum(past, 0.0), current)


def _push(hist, current):
  return jnp.concatenate([jnp.where(jnp.isfinite(current), current, 0.0)[None], hist[:-1]])


def _quantize3(x3, fmt, rounding, key, hist):
  cur = _amax(x3)
  used = _used_amax(hist, cur)
  q = qz.quantize_given_amax(x3, jnp.full((1, 1, 1), used), fmt, rounding, key, x3.shape)
  return q, _push(hist, cur)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _core(lhs, rhs, key, hist_fwd, hist_grad, dims, policy, precision, out_dtype):
  out, _ = _fwd(lhs, rhs, key, hist_fwd, hist_grad, dims, policy, precision, out_dtype)
  return out


def _fwd(lhs, rhs, key, hist_fwd, hist_grad, dims, policy, precision, out_dtype):
  lv, rv = ops._views(lhs.shape, rhs.shape, dims)
  k_l, k_r, k_bwd = ops._split_keys(key, 3)
  ql, new_l = _quantize3(ops._to3(lhs, lv), policy.lhs, policy.fwd_rounding, k_l, hist_fwd[0])
  qr, new_r = _quantize3(ops._to3(rhs, rv), policy.rhs, policy.fwd_rounding, k_r, hist_fwd[1])
  out3 = ops._gemm(ql, lv.c_ax, qr, rv.c_ax, policy, precision)
  out = out3.reshape(ops._out_shape(lhs.shape, rhs.shape, dims)).astype(out_dtype)
  return (out, jnp.stack([new_l, new_r])), (ql, qr, k_bwd, hist_grad, lhs[None][:0], rhs[None][:0])


def _fwd_sz(lhs, rhs, key, hist_fwd, hist_grad, dims, policy, precision, out_dtype):
  unwrap = lambda t: jax.tree.map(lambda k: k.value, t, is_leaf=lambda k: isinstance(k, CustomVJPPrimal))
  return _fwd(lhs.value, rhs.value, unwrap(key), hist_fwd.value, hist_grad.value, dims, policy, precision, out_dtype)


def _bwd(dims, policy, precision, out_dtype, res, cts):
  ql, qr, k_bwd, hist_grad, lhs_dt, rhs_dt = res
  g = cts[0]
  if isinstance(g, SymbolicZero):  # output unused: no gradients, the gradient history stays
    return None, None, None, None, hist_grad
  lv, rv = ops._views(lhs_dt.shape[1:], rhs_dt.shape[1:], dims)
  bsz, m, n = lv.shape3[0], lv.shape3[lv.f_ax], rv.shape3[rv.f_ax]
  g3 = g.astype(jnp.float32).reshape(bsz, m, n)
  k_dl, _ = ops._split_keys(k_bwd, 2)
  qg, new_g = _quantize3(g3, policy.dlhs, policy.grad_rounding, k_dl, hist_grad)
  dlhs, drhs = ops.backward_gemms(ql, qr, qg, qg, lhs_dt, rhs_dt, dims, policy, precision)
  # The new gradient history leaves as the cotangent of the old one (overwrite semantics).
  return dlhs, drhs, None, None, new_g


_core.defvjp(_fwd_sz, _bwd, symbolic_zeros=True)


def dot_general(lhs, rhs, dims, precision, out_dtype, *, policy, key, scale_state: ScaleState):
  """`jdfp.dot_general` with delayed scaling: returns ``(out, new_state)``."""
  if not isinstance(scale_state, ScaleState):
    raise TypeError("scale_state must be a jdfp.ScaleState (jdfp.init_scale_state(policy)), "
                    f"got {type(scale_state).__name__}")
  if policy.dlhs != policy.drhs:
    raise ValueError("delayed scaling keeps one gradient history: dlhs_grad and drhs_grad must agree")
  for f in (policy.lhs, policy.rhs, policy.dlhs):
    if not (f.is_integer and f.axis is None and f.block is None):
      raise ValueError(f"delayed scaling supports per-tensor integer formats only, got {f!r}")
  hist_fwd = jnp.stack([jnp.asarray(scale_state.lhs, jnp.float32), jnp.asarray(scale_state.rhs, jnp.float32)])
  out, new_fwd = _core(lhs, rhs, key, lax.stop_gradient(hist_fwd), jnp.asarray(scale_state.grad, jnp.float32),
                       dims, policy, precision, out_dtype)
  return out, ScaleState(new_fwd[0], new_fwd[1], scale_state.grad)


del formats
