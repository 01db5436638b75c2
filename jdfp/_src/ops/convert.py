"""Operand conversion for the ops: float -> int16 (+ exponents) on the C++ kernels where they apply
(per-tensor DFP with any rounding: ``ffi/quantize.py``; DFP / BFP blocks, rows and tiles with
any rounding: ``ffi/block_quantize.py``; bit-identical and several times faster than XLA:CPU), else
the pure-JAX quantizer of `jdfp._src.numerics.quantize` (a cross-replica max on blocks, blocks
shorter than MIN_KERNEL_BLOCK)."""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp

from jdfp._src.ffi import block_quantize as ffi_block
from jdfp._src.ffi import float_stats as ffi_float_stats
from jdfp._src.ffi import library
from jdfp._src.ffi import quantize as ffi_quantize
from jdfp._src.numerics import formats
from jdfp._src.numerics import quantize as qz
from jdfp._src.numerics.formats import BFP, DFP
from jdfp._src.ops.backend import kernel_quantize
from jdfp._src.ops.gemm import uses_int8_kernel


# While jdfp's Flax statistics are recorded around an op, its kernel conversions count (and keep
# an int16 copy), so that they are the very calls the statistics make and XLA merges them.
_COUNTERS_READ = contextvars.ContextVar("jdfp_counters_read", default=None)


@contextlib.contextmanager
def counters_read(read: bool = True):
  """Within this block, ops convert with the counting kernel call (`quantize_dfp_with_stats`'s)
  if ``read``, else with the plain one (and may skip int16 copies nobody keeps)."""
  token = _COUNTERS_READ.set(bool(read))
  try:
    yield
  finally:
    _COUNTERS_READ.reset(token)


def counters_wanted(default: bool = False) -> bool:
  """Whether the enclosing `counters_read` block reads the counters (``default`` outside one)."""
  v = _COUNTERS_READ.get()
  return default if v is None else v


def kernel_convert_available() -> bool:
  """True where the kernel conversion can run: the library is loaded and JAX's backend is CPU."""
  return library.kernel_available() and jax.default_backend() == "cpu"


def kernel_converts(x, fmt, rounding, bshape) -> bool:
  """The kernel conversion covers one exponent for the whole tensor, every rounding (nearest,
  stochastic with the Philox stream of docs/arithmetic.md, biased)."""
  return (isinstance(fmt, DFP) and rounding in formats.ROUNDING_MODES and x.size > 0 and len(bshape) == x.ndim
          and all(b >= n for b, n in zip(bshape, x.shape)))


# The block kernel reads blocks along the last axis of its [B, R, C] view in SIMD steps; blocks
# shorter than this (a per-column exponent, say) stay in XLA, where they vectorize across blocks.
MIN_KERNEL_BLOCK = 8


def kernel_converts_blocks(x, fmt, rounding, bshape) -> bool:
  """The block kernel covers DFP / BFP with any block shape that has a 3-D view whose innermost
  blocks are >= MIN_KERNEL_BLOCK long (or span the axis), every rounding."""
  if not (isinstance(fmt, (DFP, BFP)) and rounding in ffi_block.ROUNDINGS and x.size > 0
          and len(bshape) == x.ndim):
    return False
  view = ffi_block.block_view3(x.shape, bshape)
  return view is not None and view[1][2] >= min(MIN_KERNEL_BLOCK, view[0][2])


