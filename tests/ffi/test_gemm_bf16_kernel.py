"""The C++ BF16 GEMM (jdfp/_src/ffi/gemm_bf16.py) against its contract, bit for bit.

Contract (docs/arithmetic.md, "BF16 GEMM"): each output is the chain of vdpbf16ps half-steps over
k-pairs, odd k first.  `_oracle` is an independent numpy model of it (float64 products and sums,
one rounding to 24 bits, FTZ, NaN precedence); the scalar path, the AVX512_BF16 path and the oracle
must agree bit for bit, NaN payloads included.  Values are also checked against a float64 dot within
the FP32-accumulation error bound.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jdfp
from jdfp import kernels
from kernel_testing import bits_eq

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="libjdfp_ffi.so not built")

if kernels.kernel_available():
  from jdfp._src.ffi.gemm_bf16 import gemm_bf16, has_avx512_bf16
  BF16_ISAS = ("scalar",) + (("avx512_bf16",) if has_avx512_bf16() else ())
else:
  BF16_ISAS = ()
needs_bf16 = pytest.mark.skipif("avx512_bf16" not in BF16_ISAS, reason="CPU lacks AVX512_BF16")

MIN_NORMAL = 2.0**-126


def _bits16(x) -> np.ndarray:
  return np.asarray(x).view(np.uint16) if np.asarray(x).dtype != np.uint16 else np.asarray(x)


def _bf16(bits) -> jax.Array:
  return jnp.asarray(np.asarray(bits, np.uint16).view(jnp.bfloat16))


def _daz(h):
  f = (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
  return np.where((h & 0x7F80) == 0, np.where(h & 0x8000, -0.0, 0.0), f)


def _step(acc, a, b):
  """One vdpbf16ps half-step on float32 acc and bf16 bits a, b (broadcast), as the contract says."""
  with np.errstate(over="ignore", invalid="ignore"):
    ab = acc.view(np.uint32)
    c = np.where((ab & 0x7F800000) == 0, np.where(ab >> 31, -0.0, 0.0), acc.astype(np.float64))
    s = c + _daz(a) * _daz(b)
    m = np.abs(s)
    r = s.astype(np.float32)
    tiny = np.where(m >= MIN_NORMAL - 2.0**-151, np.float32(MIN_NORMAL), np.float32(0))
    r = np.where(m < MIN_NORMAL, np.where(np.signbit(s), -tiny, tiny), r).astype(np.float32)
    r = np.where(np.isnan(s), np.uint32(0xFFC00000).view(np.float32), r)
    bits = r.view(np.uint32)
    nan16 = lambda h: ((h & 0x7F80) == 0x7F80) & ((h & 0x7F) != 0)
    bits = np.where((ab & 0x7FFFFFFF) > 0x7F800000, ab | 0x00400000, bits)
    bits = np.where(nan16(b), (b.astype(np.uint32) << 16) | 0x00400000, bits)
    bits = np.where(nan16(a), (a.astype(np.uint32) << 16) | 0x00400000, bits)
    return bits.astype(np.uint32).view(np.float32)


def _oracle(a_bits, b_bits):
  """[M, K] x [K, N] bf16 bits -> float32 [M, N] by the contract's chain."""
  m, k = a_bits.shape
  n = b_bits.shape[1]
  acc = np.zeros((m, n), np.float32)
  for k0 in range(0, k, 2):
    if k0 + 1 < k:
      acc = _step(acc, a_bits[:, k0 + 1, None], b_bits[None, k0 + 1, :])
    else:
      acc = _step(acc, np.zeros((m, 1), np.uint16), np.zeros((1, n), np.uint16))
    acc = _step(acc, a_bits[:, k0, None], b_bits[None, k0, :])
  return acc


