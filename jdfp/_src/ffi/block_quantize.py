"""Python side of ``xla_ffi/block_quantize_ffi.cc``: float32 -> int16 conversion of a block format
(DFP or BFP, one exponent per row, 1-D block or 2-D tile), exponents included, in C++ (bit-identical
to the pure-JAX `jdfp._src.numerics.quantize.quantize_blocks` for every rounding; stochastic rounding
draws each element's bits from its row-major index, the Philox stream of docs/arithmetic.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from jdfp._src.ffi import conv as ffi_conv
from jdfp._src.ffi.library import (INT32_MAX, TARGET_BLOCK_FAKE_QUANTIZE, TARGET_BLOCK_PATCH_GEMM,
                                   TARGET_BLOCK_PATCH_GEMM_STATS, TARGET_BLOCK_QUANTIZE,
                                   TARGET_BLOCK_QUANTIZE_PATCHES, TARGET_BLOCK_QUANTIZE_PATCHES_STATS,
                                   TARGET_BLOCK_QUANTIZE_STATS, dtype_of, isa_attribute, require_lib)
from jdfp._src.ffi.quantize import check_out_dtype, rounding_operands
from jdfp._src.numerics import formats
from jdfp._src.numerics.shard_types import match_varying

__all__ = ["block_quantize", "block_quantize_with_stats", "block_view3", "fake_quantize_blocks", "quantize_blocks",
           "quantize_blocks_with_stats", "quantize_patches_with_stats", "patch_gemm"]

ROUNDINGS = ("nearest", "stochastic", "biased")
FAKE_ROUNDINGS = ("nearest", "biased")  # the optimizer's one-pass re-quantization (no stochastic variant)


def block_view3(shape, bshape) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
  """``shape`` and its block shape as one ``[B, R, C]`` view with blocks ``(bb, br, bc)``, or None.

  Adjacent axes merge when the inner one is whole (a block spans it, so blocks of the merged axis
  are ``b_outer * n_inner``) or both have blocks of 1; a view needing more than three axes is None.
  """
  dims = [[int(n), min(int(b), max(int(n), 1))] for n, b in zip(shape, bshape)]
  merged: list[list[int]] = []
  for n, b in dims:
    if merged and (b == max(n, 1) or (b == 1 and merged[-1][1] == 1)):
      merged[-1] = [merged[-1][0] * n, merged[-1][1] * b]
    else:
      merged.append([n, b])
  if len(merged) > 3:
    return None
  merged = [[1, 1]] * (3 - len(merged)) + merged
  return tuple(m[0] for m in merged), tuple(m[1] for m in merged)


def block_quantize(x, block, *, bfp: bool, bits: int, rounding: str = "nearest", key=None,
                   isa: str = "auto", out_dtype=jnp.int16) -> tuple[jax.Array, jax.Array]:
  """``(int16 values [B, R, C], int32 exponents [GB, GR, GC])`` of float32 ``x [B, R, C]`` with blocks
  ``block = (bb, br, bc)`` (a block longer than its axis covers the axis), ``G* = ceil(n / b)``.

  ``bfp``: BFP exponents with ``bits`` mantissa bits (1..15), else DFP with ``bits`` bits (2..16,
  sign included). Each block's exponent is ``quantize.group_exponent`` of its max |x| (NaN/Inf:
  ``NONFINITE_EXPONENT`` and zeros; all zero: 0; subnormals read as zero, XLA:CPU's DAZ).
  ``rounding``: "nearest", "stochastic" (needs ``key``) or "biased", as `jdfp._src.ffi.quantize.quantize`.
  ``out_dtype``: int16, or int8 for formats of <= 8 bits (DFP bits <= 8, BFP mantissa bits <= 7).
  """
  return _call(x, block, bfp, bits, rounding, key, isa, stats=False, out_dtype=out_dtype)


def block_quantize_with_stats(x, block, *, bfp: bool, bits: int, rounding: str = "nearest", key=None,
                              isa: str = "auto", out_dtype=jnp.int16):
  """`block_quantize` plus, counted while converting: int32 ``[saturated, underflow, nonfinite,
  nonzero]`` (`jdfp._src.ffi.quantize.quant_stats`'s counters, each element against its block's
  exponent) and int32 ``[max, min]`` of the exponents of the blocks that hold a nonzero finite value
  (``[0, 0]`` if none): the Flax statistics of a block format in the conversion's own pass."""
  return _call(x, block, bfp, bits, rounding, key, isa, stats=True, out_dtype=out_dtype)


