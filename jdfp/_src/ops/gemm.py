"""One GEMM on quantized 3-D operands: any layout mapped onto the kernel's ``[B, M, K] x [B, K, N]``
(transpose flags instead of copies where possible), block exponents aligned along K, run on the
FFI kernel or the bit-identical pure-JAX reference."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jdfp._src.ffi import gemm as ffi_gemm
from jdfp._src.ffi import gemm_bf16 as ffi_gemm_bf16
from jdfp._src.ffi import gemm_i8 as ffi_gemm_i8
from jdfp._src.numerics import formats
from jdfp._src.numerics import quantize as qz
from jdfp._src.numerics import reference
from jdfp._src.numerics.shard_types import match_varying
from jdfp._src.ops.backend import resolve_backend
from jdfp._src.ops.policy import Policy

def uses_int8_kernel(bits_a: int, bits_b: int) -> bool:
  """Whether a GEMM of integer formats with these bits runs on the INT8 kernel (backend "ffi")."""
  return max(bits_a, bits_b) <= ffi_gemm_i8.MAX_BITS


def int8_storage(qa: qz.QArray, qb: qz.QArray, policy: Policy) -> tuple[qz.QArray, qz.QArray]:
  """The forward operands as the INT8 kernel reads them: int8 values when it runs their GEMM (both
  formats <= 8 bits, backend "ffi", both quantized to integers), so what the backward keeps of them
  is half the bytes of the int16 copy (|v| <= 127: exact).  Otherwise unchanged.  The kernel
  conversions usually write int8 already (`jdfp._src.ops.convert.quantize3_operands`); this narrows
  what still comes as int16 (the pure-JAX quantizer's paths, Flax statistics recorded)."""
  ints = all(q.fmt.is_integer and q.values.dtype in (jnp.int8, jnp.int16) for q in (qa, qb))
  if not (ints and uses_int8_kernel(qa.fmt.int_bits, qb.fmt.int_bits) and resolve_backend(policy) == "ffi"):
    return qa, qb
  return tuple(qz.QArray(q.values.astype(jnp.int8), q.exponent, q.fmt, q.blocks) for q in (qa, qb))


def widen_int8(x: jax.Array) -> jax.Array:
  """int8 storage (int8_storage) widened for the INT16 kernel and the reference; others as they are."""
  return x.astype(jnp.int16) if x.dtype == jnp.int8 else x


def kernel_exponents(q: qz.QArray, c_ax: int, role: str):
  """Exponents of a kernel operand: ``[B', F', KB]`` for "a", ``[B', KB, F']`` for "b"; and block_k."""
  e = q.exponent
  bs = q.block_shape
  shape = q.values.shape
  f_ax = 3 - c_ax
  # Expand the batch and free axes of the grid to full size unless the exponent is shared.
  for ax in (0, f_ax):
    if e.shape[ax] not in (1, shape[ax]):
      e = formats.expand_blocks(e, tuple(bs[i] if i == ax else 1 for i in range(3)),
                                tuple(shape[i] if i == ax else e.shape[i] for i in range(3)))
  block = None if e.shape[c_ax] == 1 else bs[c_ax]
  order = (0, f_ax, c_ax) if role == "a" else (0, c_ax, f_ax)
  return jnp.transpose(e, order), block


def align_blocks(e, block, target, k, axis):
  """Re-express per-block exponents (blocks of `block`, None = whole K) on blocks of `target`."""
  if block == target:
    return e
  kb = -(-k // target)
  if block is None:
    return jnp.broadcast_to(e, e.shape[:axis] + (kb,) + e.shape[axis + 1:])
  return lax.slice_in_dim(jnp.repeat(e, block // target, axis=axis), 0, kb, axis=axis)


def gemm(qa: qz.QArray, a_c: int, qb: qz.QArray, b_c: int, policy: Policy, precision=None) -> jax.Array:
  """float32 ``[B, Fa, Fb]`` = sum over K of a * b, where a's contraction is physical axis a_c, b's b_c."""
  if not qa.fmt.is_integer:
    dims = (((a_c,), (b_c,)), ((0,), (0,)))
    a, b = qa.values, qb.values
    if a.dtype == b.dtype == jnp.bfloat16 and (isa := bf16_dot_isa(policy)):
      # bf16 products are exact, float32 sums in the kernel's documented order (docs/arithmetic.md):
      # the vdpbf16ps chain, or the AMX-BF16 tile unit's.
      out = ffi_gemm_bf16.gemm_bf16(a, b, transpose_a=a_c == 1, transpose_b=b_c == 2, isa=isa)
      return match_varying(out, a, b)
    if a.dtype == b.dtype == jnp.float16 and f16_dot_kernel(policy) and _work(a, b, b_c) >= F16_MIN_WORK:
      # Each float16 split exactly into two bfloat16 on AMX-BF16 tiles: exact products, float32 sums
      # (docs/arithmetic.md, "The FP16 GEMM on AMX-BF16 tiles"), ~1.5x FP32 where XLA has no FP16 dot.
      out = ffi_gemm_bf16.gemm_f16(a, b, transpose_a=a_c == 1, transpose_b=b_c == 2)
      return match_varying(out, a, b)
    if jnp.float16 in (a.dtype, b.dtype):
      # XLA:CPU has no fast FP16 dot; FP16 x FP16 products are exact in float32 (11 + 11 significand
      # bits), so widening first is the same arithmetic (FP32 products and sums) at FP32 speed.
      a, b, precision = a.astype(jnp.float32), b.astype(jnp.float32), lax.Precision.HIGHEST
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)
  ea, eb, block = _kernel_exponents_of(qa, a_c, qb, b_c)
  bits_a, bits_b = qa.fmt.int_bits, qb.fmt.int_bits
  ta, tb = a_c == 1, b_c == 2
  if resolve_backend(policy) == "ffi":
    if _int8_kernel_runs(qa, qb):
      # Both formats fit int8 (|v| <= 127): the vpdpbusd kernel, same contract, the same bits.  (A
      # float32 operand, quantized while packing, still goes to the INT16 kernel's fused path.)
      out = ffi_gemm_i8.gemm_i8(qa.values.astype(jnp.int8), qb.values.astype(jnp.int8), ea, eb,
                                bits_a=bits_a, bits_b=bits_b, block_k=block, transpose_a=ta,
                                transpose_b=tb, isa=policy.isa)
    else:
      out = ffi_gemm.gemm(widen_int8(qa.values), widen_int8(qb.values), ea, eb, bits_a=bits_a, bits_b=bits_b,
                          block_k=block, transpose_a=ta, transpose_b=tb, isa=policy.isa)
    # An FFI call's result type carries no shard_map varying axes: give it its inputs' ones.
    return match_varying(out, qa.values, qb.values, ea, eb)
  return reference_call(widen_int8(qa.values), widen_int8(qb.values), ea, eb, bits_a, bits_b, block, ta, tb)


def _kernel_exponents_of(qa: qz.QArray, a_c: int, qb: qz.QArray, b_c: int):
  """Both operands' kernel exponents on one block length along K: ``(ea, eb, block_k)``."""
  k = qa.values.shape[a_c]
  ea, bka = kernel_exponents(qa, a_c, "a")
  eb, bkb = kernel_exponents(qb, b_c, "b")
  if bka is None and bkb is None:
    return ea, eb, None
  block = math.gcd(*(x for x in (bka, bkb) if x is not None))
  return align_blocks(ea, bka, block, k, 2), align_blocks(eb, bkb, block, k, 1), block


def _int8_kernel_runs(qa: qz.QArray, qb: qz.QArray) -> bool:
  """Whether the FFI backend runs this integer GEMM on the INT8 kernel: both formats <= 8 bits and
  both operands integers (a float32 operand, quantized while packing, goes to the INT16 kernel)."""
  integer = all(q.values.dtype in (jnp.int8, jnp.int16) for q in (qa, qb))
  return uses_int8_kernel(qa.fmt.int_bits, qb.fmt.int_bits) and integer


# The fused GEMM + col2im runs one image per work unit: below this many images the unfused GEMM
# (tiles over rows and columns) keeps both cores busier; above this many bytes of patch gradient per
# image, each worker's buffer would outgrow what the fusion saves.
COL2IM_MIN_IMAGES = 4
COL2IM_MAX_IMAGE_BYTES = 64 << 20


def gemm_col2im(qa: qz.QArray, qb: qz.QArray, b_c: int, policy: Policy, x_shape, conv_kwargs: dict):
  """The backward-data of a conv on its patch matrix: ``dx`` float32 of shape ``x_shape`` =
  col2im(``gemm(qa, 2, qb, b_c)``), qa the output gradient ``[1, rows, O]``, in one call of the INT8
  or INT16 kernel (the patch gradient is never stored whole; bit for bit the GEMM + XLA's col2im).
  None where neither runs this GEMM that way (then the caller does the two steps)."""
  ints = all(q.fmt.is_integer and q.values.dtype in (jnp.int8, jnp.int16) for q in (qa, qb))
  if not (ints and resolve_backend(policy) == "ffi"):
    return None
  rows, cols = qa.values.shape[1], qb.values.shape[3 - b_c]
  images = x_shape[0]
  if qa.values.shape[0] != 1 or images < COL2IM_MIN_IMAGES or rows * cols * 4 // images > COL2IM_MAX_IMAGE_BYTES:
    return None
  ea, eb, block = _kernel_exponents_of(qa, 2, qb, b_c)
  kw = dict(x_shape=x_shape, bits_a=qa.fmt.int_bits, bits_b=qb.fmt.int_bits, block_k=block, transpose_a=False,
            transpose_b=b_c == 2, isa=policy.isa, **conv_kwargs)
  if _int8_kernel_runs(qa, qb):
    dx = ffi_gemm_i8.gemm_i8_col2im(qa.values.astype(jnp.int8), qb.values.astype(jnp.int8), ea, eb, **kw)
  else:
    dx = ffi_gemm.gemm_col2im(widen_int8(qa.values), widen_int8(qb.values), ea, eb, **kw)
  return match_varying(dx, qa.values, qb.values, ea, eb)


def bf16_kernel(policy: Policy) -> bool:
  """Whether BF16 x BF16 convolutions can run on the C++ vdpbf16ps kernels: the FFI backend on a CPU
  with AVX512_BF16 (elsewhere they stay XLA float32 convs of the widened operands)."""
  return (policy.backend != "reference" and jax.default_backend() == "cpu"
          and ffi_gemm_bf16.has_avx512_bf16())


# The FP16 GEMM takes dots of at least this many products (batch x M x N x K; 128 x 128 x 256):
# below it XLA's FP32 dot of the widened operands is as fast, and a step of small dots (the 64-128-10
# MLP) was slower through the custom calls (docs/benchmarks.md).
F16_MIN_WORK = 1 << 22


def _work(a, b, b_c: int) -> int:
  """batch x M x N x K of a GEMM on 3-D operands (a's M and K are its last two axes either way)."""
  return max(a.shape[0], b.shape[0]) * a.shape[1] * a.shape[2] * b.shape[3 - b_c]


def f16_dot_kernel(policy: Policy) -> bool:
  """Whether FP16 x FP16 dots run on the AMX-BF16 FP16 GEMM (`jdfp._src.ffi.gemm_bf16.gemm_f16`):
  backend not "reference", CPU, ``isa="auto"`` and the tiles ready (`amx_bf16_ready`, ``JDFP_AMX``
  not 0), for dots of at least `F16_MIN_WORK` products.  Elsewhere they are XLA's FP32 dots of the
  widened operands: the same exact products, other float32 sums."""
  return (policy.backend != "reference" and jax.default_backend() == "cpu" and policy.isa == "auto"
          and ffi_gemm_bf16.amx_bf16_ready())


def bf16_dot_isa(policy: Policy) -> str | None:
  """The jdfp BF16 GEMM's ``isa`` for this policy's BF16 x BF16 dots, or None where they stay XLA's
  dots of the widened operands (the reference backend, no AVX512_BF16 and no AMX-BF16).

  ``isa="auto"`` on a CPU whose AMX-BF16 tiles are ready (`amx_bf16_ready`: Intel Sapphire Rapids and
  later, ``JDFP_AMX`` not 0) gives "amx_bf16": jdfp's GEMM on the tiles, 1.1-5x XLA's FP32 dot from
  64 x 128 x 10 up (docs/benchmarks.md, 2026-12-07 (19:00-)).  XLA's own bf16 dot ran on those tiles
  up to jax 0.12.0 but at FP32's speed from jax 0.12.1 on, so the recipe no longer depends on it.
  Elsewhere with AVX512_BF16, the vdpbf16ps chain ("scalar" where the policy names it).  Both are the
  recipe's arithmetic (exact bf16 products, float32 sums), each in its own documented order."""
  if policy.backend == "reference" or jax.default_backend() != "cpu":
    return None
  if policy.isa == "auto" and ffi_gemm_bf16.amx_bf16_ready():
    return "amx_bf16"
  if ffi_gemm_bf16.has_avx512_bf16():
    return "scalar" if policy.isa == "scalar" else "auto"
  return None


def bf16_dot_kernel(policy: Policy) -> bool:
  """Whether this policy's BF16 x BF16 dots run on a jdfp BF16 GEMM (`bf16_dot_isa`)."""
  return bf16_dot_isa(policy) is not None


@functools.partial(jax.named_call, name="jdfp_reference_gemm")
def reference_call(a, b, ea, eb, bits_a, bits_b, block, ta, tb):
  a = jnp.swapaxes(a, 1, 2) if ta else a
  b = jnp.swapaxes(b, 1, 2) if tb else b
  bsz = max(a.shape[0], b.shape[0], ea.shape[0], eb.shape[0])
  m, n = a.shape[1], b.shape[2]
  a = jnp.broadcast_to(a, (bsz,) + a.shape[1:])
  b = jnp.broadcast_to(b, (bsz,) + b.shape[1:])
  ea = jnp.broadcast_to(ea, (bsz, m, ea.shape[2]))
  eb = jnp.broadcast_to(eb, (bsz, eb.shape[1], n))
  return reference.reference_gemm(a, b, ea, eb, bits_a=bits_a, bits_b=bits_b, block_k=block)
