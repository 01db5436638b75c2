"""Convolutions on int16 tensors with per-tensor exponents, and their custom VJP (`conv_core`).

x, w and the output gradient are quantized once (never their im2col copies) and each pass is one
GEMM of the contract on the im2col matrix, K ordered (kernel taps row-major, input channel):
  forward          y  = conv(x, w)
  backward-data    dx = conv(dy, w flipped with in/out features swapped, lhs dilation = strides)
  weight-gradient  dw = im2col(x)^T . dy   (K = the output pixels)
Backend "ffi": the implicit-GEMM conv kernel (no im2col buffer); "reference": im2col in JAX + the
reference GEMM -- bit-identical.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jdfp._src.ffi import conv as ffi_conv
from jdfp._src.ffi import quantize as ffi_quantize
from jdfp._src.numerics import formats
from jdfp._src.numerics import quantize as qz
from jdfp._src.numerics.shard_types import match_varying
from jdfp._src.ops.backend import kernel_quantize, resolve_backend
from jdfp._src.ops.convert import counters_read, quantize_blocks
from jdfp._src.ops.gemm import reference_call
from jdfp._src.ops.layout import prod
from jdfp._src.ops.policy import Policy, check_backward_key
from jdfp._src.ops.vjp import as_cotangent_of, perturbed_marker, primal_values, split_keys


def patches(x, kernel_spatial, strides, pads, lhs_dil, rhs_dil):
  """x ``[N, *S, C]`` -> patches ``[N, *O, KK, C]`` (KK = prod(kernel_spatial), row-major offsets)."""
  nsp = len(kernel_spatial)
  cfg = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(pads, lhs_dil)] + [(0, 0, 0)]
  x = lax.pad(x, jnp.zeros((), x.dtype), cfg)
  sizes = x.shape[1:1 + nsp]
  eff = [(k - 1) * d + 1 for k, d in zip(kernel_spatial, rhs_dil)]
  out = [max(0, (s - e) // st + 1) for s, e, st in zip(sizes, eff, strides)]
  slices = []
  for offs in np.ndindex(*kernel_spatial):
    start = [0] + [o * d for o, d in zip(offs, rhs_dil)] + [0]
    limit = [x.shape[0]] + [st0 + (o_ - 1) * st + 1 if o_ > 0 else st0
                            for st0, o_, st in zip(start[1:-1], out, strides)] + [x.shape[-1]]
    slices.append(lax.slice(x, start, limit, [1] + list(strides) + [1]))
  return jnp.stack(slices, axis=-2), tuple(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def kernel_patches(x, kernel_spatial, strides, pads, lhs_dil, rhs_dil):
  """`patches` (the array only) on the C++ im2col kernel: one pass instead of one XLA fusion per
  tap plus a stack, bit for bit the same copy. Its transpose (col2im) stays XLA's, of `patches`."""
  return ffi_conv.im2col(x, kernel_spatial=kernel_spatial, window_strides=strides, padding=pads,
                         lhs_dilation=lhs_dil, rhs_dilation=rhs_dil)


def _kernel_patches_fwd(x, kernel_spatial, strides, pads, lhs_dil, rhs_dil):
  return kernel_patches(x, kernel_spatial, strides, pads, lhs_dil, rhs_dil), x[None][:0]


def _kernel_patches_bwd(kernel_spatial, strides, pads, lhs_dil, rhs_dil, x_dt, g):
  xla_patches = lambda x: patches(x, kernel_spatial, strides, pads, lhs_dil, rhs_dil)[0]
  (dx,) = jax.linear_transpose(xla_patches, jax.ShapeDtypeStruct(x_dt.shape[1:], x_dt.dtype))(g)
  return (dx,)


kernel_patches.defvjp(_kernel_patches_fwd, _kernel_patches_bwd)


def patches_on(x, kernel_spatial, strides, pads, lhs_dil, rhs_dil, use_kernel: bool):
  """`patches`, on the im2col kernel when ``use_kernel`` (backend "ffi") and x is float32 with 1 to 3
  spatial dims; returns ``(patches, out_spatial)``."""
  if use_kernel and x.dtype == jnp.float32 and 1 <= len(kernel_spatial) <= 3:
    p = kernel_patches(x, tuple(kernel_spatial), tuple(strides), tuple(tuple(q) for q in pads), tuple(lhs_dil),
                       tuple(rhs_dil))
    return p, tuple(p.shape[1:-2])
  return patches(x, kernel_spatial, strides, pads, lhs_dil, rhs_dil)