def quantize_blocks(x, fmt, bshape: tuple[int, ...], *, rounding: str = "nearest", key=None,
                    axis_name=None, use_kernel: bool | None = False, int8: bool = False) -> qz.QArray:
  """`jdfp._src.numerics.quantize.quantize_blocks`, converting on the C++ kernel where it applies.

  ``use_kernel``: convert float -> int16 on the kernel (bit-identical); None: whenever the kernel is
  loaded and JAX runs on CPU. ``int8`` (formats of <= 8 bits): the kernel writes int8 values (the
  same numbers); the pure-JAX paths still give int16.
  """
  formats.check_format(fmt)
  qz.check_rounding(rounding, key)
  if use_kernel is None:
    use_kernel = kernel_convert_available()
  if not use_kernel:
    return qz.quantize_blocks(x, fmt, bshape, rounding=rounding, key=key, axis_name=axis_name)
  return _quantize(qz.as_float_input(x), key if rounding == "stochastic" else None, fmt, rounding, tuple(bshape),
                   qz.normalize_axis_name(axis_name), counters_wanted(), bool(int8))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _quantize(x, key, fmt, rounding, bshape, axis_name=None, counted=False, int8=False) -> qz.QArray:
  out_dtype = jnp.int8 if int8 else jnp.int16
  if not kernel_converts(x, fmt, rounding, bshape):
    if axis_name is None and kernel_converts_blocks(x, fmt, rounding, bshape):
      # Maxima, exponents, values: one call (the statistics call's while they are recorded).
      values, e = ffi_block.quantize_blocks(x, fmt, bshape, rounding=rounding, key=key, counted=counted,
                                            out_dtype=out_dtype)
      return qz.QArray(values, e, fmt, bshape)
    # Other formats and roundings, and blocks whose maxima replicas share: the numerics' quantizer.
    return qz.quantize_blocks(x, fmt, bshape, rounding=rounding, key=key, axis_name=axis_name)
  if axis_name is None:  # max, exponent, conversion: one call
    values, e = ffi_quantize.quantize_dfp(x, bits=fmt.bits, counted=counted, rounding=rounding, key=key,
                                          out_dtype=out_dtype)
    return qz.QArray(values, e, fmt, bshape)
  amax = qz.shared_amax(formats.block_amax(x, bshape), axis_name)  # replicas agree on the exponent first
  return quantize_given_amax(x, amax, fmt, rounding, key, bshape, True, int8)


def fake_quantize(x, fmt, *, rounding: str = "nearest", key=None) -> jax.Array:
  """float32 `jdfp._src.numerics.quantize.fake_quantize` of float32 ``x`` (its format's own block
  shape), on the C++ kernel wherever it runs: block formats in one pass that returns the dequantized
  values (`ffi.block_quantize.fake_quantize_blocks`), per-tensor DFP through `quantize_blocks`."""
  bshape = fmt.block_shape(x.shape) if fmt.is_integer else None
  if (fmt.is_integer and kernel_convert_available() and not kernel_converts(x, fmt, rounding, bshape)
      and rounding in ffi_block.FAKE_ROUNDINGS and kernel_converts_blocks(x, fmt, rounding, bshape)):
    return ffi_block.fake_quantize_blocks(x, fmt, bshape, rounding=rounding)
  if not fmt.is_integer:
    return qz.fake_quantize(x, fmt, rounding=rounding, key=key)
  return qz.dequantize(quantize_blocks(x, fmt, bshape, rounding=rounding, key=key, use_kernel=None))


def quantize_given_amax(x, amax, fmt, rounding, key, bshape, use_kernel=False, int8=False) -> qz.QArray:
  """`quantize_given_exponent` with the exponents of the per-block maxima ``amax``."""
  return quantize_given_exponent(x, qz.group_exponent(amax, fmt), fmt, rounding, key, bshape, use_kernel, int8)


def quantize_given_exponent(x, e, fmt, rounding, key, bshape, use_kernel=False, int8=False) -> qz.QArray:
  """`jdfp._src.numerics.quantize.quantize_given_exponent`, on the kernel where it applies (``int8``:
  int8 values from the kernel, formats of <= 8 bits)."""
  if use_kernel and kernel_converts(x, fmt, rounding, bshape):
    values = ffi_quantize.quantize(x.astype(jnp.float32), e, bits=fmt.bits, rounding=rounding,
                                   key=key if rounding == "stochastic" else None,
                                   out_dtype=jnp.int8 if int8 else jnp.int16)
    return qz.QArray(values, e, fmt, bshape)
  return qz.quantize_given_exponent(x, e, fmt, rounding, key, bshape)


