"""`jdfp.conv_general_dilated`: the drop-in for `jax.lax.conv_general_dilated` with forward,
backward-data and weight-gradient in low precision. Per-tensor integer formats run as convolutions
(`jdfp._src.ops.conv_vjp`), FP16/BF16 as convolutions with FP32 accumulation
(`jdfp._src.ops.float_conv`); block formats as the GEMM of their im2col patch matrix, which on
backend "ffi" the lhs conversion gathers from the input (`jdfp._src.ops.patch_conv`) or the C++
im2col kernel materialises."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jdfp._src.ops import delayed
from jdfp._src.ops.backend import resolve_backend, warn_once
from jdfp._src.ops.conv_vjp import ConvGeom, conv_core, conv_kernel_eligible, patches_on
from jdfp._src.ops.dot import dot_general
from jdfp._src.ops.float_conv import float_conv, float_formats
from jdfp._src.ops.layout import check_float, lax_conv_shape, prod, result_dtype
from jdfp._src.ops.patch_conv import PatchGeom, patch_conv_core
from jdfp._src.ops.patch_conv import applies as patch_conv_applies
from jdfp._src.ops.policy import Policy, check_key


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None, *, policy: Policy | None = None,
                         key=None, scale_state=None, _dot_general=None, _patch_conv=None) -> jax.Array:
  """Drop-in for `jax.lax.conv_general_dilated` (any dimension numbers, strides, padding, lhs/rhs
  dilation, feature groups) with forward, backward-data and weight-gradient in low precision.

  Integer formats with per-tensor exponents (`DFP` / `BFP` with ``axis=None, block=None``, the
  default): x, w and the output gradient are quantized once and each pass is a convolution of the
  int16 tensors -- on the C++ implicit-GEMM conv kernel (backend "ffi") or, bit-identically, im2col
  + the reference GEMM (backend "reference").  Backward-data is the conv of the output gradient
  with the flipped kernel (lhs dilation = strides), weight-gradient im2col(x)^T . dy.
  FP16/BF16: the operands of each pass rounded to the format, convolved with FP32 accumulation (no
  patches). Block exponents (HBFP tiles of the patch matrix): `jdfp.dot_general` on the patch
  matrix, which backend "ffi" converts straight from the input (one group, float32) or builds on the
  im2col kernel, and the reference backend in XLA (logged in `fallback_log`); on backend "ffi" the
  backward-data GEMM and its col2im are then one kernel call (from 4 images on), bit-identical.
  ``scale_state``: with ``Policy(scaling="delayed")`` (per-tensor formats), the op's `jdfp.ScaleState`;
  the call then returns ``(out, new_state)`` as `jdfp.dot_general` does."""
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  check_float("lhs", lhs)
  check_float("rhs", rhs)
  # lax's own validation (same exception types and messages) and its output shape.
  out_struct = lax_conv_shape(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                              feature_group_count, batch_group_count, precision)
  if batch_group_count != 1:
    raise NotImplementedError("jdfp.conv_general_dilated: batch_group_count > 1 is not supported")
  nsp = lhs.ndim - 2
  if nsp < 1 or rhs.ndim != lhs.ndim:
    raise ValueError(f"lhs and rhs must have the same rank >= 3, got {lhs.shape} and {rhs.shape}")
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  strides = tuple(window_strides)
  lhs_dil = tuple(lhs_dilation or (1,) * nsp)
  rhs_dil = tuple(rhs_dilation or (1,) * nsp)
  if len(strides) != nsp or len(lhs_dil) != nsp or len(rhs_dil) != nsp:
    raise ValueError(f"window_strides, lhs_dilation and rhs_dilation need {nsp} entries each")
  # Canonical layouts: lhs [N, *S, C], rhs [*K, I, O].
  x = jnp.transpose(lhs, (dn.lhs_spec[0],) + tuple(dn.lhs_spec[2:]) + (dn.lhs_spec[1],))
  w = jnp.transpose(rhs, tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[1], dn.rhs_spec[0]))
  ksp = w.shape[:nsp]
  c, i, o = x.shape[-1], w.shape[-2], w.shape[-1]
  g = int(feature_group_count)
  if g < 1 or c != i * g or o % g:
    raise ValueError(f"feature_group_count={g}: lhs features {c} must equal rhs input features {i} x groups, "
                     f"and rhs output features {o} must divide by groups")
  if isinstance(padding, str):
    in_sp = [(s - 1) * d + 1 for s, d in zip(x.shape[1:1 + nsp], lhs_dil)]
    k_eff = [(k - 1) * d + 1 for k, d in zip(ksp, rhs_dil)]
    pads = lax.padtype_to_pads(in_sp, k_eff, strides, padding)
  else:
    pads = tuple(tuple(p) for p in padding)
  if (any(st > 1 for st in strides) and all(k == 1 for k in ksp) and all(d == 1 for d in lhs_dil)
      and all(tuple(p) == (0, 0) for p in pads)):
    # A strided 1x1 conv (ResNet's projection shortcut) reads only x[:, ::s, ::s]: slice first, so the
    # int16 operand and its backward residual hold just that part. Exponents (taken over the read
    # positions anyway), outputs and gradients are unchanged; JAX scatters dx back through the slice.
    x = lax.slice(x, (0,) * x.ndim, x.shape, (1,) + strides + (1,))
    strides = (1,) * nsp
  policy = Policy() if policy is None else policy
  if not isinstance(policy, Policy):
    raise TypeError(f"policy must be a jdfp.Policy, got {type(policy).__name__}")
  if not out_struct.size or not x.size or not w.size:
    # An empty output, or an empty sum (no input features): what lax gives, with no GEMM to run.
    y = jnp.zeros(out_struct.shape, result_dtype(lhs, rhs, preferred_element_type))
    return (y, scale_state) if (policy.scaling == "delayed" or scale_state is not None) else y
  geom = ConvGeom(tuple(int(s) for s in x.shape[1:1 + nsp]), tuple(int(k) for k in ksp),
                   tuple(int(s) for s in strides), tuple((int(lo), int(hi)) for lo, hi in pads),
                   tuple(int(d) for d in lhs_dil), tuple(int(d) for d in rhs_dil), g)
  if policy.scaling == "delayed" or scale_state is not None:  # returns (out, new_state): jdfp._src.ops.delayed
    y, new_state = delayed.conv_general_dilated(x, w, geom, policy=policy, key=key, scale_state=scale_state,
                                                out_dtype=result_dtype(lhs, rhs, preferred_element_type))
    return jnp.transpose(y, conv_out_perm(dn, nsp)), new_state
  if _dot_general is None and float_formats(policy):  # FP16 / BF16: a convolution, FP32 accumulation
    y = float_conv(x, w, geom, policy, result_dtype(lhs, rhs, preferred_element_type))
    return jnp.transpose(y, conv_out_perm(dn, nsp))
  # `_dot_general` (as jnp.einsum's hook): force the im2col arrangement with that GEMM (the Flax
  # integration passes its statistics-tracking dot for block formats).
  if _dot_general is None and conv_kernel_eligible(policy, x.shape, w.shape, geom):
    check_key(policy, key)
    y = conv_core(x, w, key, geom, policy, result_dtype(lhs, rhs, preferred_element_type))
    return jnp.transpose(y, conv_out_perm(dn, nsp))
  if _dot_general is None and policy.lhs.is_integer and resolve_backend(policy) == "ffi":
    if nsp > 3:
      why = f"{nsp} spatial dims (the implicit-GEMM conv kernel takes 1 to 3)"
    else:
      why = (f"formats with block exponents ({policy.lhs!r}, {policy.rhs!r}, {policy.grad!r}); the implicit-GEMM "
             "conv kernel takes per-tensor exponents only")
    warn_once(f"jdfp.conv_general_dilated: {why}, so the conv runs as a GEMM on its im2col patch matrix on "
              "the GEMM kernel (converted from the input by the block-conversion kernel without being "
              "stored where it can: one group, float32 input; else materialised).")
  gemm_policy = getattr(_dot_general, "policy", policy) if _dot_general is not None else policy
  pgeom = PatchGeom(tuple(x.shape), geom.k_sp, geom.strides, geom.pads, geom.lhs_dil, geom.rhs_dil, geom.out_sp)
  if ((_dot_general is None or _patch_conv is not None) and isinstance(gemm_policy, Policy)
      and patch_conv_applies(x, g, pgeom, gemm_policy)):
    # The lhs conversion gathers the patch matrix itself (`jdfp._src.ops.patch_conv`).
    w3 = w.reshape(1, prod(ksp) * i, o)
    if _dot_general is None:
      check_key(policy, key)
      y3 = patch_conv_core(x, w3, key, pgeom, policy, precision, result_dtype(lhs, rhs, preferred_element_type))
    else:
      y3 = _patch_conv(x, w3, pgeom, precision, preferred_element_type)
    return jnp.transpose(y3.reshape((x.shape[0],) + pgeom.out_sp + (o,)), conv_out_perm(dn, nsp))
  # [N, *O, KK, C]; the patches on the im2col kernel where the GEMM's policy runs on the kernels.
  p, out_sp = patches_on(x, ksp, strides, pads, lhs_dil, rhs_dil,
                         isinstance(gemm_policy, Policy) and resolve_backend(gemm_policy) == "ffi")
  n = x.shape[0]
  kk = prod(ksp)
  rows = n * prod(out_sp)
  # [G, rows, KK*I] . [G, KK*I, O/G] -> [G, rows, O/G]
  p = p.reshape(rows, kk, g, i).transpose(2, 0, 1, 3).reshape(g, rows, kk * i)
  w = w.reshape(kk, i, g, o // g).transpose(2, 0, 1, 3).reshape(g, kk * i, o // g)
  dims = (((2,), (1,)), ((0,), (0,)))
  if _dot_general is None:
    y = dot_general(p, w, dims, precision, preferred_element_type, policy=policy, key=key)
  else:
    y = _dot_general(p, w, dims, precision, preferred_element_type)
  y = y.transpose(1, 0, 2).reshape((n,) + out_sp + (o,))
  return jnp.transpose(y, conv_out_perm(dn, nsp))


def conv_out_perm(dn, nsp):
  """Permutation from the canonical output ``[N, *O, C]`` to the requested layout."""
  out_perm = [0] * (nsp + 2)
  out_perm[dn.out_spec[0]] = 0
  out_perm[dn.out_spec[1]] = nsp + 1
  for j, d in enumerate(dn.out_spec[2:]):
    out_perm[d] = 1 + j
  return tuple(out_perm)