def _random_bits(rng, shape, special=0.1, lo=-20, hi=20):
  """bf16 bit patterns: normals with exponents in [lo, hi], plus a `special` share of zeros,
  denormals, Inf and NaN (quiet and signalling)."""
  e = rng.integers(lo, hi + 1, shape) + 127
  bits = (rng.integers(0, 2, shape) << 15) | (e << 7) | rng.integers(0, 128, shape)
  kind = rng.random(shape)
  den = (rng.integers(0, 2, shape) << 15) | rng.integers(0, 128, shape)
  inf = (rng.integers(0, 2, shape) << 15) | 0x7F80
  nan = inf | rng.integers(1, 128, shape)
  bits = np.where(kind < special * 0.5, den, bits)
  bits = np.where((kind >= special * 0.5) & (kind < special * 0.75), inf, bits)
  bits = np.where((kind >= special * 0.75) & (kind < special), nan, bits)
  return bits.astype(np.uint16)


def _run(a_bits, b_bits, isa, **kw):
  return np.asarray(gemm_bf16(_bf16(a_bits), _bf16(b_bits), isa=isa, **kw))


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 2), (3, 5, 7), (14, 32, 2), (15, 33, 3), (29, 65, 385),
                                   (40, 100, 400)])
@pytest.mark.parametrize("special", [0.0, 0.15])
def test_paths_equal_oracle(shape, special):
  m, n, k = shape
  rng = np.random.default_rng(m * 1000 + n * 10 + k)
  a, b = _random_bits(rng, (m, k), special), _random_bits(rng, (k, n), special)
  want = _oracle(a, b)
  for isa in BF16_ISAS:
    bits_eq(_run(a, b, isa), want)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 30), n=st.integers(1, 40), k=st.integers(1, 70), seed=st.integers(0, 2**31),
       lo=st.integers(-140, 100))
def test_paths_equal_oracle_any_range(m, n, k, seed, lo):
  """Exponents anywhere (products far below 2**-126 or beyond float32's range included)."""
  rng = np.random.default_rng(seed)
  a = _random_bits(rng, (m, k), 0.1, lo=max(lo, -126), hi=min(lo + 40, 127))
  b = _random_bits(rng, (k, n), 0.1, lo=max(-lo - 40, -126), hi=min(-lo, 127))
  want = _oracle(a, b)
  for isa in BF16_ISAS:
    bits_eq(_run(a, b, isa), want)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(2, 12))
def test_near_min_normal(seed, k):
  """Sums that cancel to within a few ulps of 2**-126: the 24-bit rounding and flush boundary."""
  rng = np.random.default_rng(seed)
  m, n = 16, 33
  a = _random_bits(rng, (m, k), 0.0, lo=-70, hi=-55)
  b = _random_bits(rng, (k, n), 0.0, lo=-75, hi=-55)
  want = _oracle(a, b)
  for isa in BF16_ISAS:
    bits_eq(_run(a, b, isa), want)


def _bf(x):
  return np.asarray(np.asarray(x, np.float32).astype(jnp.bfloat16)).view(np.uint16)