def kernel_casts(policy) -> bool:
  """Whether this policy's FP16 / BF16 casts may run on the C++ kernel (`cast_float`): any backend
  but "reference", where the kernel runs."""
  return policy.backend != "reference" and kernel_convert_available()


def kernel_cast_applies(x, use_kernel) -> bool:
  """Whether `cast_float` of ``x`` casts on the kernel (the Flax statistics ask the same question)."""
  return bool(use_kernel) and jnp.result_type(x) == jnp.float32 and jnp.size(x) > 0


def cast_float(x, fmt, use_kernel=False) -> jax.Array:
  """``x.astype(fmt.dtype)`` (FP16 / BF16). Inside a `counters_read` block, float32 ``x`` and
  ``use_kernel``: cast on the C++ kernel that also counts (`ffi.float_stats.float_cast_stats`, bit for
  bit XLA's convert), the very call the Flax statistics make, so XLA merges the two and each operand
  is read once for its cast and its counters (XLA's convert and a separate count were three passes)."""
  if counters_wanted() and kernel_cast_applies(x, use_kernel):
    return ffi_float_stats.float_cast_stats(x, fmt.dtype)[0]
  return x.astype(fmt.dtype)


def quantize3(x3, fmt, c_ax: int, rounding: str, key, axis_name=None, use_kernel=None, int8=False) -> qz.QArray:
  """Quantize a physical 3-D operand; block formats read on its (batch, free, contraction) view.
  ``use_kernel``: the float -> int16 conversion on the C++ kernel (None: wherever it can run; FP16 /
  BF16: `cast_float`'s kernel cast); ``int8``: the kernel writes int8 values (a format of <= 8 bits
  bound for the INT8 GEMM)."""
  if not fmt.is_integer:
    if use_kernel is None:
      use_kernel = kernel_convert_available()
    if counters_wanted() and kernel_cast_applies(x3, use_kernel):
      return qz.QArray(cast_float(x3, fmt, True), jnp.zeros((1,) * x3.ndim, jnp.int32), fmt, None)
    return qz.quantize_array(x3, fmt)
  return quantize_blocks(x3, fmt, block_shape3(x3.shape, fmt, c_ax), rounding=rounding, key=key,
                         axis_name=axis_name, use_kernel=use_kernel, int8=int8)


# Which operands whose int16 copy nobody keeps skip the conversion (exponent-only call + the GEMM's
# float32-input packing), measured on the Zen 5 VM (docs/op_costs.md): the kernel packs a float32
# "b" operand once per column range but re-converts a float32 "a" operand for every column block,
# and its float32 packing is slower per element than the conversion kernel. So: both operands for
# tiny GEMMs (one custom call fewer is the whole gain), "b" alone from 1024^3 up, else none.
LAZY_BOTH_MAX_WORK = 2**15
LAZY_B_MIN_WORK = 2**30


def lazy_operands(work: int, lazy_a: bool, lazy_b: bool) -> tuple[bool, bool]:
  """(a, b): which of the candidate operands of a GEMM of ``work`` = B*M*N*K take the float path."""
  if work <= LAZY_BOTH_MAX_WORK:
    return lazy_a, lazy_b
  return False, lazy_b and work >= LAZY_B_MIN_WORK