def _call(x, block, bfp, bits, rounding, key, isa, stats, fake=False, out_dtype=jnp.int16, patches=None, after=None,
          gemm=None):
  """``patches``: ``(shape3, attrs)`` of the patch matrix of the conv input ``x`` (`quantize_patches_with_stats`);
  ``after`` as there; ``gemm``: ``(b, eb, bits_b)`` of `patch_gemm` (then the int16 values are not a result:
  ``y`` float32 ``[1, rows, N]`` is, first)."""
  isa_code = isa_attribute(isa)
  if dtype_of("x", x).name != "float32":
    raise TypeError(f"x must have dtype float32, got {np.dtype(x.dtype).name}")
  shape = tuple(np.shape(x)) if patches is None else patches[0]
  if len(shape) != 3:
    raise ValueError(f"x must be 3-D [B, R, C], got shape {shape}")
  if (len(block) != 3 or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1
                             for b in block)):
    raise ValueError(f"block must be three ints >= 1, got {block!r}")
  lo, hi = (1, 15) if bfp else (2, 16)
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not lo <= bits <= hi:
    raise ValueError(f"bits must be an int in {lo}..{hi} for {'BFP' if bfp else 'DFP'}, got {bits!r}")
  values_dt = jnp.float32 if fake else check_out_dtype(out_dtype, bits + 1 if bfp else bits)
  allowed = FAKE_ROUNDINGS if fake else ROUNDINGS
  if rounding not in allowed:
    raise ValueError(f"rounding must be one of {allowed} on the kernel, got {rounding!r}")
  rounding_code, key_op = rounding_operands(rounding, key)
  if after is not None:
    if rounding == "stochastic":
      raise ValueError("after= is for deterministic rounding: stochastic rounding reads the key operand")
    if np.size(after) == 0:
      raise ValueError("after must have at least one element")
    word = lax.bitcast_convert_type(jnp.ravel(after)[:1].astype(jnp.float32), jnp.uint32)
    key_op = jnp.broadcast_to(word, (2,))
  n = int(np.prod(shape))
  if stats and n > INT32_MAX:
    raise ValueError(f"x has {n} elements; the int32 counters hold at most {INT32_MAX}")
  grid = formats.grid_shape(shape, block)
  if n == 0:
    y0 = jnp.zeros(shape, values_dt) if gemm is None else jnp.zeros(shape[:2] + (gemm[0].shape[-1],), jnp.float32)
    empty = (y0, jnp.zeros(grid, jnp.int32))
    return empty + ((jnp.zeros((4,), jnp.int32), jnp.zeros((2,), jnp.int32)) if stats else ())
  require_lib()
  first = (jax.ShapeDtypeStruct(shape, values_dt) if gemm is None
           else jax.ShapeDtypeStruct(shape[:2] + (gemm[0].shape[-1],), jnp.float32))
  outs = (first, jax.ShapeDtypeStruct(grid, jnp.int32))
  if stats:
    outs += (jax.ShapeDtypeStruct((4,), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32))
  target = TARGET_BLOCK_FAKE_QUANTIZE if fake else TARGET_BLOCK_QUANTIZE_STATS if stats else TARGET_BLOCK_QUANTIZE
  extra, operands = {}, (x, key_op)
  if patches is not None:
    target = TARGET_BLOCK_QUANTIZE_PATCHES_STATS if stats else TARGET_BLOCK_QUANTIZE_PATCHES
    extra = patches[1]
  if gemm is not None:
    target = TARGET_BLOCK_PATCH_GEMM_STATS if stats else TARGET_BLOCK_PATCH_GEMM
    operands += tuple(gemm[:2])
    extra = dict(extra, bits_b=np.int32(gemm[2]))
  call = jax.ffi.ffi_call(target, outs,
                          vmap_method="sequential")
  res = call(*operands, block=np.asarray(block, np.int64), kind=np.int32(1 if bfp else 0), bits=np.int32(bits),
             rounding=rounding_code, isa=np.int32(isa_code), **extra)
  # An FFI result carries no shard_map varying axes: give it its input's ones.
  return tuple(match_varying(r, x) for r in res)


