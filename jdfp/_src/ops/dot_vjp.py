"""The custom VJP of `jdfp.dot_general` (current scaling), in flax ``fp8_ops`` style: `dot_core`,
its forward `_dot_fwd` and backward `dot_bwd`.

- forward: quantize both operands (per `Policy`) and run the GEMM on the backend;
- residuals: the quantized int16 operands + exponents (half the bytes of float32 copies), or for
  operands in ``Policy.float_residuals`` the float inputs themselves (re-quantized in the backward);
- backward: quantize the incoming gradient and run backward-data and weight-gradient GEMMs on the
  same backend, reusing the forward's int16 operands (`backward_gemms`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jdfp._src.numerics import quantize as qz
from jdfp._src.ops.backend import kernel_quantize, resolve_backend
from jdfp._src.ops.convert import (block_shape3, counters_read, counters_wanted, int8_conversions, kernel_casts,
                                   lazy_operands, quantize3, quantize3_operands, quantize_blocks_equal,
                                   quantize_given_exponent)
from jdfp._src.ops.gemm import gemm, int8_storage
from jdfp._src.ops.layout import View, from3, out_shape, to3, views
from jdfp._src.ops.policy import Policy, check_backward_key
from jdfp._src.ops.vjp import as_cotangent_of, perturbed_marker, perturbed_marker_of, primal_values, split_keys


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def dot_core(lhs, rhs, key, dims, policy, precision, out_dtype):
  # Not differentiated: no operand is kept, so none needs an int16 copy.
  out, _ = _dot_fwd(lhs, rhs, key, dims, policy, precision, out_dtype, lazy=("lhs", "rhs"))
  return out


def _dot_fwd(lhs, rhs, key, dims, policy, precision, out_dtype, lazy=None):
  """``lazy``: the roles whose int16 copy nobody keeps (default: ``policy.float_residuals``); where
  `lazy_operands` says it pays, the kernel quantizes those while packing, after one exponent call."""
  lv, rv = views(lhs.shape, rhs.shape, dims)
  k_fwd_l, k_fwd_r, k_bwd = split_keys(key, 3)
  lazy = policy.float_residuals if lazy is None else lazy
  work = lv.shape3[0] * lv.shape3[lv.f_ax] * lv.shape3[lv.c_ax] * rv.shape3[rv.f_ax]
  ql, qr = quantize3_operands(
      [(to3(lhs, lv), policy.lhs, lv.c_ax, k_fwd_l), (to3(rhs, rv), policy.rhs, rv.c_ax, k_fwd_r)],
      policy.fwd_rounding, policy.axis_name, kernel_quantize(policy) or kernel_casts(policy),
      lazy_operands(work, "lhs" in lazy, "rhs" in lazy), int8_conversions(policy))
  ql, qr = int8_storage(ql, qr, policy)  # <= 8-bit formats on the INT8 kernel: int8 residuals
  out3 = gemm(ql, lv.c_ax, qr, rv.c_ax, policy, precision)
  out = out3.reshape(out_shape(lhs.shape, rhs.shape, dims)).astype(out_dtype)
  # Zero-size slices carry the operands' shapes, dtypes and shard_map types through the residuals.
  res = (backward_residual(ql, lhs, "lhs", policy), backward_residual(qr, rhs, "rhs", policy), k_bwd,
         lhs[None][:0], rhs[None][:0])
  return out, res


def backward_residual(q: qz.QArray, x, role: str, policy: Policy) -> qz.QArray:
  """What the backward keeps of a forward operand: its int16 QArray, or with
  ``Policy(float_residuals=...)`` the float input itself plus the forward's exponents."""
  if role not in policy.float_residuals:
    return q
  return qz.QArray(x, q.exponent, q.fmt, q.blocks)


