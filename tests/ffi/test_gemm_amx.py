"""The INT16 GEMM's AMX-INT8 path (xla_ffi/kernel_amx.cc): what ``isa="auto"`` runs on CPUs with AMX
tiles for GEMMs with one exponent pair per output element.  Its own edges: the K limit of its
int32 tile sums, the 16 x 64 tile padding, every operand layout, float inputs, range errors.
(test_gemm_kernel.py runs its whole suite with ``isa="auto"`` too.)"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from jdfp import kernels
from kernel_testing import bits_eq, qmax
from test_gemm_kernel import NONFINITE, _ftz_case, _oracle, _rand_case, _run

pytestmark = pytest.mark.skipif(not (kernels.kernel_available() and kernels.has_amx_int8()),
                                reason="no AMX-INT8 tiles on this CPU (or JDFP_AMX=0)")

K_MAX = 16384  # kAmxMaxK: longest K whose byte-product tile sums cannot leave int32


def _both(a, b, ea, eb, **kw):
  """The AMX path (auto) against the AVX-512 kernel and the numpy oracle, bit for bit."""
  got = _run(a, b, ea, eb, isa="auto", **kw)
  bits_eq(got, _run(a, b, ea, eb, isa="avx512_vnni", **kw))
  if not (np.asarray(a).dtype == np.float32 or np.asarray(b).dtype == np.float32):
    bits_eq(got, _oracle(a, b, ea, eb, **kw))
  return got


@pytest.mark.parametrize("k", [K_MAX, K_MAX + 1])
@pytest.mark.parametrize("bits", [16, 15])
def test_all_max_at_the_k_limit(k, bits):
  # Every product +-qmax**2 at the longest K the tiles take (and one past it, which the AVX-512
  # kernel runs): the high-byte sums reach K * 2**14, the mixed ones K * 65280, the low ones
  # K * 255**2; alternating signs cancel exactly.
  q = qmax(bits)
  a = np.full((18, k), q, np.int16)
  a[1] = -q
  a[2, ::2] = -q
  a[3] = -q if bits == 16 else q - 1
  b = np.full((k, 17), q, np.int16)
  b[:, 3] = -q
  b[::3, 5] = -q
  e = np.zeros((1, 1), np.int32)
  got = _both(a, b, e, e, bits_a=bits, bits_b=bits)
  assert got[0, 0] == np.float32(k * q * q)


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_layouts_edges_and_exponents(ta, tb):
  # Sizes on both sides of the 16-row / 16-column / 64-k tile edges; per-tensor, per-row and
  # per-column exponents; batch broadcasting; NONFINITE rows and columns.
  rng = np.random.default_rng(3)
  for m, k, n, batch_a, batch_b in ((16, 64, 16, (), ()), (17, 65, 33, (2,), (1,)), (1, 32, 1, (), ()),
                                    (47, 200, 15, (3,), (3,)), (130, 1000, 70, (), (2,))):
    a, b, ea, eb = _rand_case(rng, batch_a, batch_b, m, k, n, 16, 16, None, ta, tb, erange=30)
    kw = dict(bits_a=16, bits_b=16, transpose_a=ta, transpose_b=tb)
    _both(a, b, ea, eb, **kw)
    _both(a, b, ea[..., :1, :], eb[..., :, :1], **kw)  # one exponent per operand
    ea[..., m // 2, 0] = NONFINITE
    eb[..., 0, n - 1] = NONFINITE
    got = _both(a, b, ea, eb, **kw)
    assert np.isnan(got[..., m // 2, :]).all() and np.isnan(got[..., :, n - 1]).all()


@pytest.mark.parametrize("bits", [8, 16])
def test_ftz_at_the_normal_boundary(bits):
  # test_gemm_kernel's FTZ rows (block values and their scale2 just below / at / above 2**-126, both
  # signs) with K = 32, so that the tiles take them: the one-exponent-pair epilogue flushes as scale2.
  a, b, ea, eb = _ftz_case(1, 32)
  want = _oracle(a, b, ea, eb, bits_a=bits, bits_b=bits)
  bits_eq(_run(a, b, ea, eb, isa="auto", bits_a=bits, bits_b=bits), want)
  if bits == 8:
    bits_eq(kernels.gemm_i8(a.astype(np.int8), b.astype(np.int8), ea, eb, bits_a=8, bits_b=8, isa="auto"), want)


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_float_inputs_quantized_while_packing(ta, tb):
  rng = np.random.default_rng(4)
  m, k, n = 37, 150, 29
  a = (rng.standard_normal((k, m) if ta else (m, k)) * 4).astype(np.float32)
  b = (rng.standard_normal((n, k) if tb else (k, n)) * 0.02).astype(np.float32)
  a.flat[5] = np.nan  # NaN quantizes to 0 (its group's exponent would be NONFINITE in practice)
  b.flat[7] = 1e30    # clipped to qmax
  ea = rng.integers(-14, -11, (m, 1)).astype(np.int32)
  eb = rng.integers(-22, -19, (1, n)).astype(np.int32)
  for bits in (16, 12):
    kw = dict(bits_a=bits, bits_b=bits, transpose_a=ta, transpose_b=tb)
    _both(a, b, ea, eb, **kw)
    _both(a, b.astype(np.float32), ea[:1], eb[:, :1], **kw)


@pytest.mark.parametrize("gemm,dtype,lowest", [(kernels.gemm, np.int16, -32768), (kernels.gemm_i8, np.int8, -128)])
def test_out_of_range_values_are_an_error(gemm, dtype, lowest):
  # The INT16 and INT8 paths check the range while packing: the type's lowest value, or one past
  # a narrower format's qmax, fails the call.
  a = np.zeros((20, 64), dtype)
  b = np.zeros((64, 20), dtype)
  e = np.zeros((1, 1), np.int32)
  bits = 8 * np.dtype(dtype).itemsize
  bad = a.copy()
  bad[19, 63] = lowest
  with pytest.raises(Exception, match="outside"):
    np.asarray(gemm(bad, b, e, e, bits_a=bits, bits_b=bits, isa="auto"))
  bad_b = b.copy()
  bad_b[40, 17] = 8  # qmax(4) = 7
  with pytest.raises(Exception, match="operand b"):
    np.asarray(gemm(a, bad_b, e, e, bits_a=bits, bits_b=4, isa="auto"))


def test_jdfp_amx_0_turns_it_off(tmp_path):
  # cwd outside the checkout, so the installed jdfp (with its library) is the one imported.
  code = "from jdfp import kernels; print(kernels.kernel_available(), kernels.has_amx_int8())"
  env = dict(os.environ, JDFP_AMX="0")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["True", "False"]


def test_has_amx_int8_matches_cpuinfo():
  flags = set()
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("flags"):
        flags = set(line.split(":", 1)[1].split())
        break
  assert {"amx_tile", "amx_int8"} <= flags


# ---------------------------------------------------------------- the INT8 GEMM (kernel_amx_i8.cc)
K_MAX_I8 = 131072  # kAmxI8MaxK: 131072 * 127**2 < 2**31


def _both_i8(a, b, ea, eb, **kw):
  """The INT8 GEMM's AMX path (auto) against its vpdpbusd kernel and the numpy oracle."""
  got = np.asarray(kernels.gemm_i8(a, b, ea, eb, isa="auto", **kw))
  bits_eq(got, np.asarray(kernels.gemm_i8(a, b, ea, eb, isa="avx512_vnni", **kw)))
  bits_eq(got, _oracle(a, b, ea, eb, **kw))
  return got


