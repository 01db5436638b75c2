"""Python side of ``xla_ffi/gemm_ffi.cc``: the exact INT16 GEMM (docs/arithmetic.md) as a JAX op."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jdfp._src.ffi.conv import patch_geometry
from jdfp._src.ffi.library import (TARGET_I16, TARGET_I16_COL2IM, TARGET_I16_PATCH_WGRAD, TARGET_Q, check_bits,
                                   dtype_of, has_amx_int8, isa_attribute, kernel_available, require_lib)

__all__ = ["AMX_CONV_MIN_WORK", "AMX_I8_MAX_K", "AMX_MAX_K", "AMX_MIN_K", "check_gemm_args", "col2im_call",
           "conv_runs_on_amx", "gemm", "gemm_col2im", "gemm_patch_wgrad", "patch_wgrad_call", "runs_on_amx"]

# xla_ffi/gemm_common.h: the K range the AMX-INT8 paths take (kAmxMinK, kAmxMaxK).
AMX_MIN_K = 32
AMX_MAX_K = 16384
AMX_I8_MAX_K = 131072  # gemm_i8_common.h's kAmxI8MaxK
AMX_CONV_MIN_WORK = 1 << 26  # conv_ffi.cc's kAmxConvMinWork: products of a conv that takes the tiles


def gemm(a, b, ea, eb, *, bits_a: int, bits_b: int, block_k: int | None = None,
         transpose_a: bool = False, transpose_b: bool = False, isa: str = "auto") -> jax.Array:
  """Exact DFP GEMM on the C++ kernel: ``float32 [..., M, N]`` per docs/arithmetic.md.

  Args:
    a: int16 ``[..., M, K]`` (``[..., K, M]`` with ``transpose_a``), values in ``[-qmax_a, qmax_a]``;
      or float32, quantized while packing: ``clip(round_half_even(scale2(a, -ea)), +-qmax_a)``,
      bit-identical to quantizing first and passing int16.
    b: int16 or float32 ``[..., K, N]`` (``[..., N, K]`` with ``transpose_b``).
    ea: int32 exponents ``[..., M, KB]`` (or ``[..., 1, KB]``: one exponent for every row).
    eb: int32 exponents ``[..., KB, N]`` (or ``[..., KB, 1]``).  ``KB = ceil(K / block_k)``.
    bits_a, bits_b: the operands' bits (2..16, sign included); they fix the safe chain length.
    block_k: exponent block length along K; None means K (a single block, KB == 1).
    transpose_a, transpose_b: the operand layouts above (no copies are made).
    isa: "auto" (best available), "scalar", "avx2", "avx_vnni" or "avx512_vnni"; an ISA the CPU
      lacks makes the call fail at run time.

  Leading batch dims broadcast numpy-style (size 1 is read with stride 0, never copied).  An
  int16 value outside ``[-qmax, qmax]`` makes the call fail at run time (never a silent wrap).  A
  ``NONFINITE_EXPONENT`` (2**30) in ``ea[..., m, :]`` or ``eb[..., :, n]`` makes ``out[..., m, n]`` NaN.
  """
  bits_a = check_bits("bits_a", bits_a)
  bits_b = check_bits("bits_b", bits_b)
  isa_code = isa_attribute(isa)
  dts, (m, n), batch, bk_attr = check_gemm_args(a, b, ea, eb, ("int16", "float32"), block_k, transpose_a,
                                                transpose_b)
  require_lib()
  quant = dts["a"].name == "float32" or dts["b"].name == "float32"
  call = jax.ffi.ffi_call(
      TARGET_Q if quant else TARGET_I16,
      jax.ShapeDtypeStruct(tuple(batch) + (m, n), jnp.float32),
      vmap_method="expand_dims",
  )
  return call(a, b, ea, eb, bits_a=np.int32(bits_a), bits_b=np.int32(bits_b),
              block_k=np.int64(bk_attr), transpose_a=bool(transpose_a),
              transpose_b=bool(transpose_b), isa=np.int32(isa_code))


def runs_on_amx(k: int, kb: int, block_k: int, isa: str | int, int8: bool = False) -> bool:
  """Whether a `gemm` (or, with ``int8``, `gemm_i8`) call with contraction length ``k``, ``kb``
  exponent blocks of ``block_k`` along K and this ``isa`` runs on the AMX-INT8 tiles (the rules of
  xla_ffi/gemm_ffi.cc and gemm_i8_ffi.cc).  A blocked INT8 call (``kb > 1``) does so only when every
  exponent pair scales exactly (no NONFINITE or extreme exponent), which its data decides."""
  if not (isa in ("auto", 0) and k >= AMX_MIN_K and kernel_available() and has_amx_int8()):
    return False
  if kb == 1:
    return k <= (AMX_I8_MAX_K if int8 else AMX_MAX_K)
  return int8 and block_k <= 64 and block_k % 4 == 0


def conv_runs_on_amx(x_shape, w_shape, y_shape, isa: str | int) -> bool:
  """Whether a `jdfp.kernels.conv` call (or `conv_input_grad`, the same call on dy) with these 5-D
  shapes (x ``[N, D, H, W, C]``, w ``[KD, KH, KW, C/G, O]``, y ``[N, OD, OH, OW, O]``) runs on the
  AMX-INT8 tiles (xla_ffi/conv_ffi.cc): K = taps x C/G within the GEMM's range and at least
  `AMX_CONV_MIN_WORK` products.  The weight gradient never does."""
  k = math.prod(w_shape[:3]) * w_shape[3]
  return runs_on_amx(k, 1, k, isa) and math.prod(y_shape) * k >= AMX_CONV_MIN_WORK


def check_gemm_args(a, b, ea, eb, operand_dtypes, block_k, transpose_a, transpose_b):
  """Trace-time checks shared by the GEMM wrappers (INT16 here, INT8 in gemm_i8.py): flags, dtypes
  (``a``/``b`` in ``operand_dtypes``, exponents int32), ranks, K, block_k, exponent shapes, batch
  broadcast. Returns (dtypes by name, (M, N), batch shape, the block_k attribute)."""
  for name, flag in (("transpose_a", transpose_a), ("transpose_b", transpose_b)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"{name} must be a bool, got {flag!r}")
  dts = {}
  for name, x, allowed in (("a", a, tuple(operand_dtypes)), ("b", b, tuple(operand_dtypes)),
                           ("ea", ea, ("int32",)), ("eb", eb, ("int32",))):
    dt = dtype_of(name, x)
    if dt.name not in allowed:
      raise TypeError(f"{name} must have dtype {' or '.join(allowed)}, got {dt.name}")
    if np.ndim(x) < 2:
      raise ValueError(f"{name} must have rank >= 2, got shape {np.shape(x)}")
    dts[name] = dt
  sa, sb, sea, seb = (tuple(np.shape(x)) for x in (a, b, ea, eb))
  m, k = (sa[-1], sa[-2]) if transpose_a else (sa[-2], sa[-1])
  kb_, n = (sb[-1], sb[-2]) if transpose_b else (sb[-2], sb[-1])
  if k != kb_:
    raise ValueError(f"contraction dims differ: a has K={k} (shape {sa}, transpose_a={transpose_a}), "
                     f"b has K={kb_} (shape {sb}, transpose_b={transpose_b})")
  if block_k is None:
    bk_attr, bk = -1, max(k, 1)
  else:
    if isinstance(block_k, bool) or not isinstance(block_k, (int, np.integer)) or block_k < 1:
      raise ValueError(f"block_k must be None or an int >= 1, got {block_k!r}")
    bk_attr = bk = int(block_k)
  kb = -(-k // bk)
  if sea[-1] != kb or sea[-2] not in (m, 1):
    raise ValueError(f"ea must have shape [..., {m} (or 1), {kb}] (KB = ceil(K={k} / block_k={bk})), "
                     f"got {sea}")
  if seb[-2] != kb or seb[-1] not in (n, 1):
    raise ValueError(f"eb must have shape [..., {kb}, {n} (or 1)] (KB = ceil(K={k} / block_k={bk})), "
                     f"got {seb}")
  try:
    batch = np.broadcast_shapes(sa[:-2], sb[:-2], sea[:-2], seb[:-2])
  except ValueError:
    raise ValueError(f"batch dims of a {sa[:-2]}, b {sb[:-2]}, ea {sea[:-2]}, eb {seb[:-2]} "
                     "do not broadcast") from None
  return dts, (m, n), tuple(batch), bk_attr


def gemm_col2im(a, b, ea, eb, *, x_shape, kernel_spatial, window_strides, padding, lhs_dilation=None,
                rhs_dilation=None, bits_a: int, bits_b: int, block_k: int | None = None, transpose_a: bool = False,
                transpose_b: bool = False, isa: str = "auto") -> jax.Array:
  """The backward-data of a conv on its patch matrix in one INT16 kernel call: float32 ``dx`` of shape
  ``x_shape = [N, *S, C]`` from the patch gradient ``a . b`` (`gemm`'s int16 operands and
  attributes, one batch element ``[1, rows, KK * C]``: rows the output pixels of the conv with this
  geometry, KK its taps). Bit for bit ``jax.linear_transpose`` of `jdfp._src.ops.conv_vjp.patches`
  applied to ``gemm(a, b, ...)`` (taps summed last first, docs/arithmetic.md), image by image, so
  the patch gradient is never stored whole."""
  return col2im_call(TARGET_I16_COL2IM, ("int16",), a, b, ea, eb, check_bits("bits_a", bits_a),
                     check_bits("bits_b", bits_b), block_k, transpose_a, transpose_b, isa, x_shape, kernel_spatial,
                     window_strides, padding, lhs_dilation, rhs_dilation)


def gemm_patch_wgrad(x, e, b, eb, *, tiles, kernel_spatial, window_strides, padding, lhs_dilation=None,
                     rhs_dilation=None, bits_a: int, bits_b: int, block_k: int | None = None,
                     isa: str = "auto") -> jax.Array:
  """The weight gradient of a block-format conv in one INT16 kernel call: float32 ``[1, K, N]`` =
  ``P^T . b``, P ``[1, rows, K]`` the patch matrix of the float32 conv input ``x [N, *S, C]`` with
  this geometry (`jdfp._src.ffi.conv.im2col`'s, reshaped), ``b`` int16 ``[1, rows, N]`` with
  exponents ``eb [1, KB, N or 1]`` (blocks of ``block_k`` rows, None: all of them).

  P is quantized on ``e [1, GR, GC]``, the exponents of its ``tiles = (br, bc)`` that the forward's
  conversion found, with nearest rounding, while the kernel packs it, a kc block at a time: bit for
  bit `gemm` (``transpose_a``) on ``quantize_patches_with_stats``'s int16 P, which is never stored.
  ``block_k`` must divide ``br`` (or one tile row must hold every row)."""
  return patch_wgrad_call(TARGET_I16_PATCH_WGRAD, "int16", x, e, b, eb, tiles, kernel_spatial, window_strides,
                          padding, lhs_dilation, rhs_dilation, check_bits("bits_a", bits_a),
                          check_bits("bits_b", bits_b), block_k, isa)


def patch_wgrad_call(target, b_dtype, x, e, b, eb, tiles, kernel_spatial, window_strides, padding, lhs_dilation,
                     rhs_dilation, bits_a, bits_b, block_k, isa) -> jax.Array:
  """The FFI call of a fused conv weight gradient (INT16 here, INT8 in gemm_i8.py), bits already checked."""
  isa_code = isa_attribute(isa)
  for name, v, want in (("x", x, "float32"), ("e", e, "int32"), ("b", b, b_dtype), ("eb", eb, "int32")):
    if dtype_of(name, v).name != want or (name != "x" and np.ndim(v) != 3):
      raise TypeError(f"{name} must be {want}{'' if name == 'x' else ' 3-D'}, got {dtype_of(name, v).name} "
                      f"{tuple(np.shape(v))}")
  sx = tuple(int(d) for d in np.shape(x))
  nsp, ksp, out_sp, attrs = patch_geometry(sx, kernel_spatial, window_strides, padding, lhs_dilation, rhs_dilation)
  rows, k = sx[0] * math.prod(out_sp), math.prod(ksp) * sx[-1]
  br, bc = (int(t) for t in tiles)
  grid = (1, -(-rows // br), -(-k // bc))
  if tuple(np.shape(e)) != grid:
    raise ValueError(f"e must be the tile grid {grid} of the patch matrix [1, {rows}, {k}] with tiles {(br, bc)}, "
                     f"got {tuple(np.shape(e))}")
  # b / eb / block_k against a P^T stand-in: the checks of `gemm`.
  pt = jax.ShapeDtypeStruct((1, rows, k), jnp.dtype(b_dtype))
  kb = 1 if block_k is None else -(-rows // block_k)
  _, (m, n), _, bk_attr = check_gemm_args(pt, b, jax.ShapeDtypeStruct((1, k, kb), jnp.int32), eb, (b_dtype,),
                                          block_k, True, False)
  require_lib()
  x5 = jnp.reshape(x, (sx[0],) + (1,) * (3 - nsp) + sx[1:])
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((1, m, n), jnp.float32), vmap_method="sequential")
  return call(x5, e, b, eb, bits_a=np.int32(bits_a), bits_b=np.int32(bits_b), block_k=np.int64(bk_attr),
              block=np.asarray((br, bc), np.int64), isa=np.int32(isa_code), **attrs)


def col2im_call(target, operand_dtypes, a, b, ea, eb, bits_a, bits_b, block_k, transpose_a, transpose_b, isa,
                x_shape, kernel_spatial, window_strides, padding, lhs_dilation, rhs_dilation) -> jax.Array:
  """The FFI call of a GEMM + col2im kernel (INT16 here, INT8 in gemm_i8.py), bits already checked."""
  isa_code = isa_attribute(isa)
  _, (m, n), batch, bk_attr = check_gemm_args(a, b, ea, eb, operand_dtypes, block_k, transpose_a, transpose_b)
  x_shape = tuple(int(d) for d in x_shape)
  nsp, ksp, out_sp, attrs = patch_geometry(x_shape, kernel_spatial, window_strides, padding, lhs_dilation,
                                           rhs_dilation)
  want = (x_shape[0] * math.prod(out_sp), math.prod(ksp) * x_shape[-1])
  if tuple(batch) != (1,) or (m, n) != want:
    raise ValueError(f"a . b must be [1, rows, taps * C] = [1, {want[0]}, {want[1]}] for x_shape {x_shape} and this "
                     f"conv geometry, got {tuple(batch) + (m, n)}")
  require_lib()
  x5 = (x_shape[0],) + (1,) * (3 - nsp) + x_shape[1:]
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x5, jnp.float32), vmap_method="sequential")
  out = call(a, b, ea, eb, bits_a=np.int32(bits_a), bits_b=np.int32(bits_b), block_k=np.int64(bk_attr),
             transpose_a=bool(transpose_a), transpose_b=bool(transpose_b), isa=np.int32(isa_code), **attrs)
  return out.reshape(x_shape)
