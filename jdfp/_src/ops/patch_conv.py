"""Block-format convolutions (HBFP tiles of the patch matrix) without storing the patch matrix.

A conv whose lhs format has block exponents is, by definition, `jdfp.dot_general` on its im2col
patch matrix ``P [1, rows, KK * C]`` (rows: output pixels; columns: (tap, channel)), whose tiles the
lhs format blocks. On backend "ffi" the forward builds ``P`` only inside the block conversion: each
work unit of `ffi.block_quantize.quantize_patches_with_stats` gathers its rows from the conv input
and converts them (maxima, exponents, values, counters in one pass), so neither the float32 patch
matrix nor a second pass over it exists. Bit for bit the im2col + `jdfp.dot_general` arrangement:
the same keys, conversions, GEMMs and backward (`dot_vjp.dot_bwd`). For the weight gradient the
backward keeps x itself where it is smaller than the patch matrix's integers (`keeps_float_input`),
with the forward's tile exponents: the weight gradient is then one INT16 / INT8 kernel call that
converts P from x on them while packing (`fuses_weight_grad`, `weight_grad`); formats the backward
re-blocks convert x again once the op's output gradient exists. The backward-data GEMM and
col2im (the transpose of `conv_vjp.patches`) run as one INT8 / INT16 kernel call
(`ops.gemm.gemm_col2im`, from 4 images on), so the float32 patch gradient is not stored either;
elsewhere the GEMM, then XLA's col2im, with the same bits."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jdfp._src.ffi import block_quantize as ffi_block
from jdfp._src.ffi import gemm as ffi_gemm
from jdfp._src.ffi import gemm_i8 as ffi_gemm_i8
from jdfp._src.numerics import quantize as qz
from jdfp._src.numerics.shard_types import match_varying, varying_axes
from jdfp._src.ops import dot_vjp
from jdfp._src.ops.backend import kernel_quantize, resolve_backend
from jdfp._src.ops.conv_vjp import patches
from jdfp._src.ops.convert import (block_shape3, counters_wanted, int8_conversions, int8_operands, kernel_converts,
                                   kernel_converts_blocks, quantize3)
from jdfp._src.ops.gemm import (align_blocks, gemm, gemm_col2im, int8_storage, kernel_exponents, uses_int8_kernel,
                                widen_int8)
from jdfp._src.ops.layout import prod
from jdfp._src.ops.policy import Policy
from jdfp._src.ops.vjp import as_cotangent_of, perturbed_marker, perturbed_marker_of, primal_values, split_keys

# The GEMM of the im2col arrangement: P [1, rows, K] . W [1, K, O].
DIMS = (((2,), (1,)), ((0,), (0,)))


@dataclasses.dataclass(frozen=True)
class PatchGeom:
  """Static geometry of the patch matrix of a conv input ``x [N, *S, C]`` (canonical layout)."""

  in_shape: tuple[int, ...]
  k_sp: tuple[int, ...]
  strides: tuple[int, ...]
  pads: tuple[tuple[int, int], ...]
  lhs_dil: tuple[int, ...]
  rhs_dil: tuple[int, ...]
  out_sp: tuple[int, ...]

  @property
  def shape3(self) -> tuple[int, int, int]:
    return (1, self.in_shape[0] * prod(self.out_sp), prod(self.k_sp) * self.in_shape[-1])

  @property
  def patches_shape(self) -> tuple[int, ...]:
    """`conv_vjp.patches`'s ``[N, *O, KK, C]``."""
    return (self.in_shape[0],) + self.out_sp + (prod(self.k_sp), self.in_shape[-1])

  def kernel_kwargs(self) -> dict:
    return dict(kernel_spatial=self.k_sp, window_strides=self.strides, padding=self.pads,
                lhs_dilation=self.lhs_dil, rhs_dilation=self.rhs_dil)


def applies(x, groups: int, geom: PatchGeom, policy: Policy) -> bool:
  """Whether the conv's lhs conversion runs on the patch kernel: FFI backend, current scaling, one
  group, float32 input with 1 to 3 spatial dims, an lhs format with block exponents that the block
  kernel converts, and no cross-replica exponent."""
  fmt = policy.lhs
  if not (fmt.is_integer and kernel_quantize(policy) and resolve_backend(policy) == "ffi" and groups == 1
          and policy.scaling == "current" and policy.axis_name is None
          and x.dtype == jnp.float32 and 1 <= len(geom.k_sp) <= 3 and prod(geom.shape3) > 0):
    return False
  p3 = jax.ShapeDtypeStruct(geom.shape3, jnp.float32)
  bshape = block_shape3(geom.shape3, fmt, 2)
  return (bshape[0] == 1 and not kernel_converts(p3, fmt, policy.fwd_rounding, bshape)
          and kernel_converts_blocks(p3, fmt, policy.fwd_rounding, bshape))