@pytest.mark.parametrize("isa", BF16_ISAS)
def test_documented_cases(isa):
  """The vdpbf16ps behaviours docs/arithmetic.md lists, one output each (K = 2: out = (0 + a1 b1) + a0 b0)."""
  cases = [  # (a0, a1, b0, b1, expected float32)
      (1.0, 2.0**-12, 1.0, 2.0**-12, 1.0),  # 0 + 2**-24, then + 1: the odd pair goes first, 1 + 2**-24 ties to 1
      (1.5 * 2.0**-12, 1.0, 2.0**-12, 1.0, 1.0 + 2.0**-23),  # 1, then + 1.5 * 2**-24: one rounding per step
      (2.0**-70, 1.0, 2.0**-70, 2.0**-126, MIN_NORMAL + 2.0**-140),  # a product below 2**-126 still counts
      (-2.0**-75, 1.0, 2.0**-75, 2.0**-126, 0.0),  # 2**-126 - 2**-150 rounds (24 bits) below 2**-126: flushed
      (2.0**-63, 2.0**-63, 2.0**-63, 2.0**-64, MIN_NORMAL),  # 0 + 2**-127 flushes to 0 before + 2**-126
      (2.0**100, 2.0**100, 2.0**100, -2.0**100, -np.inf),  # 0 - 2**200 rounds to -Inf; -Inf + 2**200 = -Inf
  ]
  for a0, a1, b0, b1, want in cases:
    a = _bf([[a0, a1]])
    b = _bf([[b0], [b1]])
    got = _run(a, b, isa)[0, 0]
    assert got == np.float32(want) or (np.isnan(want) and np.isnan(got)), (a0, a1, b0, b1, got, want)
  # Denormal bf16 inputs read as zero: 2**-130 * 2**100 would be 2**-30.
  a = np.array([[0x0010, 0]], np.uint16)  # 2**-130 (bf16 denormal)
  b = _bf([[2.0**100], [0.0]])
  assert _run(a, b, isa)[0, 0] == 0.0
  # A finite product beyond float32's range is not Inf by itself: -Inf + (huge finite) = -Inf, not NaN.
  a = _bf([[2.0**100, -np.inf]])
  b = _bf([[2.0**100], [1.0]])
  assert _run(a, b, isa)[0, 0] == -np.inf
  # Inf * 0 and Inf - Inf: the default NaN.
  a = _bf([[np.inf, 0.0]])
  b = _bf([[0.0], [0.0]])
  assert _run(a, b, isa)[0, 0].view(np.uint32) == 0xFFC00000
  # NaN payload: the first NaN of (a, b), quieted.
  a = np.array([[0, 0x7F81]], np.uint16)
  b = np.array([[0], [0x7FC5]], np.uint16)
  assert _run(a, b, isa)[0, 0].view(np.uint32) == 0x7FC10000


def test_error_bound_vs_float64():
  rng = np.random.default_rng(7)
  for m, n, k in [(64, 48, 1000), (10, 10, 4097)]:
    a = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ref = a64 @ b64
    bound = k * 2.0**-24 * (np.abs(a64) @ np.abs(b64))
    for isa in BF16_ISAS:
      out = np.asarray(gemm_bf16(a, b, isa=isa))
      assert np.all(np.abs(out - ref) <= bound)


@pytest.mark.parametrize("isa", BF16_ISAS)
def test_layouts_and_batch(isa):
  rng = np.random.default_rng(3)
  a = _random_bits(rng, (2, 1, 19, 37), 0.0)
  b = _random_bits(rng, (1, 3, 37, 45), 0.0)
  want = np.stack([np.stack([_oracle(a[i, 0], b[0, j]) for j in range(3)]) for i in range(2)])
  bits_eq(_run(a, b, isa), want)
  at, bt = np.swapaxes(a, -1, -2).copy(), np.swapaxes(b, -1, -2).copy()
  bits_eq(_run(at, b, isa, transpose_a=True), want)
  bits_eq(_run(a, bt, isa, transpose_b=True), want)
  bits_eq(_run(at, bt, isa, transpose_a=True, transpose_b=True), want)
  # Unbatched b against batched a.
  bits_eq(_run(a[:, 0], b[0, 0], isa), np.stack([_oracle(a[i, 0], b[0, 0]) for i in range(2)]))


@pytest.mark.parametrize("isa", BF16_ISAS)
def test_empty_and_k0(isa):
  assert _run(np.zeros((0, 5), np.uint16), np.zeros((5, 3), np.uint16), isa).shape == (0, 3)
  assert _run(np.zeros((4, 5), np.uint16), np.zeros((5, 0), np.uint16), isa).shape == (4, 0)
  out = _run(np.zeros((4, 0), np.uint16), np.zeros((0, 3), np.uint16), isa)
  bits_eq(out, np.zeros((4, 3), np.float32))  # the empty sum is +0


