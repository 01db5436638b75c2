"""Python side of ``xla_ffi/gemm_bf16_ffi.cc``: the BF16 GEMM on ``vdpbf16ps`` (docs/arithmetic.md,
"BF16 GEMM") as a JAX op."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jdfp._src.ffi.library import dtype_of, kernel_available, require_lib

__all__ = ["BF16_ISA_NAMES", "gemm_bf16", "has_avx512_bf16"]

TARGET_GEMM_BF16 = "jdfp_gemm_bf16"
# The handler's `isa` attribute: "auto" is avx512_bf16 where the CPU has it, else scalar.
BF16_ISA_NAMES = ("auto", "scalar", "avx512_bf16")


@functools.cache
def _register() -> None:
  lib = require_lib()
  jax.ffi.register_ffi_target(TARGET_GEMM_BF16, jax.ffi.pycapsule(lib.JdfpGemmBf16), platform="cpu")


@functools.cache
def has_avx512_bf16() -> bool:
  """True when the library is loaded and this CPU/OS runs the AVX512_BF16 path (cpuid, in C++)."""
  return kernel_available() and bool(require_lib().jdfp_has_avx512_bf16())


def gemm_bf16(a, b, *, transpose_a: bool = False, transpose_b: bool = False, isa: str = "auto") -> jax.Array:
  """``float32 [..., M, N]`` = the ``vdpbf16ps`` chain over K of ``a x b`` (docs/arithmetic.md).

  Args:
    a: bfloat16 ``[..., M, K]`` (``[..., K, M]`` with ``transpose_a``); float32 is rounded to
      bfloat16 (nearest-even) while packing, the same as ``a.astype(jnp.bfloat16)`` first.
    b: bfloat16 or float32 ``[..., K, N]`` (``[..., N, K]`` with ``transpose_b``).
    transpose_a, transpose_b: the operand layouts above (no copies are made).
    isa: "auto", "scalar" (the same arithmetic element by element) or "avx512_bf16" (fails at run
      time on a CPU without AVX512_BF16).

  Leading batch dims broadcast numpy-style (size 1 is read with stride 0, never copied).
  """
  if isa not in BF16_ISA_NAMES:
    raise ValueError(f"isa must be one of {BF16_ISA_NAMES}, got {isa!r}")
  for name, flag in (("transpose_a", transpose_a), ("transpose_b", transpose_b)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"{name} must be a bool, got {flag!r}")
  for name, x in (("a", a), ("b", b)):
    dt = dtype_of(name, x)
    if dt != jnp.bfloat16 and dt != np.float32:
      raise TypeError(f"{name} must have dtype bfloat16 or float32, got {dt.name}")
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
  _register()
  call = jax.ffi.ffi_call(TARGET_GEMM_BF16, jax.ShapeDtypeStruct(tuple(batch) + (m, n), jnp.float32),
                          vmap_method="expand_dims")
  return call(a, b, transpose_a=bool(transpose_a), transpose_b=bool(transpose_b),
              isa=np.int32(BF16_ISA_NAMES.index(isa)))