def patch_conversion(x, geom: PatchGeom, fmt, rounding: str, key, int8: bool, counted: bool, after=None):
  """The kernel call that converts the patch matrix of ``x`` by the lhs format's blocks (contraction
  axis 2): ``(values [1, rows, K], exponents, counts, erange)`` (no counts unless ``counted``). The op
  and the Flax statistics both make it through here, so their calls are identical and XLA merges them.
  ``after``: an array the call must wait for (deterministic rounding only; see
  `ffi.block_quantize.quantize_patches_with_stats`)."""
  bshape = block_shape3(geom.shape3, fmt, 2)
  return ffi_block.quantize_patches_with_stats(
      x, fmt, bshape, rounding=rounding, key=key if rounding == "stochastic" else None, stats=counted,
      out_dtype=jnp.int8 if int8 else jnp.int16, after=after, **geom.kernel_kwargs())


def quantize_patches(x, geom: PatchGeom, fmt, rounding: str, key, int8: bool, after=None) -> qz.QArray:
  """The QArray that `convert.quantize3` gives for the patch matrix of ``x``, from x itself (the
  counting call inside a `counters_read` block)."""
  values, e = patch_conversion(x, geom, fmt, rounding, key, int8, counters_wanted(), after)[:2]
  return qz.QArray(values, e, fmt, block_shape3(geom.shape3, fmt, 2))


def rhs_operand(w3, key, policy: Policy, i8: bool) -> qz.QArray:
  """The forward's rhs conversion (`dot_vjp._dot_fwd`'s for the im2col arrangement); int8 values
  where both operands go to the INT8 kernel (the kernel conversion writes them so already; |v| <= 127)."""
  qr = quantize3(w3, policy.rhs, 1, policy.fwd_rounding, key, policy.axis_name, True, i8)
  if i8 and qr.fmt.is_integer and qr.values.dtype != jnp.int8:
    qr = qz.QArray(qr.values.astype(jnp.int8), qr.exponent, qr.fmt, qr.blocks)
  return qr


def fused_rhs_exponents(geom: PatchGeom, policy: Policy, qr: qz.QArray):
  """``eb [1, KB, N or 1]`` of ``qr`` on the column blocks of the patch conversion, where
  `ffi.block_quantize.patch_gemm` can take them (qr int8 / int16 of an integer format whose blocks
  along K are whole multiples of the lhs's, or one block); else None."""
  if not (qr.fmt.is_integer and qr.values.dtype in (jnp.int8, jnp.int16) and qr.values.shape[0] == 1):
    return None
  k = geom.shape3[2]
  bc = block_shape3(geom.shape3, policy.lhs, 2)[2]
  bka = None if bc >= k else bc
  eb, bkb = kernel_exponents(qr, 1, "b")
  if eb.shape[0] != 1 or (bka is None and bkb is not None) or (bka is not None and bkb is not None and bkb % bka):
    return None
  return align_blocks(eb, bkb, bka, k, 1)