def quantize_blocks(x, fmt, bshape, *, rounding: str = "nearest", key=None, isa: str = "auto", counted: bool = False,
                    out_dtype=jnp.int16):
  """`block_quantize` of an N-D float32 ``x`` in a DFP / BFP format with block shape ``bshape``:
  ``(int16 values of x's shape, int32 exponents of the block grid's shape)``. ``x`` and ``bshape``
  must have a 3-D view (`block_view3`). ``counted``: make `quantize_blocks_with_stats`'s call (and
  drop its counters), so that XLA merges it with a statistics call on the same tensor. ``out_dtype``:
  int16, or int8 for formats of <= 8 bits."""
  return quantize_blocks_with_stats(x, fmt, bshape, rounding=rounding, key=key, isa=isa, stats=counted,
                                    out_dtype=out_dtype)[:2]


def fake_quantize_blocks(x, fmt, bshape, *, rounding: str = "nearest", isa: str = "auto") -> jax.Array:
  """float32 ``dequantize(quantize_blocks(x, fmt, bshape))`` in one kernel pass (no int16 tensor,
  no exponent expansion): x rounded onto the format's grid, NaN for blocks holding NaN/Inf."""
  return quantize_blocks_with_stats(x, fmt, bshape, rounding=rounding, isa=isa, stats=False, fake=True)[0]


def quantize_blocks_with_stats(x, fmt, bshape, *, rounding: str = "nearest", key=None, isa: str = "auto",
                               stats: bool = True, fake: bool = False, out_dtype=jnp.int16):
  """`quantize_blocks` plus `block_quantize_with_stats`'s counters and exponent range (``fake``:
  dequantized float32 values instead of int16, no counters)."""
  if not isinstance(fmt, (formats.DFP, formats.BFP)):
    raise TypeError(f"fmt must be DFP or BFP, got {fmt!r}")
  shape = tuple(np.shape(x))
  view = block_view3(shape, bshape)
  if view is None:
    raise ValueError(f"block shape {tuple(bshape)} of shape {shape} has no 3-D [B, R, C] view")
  shape3, block3 = view
  bfp = isinstance(fmt, formats.BFP)
  # A reshape keeps every element's row-major index: the view draws the tensor's own Philox stream.
  res = _call(jnp.reshape(x, shape3), block3, bfp, fmt.mantissa_bits if bfp else fmt.bits, rounding, key, isa, stats,
              fake, out_dtype)
  return (jnp.reshape(res[0], shape), jnp.reshape(res[1], formats.grid_shape(shape, bshape))) + tuple(res[2:])


def quantize_patches_with_stats(x, fmt, bshape, *, kernel_spatial, window_strides, padding, lhs_dilation=None,
                                rhs_dilation=None, rounding: str = "nearest", key=None, isa: str = "auto",
                                stats: bool = True, out_dtype=jnp.int16, after=None):
  """`quantize_blocks_with_stats` of the patch matrix ``[1, rows, KK * C]`` of the conv input ``x``
  ``[N, *S, C]`` (`jdfp._src.ffi.conv.im2col`'s, reshaped: rows the output pixels, columns (tap, c))
  with blocks ``bshape`` ``(1, br, bc)``, bit for bit, without storing that matrix: each work unit
  gathers its rows from x. Stochastic rounding draws from each element's index in the patch matrix.

  ``after`` (deterministic rounding only): a non-empty array the call must wait for. Its first element
  fills the key operand, which these roundings ignore, so the result is unchanged; XLA then cannot
  schedule the call before ``after`` exists (a backward's re-conversion of a forward input waits for
  that op's output gradient instead of running during the forward)."""
  x5, block, bfp, bits, patches = _patch_view(x, fmt, bshape, kernel_spatial, window_strides, padding, lhs_dilation,
                                               rhs_dilation)
  return _call(x5, block, bfp, bits, rounding, key, isa, stats, False, out_dtype, patches=patches, after=after)