def _reread(q: qz.QArray, view: View, role: str, policy: Policy) -> qz.QArray:
  """The forward's quantized operand again (bit for bit) from what `backward_residual` kept."""
  if role not in policy.float_residuals:
    return q
  x3 = to3(q.values, view)
  q3 = qz.QArray(x3, q.exponent, q.fmt, q.blocks)
  if needs_reblock(q3, view.f_ax):
    return q3  # `reblock_for_backward` quantizes the float input
  if not q.fmt.is_integer:
    return qz.quantize_array(x3, q.fmt)
  if resolve_backend(policy) == "ffi" and policy.fwd_rounding == "nearest":
    # The GEMM kernel quantizes float32 operands while packing them: no int16 copy is made.
    return qz.QArray(x3.astype(jnp.float32), q.exponent, q.fmt, q.blocks)
  return quantize_given_exponent(qz.as_float_input(x3), q.exponent, q.fmt, policy.fwd_rounding, None, q.blocks,
                                    kernel_quantize(policy))


def _dot_fwd_perturbed(lhs, rhs, key, dims, policy, precision, out_dtype):
  """fwd with symbolic zeros: an operand nobody differentiates (the input batch, say) needs no
  backward GEMM. A None marker in the residuals tells `dot_bwd` to skip it."""
  out, res = _dot_fwd(lhs.value, rhs.value, primal_values(key), dims, policy, precision, out_dtype)
  # Whether the Flax statistics count this op (`counters_read` around its forward): its backward's
  # FP16 / BF16 gradient cast is then their counting kernel call, else XLA's plain convert.
  return out, res + (perturbed_marker(lhs), perturbed_marker(rhs), perturbed_marker_of(counters_wanted()))


def dot_bwd(dims, policy, precision, out_dtype, res, g, lhs_cotangent=None, rhs_grad=None):
  """The VJP of `dot_core`; ``lhs_cotangent`` and ``rhs_grad`` as in `backward_gemms`."""
  ql, qr, k_bwd, lhs_dt, rhs_dt, need_l, need_r, counted = res
  if isinstance(g, SymbolicZero):
    return None, None, None
  check_backward_key(policy, k_bwd)
  lhs_shape, rhs_shape = lhs_dt.shape[1:], rhs_dt.shape[1:]
  lv, rv = views(lhs_shape, rhs_shape, dims)
  ql, qr = _reread(ql, lv, "lhs", policy), _reread(qr, rv, "rhs", policy)
  bsz, m, n = lv.shape3[0], lv.shape3[lv.f_ax], rv.shape3[rv.f_ax]
  g3 = g.astype(jnp.float32).reshape(bsz, m, n)
  k_dl, k_dr = split_keys(k_bwd, 2)
  # Output gradient as the dlhs operand (contraction over N: physical axis 2) and as the drhs
  # operand (contraction over M: axis 1). Blocks that read the same on both views (per tensor, HBFP
  # tiles: `quantize_blocks_equal`) give the same QArray: quantize once.
  ax = policy.axis_name
  uk = kernel_quantize(policy) or kernel_casts(policy)  # (FP16 / BF16: the counting cast)
  i8 = int8_conversions(policy)
  # The gradient's conversion counts: it is then the call the Flax gradient statistics make (merged).
  # (Integer formats always: the counting kernel call costs what the plain one does.)
  with counters_read(kernel_quantize(policy) or counted is not None):
    g_dl = quantize3(g3, policy.dlhs, 2, policy.grad_rounding, k_dl, ax, uk, i8)
    same = (policy.dlhs == policy.drhs and (not policy.dlhs.is_integer or
            quantize_blocks_equal(policy.dlhs, g3.shape)))
    g_dr = g_dl if same else quantize3(g3, policy.drhs, 1, policy.grad_rounding, k_dr, ax, uk, i8)

  dlhs, drhs = backward_gemms(ql, qr, g_dl, g_dr, lhs_dt, rhs_dt, dims, policy, precision,
                              need_l is not None, need_r is not None, lhs_cotangent, rhs_grad)
  return dlhs, drhs, None


