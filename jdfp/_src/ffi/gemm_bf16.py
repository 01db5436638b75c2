"""Python side of ``xla_ffi/gemm_bf16_ffi.cc``: the BF16 GEMM on ``vdpbf16ps`` (docs/arithmetic.md,
"BF16 GEMM") as a JAX op, the BF16 convolutions on the same chains (implicit GEMM: the patch
matrix is gathered while packing, never stored), and the FP16 GEMM on AMX-BF16 tiles (docs/arithmetic.md,
"The FP16 GEMM on AMX-BF16 tiles")."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jdfp._src.ffi import conv as ffi_conv
from jdfp._src.ffi.library import dtype_of, kernel_available, require_lib

__all__ = ["BF16_ISA_NAMES", "amx_bf16_ready", "conv_bf16", "conv_bf16_input_grad", "conv_bf16_weight_grad",
           "conv_f16", "conv_f16_input_grad", "conv_f16_weight_grad", "gemm_bf16", "gemm_f16", "has_amx_bf16",
           "has_avx512_bf16", "transpose16"]

TARGET_GEMM_BF16 = "jdfp_gemm_bf16"
TARGET_CONV_BF16 = "jdfp_conv_bf16"
TARGET_TRANSPOSE16 = "jdfp_transpose16"
TARGET_GEMM_F16 = "jdfp_gemm_f16"
TARGET_CONV_F16 = "jdfp_conv_f16"
# The handler's `isa` attribute: "auto" is avx512_bf16 where the CPU has it, else scalar (both the
# vdpbf16ps chain, bit for bit); "amx_bf16" is the FP16 GEMM's AMX-BF16 tiles on the bfloat16 operands
# as they are (exact products, the tile unit's float32 sums: a bound, not a chain; bfloat16 operands
# only; fails at run time where `amx_bf16_ready()` is false).
BF16_ISA_NAMES = ("auto", "scalar", "avx512_bf16", "amx_bf16")


@functools.cache
def _register() -> None:
  lib = require_lib()
  jax.ffi.register_ffi_target(TARGET_GEMM_BF16, jax.ffi.pycapsule(lib.JdfpGemmBf16), platform="cpu")
  jax.ffi.register_ffi_target(TARGET_CONV_BF16, jax.ffi.pycapsule(lib.JdfpConvBf16), platform="cpu")
  jax.ffi.register_ffi_target(TARGET_TRANSPOSE16, jax.ffi.pycapsule(lib.JdfpTranspose16), platform="cpu")
  jax.ffi.register_ffi_target(TARGET_GEMM_F16, jax.ffi.pycapsule(lib.JdfpGemmF16), platform="cpu")
  jax.ffi.register_ffi_target(TARGET_CONV_F16, jax.ffi.pycapsule(lib.JdfpConvF16), platform="cpu")


@functools.cache
def has_avx512_bf16() -> bool:
  """True when the library is loaded and this CPU/OS runs the AVX512_BF16 path (cpuid, in C++)."""
  return kernel_available() and bool(require_lib().jdfp_has_avx512_bf16())


@functools.cache
def has_amx_bf16() -> bool:
  """True when the library is loaded and this CPU/OS has AMX-BF16 tiles (cpuid + xgetbv, in C++)."""
  return kernel_available() and bool(require_lib().jdfp_has_amx_bf16())


@functools.cache
def amx_bf16_ready() -> bool:
  """True when `gemm_f16` runs here: AMX-BF16 tiles (cpuid, OS tile state), granted to this process,
  and ``JDFP_AMX`` is not ``0`` (the same switch as the INT16 / INT8 GEMMs' tile paths)."""
  return kernel_available() and bool(require_lib().jdfp_amx_bf16_ready())


def _gemm_shape(a, b, transpose_a, transpose_b):
  """``(batch, M, N)`` of a GEMM call, with clear errors for bad flags and shapes."""
  for name, flag in (("transpose_a", transpose_a), ("transpose_b", transpose_b)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"{name} must be a bool, got {flag!r}")
  for name, x in (("a", a), ("b", b)):
    if np.ndim(x) < 2:
      raise ValueError(f"{name} must have rank >= 2, got shape {np.shape(x)}")
  sa, sb = tuple(np.shape(a)), tuple(np.shape(b))
  m, k = (sa[-1], sa[-2]) if transpose_a else (sa[-2], sa[-1])
  kb, n = (sb[-1], sb[-2]) if transpose_b else (sb[-2], sb[-1])
  if k != kb:
    raise ValueError(f"contraction dims differ: a has K={k} (shape {sa}, transpose_a={transpose_a}), "
                     f"b has K={kb} (shape {sb}, transpose_b={transpose_b})")
  try:
    batch = np.broadcast_shapes(sa[:-2], sb[:-2])
  except ValueError:
    raise ValueError(f"batch dims of a {sa[:-2]} and b {sb[:-2]} do not broadcast") from None
  return tuple(batch), m, n


def gemm_f16(a, b, *, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
  """``float32 [..., M, N]`` = sum over K of ``a x b`` for float16 ``a``, ``b`` on AMX-BF16 tiles.

  Each float16 value is split exactly into two bfloat16 (``x = hi + lo``), so every product is
  exact; the sums are float32 in the tile unit's order (docs/arithmetic.md, "The FP16 GEMM on
  AMX-BF16 tiles": the error bound, and NaN / Inf). Layouts and batch broadcasting as `gemm_bf16`.
  Runs only where `amx_bf16_ready()`; elsewhere the call fails at run time (the ops widen to FP32
  there instead).
  """
  for name, x in (("a", a), ("b", b)):
    dt = dtype_of(name, x)
    if dt != np.float16:
      raise TypeError(f"{name} must have dtype float16, got {dt.name}")
  batch, m, n = _gemm_shape(a, b, transpose_a, transpose_b)
  _register()
  call = jax.ffi.ffi_call(TARGET_GEMM_F16, jax.ShapeDtypeStruct(batch + (m, n), jnp.float32),
                          vmap_method="expand_dims")
  return call(a, b, transpose_a=bool(transpose_a), transpose_b=bool(transpose_b), isa=np.int32(0))


def gemm_bf16(a, b, *, transpose_a: bool = False, transpose_b: bool = False, isa: str = "auto") -> jax.Array:
  """``float32 [..., M, N]`` = the ``vdpbf16ps`` chain over K of ``a x b`` (docs/arithmetic.md).

  Args:
    a: bfloat16 ``[..., M, K]`` (``[..., K, M]`` with ``transpose_a``); float32 is rounded to
      bfloat16 (nearest-even) while packing, the same as ``a.astype(jnp.bfloat16)`` first.
    b: bfloat16 or float32 ``[..., K, N]`` (``[..., N, K]`` with ``transpose_b``).
    transpose_a, transpose_b: the operand layouts above (no copies are made).
    isa: "auto", "scalar" (the same arithmetic element by element) or "avx512_bf16" (fails at run
      time on a CPU without AVX512_BF16); or "amx_bf16": bfloat16 operands on the AMX-BF16 tiles,
      exact products summed in float32 in the tile unit's order (not the chain; docs/arithmetic.md).

  Leading batch dims broadcast numpy-style (size 1 is read with stride 0, never copied).
  """
  if isa not in BF16_ISA_NAMES:
    raise ValueError(f"isa must be one of {BF16_ISA_NAMES}, got {isa!r}")
  for name, x in (("a", a), ("b", b)):
    dt = dtype_of(name, x)
    if dt != jnp.bfloat16 and dt != np.float32:
      raise TypeError(f"{name} must have dtype bfloat16 or float32, got {dt.name}")
  batch, m, n = _gemm_shape(a, b, transpose_a, transpose_b)
  _register()
  call = jax.ffi.ffi_call(TARGET_GEMM_BF16, jax.ShapeDtypeStruct(batch + (m, n), jnp.float32),
                          vmap_method="expand_dims")
  return call(a, b, transpose_a=bool(transpose_a), transpose_b=bool(transpose_b),
              isa=np.int32(BF16_ISA_NAMES.index(isa)))


def transpose16(x) -> jax.Array:
  """``x [..., R, C]`` (bfloat16, float16 or int16) -> ``[..., C, R]``, a physical copy in C++.

  XLA folds its own transposes into the dot that reads them; this one it cannot, so a dot of the
  result contracts its lhs's last axis (what XLA's bf16 dot needed to run on AMX tiles up to jax
  0.12.0; jdfp's own GEMMs read transposed operands in place).
  """
  dt = dtype_of("x", x)
  if dt not in (jnp.bfloat16, jnp.float16, jnp.int16):
    raise TypeError(f"x must have a 16-bit dtype (bfloat16, float16, int16), got {dt.name}")
  if np.ndim(x) < 2:
    raise ValueError(f"x must have rank >= 2, got shape {np.shape(x)}")
  _register()
  shape = tuple(np.shape(x))
  call = jax.ffi.ffi_call(TARGET_TRANSPOSE16, jax.ShapeDtypeStruct(shape[:-2] + (shape[-1], shape[-2]), dt),
                          vmap_method="expand_dims")
  return call(x)


def _isa_code(isa: str) -> np.int32:
  if isa not in BF16_ISA_NAMES:
    raise ValueError(f"isa must be one of {BF16_ISA_NAMES}, got {isa!r}")
  return np.int32(BF16_ISA_NAMES.index(isa))


def _check_operands(dtype, **operands) -> int:
  """Every operand ``dtype`` with equal ranks 3..5 (1 to 3 spatial dims); returns the spatial rank."""
  for name, v in operands.items():
    if dtype_of(name, v) != dtype:
      raise TypeError(f"{name} must have dtype {jnp.dtype(dtype).name}, got {dtype_of(name, v).name}")
  ranks = {np.ndim(v) for v in operands.values()}
  if len(ranks) != 1 or not 3 <= next(iter(ranks)) <= 5:
    shapes = ", ".join(f"{k} {np.shape(v)}" for k, v in operands.items())
    raise ValueError(f"conv operands must have equal ranks 3, 4 or 5 (1 to 3 spatial dims), got {shapes}")
  return next(iter(ranks)) - 2


def _conv_call(x, b, out_shape, attrs, weight_gradient: bool, isa: str):
  _register()
  target = TARGET_CONV_F16 if dtype_of("x", x) == np.float16 else TARGET_CONV_BF16
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential")
  attrs = {k: v for k, v in attrs.items() if k != "kernel_spatial"}
  return call(x, b, weight_gradient=bool(weight_gradient), isa=_isa_code(isa), **attrs)


def _conv(x, w, dtype, window_strides, padding, lhs_dilation, rhs_dilation, isa):
  nsp = _check_operands(dtype, x=x, w=w)
  sx, sw = tuple(np.shape(x)), tuple(np.shape(w))
  if sw[-2] != sx[-1]:
    raise ValueError(f"w must be [*K, C, O] with C = x's channels {sx[-1]} (one group), got {sw}")
  _, ksp, out_sp, attrs = ffi_conv.patch_geometry(sx, sw[:-2], window_strides, padding, lhs_dilation, rhs_dilation)
  out5 = (sx[0],) + (1,) * (3 - nsp) + out_sp + (sw[-1],)
  y = _conv_call(ffi_conv.to_5d(x, nsp), ffi_conv.kernel_to_5d(w, nsp), out5, attrs, False, isa)
  return y.reshape((sx[0],) + out_sp + (sw[-1],))


def _conv_weight_grad(x, dy, dtype, kernel_spatial, window_strides, padding, lhs_dilation, rhs_dilation, isa):
  nsp = _check_operands(dtype, x=x, dy=dy)
  sx, sd = tuple(np.shape(x)), tuple(np.shape(dy))
  _, ksp, out_sp, attrs = ffi_conv.patch_geometry(sx, kernel_spatial, window_strides, padding, lhs_dilation,
                                                  rhs_dilation)
  if sd != (sx[0],) + out_sp + (sd[-1],):
    raise ValueError(f"dy must have shape {(sx[0],) + out_sp + (sd[-1],)} (the conv output), got {sd}")
  # The kernel writes dw^T [O, *K, C]; the transpose of this small tensor is cheap.
  out5 = (sd[-1],) + (1,) * (3 - nsp) + ksp + (sx[-1],)
  dwt = _conv_call(ffi_conv.to_5d(x, nsp), ffi_conv.to_5d(dy, nsp), out5, attrs, True, isa)
  return jnp.moveaxis(dwt.reshape((sd[-1],) + ksp + (sx[-1],)), 0, -1)


def _conv_input_grad(dy, w, dtype, input_spatial, window_strides, padding, lhs_dilation, rhs_dilation, isa):
  _check_operands(dtype, dy=dy, w=w)
  nsp, in_sp, strides, pads, ldil, rdil = ffi_conv.input_grad_geometry(dy, w, input_spatial, window_strides, padding,
                                                                       lhs_dilation, rhs_dilation)
  wt, pads_t = ffi_conv.conv_input_grad_setup(w, in_sp, strides, pads, ldil, rdil, 1)
  if ffi_conv.splits_by_phase(strides, ldil):
    phase_conv = lambda wsub, pads, rd: _conv(dy, wsub, dtype, (1,) * nsp, pads, None, rd, isa)
    return ffi_conv.input_grad_phases(dy, wt, in_sp, strides, pads_t, rdil, phase_conv, jnp.float32(0))
  return _conv(dy, wt, dtype, ldil, pads_t, strides, rdil, isa)


def conv_bf16(x, w, *, window_strides, padding, lhs_dilation=None, rhs_dilation=None, isa: str = "auto") -> jax.Array:
  """BF16 convolution (one group) on the vdpbf16ps kernel: float32 ``[N, *O, O]``.

  ``x``: bfloat16 ``[N, *S, C]`` (1 to 3 spatial dims), ``w``: bfloat16 ``[*K, C, O]``; the other
  arguments as `jax.lax.conv_general_dilated`.  Bit for bit ``gemm_bf16(im2col(x), w.reshape(-1, O))``
  with the patch matrix's K ordered (kernel taps row-major, channel), +0 where a tap reads padding.
  ``isa="amx_bf16"``: the same implicit GEMM on the AMX-BF16 tiles (the bound of `gemm_bf16`'s
  amx_bf16, not the chain).
  """
  return _conv(x, w, jnp.bfloat16, window_strides, padding, lhs_dilation, rhs_dilation, isa)


def conv_bf16_weight_grad(x, dy, *, kernel_spatial, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                          isa: str = "auto") -> jax.Array:
  """Weight-gradient of `conv_bf16`: float32 ``[*K, C, O]``, the transpose of
  ``gemm_bf16(dy.reshape(-1, O)^T, im2col(x))`` bit for bit (K = the output pixels in row-major order)."""
  return _conv_weight_grad(x, dy, jnp.bfloat16, kernel_spatial, window_strides, padding, lhs_dilation, rhs_dilation,
                           isa)


def conv_bf16_input_grad(dy, w, *, input_spatial, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         isa: str = "auto") -> jax.Array:
  """Backward-data of `conv_bf16`: float32 ``[N, *S, C]``, `conv_bf16` of ``dy`` with the flipped,
  transposed kernel, lhs dilation = the forward strides (`jdfp._src.ffi.conv.conv_input_grad_setup`).
  A strided conv runs one stride-1 conv per output phase with the taps that read dy values, not the
  zeros of the dilation (`jdfp._src.ffi.conv.input_grad_phases`; docs/arithmetic.md)."""
  return _conv_input_grad(dy, w, jnp.bfloat16, input_spatial, window_strides, padding, lhs_dilation, rhs_dilation, isa)


def conv_f16(x, w, *, window_strides, padding, lhs_dilation=None, rhs_dilation=None) -> jax.Array:
  """FP16 convolution (one group) on the FP16 GEMM's AMX-BF16 tiles: float32 ``[N, *O, O]``.

  ``x``: float16 ``[N, *S, C]``, ``w``: float16 ``[*K, C, O]``; the other arguments as
  `jax.lax.conv_general_dilated`.  `gemm_f16` on the patch matrix (gathered while packing, never
  stored): exact products, float32 sums.  Only where `amx_bf16_ready()`.
  """
  return _conv(x, w, jnp.float16, window_strides, padding, lhs_dilation, rhs_dilation, "auto")


def conv_f16_weight_grad(x, dy, *, kernel_spatial, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None) -> jax.Array:
  """Weight-gradient of `conv_f16`: float32 ``[*K, C, O]`` = ``dy^T . im2col(x)`` on the tiles."""
  return _conv_weight_grad(x, dy, jnp.float16, kernel_spatial, window_strides, padding, lhs_dilation, rhs_dilation,
                           "auto")


def conv_f16_input_grad(dy, w, *, input_spatial, window_strides, padding, lhs_dilation=None,
                        rhs_dilation=None) -> jax.Array:
  """Backward-data of `conv_f16` (set up as `conv_bf16_input_grad`): float32 ``[N, *S, C]``."""
  return _conv_input_grad(dy, w, jnp.float16, input_spatial, window_strides, padding, lhs_dilation, rhs_dilation,
                          "auto")
