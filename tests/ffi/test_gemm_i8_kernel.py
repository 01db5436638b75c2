"""The C++ exact INT8 GEMM (vpdpbusd, ffi.gemm_i8) bit for bit against the INT16 kernel and the
pure-JAX reference, on every ISA path.

The contract (docs/arithmetic.md) makes the result independent of where chains are cut, so for the
same int8 values and exponents the INT8 kernel, the INT16 kernel and `reference_gemm` must agree on
every bit, NaN payloads aside (both kernels produce the same default NaN).
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
from jdfp._src.ffi import library
from jdfp._src.ffi.gemm import gemm as gemm_i16
from jdfp._src.ffi.gemm_i8 import gemm_i8
from jdfp._src.numerics import reference as ref
from kernel_testing import bits_eq, gemm_isas, qmax

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="libjdfp_ffi.so not built")


@pytest.fixture(params=gemm_isas(), scope="module")
def isa(request) -> str:
  """Each ISA path in turn, and "auto" where it means the AMX-INT8 tiles (tdpbssd)."""
  return request.param


NONFINITE = 2**30
L88 = 133144  # longest safe int32 chain at bits 8/8: floor((2**31 - 1) / 127**2)


def _case(rng, batch_a, batch_b, m, k, n, bits_a=8, bits_b=8, block_k=None, ta=False, tb=False, erange=6,
          ea_rows=True, eb_cols=True):
  bk = max(k, 1) if block_k is None else block_k
  kb = -(-k // bk)
  a = rng.integers(-qmax(bits_a), qmax(bits_a) + 1, batch_a + ((k, m) if ta else (m, k))).astype(np.int8)
  b = rng.integers(-qmax(bits_b), qmax(bits_b) + 1, batch_b + ((n, k) if tb else (k, n))).astype(np.int8)
  ea = rng.integers(-erange, erange + 1, batch_a + (m if ea_rows else 1, kb), dtype=np.int32)
  eb = rng.integers(-erange, erange + 1, batch_b + (kb, n if eb_cols else 1), dtype=np.int32)
  return a, b, ea, eb


def _i8(a, b, ea, eb, **kw):
  return np.asarray(gemm_i8(jnp.asarray(a), jnp.asarray(b), jnp.asarray(ea), jnp.asarray(eb), **kw))


def _i16(a, b, ea, eb, **kw):
  kw = {k: v for k, v in kw.items() if k != "isa"}
  return np.asarray(gemm_i16(jnp.asarray(a, jnp.int16), jnp.asarray(b, jnp.int16), jnp.asarray(ea),
                             jnp.asarray(eb), **kw))


def _lead(a, b, ea, eb, *, transpose_a=False, transpose_b=False, **kw):
  """reference_gemm ([B, M, K] x [B, K, N]) on the same values, batch dims broadcast."""
  a = np.asarray(a, np.int16)
  b = np.asarray(b, np.int16)
  if transpose_a:
    a = np.swapaxes(a, -1, -2)
  if transpose_b:
    b = np.swapaxes(b, -1, -2)
  m, k = a.shape[-2:]
  n = b.shape[-1]
  batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2], ea.shape[:-2], eb.shape[:-2])
  kb = ea.shape[-1]
  flat = lambda x, tail: np.broadcast_to(x, batch + tail).reshape((-1,) + tail)
  out = ref.reference_gemm(jnp.asarray(flat(a, (m, k))), jnp.asarray(flat(b, (k, n))),
                           jnp.asarray(flat(ea, (m, kb))), jnp.asarray(flat(eb, (kb, n))), **kw)
  return np.asarray(out).reshape(batch + (m, n))


def _check(a, b, ea, eb, isa, lead=True, **kw):
  got = _i8(a, b, ea, eb, isa=isa, **kw)
  bits_eq(got, _i16(a, b, ea, eb, **kw))
  if lead:
    bits_eq(got, _lead(a, b, ea, eb, **kw))
  return got


@pytest.mark.parametrize("block_k", [None, 8, 24, 32])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 7, 9), (13, 33, 31), (12, 64, 32), (25, 100, 67), (7, 3, 40)])
def test_shapes_and_blocks(isa, m, k, n, block_k):
  rng = np.random.default_rng(m * 1000 + k * 10 + n)
  a, b, ea, eb = _case(rng, (), (), m, k, n, block_k=block_k)
  _check(a, b, ea, eb, isa, bits_a=8, bits_b=8, block_k=block_k)


@pytest.mark.parametrize("ea_rows,eb_cols", [(False, False), (True, False), (False, True), (True, True)])
def test_per_tensor_row_column_exponents(isa, ea_rows, eb_cols):
  rng = np.random.default_rng(7)
  for bk in (None, 24):
    a, b, ea, eb = _case(rng, (), (), 37, 150, 45, block_k=bk, ea_rows=ea_rows, eb_cols=eb_cols, erange=30)
    _check(a, b, ea, eb, isa, bits_a=8, bits_b=8, block_k=bk)


def test_hbfp_tiles_and_mx_blocks(isa):
  # HBFP 24 x 24 tiles (a: per (row tile, k block), b: per (k block, column tile)) and MX blocks of 32.
  rng = np.random.default_rng(11)
  m, k, n = 50, 96, 70
  a, b, ea, eb = _case(rng, (), (), m, k, n, block_k=24, erange=12)
  ea = np.repeat(ea[::24], 24, axis=0)[:m]
  eb = np.repeat(eb[:, ::24], 24, axis=1)[:, :n]
  _check(a, b, ea, eb, isa, bits_a=8, bits_b=8, block_k=24)
  a, b, ea, eb = _case(rng, (), (), m, 100, n, block_k=32, erange=12)
  _check(a, b, ea, eb, isa, bits_a=8, bits_b=8, block_k=32)


@pytest.mark.parametrize("ta,tb", [(False, True), (True, False), (True, True)])
def test_transposes(isa, ta, tb):
  rng = np.random.default_rng(5)
  for bk in (None, 24):
    a, b, ea, eb = _case(rng, (), (), 29, 77, 35, block_k=bk, ta=ta, tb=tb)
    _check(a, b, ea, eb, isa, bits_a=8, bits_b=8, block_k=bk, transpose_a=ta, transpose_b=tb)


@pytest.mark.parametrize("m", [47, 48, 49, 100, 301])
def test_transposed_a_panel_groups(isa, m):
  # a transposed packs 48 rows (whole 6- and 12-row panels) per step on AVX-512: groups cut at the
  # tile's last row, several groups and tiles, ragged pieces (K = 77, block_k 24 and 10), row sums.
  rng = np.random.default_rng(m)
  for bk in (None, 24, 10):
    a, b, ea, eb = _case(rng, (), (), m, 77, 40, block_k=bk, ta=True, erange=10)
    _check(a, b, ea, eb, isa, bits_a=8, bits_b=8, block_k=bk, transpose_a=True)


def test_batch_dims_and_broadcast(isa):
  rng = np.random.default_rng(9)
  a, b, ea, eb = _case(rng, (2, 1), (3,), 9, 40, 17, block_k=8)
  _check(a, b, ea, eb, isa, bits_a=8, bits_b=8, block_k=8)
  a, b, ea, eb = _case(rng, (3,), (3,), 9, 40, 17)
  _check(a, b, ea, eb, isa, bits_a=8, bits_b=8)


@pytest.mark.parametrize("bits_a,bits_b", [(2, 2), (4, 8), (8, 5), (7, 7)])
def test_fewer_bits(isa, bits_a, bits_b):
  rng = np.random.default_rng(bits_a * 10 + bits_b)
  a, b, ea, eb = _case(rng, (), (), 20, 90, 33, bits_a=bits_a, bits_b=bits_b, block_k=32)
  _check(a, b, ea, eb, isa, bits_a=bits_a, bits_b=bits_b, block_k=32)


def test_multi_tile_multi_kc_threads(isa):
  # Several tiles per worker (packed B reuse), several kc blocks (chains carried across them).
  rng = np.random.default_rng(13)
  for bk in (None, 24, 1000):
    a, b, ea, eb = _case(rng, (2,), (2,), 300, 1500, 530, block_k=bk)
    _check(a, b, ea, eb, isa, lead=False, bits_a=8, bits_b=8, block_k=bk)


def test_deep_gemms_one_tile_per_worker(isa):
  # One tile per worker along the larger side for K >= 8x it (ffi_runtime.cc, deep_split).
  rng = np.random.default_rng(19)
  for m, k, n, ta, bk in ((250, 4100, 20, True, 24), (30, 3000, 130, False, None)):
    a, b, ea, eb = _case(rng, (), (), m, k, n, block_k=bk, ta=ta)
    _check(a, b, ea, eb, isa, lead=False, bits_a=8, bits_b=8, block_k=bk, transpose_a=ta)


@pytest.mark.parametrize("n", [1, 9, 16, 17])
def test_narrow_outputs(isa, n):
  # N <= 16 runs on 12 x 16 micro-tiles on AVX-512: per-tensor and block exponents (HBFP tiles, MX
  # blocks), inline and pooled, several kc blocks, transposes.
  rng = np.random.default_rng(200 + n)
  for batch, m, k, bk, ta, tb in (((), 37, 50, None, False, False), ((2,), 900, 1500, 24, True, False),
                                  ((), 300, 1000, 32, False, True), ((3,), 16, 3000, None, True, True)):
    a, b, ea, eb = _case(rng, batch, batch, m, k, n, block_k=bk, ta=ta, tb=tb)
    _check(a, b, ea, eb, isa, lead=m < 100, bits_a=8, bits_b=8, block_k=bk, transpose_a=ta, transpose_b=tb)


@pytest.mark.parametrize("m", [12, 40, 197])
def test_a_read_in_place(isa, m):
  # k-contiguous A in whole quads (K and block_k multiples of 4): the full micro-panels are read where
  # they lie, only the last partial one is packed; both must give the same bits, and a value out of
  # range must fail the call wherever it sits (a read-in-place row or the packed tail).
  rng = np.random.default_rng(300 + m)
  for k, bk in ((64, None), (96, 24), (160, 32), (100, 20), (1028, None)):
    a, b, ea, eb = _case(rng, (), (), m, k, 45, block_k=bk, erange=10)
    _check(a, b, ea, eb, isa, lead=m < 100, bits_a=8, bits_b=8, block_k=bk)
  a, b, ea, eb = _case(rng, (), (), m, 96, 45, bits_a=6)
  for row in sorted({0, m // 2, m - 1}):
    bad = a.copy()
    bad[row, 93] = 32  # qmax(6) = 31
    with pytest.raises(Exception, match="int8 operand a has a value outside"):
      _i8(bad, b, ea, eb, isa=isa, bits_a=6, bits_b=8)


def test_empty(isa):
  for m, k, n in ((0, 5, 3), (4, 0, 3), (4, 5, 0)):
    a = np.zeros((m, k), np.int8)
    b = np.zeros((k, n), np.int8)
    ea = np.zeros((m, min(k, 1)), np.int32)  # KB = ceil(K / K) = 0 for K == 0
    eb = np.zeros((min(k, 1), n), np.int32)
    got = _check(a, b, ea, eb, isa, lead=False, bits_a=8, bits_b=8)
    assert got.shape == (m, n) and not np.any(got)


def test_adversarial_maxima_longest_chain(isas):
  # Every product +-127**2 over more than two of the longest int32 chains: a wrapping int32 sum, or
  # a compensation 128 * sum(a) that left the modulo-2**32 window, would show here.
  k = 2 * L88 + 7
  a = np.full((3, k), 127, np.int8)
  a[1] = -127
  a[2, ::2] = -127
  b = np.full((k, 5), 127, np.int8)
  b[:, 3] = -127
  b[:, 4] = -127
  b[::3, 4] = 127
  ea = np.zeros((3, 1), np.int32)
  eb = np.zeros((1, 5), np.int32)
  want = ref.reference_gemm_numpy(a[None], b[None], ea[None], eb[None], bits_a=8, bits_b=8)[0]
  for isa in isas:
    bits_eq(_i8(a, b, ea, eb, isa=isa, bits_a=8, bits_b=8), want)
  bits_eq(_i16(a, b, ea, eb, bits_a=8, bits_b=8), want)
  # One block of exactly L products (one chain, the int32 bound itself) and blocks of L + 1.
  for bk in (L88, L88 + 1):
    kb = -(-k // bk)
    ea2 = np.zeros((3, kb), np.int32)
    eb2 = np.zeros((kb, 5), np.int32)
    want = ref.reference_gemm_numpy(a[None], b[None], ea2[None], eb2[None], bits_a=8, bits_b=8, block_k=bk)[0]
    for isa in isas:
      bits_eq(_i8(a, b, ea2, eb2, isa=isa, bits_a=8, bits_b=8, block_k=bk), want)


def test_nonfinite_exponents_give_nan(isa):
  rng = np.random.default_rng(17)
  for bk in (None, 24):
    a, b, ea, eb = _case(rng, (), (), 20, 72, 40, block_k=bk)
    ea[3, -1] = NONFINITE
    eb[0, 7] = NONFINITE
    got = _i8(a, b, ea, eb, isa=isa, bits_a=8, bits_b=8, block_k=bk)
    assert np.isnan(got[3]).all() and np.isnan(got[:, 7]).all()
    assert np.isfinite(np.delete(np.delete(got, 3, 0), 7, 1)).all()
    want = _lead(a, b, ea, eb, bits_a=8, bits_b=8, block_k=bk)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    bits_eq(np.where(np.isnan(got), 0, got), np.where(np.isnan(want), 0, want))


def test_extreme_exponents(isa):
  # Exponent sums outside the float32 normal range (the general scale2 path), overflow to Inf,
  # underflow flushed to zero, clamped exponents: as the reference.
  rng = np.random.default_rng(19)
  for bk in (None, 8):
    a, b, ea, eb = _case(rng, (), (), 16, 40, 33, block_k=bk)
    ea[:4] = 120
    eb[:, :5] = 100
    ea[4:8] = -140
    eb[:, 5:9] = -20
    ea[8] = 5000
    eb[:, 9] = -5000
    # With bk = 8, block values and sums fall below 2**-126 and are flushed (docs/arithmetic.md).
    _check(a, b, ea, eb, isa, bits_a=8, bits_b=8, block_k=bk)


def test_kc_splits_chains_and_blocks():
  # A tiny kc block (JDFP_I8_KC_QUADS, read once per process) cuts chains across kc blocks: their
  # int32 running sums are carried in memory, blocks straddle kc blocks.
  code = textwrap.dedent("""
    import numpy as np, jax.numpy as jnp
    from jdfp import kernels
    from jdfp._src.ffi.gemm import gemm
    from jdfp._src.ffi.gemm_i8 import gemm_i8
    rng = np.random.default_rng(0)
    for isa in kernels.available_isas():
      for bk in (None, 5, 24, 32, 100):
        m, k, n = 30, 203, 41
        kb = -(-k // (bk or k))
        a = rng.integers(-127, 128, (m, k)).astype(np.int8)
        b = rng.integers(-127, 128, (k, n)).astype(np.int8)
        ea = rng.integers(-9, 9, (m, kb)).astype(np.int32)
        eb = rng.integers(-9, 9, (kb, n)).astype(np.int32)
        got = np.asarray(gemm_i8(a, b, ea, eb, bits_a=8, bits_b=8, block_k=bk, isa=isa))
        want = np.asarray(gemm(a.astype(np.int16), b.astype(np.int16), ea, eb, bits_a=8, bits_b=8, block_k=bk))
        assert np.array_equal(got.view(np.int32), want.view(np.int32)), (isa, bk)
    print("OK")
  """)
  env = dict(os.environ, JDFP_I8_KC_QUADS="3")
  root = os.path.dirname(os.path.abspath(jdfp.__file__))
  env["PYTHONPATH"] = os.path.dirname(root) + os.pathsep + env.get("PYTHONPATH", "")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                     cwd=os.path.dirname(root))
  assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_bit_exact(isa, data):
  m = data.draw(st.integers(1, 40))
  k = data.draw(st.integers(1, 140))
  n = data.draw(st.integers(1, 70))
  bk = data.draw(st.sampled_from([None, 1, 3, 8, 24, 32, 50]))
  bits_a = data.draw(st.integers(2, 8))
  bits_b = data.draw(st.integers(2, 8))
  ta, tb = data.draw(st.booleans()), data.draw(st.booleans())
  rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
  a, b, ea, eb = _case(rng, (), (), m, k, n, bits_a, bits_b, bk, ta, tb, erange=40)
  _check(a, b, ea, eb, isa, lead=False, bits_a=bits_a, bits_b=bits_b, block_k=bk, transpose_a=ta, transpose_b=tb)


def test_out_of_range_values_are_errors(isa):
  a = np.ones((4, 8), np.int8)
  b = np.ones((8, 3), np.int8)
  ea = np.zeros((4, 1), np.int32)
  eb = np.zeros((1, 3), np.int32)
  bad = a.copy()
  bad[2, 5] = -128
  with pytest.raises(Exception, match="int8 operand a has a value outside"):
    _i8(bad, b, ea, eb, isa=isa, bits_a=8, bits_b=8)
  big = np.ones((4, 64), np.int8)  # a transposed: the row-contiguous packing (SSE2 interleave)
  big[1, 37] = -128
  with pytest.raises(Exception, match="int8 operand a"):
    _i8(big.T.copy(), np.ones((64, 3), np.int8), ea, eb, isa=isa, bits_a=8, bits_b=8, transpose_a=True)
  with pytest.raises(Exception, match="int8 operand b"):  # b [K, N]: 16-column interleave
    _i8(np.ones((2, 4), np.int8), big, np.zeros((2, 1), np.int32), np.zeros((1, 64), np.int32), isa=isa,
        bits_a=8, bits_b=8)
  bad = b.copy()
  bad[7, 2] = 8
  with pytest.raises(Exception, match="int8 operand b"):
    _i8(a, bad, ea, eb, isa=isa, bits_a=8, bits_b=4)
  with pytest.raises(Exception, match="int8 operand b"):
    _i8(a, bad.T.copy(), ea, eb, isa=isa, bits_a=8, bits_b=4, transpose_b=True)


def test_trace_time_validation():
  a = jnp.zeros((4, 8), jnp.int8)
  b = jnp.zeros((8, 3), jnp.int8)
  ea = jnp.zeros((4, 1), jnp.int32)
  eb = jnp.zeros((1, 3), jnp.int32)
  with pytest.raises(TypeError, match="a must have dtype int8"):
    gemm_i8(a.astype(jnp.int16), b, ea, eb, bits_a=8, bits_b=8)
  with pytest.raises(TypeError, match="b must have dtype int8"):
    gemm_i8(a, b.astype(jnp.float32), ea, eb, bits_a=8, bits_b=8)
  with pytest.raises(TypeError, match="ea must have dtype"):
    gemm_i8(a, b, ea.astype(jnp.int16), eb, bits_a=8, bits_b=8)
  with pytest.raises(ValueError, match="bits_a"):
    gemm_i8(a, b, ea, eb, bits_a=9, bits_b=8)
  with pytest.raises(ValueError, match="bits_b"):
    gemm_i8(a, b, ea, eb, bits_a=8, bits_b=1)
  with pytest.raises(ValueError, match="contraction"):
    gemm_i8(a, b[:5], ea, eb, bits_a=8, bits_b=8)
  with pytest.raises(ValueError, match="ea must have shape"):
    gemm_i8(a, b, ea, eb, bits_a=8, bits_b=8, block_k=4)
  with pytest.raises(ValueError, match="block_k"):
    gemm_i8(a, b, ea, eb, bits_a=8, bits_b=8, block_k=0)
  with pytest.raises(ValueError, match="isa"):
    gemm_i8(a, b, ea, eb, bits_a=8, bits_b=8, isa="sse")
  with pytest.raises(ValueError, match="broadcast"):
    gemm_i8(jnp.zeros((2, 4, 8), jnp.int8), jnp.zeros((3, 8, 3), jnp.int8), ea, eb, bits_a=8, bits_b=8)


def test_ffi_errors_from_cpp(isas):
  # The C++ side checks on its own (a call that bypasses the wrapper): bits, isa, dtypes, shapes.
  a = jnp.zeros((2, 2), jnp.int8)
  e = jnp.zeros((2, 1), jnp.int32)
  eb = jnp.zeros((1, 2), jnp.int32)
  call = jax.ffi.ffi_call(library.TARGET_I8, jax.ShapeDtypeStruct((2, 2), jnp.float32))
  kw = dict(block_k=np.int64(-1), transpose_a=False, transpose_b=False)
  with pytest.raises(Exception, match="bits_a must be in"):
    np.asarray(call(a, a, e, eb, bits_a=np.int32(9), bits_b=np.int32(8), isa=np.int32(0), **kw))
  with pytest.raises(Exception, match="isa"):
    np.asarray(call(a, a, e, eb, bits_a=np.int32(8), bits_b=np.int32(8), isa=np.int32(7), **kw))
  with pytest.raises(Exception, match="a must be int8"):
    np.asarray(call(a.astype(jnp.int16), a, e, eb, bits_a=np.int32(8), bits_b=np.int32(8), isa=np.int32(0), **kw))
  with pytest.raises(Exception, match="ea must be"):
    np.asarray(call(a, a, jnp.zeros((2, 3), jnp.int32), eb, bits_a=np.int32(8), bits_b=np.int32(8),
                    isa=np.int32(0), **kw))
  missing = [i for i, nm in enumerate(kernels.ISA_NAMES) if i and nm not in isas]
  for code in missing:
    with pytest.raises(Exception, match="not supported"):
      np.asarray(call(a, a, e, eb, bits_a=np.int32(8), bits_b=np.int32(8), isa=np.int32(code), **kw))


def test_jit_and_vmap(isa):
  rng = np.random.default_rng(23)
  a, b, ea, eb = _case(rng, (3,), (3,), 6, 30, 10, block_k=8)
  f = jax.jit(lambda *x: gemm_i8(*x, bits_a=8, bits_b=8, block_k=8, isa=isa))
  want = _i16(a, b, ea, eb, bits_a=8, bits_b=8, block_k=8)
  bits_eq(f(a, b, ea, eb), want)
  bits_eq(jax.vmap(f)(a, b, ea, eb), want)