def backward_gemms(ql, qr, g_dl, g_dr, lhs_dt, rhs_dt, dims, policy, precision, need_l=True, need_r=True,
                   lhs_cotangent=None, rhs_grad=None):
  """Backward-data and weight-gradient GEMMs from the quantized operands and output gradient, each
  produced directly in its operand's physical layout (no transposes of the results).

  ``lhs_cotangent(g_dl, qr, b_c)``, for an lhs ``[B, M, K]`` that is itself a function of some
  array (`patch_conv`: the patch matrix of the conv input), gives that array's cotangent from the
  backward-data GEMM's operands (``g_dl . qr`` contracting qr's axis b_c) in place of the lhs's
  (its shard_map type included).  ``rhs_grad(g_dr)``, for an rhs ``[B, K, N]``: the weight-gradient
  GEMM ``lhs^T . g_dr`` ``[B, K, N]`` computed without ``ql`` (`patch_conv`: from the conv input itself)."""
  lv, rv = views(lhs_dt.shape[1:], rhs_dt.shape[1:], dims)
  dlhs = drhs = None
  if need_l:
    qr = reblock_for_backward(qr, rv.f_ax, policy)
    if lhs_cotangent is not None:
      assert lv.c_ax == 2, "lhs_cotangent: lhs [B, M, K]"
      dlhs = lhs_cotangent(g_dl, qr, rv.f_ax)
    else:
      if lv.c_ax == 2:  # lhs3 = [B, M, K]: dlhs3 = g[B, M, N] . rhs^T
        dl3 = gemm(g_dl, 2, qr, rv.f_ax, policy, precision)
      else:  # lhs3 = [B, K, M]: dlhs3 = rhs[., K, N] . g^T
        dl3 = gemm(qr, rv.f_ax, g_dl, 2, policy, precision)
      dlhs = as_cotangent_of(from3(dl3, lv, lhs_dt.shape[1:]).astype(lhs_dt.dtype), lhs_dt)
  if need_r and rhs_grad is not None:
    assert rv.c_ax == 1, "rhs_grad: rhs [B, K, N]"
    drhs = as_cotangent_of(from3(rhs_grad(g_dr), rv, rhs_dt.shape[1:]).astype(rhs_dt.dtype), rhs_dt)
  elif need_r:
    ql = reblock_for_backward(ql, lv.f_ax, policy)
    if rv.c_ax == 1:  # rhs3 = [B, K, N]: drhs3 = lhs^T . g
      dr3 = gemm(ql, lv.f_ax, g_dr, 1, policy, precision)
    else:  # rhs3 = [B, N, K]: drhs3 = g^T . lhs
      dr3 = gemm(g_dr, 1, ql, lv.f_ax, policy, precision)
    drhs = as_cotangent_of(from3(dr3, rv, rhs_dt.shape[1:]).astype(rhs_dt.dtype), rhs_dt)
  return dlhs, drhs


def needs_reblock(q: qz.QArray, c_ax: int) -> bool:
  """Whether `reblock_for_backward` re-quantizes ``q`` for a GEMM contracting over axis ``c_ax``."""
  fmt = q.fmt
  if not fmt.is_integer or not isinstance(getattr(fmt, "block", None), int):
    return False
  return block_shape3(q.values.shape, fmt, c_ax) != q.block_shape


def reblock_for_backward(q: qz.QArray, c_ax: int, policy: Policy) -> qz.QArray:
  """A forward operand for a backward GEMM that contracts over its physical axis ``c_ax``.

  Formats whose blocks read the same on both views (per-tensor, HBFP tiles) keep the forward's
  integers. 1-D blocks along the forward's contraction axis (MX style, ``BFP(7, block=32, axis=-1)``)
  would lie across the backward's: one exponent per product (``block_k = 1``), ~100x slower. As MX
  training does, such an operand is quantized again along the new contraction axis (nearest), from
  its float input where the policy kept it (``float_residuals``), else from its dequantized values.
  """
  if not needs_reblock(q, c_ax):
    return q
  x = q.values if jnp.issubdtype(q.values.dtype, jnp.floating) else qz.dequantize(q)
  return quantize3(x.astype(jnp.float32), q.fmt, c_ax, "nearest", None, policy.axis_name, kernel_quantize(policy),
                   int8_conversions(policy))


dot_core.defvjp(_dot_fwd_perturbed, dot_bwd, symbolic_zeros=True)