def quantize3_operands(operands, rounding: str, axis_name=None, use_kernel=None, lazy=(False, False),
                       policy_int8: bool = False):
  """`quantize3` of each ``(x3, fmt, c_ax, key)``; an operand flagged in ``lazy`` whose int16 copy
  nobody keeps (a forward-only op, a ``float_residuals`` operand) gets only its exponent when the
  kernel converts it: ``QArray(float32 x3, e)``, which the GEMM kernel quantizes while packing
  (bit-identical; its packing rounds to nearest only, so other roundings always convert here).
  The exponents of all such operands come from one kernel call.

  When both operands go to the INT8 GEMM (`int8_operands`), the kernel conversions write int8
  values directly: no int16 copy for XLA to narrow (`jdfp._src.ops.gemm.int8_storage` still narrows
  what the pure-JAX paths give). ``policy_int8`` (`int8_conversions` of the op's policy): int8 even
  while Flax statistics are recorded, whose calls then ask for int8 too."""
  int8 = use_kernel is True and (policy_int8 or int8_operands([op[1] for op in operands]))
  if use_kernel is None:
    use_kernel = kernel_convert_available()
  fast = [bool(lz and use_kernel and axis_name is None and fmt.is_integer and not counters_wanted()
               and rounding == "nearest"
               and kernel_converts(x3, fmt, rounding, block_shape3(x3.shape, fmt, c_ax)))
          for (x3, fmt, c_ax, _), lz in zip(operands, lazy)]
  xs = [qz.as_float_input(op[0]).astype(jnp.float32) for op, f in zip(operands, fast) if f]
  es = ffi_quantize.dfp_exponents(*xs, bits=[op[1].bits for op, f in zip(operands, fast) if f]) if xs else ()
  int8 = int8 and not any(fast)  # a float32 operand goes to the INT16 GEMM's fused path
  lazy_q = iter(zip(xs, es))
  out = []
  for (x3, fmt, c_ax, key), f in zip(operands, fast):
    if f:
      x, e = next(lazy_q)
      out.append(qz.QArray(x, e, fmt, block_shape3(x3.shape, fmt, c_ax)))
    else:
      out.append(quantize3(x3, fmt, c_ax, rounding, key, axis_name, use_kernel, int8))
  return out


def int8_conversions(policy) -> bool:
  """Whether every kernel conversion of this policy's GEMM operands writes int8: all four formats are
  integer formats of <= 8 bits (every GEMM of the op runs on the INT8 kernel) and the kernel converts.
  A policy-wide rule, so that the op's conversions and the Flax statistics' calls (which see one
  operand at a time) ask for the same result type and XLA still merges them."""
  fmts = (policy.lhs, policy.rhs, policy.dlhs, policy.drhs)
  return (kernel_quantize(policy) and all(f.is_integer for f in fmts)
          and uses_int8_kernel(*(f.int_bits for f in fmts[:2])) and uses_int8_kernel(*(f.int_bits for f in fmts[2:])))


def int8_operands(fmts) -> bool:
  """Whether kernel-converted GEMM operands of these formats may be written as int8: all integer
  formats of <= 8 bits (the INT8 GEMM's), and no Flax statistics recorded (their conversion call is
  the int16 one, which the op's own call must equal for XLA to merge them)."""
  return (all(f.is_integer for f in fmts) and uses_int8_kernel(*(f.int_bits for f in fmts))
          and not counters_wanted())


def block_shape3(shape3, fmt, c_ax: int) -> tuple[int, ...]:
  """Physical block shape of a 3-D operand whose blocks are read on its (batch, free, contraction) view."""
  bsz, r, c = shape3
  logical = (bsz, c, r) if c_ax == 1 else (bsz, r, c)
  lb = fmt.block_shape(logical)
  return (lb[0], lb[2], lb[1]) if c_ax == 1 else tuple(lb)


def quantize_blocks_equal(fmt, shape3) -> bool:
  """Whether `quantize3` of a [B, M, N] operand gives the same QArray read with contraction axis 2
  or 1: the physical blocks agree (per-tensor, HBFP's square tiles), so one conversion serves both
  backward GEMMs. 1-D blocks along the contraction (MX) differ."""
  return block_shape3(shape3, fmt, 2) == block_shape3(shape3, fmt, 1)