@dataclasses.dataclass(frozen=True)
class ConvGeom:
  """Static geometry of a conv on canonical layouts (x ``[N, *S, C]``, w ``[*K, C/G, O]``)."""

  in_sp: tuple[int, ...]
  k_sp: tuple[int, ...]
  strides: tuple[int, ...]
  pads: tuple[tuple[int, int], ...]
  lhs_dil: tuple[int, ...]
  rhs_dil: tuple[int, ...]
  groups: int

  @property
  def out_sp(self) -> tuple[int, ...]:
    return ffi_conv.conv_out_spatial(self.in_sp, self.k_sp, self.strides, self.pads, self.lhs_dil, self.rhs_dil)

  def covered(self):
    """Per spatial dim, which input positions some output reads (None: all of them), as a static mask."""
    masks, all_read = [], True
    for s, k, st, (lo, _), ld, rd, o in zip(self.in_sp, self.k_sp, self.strides, self.pads, self.lhs_dil,
                                             self.rhs_dil, self.out_sp):
      pos = (np.arange(o)[:, None] * st + np.arange(k)[None, :] * rd - lo).ravel()
      pos = pos[(pos >= 0) & (pos % ld == 0)] // ld
      m = np.zeros(s, bool)
      m[pos[pos < s]] = True
      masks.append(m)
      all_read &= bool(m.all())
    return None if all_read else masks


def per_tensor(fmt) -> bool:
  return fmt.is_integer and fmt.block is None and fmt.axis is None


def conv_kernel_eligible(policy: Policy, x_shape, w_shape, geom: ConvGeom) -> bool:
  if not all(per_tensor(f) for f in (policy.lhs, policy.rhs, policy.dlhs, policy.drhs)):
    return False
  # Degenerate (empty) convolutions keep the im2col path, whose edge cases are already defined.
  return (len(geom.in_sp) <= 3 and prod(x_shape) > 0 and prod(w_shape) > 0 and prod(geom.out_sp) > 0)


def conv_mask(masks) -> np.ndarray:
  """The per-dimension read masks of `ConvGeom.covered` as one broadcastable ``[1, *S, 1]`` mask."""
  nsp = len(masks)
  return functools.reduce(np.logical_and, [m.reshape((1,) + tuple(-1 if j == d else 1 for j in range(nsp)) + (1,))
                                           for d, m in enumerate(masks)])


def quantize_conv_operand(x, fmt, rounding, key, axis_name, masks=None, use_kernel=False):
  """Per-tensor quantization of a conv operand: int16 values and a ``(1,)`` exponent.

  ``masks`` (per spatial dim, static) restrict the max to the input positions the conv reads, so the
  exponent is the one of the im2col matrix (what the GEMM sees) even when a stride skips inputs.
  ``use_kernel``: the float -> int16 conversion on the C++ kernel (any rounding)."""
  if masks is None:
    q = quantize_blocks(x, fmt, fmt.block_shape(jnp.shape(x)), rounding=rounding,
                           key=key if rounding == "stochastic" else None, axis_name=axis_name,
                           use_kernel=use_kernel)
    return q.values, q.exponent.reshape(1)
  x = qz.as_float_input(x)
  ax = jnp.where(jnp.isnan(x), jnp.inf, jnp.abs(x))  # as formats.block_amax
  amax = jnp.max(jnp.where(conv_mask(masks), ax, 0.0))
  if axis_name is not None:
    amax = qz.shared_amax(amax, qz.normalize_axis_name(axis_name))
  e = qz.group_exponent(amax, fmt)
  return convert_conv_operand(x, e, fmt, rounding, key, use_kernel), e.reshape(1)


