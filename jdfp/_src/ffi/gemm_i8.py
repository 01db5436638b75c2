"""Python side of ``xla_ffi/gemm_i8_ffi.cc``: the exact INT8 GEMM (vpdpbusd) as a JAX op.

Same contract as :func:`jdfp._src.ffi.gemm.gemm` (docs/arithmetic.md), so for the same int8 values
and exponents the two kernels and the pure-JAX reference agree bit for bit.  For integer formats with
at most 8 bits (DFP ``bits <= 8``, BFP ``mantissa_bits <= 7``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdfp._src.ffi.gemm import check_gemm_args, col2im_call, patch_wgrad_call
from jdfp._src.ffi.library import TARGET_I8, TARGET_I8_COL2IM, TARGET_I8_PATCH_WGRAD, isa_attribute, require_lib

__all__ = ["gemm_i8", "gemm_i8_col2im", "gemm_i8_patch_wgrad", "MAX_BITS"]

MAX_BITS = 8  # qmax = 2**(bits-1) - 1 <= 127: int8 storage, never -128


def _check_bits8(name, bits) -> int:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= MAX_BITS:
    raise ValueError(f"{name} must be an int in 2..{MAX_BITS} for the INT8 kernel, got {bits!r}")
  return int(bits)


def gemm_i8(a, b, ea, eb, *, bits_a: int, bits_b: int, block_k: int | None = None,
            transpose_a: bool = False, transpose_b: bool = False, isa: str = "auto") -> jax.Array:
  """Exact DFP / BFP GEMM of int8 operands on the C++ INT8 kernel: ``float32 [..., M, N]``.

  Args:
    a: int8 ``[..., M, K]`` (``[..., K, M]`` with ``transpose_a``), values in ``[-qmax_a, qmax_a]``.
    b: int8 ``[..., K, N]`` (``[..., N, K]`` with ``transpose_b``).
    ea: int32 exponents ``[..., M, KB]`` (or ``[..., 1, KB]``).
    eb: int32 exponents ``[..., KB, N]`` (or ``[..., KB, 1]``).  ``KB = ceil(K / block_k)``.
    bits_a, bits_b: the operands' bits (2..8, sign included).
    block_k: exponent block length along K; None means K (one block).
    transpose_a, transpose_b: the operand layouts above (no copies are made).
    isa: "auto", "scalar", "avx2", "avx_vnni" or "avx512_vnni".

  Leading batch dims broadcast numpy-style.  A value outside ``[-qmax, qmax]`` (-128 included)
  makes the call fail at run time; a ``NONFINITE_EXPONENT`` makes the affected outputs NaN.
  """
  bits_a = _check_bits8("bits_a", bits_a)
  bits_b = _check_bits8("bits_b", bits_b)
  isa_code = isa_attribute(isa)
  _, (m, n), batch, bk_attr = check_gemm_args(a, b, ea, eb, ("int8",), block_k, transpose_a, transpose_b)
  require_lib()
  call = jax.ffi.ffi_call(TARGET_I8, jax.ShapeDtypeStruct(tuple(batch) + (m, n), jnp.float32),
                          vmap_method="expand_dims")
  return call(a, b, ea, eb, bits_a=np.int32(bits_a), bits_b=np.int32(bits_b),
              block_k=np.int64(bk_attr), transpose_a=bool(transpose_a),
              transpose_b=bool(transpose_b), isa=np.int32(isa_code))


def gemm_i8_col2im(a, b, ea, eb, *, x_shape, kernel_spatial, window_strides, padding, lhs_dilation=None,
                   rhs_dilation=None, bits_a: int, bits_b: int, block_k: int | None = None,
                   transpose_a: bool = False, transpose_b: bool = False, isa: str = "auto") -> jax.Array:
  """The backward-data of a conv on its patch matrix, in one kernel call: float32 ``dx`` of shape
  ``x_shape = [N, *S, C]`` (1 to 3 spatial dims) from the patch gradient ``a . b`` (``gemm_i8``'s
  operands and attributes, one batch element: ``[1, rows, KK * C]``, rows = the output pixels of
  the conv with this geometry, KK its kernel taps).

  Bit for bit ``jax.linear_transpose`` of `jdfp._src.ops.conv_vjp.patches` applied to
  ``gemm_i8(a, b, ...)`` (taps summed last first, docs/arithmetic.md), image by image, so the patch
  gradient is never stored whole."""
  return col2im_call(TARGET_I8_COL2IM, ("int8",), a, b, ea, eb, _check_bits8("bits_a", bits_a),
                     _check_bits8("bits_b", bits_b), block_k, transpose_a, transpose_b, isa, x_shape, kernel_spatial,
                     window_strides, padding, lhs_dilation, rhs_dilation)


def gemm_i8_patch_wgrad(x, e, b, eb, *, tiles, kernel_spatial, window_strides, padding, lhs_dilation=None,
                        rhs_dilation=None, bits_a: int, bits_b: int, block_k: int | None = None,
                        isa: str = "auto") -> jax.Array:
  """`jdfp._src.ffi.gemm.gemm_patch_wgrad` on the INT8 kernel: int8 ``b``, formats of <= 8 bits; P
  converted to int8 on the forward's exponents a kc block at a time, bit for bit `gemm_i8`
  (``transpose_a``) on ``quantize_patches_with_stats``'s int8 P, which is never stored."""
  return patch_wgrad_call(TARGET_I8_PATCH_WGRAD, "int8", x, e, b, eb, tiles, kernel_spatial, window_strides, padding,
                          lhs_dilation, rhs_dilation, _check_bits8("bits_a", bits_a), _check_bits8("bits_b", bits_b),
                          block_k, isa)