@pytest.mark.parametrize("isa", BF16_ISAS)
def test_float32_operands_round_while_packing(isa):
  rng = np.random.default_rng(5)
  a = rng.standard_normal((30, 70)).astype(np.float32)
  b = rng.standard_normal((70, 50)).astype(np.float32)
  a[0, :3] = [np.nan, np.inf, 3e38]
  want = np.asarray(gemm_bf16(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16), isa=isa))
  bits_eq(gemm_bf16(jnp.asarray(a), jnp.asarray(b), isa=isa), want)
  bits_eq(gemm_bf16(jnp.asarray(a), jnp.asarray(b, jnp.bfloat16), isa=isa), want)
  bits_eq(gemm_bf16(jnp.asarray(a.T.copy()), jnp.asarray(b.T.copy()), transpose_a=True, transpose_b=True,
                    isa=isa), want)


@needs_bf16
def test_large_jit_vmap_and_thread_count_independence():
  rng = np.random.default_rng(11)
  a = jnp.asarray(rng.standard_normal((3, 300, 777)), jnp.bfloat16)
  b = jnp.asarray(rng.standard_normal((777, 260)), jnp.bfloat16)
  out = np.asarray(jax.jit(lambda a, b: gemm_bf16(a, b))(a, b))
  bits_eq(out, gemm_bf16(a, b, isa="scalar"))
  bits_eq(jax.vmap(lambda x: gemm_bf16(x, b))(a), out)
  # Many tiles, every layout and float32 operands: the same bits.
  at, bt = jnp.swapaxes(a, -1, -2), b.T
  bits_eq(gemm_bf16(at, bt, transpose_a=True, transpose_b=True), out)
  bits_eq(gemm_bf16(a.astype(jnp.float32), bt.astype(jnp.float32), transpose_b=True), out)
  bits_eq(gemm_bf16(at.astype(jnp.float32), b, transpose_a=True), out)
  script = textwrap.dedent("""
      import sys, numpy as np, jax.numpy as jnp
      from jdfp._src.ffi.gemm_bf16 import gemm_bf16
      rng = np.random.default_rng(11)
      a = jnp.asarray(rng.standard_normal((3, 300, 777)), jnp.bfloat16)
      b = jnp.asarray(rng.standard_normal((777, 260)), jnp.bfloat16)
      np.save(sys.argv[1], np.asarray(gemm_bf16(a, b)))
  """)
  for threads in ("1", "2", "3"):
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"jdfp_bf16_{os.getpid()}_{threads}.npy")
    # The child imports the jdfp this process imported (installed, or a dev tree with its library),
    # not an unbuilt source checkout in the working directory.
    root = os.path.dirname(os.path.dirname(os.path.abspath(jdfp.__file__)))
    env = dict(os.environ, JDFP_THREADS=threads, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # cwd too: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH.
    subprocess.run([sys.executable, "-c", script, path], check=True, env=env, cwd=root)
    bits_eq(np.load(path), out)
    os.remove(path)


@needs_bf16
def test_long_k_without_b_cache():
  """K long enough that a worker's packed B exceeds its cache (16 MiB): packed per kc block instead."""
  rng = np.random.default_rng(13)
  a = jnp.asarray(rng.standard_normal((2, 140001)), jnp.bfloat16)
  b = jnp.asarray(rng.standard_normal((140001, 33)), jnp.bfloat16)
  bits_eq(gemm_bf16(a, b), gemm_bf16(a, b, isa="scalar"))


def test_bad_input():
  a = jnp.zeros((4, 5), jnp.bfloat16)
  with pytest.raises(TypeError, match="a must have dtype bfloat16 or float32"):
    gemm_bf16(jnp.zeros((4, 5), jnp.float16), a.T)
  with pytest.raises(TypeError, match="b must have dtype"):
    gemm_bf16(a, jnp.zeros((5, 4), jnp.int16))
  with pytest.raises(ValueError, match="rank >= 2"):
    gemm_bf16(jnp.zeros((5,), jnp.bfloat16), a.T)
  with pytest.raises(ValueError, match="contraction dims differ"):
    gemm_bf16(a, a)
  with pytest.raises(ValueError, match="do not broadcast"):
    gemm_bf16(jnp.zeros((2, 4, 5), jnp.bfloat16), jnp.zeros((3, 5, 4), jnp.bfloat16))
  with pytest.raises(ValueError, match="isa must be one of"):
    gemm_bf16(a, a.T, isa="avx512_vnni")
  with pytest.raises(TypeError, match="transpose_a must be a bool"):
    gemm_bf16(a, a.T, transpose_a=1)


def test_ffi_errors_name_the_argument():
  """The C++ side checks too (a direct ffi_call bypassing the wrapper)."""
  call = jax.ffi.ffi_call("jdfp_gemm_bf16", jax.ShapeDtypeStruct((4, 4), jnp.float32))
  with pytest.raises(Exception, match="jdfp gemm_bf16: a must be bfloat16 or float32"):
    call(jnp.zeros((4, 5), jnp.int32), jnp.zeros((5, 4), jnp.bfloat16), transpose_a=False, transpose_b=False,
         isa=np.int32(0)).block_until_ready()
  with pytest.raises(Exception, match="jdfp gemm_bf16: isa must be"):
    call(jnp.zeros((4, 5), jnp.bfloat16), jnp.zeros((5, 4), jnp.bfloat16), transpose_a=False,
         transpose_b=False, isa=np.int32(7)).block_until_ready()
  with pytest.raises(Exception, match="jdfp gemm_bf16: out must be"):
    call(jnp.zeros((4, 5), jnp.bfloat16), jnp.zeros((5, 3), jnp.bfloat16), transpose_a=False,
         transpose_b=False, isa=np.int32(0)).block_until_ready()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.int16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (64, 96), (3, 65, 31), (2, 1, 40, 1), (0, 5), (2, 0, 3)])