def _patch_view(x, fmt, bshape, kernel_spatial, window_strides, padding, lhs_dilation, rhs_dilation):
  """The patch-matrix calls' view of a conv input: ``(x as [N, D, H, W, C], block, bfp, bits, (shape3,
  conv attributes))``, the format and ``bshape`` checked."""
  if not isinstance(fmt, (formats.DFP, formats.BFP)):
    raise TypeError(f"fmt must be DFP or BFP, got {fmt!r}")
  sx = tuple(np.shape(x))
  nsp, ksp, out_sp, attrs = ffi_conv.patch_geometry(sx, kernel_spatial, window_strides, padding, lhs_dilation,
                                                    rhs_dilation)
  shape3 = (1, sx[0] * int(np.prod(out_sp)), int(np.prod(ksp)) * sx[-1])
  if len(bshape) != 3 or bshape[0] != 1:
    raise ValueError(f"bshape must be (1, br, bc) for the patch matrix {shape3}, got {tuple(bshape)}")
  bfp = isinstance(fmt, formats.BFP)
  x5 = jnp.reshape(x, (sx[0],) + (1,) * (3 - nsp) + sx[1:])
  return x5, tuple(int(b) for b in bshape), bfp, fmt.mantissa_bits if bfp else fmt.bits, (shape3, attrs)


def patch_gemm(x, fmt, bshape, b, eb, *, bits_b: int, kernel_spatial, window_strides, padding, lhs_dilation=None,
               rhs_dilation=None, rounding: str = "nearest", isa: str = "auto", stats: bool = True):
  """The patch matrix ``P [1, rows, K]`` of the conv input ``x`` converted as `quantize_patches_with_stats`
  converts it, times ``b [1, K, N]`` (exponents ``eb [1, KB, N or 1]`` on P's column blocks, KB =
  ceil(K / bc)) in one call: ``(y float32 [1, rows, N], P's exponents[, counts, erange])``, bit for bit
  the conversion followed by `jdfp._src.ffi.gemm.gemm` (int16 b) or `jdfp._src.ffi.gemm_i8.gemm_i8`
  (int8 b: P converted to int8, formats of <= 8 bits), with P never stored (each work item converts
  a run of row bands and multiplies them while they are in L2). For the forward of a conv whose
  converted input nobody keeps: nearest or biased rounding only."""
  if rounding == "stochastic":
    raise ValueError("patch_gemm takes nearest or biased rounding (a stochastic conversion's values are kept)")
  if dtype_of("b", b).name not in ("int16", "int8") or np.ndim(b) != 3:
    raise TypeError(f"b must be int16 or int8 [1, K, N], got {np.dtype(b.dtype).name} {tuple(np.shape(b))}")
  if dtype_of("eb", eb).name != "int32" or np.ndim(eb) != 3:
    raise TypeError(f"eb must be int32 [1, KB, N or 1], got {np.dtype(eb.dtype).name} {tuple(np.shape(eb))}")
  x5, block, bfp, bits, patches = _patch_view(x, fmt, bshape, kernel_spatial, window_strides, padding, lhs_dilation,
                                               rhs_dilation)
  res = _call(x5, block, bfp, bits, rounding, None, isa, stats, False, b.dtype, patches=patches, gemm=(b, eb, bits_b))
  return tuple(match_varying(r, x, b, eb) for r in res)