def convert_conv_operand(x, e, fmt, rounding, key, use_kernel):
  """int16 values of a conv operand for the (scalar) exponent ``e``."""
  if use_kernel and x.size:
    # Unread positions may convert to any in-range value (NaN -> 0, Inf -> +-qmax): never read.
    return ffi_quantize.quantize(x, e, bits=fmt.bits, rounding=rounding,
                                 key=key if rounding == "stochastic" else None)
  nonfinite = e == formats.NONFINITE_EXPONENT
  # Unread non-finite inputs must not leak into int16 (they are never read, but keep them 0).
  xs = jnp.where(nonfinite | ~jnp.isfinite(x), 0.0, x)
  y = formats.scale2(xs, -jnp.where(nonfinite, 0, e))
  i = jnp.clip(qz.round_to_int(y, rounding, key), -fmt.qmax, fmt.qmax)
  return i.astype(jnp.int16)


def conv_int(x, ex, w, ew, geom: ConvGeom, bits_x: int, bits_w: int, policy: Policy):
  """float32 ``[N, *O, O]`` = conv of int16 x ``[N, *S, C]`` and w ``[*K, C/G, O]`` (per-tensor exponents)."""
  kw = dict(window_strides=geom.strides, padding=geom.pads, lhs_dilation=geom.lhs_dil, rhs_dilation=geom.rhs_dil,
            feature_group_count=geom.groups)
  if resolve_backend(policy) == "ffi":
    y = ffi_conv.conv(x, w, ex, ew, bits_x=bits_x, bits_w=bits_w, isa=policy.isa, **kw)
    return match_varying(y, x, w, ex, ew)
  g, n = geom.groups, x.shape[0]
  kk, i, o = prod(geom.k_sp), w.shape[-2], w.shape[-1]
  p, out_sp = patches(x, geom.k_sp, geom.strides, geom.pads, geom.lhs_dil, geom.rhs_dil)
  rows = n * prod(out_sp)
  p = p.reshape(rows, kk, g, i).transpose(2, 0, 1, 3).reshape(g, rows, kk * i)
  w3 = w.reshape(kk, i, g, o // g).transpose(2, 0, 1, 3).reshape(g, kk * i, o // g)
  y = reference_call(p, w3, ex.reshape(1, 1, 1), ew.reshape(1, 1, 1), bits_x, bits_w, None, False, False)
  return y.transpose(1, 0, 2).reshape((n,) + out_sp + (o,))


def conv_wgrad_int(x, ex, dy, edy, geom: ConvGeom, bits_x: int, bits_dy: int, policy: Policy):
  """float32 ``[*K, C/G, O]`` = im2col(x)^T . dy per group (K = output pixels, row-major)."""
  kw = dict(window_strides=geom.strides, padding=geom.pads, lhs_dilation=geom.lhs_dil, rhs_dilation=geom.rhs_dil,
            feature_group_count=geom.groups)
  if resolve_backend(policy) == "ffi":
    dw = ffi_conv.conv_weight_grad(x, dy, ex, edy, kernel_spatial=geom.k_sp, bits_x=bits_x, bits_dy=bits_dy,
                                  isa=policy.isa, **kw)
    return match_varying(dw, x, dy, ex, edy)
  g, n = geom.groups, x.shape[0]
  kk, c, o = prod(geom.k_sp), x.shape[-1], dy.shape[-1]
  i = c // g
  p, out_sp = patches(x, geom.k_sp, geom.strides, geom.pads, geom.lhs_dil, geom.rhs_dil)
  rows = n * prod(out_sp)
  p = p.reshape(rows, kk, g, i).transpose(2, 0, 1, 3).reshape(g, rows, kk * i)
  d3 = dy.reshape(rows, g, o // g).transpose(1, 0, 2)
  dw = reference_call(p, d3, ex.reshape(1, 1, 1), edy.reshape(1, 1, 1), bits_x, bits_dy, None, True, False)
  return dw.reshape(g, kk, i, o // g).transpose(1, 2, 0, 3).reshape(geom.k_sp + (i, o))


def conv_input_grad_int(dy, edy, w, ew, geom: ConvGeom, bits_dy: int, bits_w: int, policy: Policy):
  """float32 ``[N, *S, C]``: the backward-data conv (`ffi_conv.conv_input_grad_setup`), either backend.
  On the kernel a strided conv's runs per output phase (`ffi_conv.conv_input_grad`: no products with
  the zeros of the lhs-dilated dy, the same bits)."""
  if resolve_backend(policy) == "ffi":
    dx = ffi_conv.conv_input_grad(dy, w, edy, ew, input_spatial=geom.in_sp, window_strides=geom.strides,
                                  padding=geom.pads, lhs_dilation=geom.lhs_dil, rhs_dilation=geom.rhs_dil,
                                  feature_group_count=geom.groups, bits_dy=bits_dy, bits_w=bits_w, isa=policy.isa)
    return match_varying(dx, dy, w, edy, ew)
  wt, pads_t = ffi_conv.conv_input_grad_setup(w, geom.in_sp, geom.strides, geom.pads, geom.lhs_dil,
                                             geom.rhs_dil, geom.groups)
  gt = ConvGeom(geom.out_sp, geom.k_sp, geom.lhs_dil, pads_t, geom.strides, geom.rhs_dil, geom.groups)
  return conv_int(dy, edy, wt, ew, gt, bits_dy, bits_w, policy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def conv_core(x, w, key, geom, policy, out_dtype):
  out, _ = _conv_fwd(x, w, key, geom, policy, out_dtype)
  return out


def _conv_fwd(x, w, key, geom, policy, out_dtype):
  k_x, k_w, k_bwd = split_keys(key, 3)
  ax = policy.axis_name
  uk = kernel_quantize(policy)
  xq, ex = quantize_conv_operand(x, policy.lhs, policy.fwd_rounding, k_x, ax, geom.covered(), uk)
  wq, ew = quantize_conv_operand(w, policy.rhs, policy.fwd_rounding, k_w, ax, use_kernel=uk)
  y = conv_int(xq, ex, wq, ew, geom, policy.lhs.int_bits, policy.rhs.int_bits, policy).astype(out_dtype)
  # Residuals: the int16 tensors (or, per Policy.float_residuals, the float inputs) + exponents;
  # zero-size slices carry shapes, dtypes and shard_map types.
  xr = x if "lhs" in policy.float_residuals else xq
  wr = w if "rhs" in policy.float_residuals else wq
  return y, (xr, ex, wr, ew, k_bwd, x[None][:0], w[None][:0])


def _conv_fwd_perturbed(x, w, key, geom, policy, out_dtype):
  """fwd with symbolic zeros: an operand nobody differentiates (the input images) needs no pass."""
  out, res = _conv_fwd(x.value, w.value, primal_values(key), geom, policy, out_dtype)
  return out, res + (perturbed_marker(x), perturbed_marker(w))


def _conv_bwd(geom, policy, out_dtype, res, g):
  xq, ex, wq, ew, k_bwd, x_dt, w_dt, need_x, need_w = res
  if isinstance(g, SymbolicZero):
    return None, None, None
  check_backward_key(policy, k_bwd)
  k_dl, k_dr = split_keys(k_bwd, 2)
  ax = policy.axis_name
  g = g.astype(jnp.float32)
  dx = dw = None
  gl = gr = None
  uk = kernel_quantize(policy)
  # Float residuals: the forward's int16 operands again, with the forward's exponents (bit for bit).
  if "lhs" in policy.float_residuals and need_w is not None:
    xq = convert_conv_operand(qz.as_float_input(xq), ex[0], policy.lhs, policy.fwd_rounding, None, uk)
  if "rhs" in policy.float_residuals and need_x is not None:
    wq = convert_conv_operand(qz.as_float_input(wq), ew[0], policy.rhs, policy.fwd_rounding, None, uk)
  if need_x is not None:
    with counters_read():  # the call the Flax gradient statistics make: XLA merges the two
      gl = quantize_conv_operand(g, policy.dlhs, policy.grad_rounding, k_dl, ax, use_kernel=uk)
    dx = conv_input_grad_int(*gl, wq, ew, geom, policy.dlhs.int_bits, policy.rhs.int_bits, policy)
    dx = as_cotangent_of(dx.astype(x_dt.dtype), x_dt)
  if need_w is not None:
    with counters_read():
      gr = gl if (gl is not None and policy.drhs == policy.dlhs) else \
          quantize_conv_operand(g, policy.drhs, policy.grad_rounding, k_dr, ax, use_kernel=uk)
    dw = conv_wgrad_int(xq, ex, *gr, geom, policy.lhs.int_bits, policy.drhs.int_bits, policy)
    dw = as_cotangent_of(dw.astype(w_dt.dtype), w_dt)
  return dx, dw, None


conv_core.defvjp(_conv_fwd_perturbed, _conv_bwd, symbolic_zeros=True)