def test_transpose16_is_an_exact_copy(dtype, shape):
  """The copy XLA cannot fold into a dot (ops/gemm.py: AMX bf16 weight-gradients): every bit, NaN
  payloads and signed zeros included, any batch, sizes across the 32 x 32 blocks, jit and vmap."""
  from jdfp._src.ffi.gemm_bf16 import transpose16

  bits = np.random.default_rng(sum(shape)).integers(0, 2**16, shape, dtype=np.uint16)
  x = jnp.asarray(bits.view(np.int16).view(jnp.dtype(dtype)))
  want = np.swapaxes(bits, -1, -2)
  got = jax.jit(transpose16)(x)
  assert got.dtype == x.dtype and got.shape == want.shape
  np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want)
  if len(shape) == 3:
    np.testing.assert_array_equal(np.asarray(jax.vmap(transpose16)(x)).view(np.uint16), want)


def test_transpose16_rejects_bad_input():
  from jdfp._src.ffi.gemm_bf16 import transpose16

  with pytest.raises(TypeError, match="x must have a 16-bit dtype"):
    transpose16(jnp.ones((2, 3), jnp.float32))
  with pytest.raises(ValueError, match="rank >= 2"):
    transpose16(jnp.ones((3,), jnp.bfloat16))
  # The C++ side checks what a direct ffi_call could get wrong (an error, never a stray write).
  from jdfp._src.ffi.gemm_bf16 import _register
  _register()
  x = jnp.zeros((3, 4), jnp.bfloat16)
  for out in (jax.ShapeDtypeStruct((2, 3), jnp.bfloat16), jax.ShapeDtypeStruct((4, 3, 1), jnp.bfloat16)):
    with pytest.raises(Exception, match="jdfp transpose16: result shape"):
      jax.ffi.ffi_call("jdfp_transpose16", out)(x).block_until_ready()
  with pytest.raises(Exception, match="jdfp transpose16: x and the result must have one 16-bit dtype"):
    jax.ffi.ffi_call("jdfp_transpose16", jax.ShapeDtypeStruct((4, 3), jnp.float32))(x).block_until_ready()
  with pytest.raises(Exception, match="jdfp transpose16: x must have rank >= 2"):
    jax.ffi.ffi_call("jdfp_transpose16", jax.ShapeDtypeStruct((3,), jnp.bfloat16))(
        jnp.zeros((3,), jnp.bfloat16)).block_until_ready()