def fuses_gemm(x, geom: PatchGeom, policy: Policy) -> bool:
  """Whether the forward's conversion and GEMM are one `ffi.block_quantize.patch_gemm` call (the
  patch matrix never stored): an integer rhs, deterministic forward rounding, and the backward
  keeping x rather than the converted patches (`keeps_float_input`), so that nobody reads their
  values. The INT8 kernel's where both operands are int8 (`operand_int8`), else the INT16 kernel's.
  Called where `applies`."""
  if not policy.rhs.is_integer or policy.fwd_rounding == "stochastic":
    return False
  rows, k = geom.shape3[1:]
  bshape = block_shape3(geom.shape3, policy.lhs, 2)
  grid = -(-rows // bshape[1]) * -(-k // bshape[2])
  value_bytes = 1 if operand_int8(policy) else 2
  return "lhs" in policy.float_residuals or prod(x.shape) * 4 < rows * k * value_bytes + grid * 4


def fused_forward(x, qr: qz.QArray, eb, geom: PatchGeom, policy: Policy, counted: bool):
  """`ffi.block_quantize.patch_gemm` for the conv: ``(y [1, rows, N], the lhs exponents[, counts,
  erange])``, bit for bit the patch conversion followed by `gemm`."""
  return ffi_block.patch_gemm(x, policy.lhs, block_shape3(geom.shape3, policy.lhs, 2), qr.values, eb,
                              bits_b=qr.fmt.int_bits, rounding=policy.fwd_rounding, isa=policy.isa, stats=counted,
                              **geom.kernel_kwargs())


def lhs_counts(x, w3, key, geom: PatchGeom, policy: Policy):
  """``(counts, erange)`` of the op's lhs conversion, from the very call the op makes inside a
  ``counters_read(True)`` block (XLA merges the two): the fused forward's where it runs, else the
  patch conversion's."""
  k_l, k_r, _ = split_keys(key, 3)
  if fuses_gemm(x, geom, policy):
    qr = rhs_operand(w3, k_r, policy, operand_int8(policy))
    eb = fused_rhs_exponents(geom, policy, qr)
    if eb is not None:
      return fused_forward(x, qr, eb, geom, policy, True)[2:]
  return patch_conversion(x, geom, policy.lhs, policy.fwd_rounding, k_l, int8_conversions(policy), True)[2:]


def operand_int8(policy: Policy) -> bool:
  """The int8 decision `quantize3_operands` makes for the two forward operands of the dot."""
  return int8_conversions(policy) or int8_operands([policy.lhs, policy.rhs])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def patch_conv_core(x, w3, key, geom: PatchGeom, policy: Policy, precision, out_dtype):
  """float ``[1, rows, O]``: the patch matrix of x (``geom``) times ``w3 [1, KK * C, O]``."""
  out, _ = _fwd(x, w3, key, geom, policy, precision, out_dtype)
  return out


def _fwd(x, w3, key, geom, policy, precision, out_dtype):
  k_fwd_l, k_fwd_r, k_bwd = split_keys(key, 3)  # as dot_vjp._dot_fwd
  i8 = operand_int8(policy)
  qr = rhs_operand(w3, k_fwd_r, policy, i8)
  eb = fused_rhs_exponents(geom, policy, qr) if fuses_gemm(x, geom, policy) else None
  if eb is not None:
    # Conversion and GEMM in one call; the backward keeps x (`fuses_gemm`).
    out, e = fused_forward(x, qr, eb, geom, policy, counters_wanted())[:2]
    out = out.astype(out_dtype)
    lhs_res = x
  else:
    ql = quantize_patches(x, geom, policy.lhs, policy.fwd_rounding, k_fwd_l, i8)
    ql, qr = int8_storage(ql, qr, policy)
    out = gemm(ql, 2, qr, 1, policy, precision).astype(out_dtype)
    # Keep x itself where the backward may convert it again (deterministic forward rounding: the same
    # integers) and x is the smaller residual (float32 x: 4 bytes per input element; the patch matrix:
    # 1-2 bytes per element, taps / stride**2 elements per input element, plus exponents).
    lhs_res, e = (x, ql.exponent) if keeps_float_input(x, ql, policy) else (ql, None)
  if e is not None and fuses_weight_grad(geom, policy):
    lhs_res = (x, e)  # the weight gradient quantizes x's patches on these exponents while packing
  # The residuals of `dot_vjp._dot_fwd` for lhs = the patch matrix (its zero-size slice carries shape,
  # dtype and x's shard_map type).
  p_dt = jnp.broadcast_to(x.reshape(-1)[:0].reshape((0, 1, 1, 1)), (0,) + geom.shape3)
  return out, (lhs_res, dot_vjp.backward_residual(qr, w3, "rhs", policy), k_bwd, p_dt, w3[None][:0])


def keeps_float_input(x, ql: qz.QArray, policy: Policy) -> bool:
  """Whether the backward keeps the conv input ``x`` rather than its converted patch matrix ``ql``:
  always with ``Policy(float_residuals=("lhs",))``; by default where the forward rounds
  deterministically and ``x`` takes fewer bytes (3 x 3 stride-1 convs: 4 bytes per input element
  against 9-18 for the int8 / int16 patches)."""
  if "lhs" in policy.float_residuals:
    return True
  if policy.fwd_rounding == "stochastic":
    return False
  nbytes = lambda a: prod(a.shape) * jnp.dtype(a.dtype).itemsize
  return nbytes(x) < nbytes(ql.values) + nbytes(ql.exponent)


def fuses_weight_grad(geom: PatchGeom, policy: Policy) -> bool:
  """Whether the backward's weight gradient runs as one `ffi.gemm.gemm_patch_wgrad` (INT16) or
  `ffi.gemm_i8.gemm_i8_patch_wgrad` (INT8) call from x and the forward's exponents (no second
  conversion, no int16 / int8 patch matrix): nearest forward rounding (what the kernels' packing
  rounds by), tiles that read the same along both axes (no re-blocking for the backward) and an
  integer gradient format."""
  fmt = policy.lhs
  return (policy.fwd_rounding == "nearest" and policy.drhs.is_integer
          and block_shape3(geom.shape3, fmt, 2) == block_shape3(geom.shape3, fmt, 1))


def weight_grad(x, e, g_dr: qz.QArray, geom: PatchGeom, policy: Policy):
  """``[1, KK * C, O]``: the patch matrix of x (quantized on the forward's tile exponents ``e``) times
  the output gradient ``g_dr [1, rows, O]``, contracting the rows, in one kernel call; bit for bit
  `gemm` on the converted patch matrix (`dot_vjp.backward_gemms`' weight gradient)."""
  rows = geom.shape3[1]
  br, bc = block_shape3(geom.shape3, policy.lhs, 2)[1:]
  eb, bkb = kernel_exponents(g_dr, 1, "b")
  bka = None if br >= rows else br  # one tile row: P's exponents do not vary along the rows
  blocks = [b for b in (bka, bkb) if b is not None]
  block = math.gcd(*blocks) if blocks else None
  eb = align_blocks(eb, bkb, block, rows, 1)
  bits_a, bits_b = policy.lhs.int_bits, g_dr.fmt.int_bits
  kw = dict(tiles=(br, bc), bits_a=bits_a, bits_b=bits_b, block_k=block, isa=policy.isa, **geom.kernel_kwargs())
  if uses_int8_kernel(bits_a, bits_b):  # as `gemm`: both formats fit int8 (|v| <= 127)
    out = ffi_gemm_i8.gemm_i8_patch_wgrad(x, e, g_dr.values.astype(jnp.int8), eb, **kw)
  else:
    out = ffi_gemm.gemm_patch_wgrad(x, e, widen_int8(g_dr.values), eb, **kw)
  return match_varying(out, x, e, g_dr.values, eb)


def _fwd_perturbed(x, w3, key, geom, policy, precision, out_dtype):
  out, res = _fwd(x.value, w3.value, primal_values(key), geom, policy, precision, out_dtype)
  return out, res + (perturbed_marker(x), perturbed_marker(w3), perturbed_marker_of(counters_wanted()))


def _bwd(geom, policy, precision, out_dtype, res, g):
  if isinstance(g, SymbolicZero):
    return None, None, None
  reconverted = not isinstance(res[0], qz.QArray)  # the forward kept x (`keeps_float_input`)
  w_grad = None
  if reconverted:
    (x, e), need_w = res[0] if isinstance(res[0], tuple) else (res[0], None), res[6]
    ql = None
    if need_w is not None and e is not None:
      w_grad = lambda g_dr: weight_grad(x, e, g_dr, geom, policy)
    elif need_w is not None:
      # The call reads this op's output gradient (as its ignored key), so XLA converts x here, not
      # as early as it could: one layer's patch matrix alive at a time, not every layer's from the
      # forward on. (XLA:CPU drops optimization barriers before scheduling; a data dependency stays.)
      ql = quantize_patches(x, geom, policy.lhs, policy.fwd_rounding, None, operand_int8(policy), after=g)
    res = (ql,) + res[1:]
    policy = policy.replace(float_residuals=tuple(r for r in policy.float_residuals if r != "lhs"))
  p_dt = res[3]

  def x_cotangent(g_dl, qr, b_c):
    # The backward-data GEMM and col2im in one INT8 kernel call where it runs (the patch gradient is
    # never stored whole), else the GEMM then XLA's col2im: the same bits either way.  (Under
    # shard_map, a gradient varying where x is not is summed over those axes first, as the patch
    # gradient: then the unfused order.)
    dx = None
    if not varying_axes(g_dl.values) - varying_axes(p_dt):
      dx = gemm_col2im(g_dl, qr, b_c, policy, geom.in_shape, geom.kernel_kwargs())
    if dx is None:
      dp = as_cotangent_of(gemm(g_dl, 2, qr, b_c, policy, precision).astype(jnp.float32), p_dt)
      xla_patches = lambda x: patches(x, geom.k_sp, geom.strides, geom.pads, geom.lhs_dil, geom.rhs_dil)[0]
      # The transpose at a zero x of x's shard_map type (a bare ShapeDtypeStruct has none, and
      # jax.linear_transpose then refuses a varying cotangent).
      x0 = match_varying(jnp.zeros(geom.in_shape, jnp.float32), p_dt)
      (dx,) = jax.vjp(xla_patches, x0)[1](dp.reshape(geom.patches_shape))
    return dx

  dx, dw3, _ = dot_vjp.dot_bwd(DIMS, policy, precision, out_dtype, res, g, lhs_cotangent=x_cotangent,
                               rhs_grad=w_grad)
  return dx, dw3, None


patch_conv_core.defvjp(_fwd_perturbed, _bwd, symbolic_zeros=True)