@pytest.mark.parametrize("k", [K_MAX_I8, K_MAX_I8 + 1])
def test_i8_all_max_at_the_k_limit(k):
  a = np.full((17, k), 127, np.int8)
  a[1] = -127
  a[2, ::2] = -127
  b = np.full((k, 18), 127, np.int8)
  b[:, 3] = -127
  e = np.zeros((1, 1), np.int32)
  got = _both_i8(a, b, e, e, bits_a=8, bits_b=8)
  assert got[0, 0] == np.float32(k * 127 * 127)


@pytest.mark.parametrize("block_k", [24, 32, 64, 8, 12, 7, 100, None])
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_i8_blocks_layouts_and_edges(block_k, ta, tb):
  # HBFP's 24-long blocks, MX's 32, blocks the tiles do not take (7: not a multiple of 4, 100: > 64),
  # a short last block, edges of the 16 x 16 tiles, per-row / per-column exponents.
  rng = np.random.default_rng(5)
  for m, k, n in ((16, 96, 16), (33, 100, 17), (70, 530, 45)):
    a, b, ea, eb = _rand_case(rng, (), (), m, k, n, 8, 8, block_k, ta, tb, erange=20)
    kw = dict(bits_a=8, bits_b=8, block_k=block_k, transpose_a=ta, transpose_b=tb)
    _both_i8(a.astype(np.int8), b.astype(np.int8), ea, eb, **kw)


def test_i8_blocks_with_inexact_scales_or_nonfinite_exponents():
  # The tiles' blocked accumulation needs every exponent pair to scale exactly; otherwise (extreme
  # exponents, NONFINITE) the call runs on the vpdpbusd kernel: the same bits either way.
  rng = np.random.default_rng(6)
  a, b, ea, eb = _rand_case(rng, (), (), 40, 240, 30, 8, 8, 24)
  a, b = a.astype(np.int8), b.astype(np.int8)
  kw = dict(bits_a=8, bits_b=8, block_k=24)
  _both_i8(a, b, ea, eb, **kw)
  for value in (-140, 130, 70, NONFINITE):
    e2 = ea.copy()
    e2[3, 2] = value
    got = _both_i8(a, b, e2, eb, **kw)
    assert np.isnan(got[3]).all() == (value == NONFINITE)


def test_interleaved_with_xlas_own_amx_dots():
  # XLA's bf16 dots run on the same tiles (YNNPACK) and keep their own tile configuration: jdfp's
  # kernels load theirs per tile and release it after, so the two can alternate on the same threads.
  import jax
  import jax.numpy as jnp
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.standard_normal((256, 256)), jnp.float32)
  a16 = jnp.asarray(rng.integers(-8000, 8000, (256, 256)), jnp.int16)
  a8 = jnp.asarray(rng.integers(-100, 100, (256, 256)), jnp.int8)
  e = jnp.zeros((1, 1), jnp.int32)

  @jax.jit
  def program(x):
    acc = jnp.zeros((256, 256), jnp.float32)
    for _ in range(4):
      xb = x.astype(jnp.bfloat16)
      acc = acc + jax.lax.dot(xb, xb, preferred_element_type=jnp.float32) * 1e-3
      acc = acc + kernels.gemm(a16, a16, e, e, bits_a=16, bits_b=16) * 1e-9
      acc = acc + kernels.gemm_i8(a8, a8, e, e, bits_a=8, bits_b=8) * 1e-6
      x = x + 1e-3 * jnp.tanh(acc)
    return acc

  first = np.asarray(program(x))
  for _ in range(10):
    bits_eq(np.asarray(program(x)), first)
