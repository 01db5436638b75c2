"""Convolutions of the FP16 / BF16 mixed-precision recipe as convolutions (no im2col patches).

Each pass rounds its two operands to the policy's float format (round to nearest even, as
`jdfp._src.numerics.quantize.quantize_float`) and convolves them with FP32 accumulation:
  forward          y  = conv(fmt(x), fmt(w))
  backward-data    dx = conv^T_x(fmt(dy), fmt(w))
  weight-gradient  dw = conv^T_w(fmt(x), fmt(dy))
BF16 on a CPU with AVX512_BF16 (backend "ffi", one group, an even number of >= 8 input channels):
all three passes on the C++ BF16 conv kernel (`jdfp._src.ffi.gemm_bf16.conv_bf16`: implicit GEMM,
the patch matrix gathered while packing): on the AMX-BF16 tiles where they are ready and
``isa="auto"`` (exact products, the tile unit's float32 sums), else the vdpbf16ps chains
(docs/arithmetic.md).  FP16 on a CPU
with AMX-BF16 (backend "ffi", ``isa="auto"``, one group, >= 32 channels, >= 2**24 products): all three
passes on the FP16 GEMM's tiles (`conv_f16`, the same implicit GEMM; each float16 split exactly into
two bfloat16).  Otherwise
XLA convolves the rounded operands with FP32 accumulation: the forward hands them to XLA as
FP16/BF16 with ``preferred_element_type=float32`` (XLA:CPU widens them inside its conv), the
backward's transposes widen them first. A product of two FP16 or BF16 values is exact in float32
(11 + 11 and 8 + 8 significand bits fit in 24), so this *is* the recipe's arithmetic
(low-precision operands, FP32 products and sums), at XLA's FP32 convolution speed. The backward
keeps the FP16/BF16 operands: half the bytes of FP32 residuals.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jdfp._src.ffi import gemm_bf16 as ffi_gemm_bf16
from jdfp._src.numerics.shard_types import match_varying
from jdfp._src.ops.backend import warn_once
from jdfp._src.ops.gemm import bf16_kernel, f16_dot_kernel
from jdfp._src.ops.policy import Policy
from jdfp._src.ops.vjp import as_cotangent_of, perturbed_marker, primal_values


def float_formats(policy: Policy) -> bool:
  """Every operand of every pass is FP16 / BF16 (the mixed-precision recipes)."""
  return not any(f.is_integer for f in (policy.lhs, policy.rhs, policy.dlhs, policy.drhs))


def _conv32(x, w, geom):
  """FP32 conv on canonical layouts: x ``[N, *S, C]``, w ``[*K, C/G, O]`` -> ``[N, *O, O]``."""
  nsp = len(geom.k_sp)
  spatial = tuple(range(1, nsp + 1))
  dn = lax.ConvDimensionNumbers((0, nsp + 1) + spatial, (nsp + 1, nsp) + tuple(range(nsp)), (0, nsp + 1) + spatial)
  return lax.conv_general_dilated(x, w, geom.strides, geom.pads, geom.lhs_dil, geom.rhs_dil, dn,
                                  feature_group_count=geom.groups, precision=lax.Precision.HIGHEST,
                                  preferred_element_type=jnp.float32)


# The vdpbf16ps conv needs an even channel count (a k-pair never straddles two taps in its vectorized
# gather); below 8 channels (an image's first layer) XLA's float32 conv is as fast.
BF16_CONV_MIN_CHANNELS = 8


def bf16_conv_kernel(policy: Policy, channels: int, geom) -> bool:
  """Whether this conv's three passes run on the C++ BF16 conv kernel (`bf16_kernel`'s conditions,
  every operand BF16, one group, an even number of at least `BF16_CONV_MIN_CHANNELS` channels)."""
  fmts = (policy.lhs, policy.rhs, policy.dlhs, policy.drhs)
  if not (all(f.dtype == jnp.bfloat16 for f in fmts) and bf16_kernel(policy)):
    return False
  if geom.groups == 1 and channels % 2 == 0 and channels >= BF16_CONV_MIN_CHANNELS and len(geom.k_sp) <= 3:
    return True
  why = (f"{geom.groups} feature groups" if geom.groups != 1 else f"{len(geom.k_sp)} spatial dims"
         if len(geom.k_sp) > 3 else f"{channels} input channels (it takes an even number >= {BF16_CONV_MIN_CHANNELS})")
  warn_once(f"jdfp.conv_general_dilated: a BF16 conv with {why} is not on the BF16 conv kernel; it runs as "
            "XLA's float32 conv on the bf16-rounded operands (the same products, summed in XLA's order).")
  return False


# FP16 convs on the tiles: at least this many input channels per group and products (N x output
# pixels x taps x C x O).  Below, the patch gather per output pixel costs more than the products
# save (an image's 1-channel first layer ran 5x slower than XLA's conv; 16 channels 0.4-0.8x).
F16_CONV_MIN_CHANNELS = 32
F16_CONV_MIN_WORK = 1 << 24


def f16_conv_kernel(policy: Policy, geom, x_shape, w_shape) -> bool:
  """Whether this conv's three passes run on the FP16 GEMM's AMX-BF16 tiles (`conv_f16`): every
  operand FP16, `f16_dot_kernel`'s conditions, one group, at most 3 spatial dims, and at least
  `F16_CONV_MIN_CHANNELS` / `F16_CONV_MIN_WORK`.  Otherwise XLA's FP32 conv of the float16-rounded
  operands, as on CPUs without AMX-BF16 (`jdfp.explain` shows which)."""
  fmts = (policy.lhs, policy.rhs, policy.dlhs, policy.drhs)
  if not (all(f.dtype == jnp.float16 for f in fmts) and f16_dot_kernel(policy)):
    return False
  if geom.groups != 1 or len(geom.k_sp) > 3:
    # What the tiles cannot take (as the BF16 conv kernel, said once); below the size bounds XLA's
    # conv is the faster choice, not a fallback.
    why = f"{geom.groups} feature groups" if geom.groups != 1 else f"{len(geom.k_sp)} spatial dims"
    warn_once(f"jdfp.conv_general_dilated: an FP16 conv with {why} is not on the FP16 tiles (conv_f16); it runs "
              "as XLA's float32 conv on the float16-rounded operands (the same products, summed in XLA's order).")
    return False
  if w_shape[-2] < F16_CONV_MIN_CHANNELS:
    return False
  return x_shape[0] * math.prod(geom.out_sp) * math.prod(w_shape) >= F16_CONV_MIN_WORK


def _f16_kw(geom):
  return dict(window_strides=geom.strides, padding=geom.pads, lhs_dilation=geom.lhs_dil, rhs_dilation=geom.rhs_dil)


def bf16_conv_isa(policy: Policy) -> str:
  """The BF16 conv kernel's isa for this policy: with ``isa="auto"`` where the AMX-BF16 tiles are
  ready, "amx_bf16" (the FP16 GEMM's tiles on the bfloat16 operands as they are: 2-4x the vdpbf16ps
  kernel on the demo's and the CNN's convs, docs/benchmarks.md; exact products, the tile unit's float32
  sums); else "auto" (the vdpbf16ps chain)."""
  return "amx_bf16" if policy.isa == "auto" and ffi_gemm_bf16.amx_bf16_ready() else "auto"


def _conv_kw(geom, policy):
  return dict(window_strides=geom.strides, padding=geom.pads, lhs_dilation=geom.lhs_dil, rhs_dilation=geom.rhs_dil,
              isa=bf16_conv_isa(policy))


def _rounded32(x, fmt):
  """x rounded to ``fmt`` (nearest even; overflow to +-Inf, NaN kept), widened back exactly."""
  return x.astype(fmt.dtype).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def float_conv(x, w, geom, policy: Policy, out_dtype):
  out, _ = _fwd(x, w, geom, policy, out_dtype)
  return out


def _fwd(x, w, geom, policy, out_dtype):
  xq, wq = x.astype(policy.lhs.dtype), w.astype(policy.rhs.dtype)
  if bf16_conv_kernel(policy, x.shape[-1], geom):
    y = match_varying(ffi_gemm_bf16.conv_bf16(xq, wq, **_conv_kw(geom, policy)), xq, wq).astype(out_dtype)
  elif f16_conv_kernel(policy, geom, x.shape, w.shape):
    y = match_varying(ffi_gemm_bf16.conv_f16(xq, wq, **_f16_kw(geom)), xq, wq).astype(out_dtype)
  else:
    # The rounded operands go to XLA as they are, with preferred_element_type=float32: the same
    # products and FP32 sums (XLA:CPU widens them inside its conv; tests/ops/test_float_conv.py),
    # without a float32 copy of each operand between the rounding and the conv.
    y = _conv32(xq, wq, geom).astype(out_dtype)
  # Residuals: the rounded operands (or the float inputs, per Policy.float_residuals); zero-size
  # slices carry the inputs' shapes, dtypes and shard_map types.
  xr = x if "lhs" in policy.float_residuals else xq
  wr = w if "rhs" in policy.float_residuals else wq
  return y, (xr, wr, x[None][:0], w[None][:0])


def _fwd_perturbed(x, w, geom, policy, out_dtype):
  """fwd with symbolic zeros: an operand nobody differentiates (the input images) needs no pass."""
  out, res = _fwd(primal_values(x), primal_values(w), geom, policy, out_dtype)
  return out, res + (perturbed_marker(x), perturbed_marker(w))


def _bwd(geom, policy, out_dtype, res, g):
  xr, wr, x_dt, w_dt, need_x, need_w = res
  if isinstance(g, SymbolicZero):
    return None, None
  dx = dw = None
  if bf16_conv_kernel(policy, xr.shape[-1], geom):
    xq, wq, gq = xr.astype(jnp.bfloat16), wr.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
    if need_x is not None:
      dx = ffi_gemm_bf16.conv_bf16_input_grad(gq, wq, input_spatial=geom.in_sp, **_conv_kw(geom, policy))
      dx = as_cotangent_of(match_varying(dx, gq, wq).astype(x_dt.dtype), x_dt)
    if need_w is not None:
      dw = ffi_gemm_bf16.conv_bf16_weight_grad(xq, gq, kernel_spatial=geom.k_sp, **_conv_kw(geom, policy))
      dw = as_cotangent_of(match_varying(dw, xq, gq).astype(w_dt.dtype), w_dt)
    return dx, dw
  if f16_conv_kernel(policy, geom, xr.shape, wr.shape):
    xq, wq = xr.astype(jnp.float16), wr.astype(jnp.float16)
    if need_x is not None:
      gq = g.astype(policy.dlhs.dtype)
      dx = ffi_gemm_bf16.conv_f16_input_grad(gq, wq, input_spatial=geom.in_sp, **_f16_kw(geom))
      dx = as_cotangent_of(match_varying(dx, gq, wq).astype(x_dt.dtype), x_dt)
    if need_w is not None:
      gq = g.astype(policy.drhs.dtype)
      dw = ffi_gemm_bf16.conv_f16_weight_grad(xq, gq, kernel_spatial=geom.k_sp, **_f16_kw(geom))
      dw = as_cotangent_of(match_varying(dw, xq, gq).astype(w_dt.dtype), w_dt)
    return dx, dw
  x32, w32 = _rounded32(xr, policy.lhs), _rounded32(wr, policy.rhs)
  g = g.astype(jnp.float32)
  # The conv is linear in each operand: transpose it (no primal conv is traced again).
  if need_x is not None:
    t_x = jax.linear_transpose(lambda a: _conv32(a, w32, geom), x32)
    dx = as_cotangent_of(t_x(_rounded32(g, policy.dlhs))[0].astype(x_dt.dtype), x_dt)
  if need_w is not None:
    t_w = jax.linear_transpose(lambda b: _conv32(x32, b, geom), w32)
    dw = as_cotangent_of(t_w(_rounded32(g, policy.drhs))[0].astype(w_dt.dtype), w_dt)
  return dx, dw


float_conv.defvjp(_fwd_perturbed, _bwd, symbolic_zeros=True)
