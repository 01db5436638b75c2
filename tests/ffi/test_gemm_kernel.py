"""The C++ exact INT16 GEMM (jdfp.kernels.gemm) against the contract, bit for bit, on every ISA.

Oracle: `_oracle` below is an independent numpy (int64 block sums, float32 sequential accumulation)
implementation of docs/arithmetic.md; a few cases also go through the lead's pure-JAX
`reference_gemm` (which flushes subnormals explicitly, as the contract says, whatever XLA fuses).
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
from kernel_testing import bits_eq, gemm_isas, qmax

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="libjdfp_ffi.so not built")

@pytest.fixture(params=gemm_isas(), scope="module")
def isa(request) -> str:
  """Each ISA path in turn, and "auto" where it means the AMX-INT8 tiles (KB == 1, K >= 32)."""
  return request.param

NONFINITE = 2**30
CLAMP = 1000  # formats.EXPONENT_CLAMP


def _ftz(x):
  """Flush float32 subnormals to (signed) zero: XLA:CPU and the kernel run with FTZ + DAZ."""
  x = np.asarray(x, np.float32)
  return np.where(np.abs(x) < np.float32(2.0**-126), x * np.float32(0), x)


def _sc2(x, e):
  e = np.clip(e, -2 * CLAMP, 2 * CLAMP)
  e1 = np.clip(e, -126, 127)
  e2 = np.clip(e - e1, -126, 127)
  p1 = np.ldexp(np.float32(1), e1).astype(np.float32)
  p2 = np.ldexp(np.float32(1), e2).astype(np.float32)
  with np.errstate(over="ignore", invalid="ignore"):
    return _ftz(_ftz((x * p1).astype(np.float32)) * p2)


def _i64_to_f32(s):
  """int64 -> float32 rounded once, half to even (long double holds every int64 exactly on x86-64)."""
  assert np.finfo(np.longdouble).nmant >= 63
  return np.asarray(s, np.int64).astype(np.longdouble).astype(np.float32)


def _oracle(a, b, ea, eb, *, bits_a, bits_b, block_k=None, transpose_a=False, transpose_b=False):
  """docs/arithmetic.md in numpy: exact int64 block sums rounded once, float32 adds in block order."""
  a = np.asarray(a)
  b = np.asarray(b)
  if transpose_a:
    a = np.swapaxes(a, -1, -2)
  if transpose_b:
    b = np.swapaxes(b, -1, -2)
  m, k = a.shape[-2:]
  n = b.shape[-1]
  bk = max(k, 1) if block_k is None else block_k
  kb = -(-k // bk)
  ea = np.asarray(ea, np.int64)
  eb = np.asarray(eb, np.int64)
  batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2], ea.shape[:-2], eb.shape[:-2])
  a = np.broadcast_to(a, batch + (m, k)).astype(np.int64)
  b = np.broadcast_to(b, batch + (k, n)).astype(np.int64)
  ea = np.broadcast_to(ea, batch + (m, kb))
  eb = np.broadcast_to(eb, batch + (kb, n))
  if k == 0:
    return np.zeros(batch + (m, n), np.float32)
  # [..., M, blocks, N] exact int64 block sums (the chains inside a block are exact int32 sums, so
  # the block's integer sum does not depend on them), each rounded once to float32.
  starts = list(range(0, k, bk))
  prod = a[..., :, :, None] * b[..., None, :, :]
  sums = np.add.reduceat(prod, starts, axis=-2)
  f = _i64_to_f32(sums)
  eac = np.clip(ea, -CLAMP, CLAMP)
  ebc = np.clip(eb, -CLAMP, CLAMP)
  if kb > 1:
    blocks = np.arange(kb)
    e = eac[..., :, blocks][..., :, :, None] + ebc[..., blocks, :][..., None, :, :]
    f = _sc2(f, e)
  # acc = +0.0, then acc + scale2(f(S_j)) in increasing block order, each add rounded (and flushed).
  acc = np.zeros(f.shape[:-2] + f.shape[-1:], np.float32)
  if kb == 1:
    acc = f[..., 0, :]
  elif f.shape[-2] > 64:  # many blocks: sequential numpy accumulate (no subnormals at these scales)
    acc = np.add.accumulate(np.concatenate([acc[..., None, :], f], -2), axis=-2, dtype=np.float32)[..., -1, :]
  else:
    with np.errstate(invalid="ignore"):
      for c in range(f.shape[-2]):
        acc = _ftz(acc + f[..., c, :])
  if kb == 1:
    acc = _sc2(acc, eac[..., :, 0][..., :, None] + ebc[..., 0, :][..., None, :])
  bad = (ea == NONFINITE).any(-1)[..., :, None] | (eb == NONFINITE).any(-2)[..., None, :]
  return np.where(bad, np.float32(np.nan), acc).astype(np.float32)


def _rand_case(rng, batch_a, batch_b, m, k, n, bits_a, bits_b, block_k, ta=False, tb=False,
               erange=6):
  bk = max(k, 1) if block_k is None else block_k
  kb = -(-k // bk)
  a = rng.integers(-qmax(bits_a), qmax(bits_a) + 1, batch_a + ((k, m) if ta else (m, k)), dtype=np.int16)
  b = rng.integers(-qmax(bits_b), qmax(bits_b) + 1, batch_b + ((n, k) if tb else (k, n)), dtype=np.int16)
  ea = rng.integers(-erange, erange + 1, batch_a + (m, kb), dtype=np.int32)
  eb = rng.integers(-erange, erange + 1, batch_b + (kb, n), dtype=np.int32)
  return a, b, ea, eb


def _run(a, b, ea, eb, **kw):
  return np.asarray(kernels.gemm(jnp.asarray(a), jnp.asarray(b), jnp.asarray(ea), jnp.asarray(eb), **kw))


def test_oracle_matches_lead_numpy_reference():
  ref = pytest.importorskip("jdfp._src.numerics.reference")
  rng = np.random.default_rng(1)
  for bits_a, bits_b, k, bk in ((14, 14, 100, None), (16, 16, 33, 5), (8, 12, 70, 24), (3, 2, 9, 1)):
    a, b, ea, eb = _rand_case(rng, (2,), (2,), 5, k, 6, bits_a, bits_b, bk)
    kw = dict(bits_a=bits_a, bits_b=bits_b, block_k=bk)
    bits_eq(_oracle(a, b, ea, eb, **kw), ref.reference_gemm_numpy(a, b, ea, eb, **kw))


def test_isas_and_chain_length(isas):
  assert isas[0] == "scalar"
  assert kernels.best_isa() == isas[-1]
  lib = library._lib
  for ba in range(2, 17):
    for bb in range(2, 17):
      L = kernels.safe_chain_length(ba, bb)
      assert L == min(2**20, (2**31 - 1) // (qmax(ba) * qmax(bb)))
      assert lib.jdfp_safe_chain_length(ba, bb) == L
  assert kernels.safe_chain_length(16, 16) == 2
  assert kernels.safe_chain_length(14, 14) == 32
  assert kernels.safe_chain_length(8, 8) == 133144


BLOCKS = st.sampled_from([None, None, 1, 5, 24, 32, 64, 7])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_bit_exact(isa, data):
  m = data.draw(st.integers(1, 37), "M")
  n = data.draw(st.integers(1, 45), "N")
  k = data.draw(st.one_of(st.integers(1, 80), st.integers(81, 700)), "K")
  bits_a = data.draw(st.integers(2, 16), "bits_a")
  bits_b = data.draw(st.integers(2, 16), "bits_b")
  block_k = data.draw(BLOCKS, "block_k")
  ta = data.draw(st.booleans(), "transpose_a")
  tb = data.draw(st.booleans(), "transpose_b")
  batch = data.draw(st.sampled_from([(), (1,), (2,)]), "batch")
  seed = data.draw(st.integers(0, 2**32 - 1), "seed")
  rng = np.random.default_rng(seed)
  a, b, ea, eb = _rand_case(rng, batch, batch, m, k, n, bits_a, bits_b, block_k, ta, tb)
  kw = dict(bits_a=bits_a, bits_b=bits_b, block_k=block_k, transpose_a=ta, transpose_b=tb)
  bits_eq(_run(a, b, ea, eb, isa=isa, **kw), _oracle(a, b, ea, eb, **kw))


def test_multi_tile_multi_kc_threads(isa):
  # Big enough for several tiles, several kc blocks, split chains (bits 8: C = K) and the pool.
  rng = np.random.default_rng(7)
  for bits, k, bk in ((14, 1000, None), (8, 900, None), (12, 777, 64)):
    a, b, ea, eb = _rand_case(rng, (), (), 150, k, 260, bits, bits, bk)
    kw = dict(bits_a=bits, bits_b=bits, block_k=bk)
    bits_eq(_run(a, b, ea, eb, isa=isa, **kw), _oracle(a, b, ea, eb, **kw))


def test_deep_gemms_one_tile_per_worker(isa):
  # K at least 8x the larger side and work above the inline threshold: one tile per worker along M
  # (M >= N, rows not a multiple of MR) or along N (ffi_runtime.cc, deep_split); transposed A and
  # block exponents as in a weight gradient.
  rng = np.random.default_rng(17)
  for m, k, n, ta, bk in ((250, 4100, 20, True, 24), (100, 4000, 40, False, None), (30, 3000, 130, True, 64)):
    a, b, ea, eb = _rand_case(rng, (), (), m, k, n, 12, 12, bk, ta=ta)
    kw = dict(bits_a=12, bits_b=12, block_k=bk, transpose_a=ta)
    bits_eq(_run(a, b, ea, eb, isa=isa, **kw), _oracle(a, b, ea, eb, **kw))


def test_packed_operand_reuse_across_tiles_batches_and_calls(isa):
  # A worker reuses its packed B panels for its next tile of the same op, batch element and columns,
  # and its packed A panels for a later tile of the same op, batch element and rows (M and N split
  # into several tiles, several kc blocks).  Other batch elements and later calls with the same
  # shapes but other data must not see them.
  rng = np.random.default_rng(11)
  for batch, m, k, n, bk in (((2,), 900, 600, 70, None), ((), 400, 300, 1100, 96),
                             ((2,), 400, 260, 1100, None)):
    a, b, ea, eb = _rand_case(rng, batch, batch, m, k, n, 14, 14, bk)
    kw = dict(bits_a=14, bits_b=14, block_k=bk)
    bits_eq(_run(a, b, ea, eb, isa=isa, **kw), _oracle(a, b, ea, eb, **kw))
    b2 = rng.integers(-8191, 8192, b.shape, dtype=np.int16)
    bits_eq(_run(a, b2, ea, eb, isa=isa, **kw), _oracle(a, b2, ea, eb, **kw))
    a2 = rng.integers(-8191, 8192, a.shape, dtype=np.int16)
    bits_eq(_run(a2, b2, ea, eb, isa=isa, **kw), _oracle(a2, b2, ea, eb, **kw))
    bits_eq(_run(a, b, ea, eb, isa=isa, **kw), _oracle(a, b, ea, eb, **kw))


@pytest.mark.parametrize("bits,k", [(16, 65536), (15, 65536), (14, 65536), (8, 65536), (2, 65536)])
def test_adversarial_all_max_large_k(bits, k, isas):
  # Every product is +-qmax**2: a plain int32 sum over K would wrap (e.g. 65536 * 2**30 for bits 16).
  q = qmax(bits)
  a = np.full((3, k), q, np.int16)
  a[1] = -q
  a[2, ::2] = -q  # alternating signs: exact cancellation
  b = np.full((k, 5), q, np.int16)
  b[:, 3] = -q
  ea = np.zeros((3, 1), np.int32)
  eb = np.zeros((1, 5), np.int32)
  kw = dict(bits_a=bits, bits_b=bits)
  want = _oracle(a, b, ea, eb, **kw)
  assert want[2, 0] == 0.0
  for isa in isas:
    got = _run(a, b, ea, eb, isa=isa, **kw)
    bits_eq(got, want)
    assert np.all(np.sign(got[0]) == np.array([1, 1, 1, -1, 1]))


@pytest.mark.parametrize("float_a", [False, True])
def test_grouped_pieces_bit_exact(isa, float_a):
  # The SIMD kernels sum consecutive pieces of a block in int32 without an update between them while
  # Cauchy-Schwarz bounds the group's sum by 2**31 - 2**16 (sums of squares per micro-panel and
  # piece).  Hot cells (a row or column at +qmax over a 32-long piece: a piece sum near 2**31) among
  # small values: grouping two hot pieces, or reading another panel's or piece's sums of squares,
  # wraps the int32 and changes the result.  Several tiles, kc blocks and panels, both layouts; the
  # last shape has enough row and column ranges that workers reuse packed A and B panels (and their
  # sums of squares) across tiles.
  rng = np.random.default_rng(5)
  q = qmax(14)
  for m, k, n, ta in ((100, 2048, 90, False), (61, 1500, 130, True), (250, 600, 1560, False)):
    a = rng.integers(-3, 4, (m, k)).astype(np.int16)
    b = rng.integers(-3, 4, (k, n)).astype(np.int16)
    for i, s in zip(rng.integers(0, m, 60), rng.integers(0, k // 32, 60)):
      a[i, 32 * s:32 * s + 32] = q
    for j, s in zip(rng.integers(0, n, 60), rng.integers(0, k // 32, 60)):
      b[32 * s:32 * s + 32, j] = q
    a[:, 64:128] = q  # two hot pieces in a row for every row and column: never one group
    b[64:128, :] = q
    ea = np.zeros((m, 1), np.int32)
    eb = np.zeros((1, n), np.int32)
    want = _oracle(a, b, ea, eb, bits_a=14, bits_b=14)
    a_in = np.ascontiguousarray(a.T) if ta else a
    if float_a:  # float32 input quantized while packing (exponent 0: the values themselves)
      a_in = a_in.astype(np.float32)
    bits_eq(_run(a_in, b, ea, eb, bits_a=14, bits_b=14, transpose_a=ta, isa=isa), want)


def test_block_exponents_blockwise(isa):
  rng = np.random.default_rng(3)
  for bk in (1, 5, 24, 32, 64):
    a, b, ea, eb = _rand_case(rng, (2,), (2,), 19, 200, 21, 14, 13, bk, erange=20)
    kw = dict(bits_a=14, bits_b=13, block_k=bk)
    bits_eq(_run(a, b, ea, eb, isa=isa, **kw), _oracle(a, b, ea, eb, **kw))


@pytest.mark.parametrize("bits", [14, 8])
def test_block_scale_fast_and_general_paths(isa, bits):
  # The SIMD kernels scale a closed block by one multiply (or multiply-add) with 2**ea * 2**eb when
  # every exponent of the block over the tile keeps 2**ea, 2**eb and 2**(ea + eb) normal and
  # ea + eb <= 63, else by scale2's two multiplies; the INT8 kernel also takes one scale per column
  # when a micro-tile's rows share their exponent.  Exponent ranges on both sides of those lines
  # (sums of 63 / 64, 127 / 128, -126 / -127, single exponents beyond 127 / -126), each in a GEMM of
  # its own so no block hides under a larger one, rows alike (HBFP's 24-row tiles) and not, overflow
  # to inf and flushing included; bits 8 runs the INT8 kernel too.
  from jdfp._src.ffi.gemm_i8 import gemm_i8
  rng = np.random.default_rng(11)
  m, n, bk, kb = 50, 35, 4, 3
  q = qmax(bits)
  choices = [((-10, 10), (-10, 10)), ((31, 32), (31, 32)), ((-63, -63), (-63, -62)), ((63, 64), (63, 63)),
             ((-64, -63), (-63, -63)), ((127, 127), (-5, 1)), ((-130, -126), (0, 3)), ((80, 90), (-1, 0)),
             ((64, 64), (60, 63)), ((-20, -10), (-20, -10)), ((-140, -100), (-30, -20))]
  kw = dict(bits_a=bits, bits_b=bits, block_k=bk)
  for (alo, ahi), (blo, bhi) in choices:
    a = rng.integers(-q, q + 1, (m, kb * bk)).astype(np.int16)
    b = rng.integers(-q, q + 1, (kb * bk, n)).astype(np.int16)
    ea = rng.integers(alo, ahi + 1, (m, kb)).astype(np.int32)
    eb = rng.integers(blo, bhi + 1, (kb, n)).astype(np.int32)
    ea[:, 1] = np.repeat(ea[::24, 1], 24)[:m]  # block 1: rows alike in groups of 24
    want = _oracle(a, b, ea, eb, **kw)
    bits_eq(_run(a, b, ea, eb, isa=isa, **kw), want)
    if bits == 8:
      bits_eq(gemm_i8(jnp.asarray(a, jnp.int8), jnp.asarray(b, jnp.int8), jnp.asarray(ea), jnp.asarray(eb), isa=isa,
                      **kw), want)


def test_batch_broadcasting_and_exponent_broadcast(isa):
  rng = np.random.default_rng(4)
  m, k, n = 9, 50, 17
  a = rng.integers(-8191, 8192, (2, 1, m, k), dtype=np.int16)
  b = rng.integers(-8191, 8192, (1, 3, k, n), dtype=np.int16)
  ea = rng.integers(-3, 4, (1, m, 1), dtype=np.int32)  # rank 3: right-aligned batch
  eb = rng.integers(-3, 4, (2, 3, 1, n), dtype=np.int32)
  kw = dict(bits_a=14, bits_b=14)
  got = _run(a, b, ea, eb, isa=isa, **kw)
  assert got.shape == (2, 3, m, n)
  bits_eq(got, _oracle(a, b, ea, eb, **kw))
  # One exponent per tensor: ea [..., 1, KB], eb [..., KB, 1]
  ea1 = np.full((1, 1), 2, np.int32)
  eb1 = np.full((1, 1), -3, np.int32)
  bits_eq(_run(a[0, 0], b[0, 0], ea1, eb1, isa=isa, **kw), _oracle(a[0, 0], b[0, 0], ea1, eb1, **kw))
  # KB > 1 with broadcast exponent rows/cols
  ea2 = rng.integers(-3, 4, (1, 5), dtype=np.int32)
  eb2 = rng.integers(-3, 4, (5, 1), dtype=np.int32)
  kw2 = dict(bits_a=14, bits_b=14, block_k=10)
  bits_eq(_run(a[1, 0], b[0, 2], ea2, eb2, isa=isa, **kw2), _oracle(a[1, 0], b[0, 2], ea2, eb2, **kw2))


def _quantize_np(x, e_rows, bits, block_k, axis_k):
  """clip(round_half_even(scale2(x, -e)), +-qmax) in numpy; e per (row, block) along axis_k."""
  x = np.asarray(x, np.float32)
  k = x.shape[axis_k]
  bk = max(k, 1) if block_k is None else block_k
  e = np.repeat(np.asarray(e_rows, np.int64), bk, axis=axis_k)
  e = np.take(e, np.arange(k), axis=axis_k)
  nonfinite = e == NONFINITE
  y = _sc2(np.where(nonfinite, np.float32(0), x), -np.where(nonfinite, 0, np.clip(e, -CLAMP, CLAMP)))
  y = np.where(np.isnan(y), np.float32(0), y)
  return np.clip(np.rint(y), -qmax(bits), qmax(bits)).astype(np.int16)


def test_float_input_fused_quantization(isa):
  rng = np.random.default_rng(5)
  for block_k, ta, tb in ((None, False, False), (16, False, True), (7, True, False), (None, True, True)):
    m, k, n = 13, 61, 29
    bk = k if block_k is None else block_k
    kb = -(-k // bk)
    ea = rng.integers(-12, -2, (m, kb), dtype=np.int32)
    eb = rng.integers(-12, -2, (kb, n), dtype=np.int32)
    af = (rng.standard_normal((m, k)) * 300).astype(np.float32)
    bf = (rng.standard_normal((k, n)) * 300).astype(np.float32)
    af[0, :5] = [0.5, 1.5, 2.5, -0.5, -2.5]  # exact ties (with e = 0 below)
    ea[0, 0] = 0
    af[1, 3] = 1e30  # saturates at qmax
    bf[2, 4] = -1e30
    qa = _quantize_np(af, ea, 10, block_k, 1)
    qb = _quantize_np(bf, eb, 9, block_k, 0)
    assert list(qa[0, :5]) == [0, 2, 2, 0, -2]
    a_in = af.T.copy() if ta else af
    b_in = bf.T.copy() if tb else bf
    qa_in = qa.T.copy() if ta else qa
    qb_in = qb.T.copy() if tb else qb
    kw = dict(bits_a=10, bits_b=9, block_k=block_k, transpose_a=ta, transpose_b=tb, isa=isa)
    want = _run(qa_in, qb_in, ea, eb, **kw)
    bits_eq(want, _oracle(qa, qb, ea, eb, bits_a=10, bits_b=9, block_k=block_k))
    bits_eq(_run(a_in, b_in, ea, eb, **kw), want)
    bits_eq(_run(a_in, qb_in, ea, eb, **kw), want)
    bits_eq(_run(qa_in, b_in, ea, eb, **kw), want)


def test_float_input_matches_lead_quantizer(isas):
  quantize = pytest.importorskip("jdfp._src.numerics.quantize")
  formats = pytest.importorskip("jdfp._src.numerics.formats")
  rng = np.random.default_rng(11)
  x = (rng.standard_normal((24, 48)) * 10).astype(np.float32)
  w = (rng.standard_normal((48, 40)) * 0.05).astype(np.float32)
  x[3, 7] = np.inf  # row 3 becomes NONFINITE -> NaN row
  for fx, fw in ((formats.DFP(bits=14), formats.DFP(bits=14)),
                 (formats.DFP(bits=12, axis=-1), formats.DFP(bits=13, axis=0))):
    qx = quantize.quantize_array(jnp.asarray(x), fx)
    qw = quantize.quantize_array(jnp.asarray(w), fw)
    kw = dict(bits_a=fx.bits, bits_b=fw.bits)
    want = _run(qx.values, qw.values, qx.exponent, qw.exponent, **kw)
    for isa in gemm_isas():
      bits_eq(_run(x, w, qx.exponent, qw.exponent, isa=isa, **kw), want)


def test_nonfinite_exponent_gives_nan(isa):
  rng = np.random.default_rng(6)
  for block_k in (None, 8):
    a, b, ea, eb = _rand_case(rng, (), (), 7, 30, 9, 12, 12, block_k)
    ea[2, -1] = NONFINITE
    eb[0, 5] = NONFINITE
    kw = dict(bits_a=12, bits_b=12, block_k=block_k)
    got = _run(a, b, ea, eb, isa=isa, **kw)
    nan = np.zeros((7, 9), bool)
    nan[2, :] = True
    nan[:, 5] = True
    assert np.array_equal(np.isnan(got), nan)
    bits_eq(got, _oracle(a, b, ea, eb, **kw))
    # float input: NaN values in a NONFINITE group quantize to 0, output NaN there.
    af = a.astype(np.float32)
    af[2, 0] = np.nan
    ea0 = np.zeros_like(ea)
    ea0[2, -1] = NONFINITE
    got_f = _run(af, b, ea0, eb, **kw, isa=isa)
    assert np.array_equal(np.isnan(got_f), nan)


def test_out_of_range_int16_is_an_error(isa):
  a = np.zeros((4, 8), np.int16)
  b = np.zeros((8, 3), np.int16)
  e1 = np.zeros((4, 1), np.int32)
  e2 = np.zeros((1, 3), np.int32)
  bad_a = a.copy()
  bad_a[3, 7] = -32768
  with pytest.raises(Exception, match="outside"):
    _run(bad_a, b, e1, e2, bits_a=16, bits_b=16, isa=isa)
  bad_b = b.copy()
  bad_b[5, 2] = 8  # qmax(4) = 7
  with pytest.raises(Exception, match="operand b"):
    _run(a, bad_b, e1, e2, bits_a=16, bits_b=4, isa=isa)
  # in range passes
  ok_b = b.copy()
  ok_b[5, 2] = 7
  _run(a, ok_b, e1, e2, bits_a=16, bits_b=4, isa=isa)


def test_extreme_exponents_match_lead_reference(isas):
  ref = pytest.importorskip("jdfp._src.numerics.reference")
  rng = np.random.default_rng(8)
  for block_k in (None, 16):
    a, b, ea, eb = _rand_case(rng, (1,), (1,), 6, 40, 7, 14, 14, block_k)
    kb = ea.shape[-1]
    ea[0, :, :] = rng.choice([-300, -160, -140, -60, 0, 90, 200, 2000, -5000], (6, kb))
    eb[0, :, :] = rng.choice([-300, -120, -20, 0, 60, 130, 2**31 - 1], (kb, 7))
    kw = dict(bits_a=14, bits_b=14, block_k=block_k)
    want = _oracle(a, b, ea, eb, **kw)
    lead = np.asarray(ref.reference_gemm(jnp.asarray(a), jnp.asarray(b), jnp.asarray(ea), jnp.asarray(eb), **kw))
    bits_eq(lead, want)
    for isa in gemm_isas():
      bits_eq(_run(a, b, ea, eb, isa=isa, **kw), want)


def _ftz_rows(kb):
  """Rows of (S_j, e_j) block sums and exponents whose block values, or whose float32 running sums,
  land just below / at / above 2**-126, both signs (d = 1, 2, 3 in units of 2**-127)."""
  rows = []
  for s in (1, -1):
    for d in (1, 2, 3):
      rows.append([(s * d, -127)])                                    # a block value
      rows.append([(s * (d + 4), -127), (-s * 4, -127), (0, 0)])      # a sum of two normals, then + +0.0
      rows.append([(s * (d + 4), -127), (-s * 4, -127), (-1, -140)])  # ..., then + -0.0 (flushed block)
      rows.append([(s * 100, -120), (s * d, -127), (0, 0)])           # a tiny block next to a normal acc
      rows.append([(s * d, -127), (s * 100, -120), (0, 0)])
      rows.append([(s * (d + 125), -133), (s * 100, -150)])           # 2**-126 - 2**-133 ... (two steps)
    rows.append([(s * 7, -127), (-s * 7, -127), (0, 0)])              # exact cancellation: +0.0
  return [(r + [(0, 0)] * kb)[:kb] for r in rows]


def _ftz_case(kb, bk):
  """a, b, ea, eb realising _ftz_rows(kb): S_j = a[m, j*bk] + a[m, j*bk + 1] (b is 1 there, else 0),
  e_j = ea[m, j] (eb = 0); |S_j| <= 254 keeps every int8 value in range."""
  rows = _ftz_rows(kb)
  a = np.zeros((len(rows), kb * bk), np.int16)
  ea = np.zeros((len(rows), kb), np.int32)
  for m, row in enumerate(rows):
    for j, (sj, ej) in enumerate(row):
      a[m, j * bk] = np.clip(sj, -127, 127)
      a[m, j * bk + 1] = sj - a[m, j * bk]
      ea[m, j] = ej
  b = np.zeros((kb * bk, 1), np.int16)
  b[0::bk] = b[1::bk] = 1
  return a, b, ea, np.zeros((kb, 1), np.int32)


@pytest.mark.parametrize("kb", [1, 3])
@pytest.mark.parametrize("bits", [8, 16])
def test_ftz_at_the_normal_boundary(isas, kb, bits):
  # FTZ (docs/arithmetic.md "Subnormals"): every scale2 product and every acc add whose value is below
  # 2**-126 becomes a zero of its sign, in the reference (whatever XLA fuses), the oracle and every
  # kernel.  bits 16 (chain 2 < block 4) takes the reference's multi-chain block path, bits 8 one chain.
  ref = pytest.importorskip("jdfp._src.numerics.reference")
  from jdfp._src.ffi.gemm_i8 import gemm_i8
  a, b, ea, eb = _ftz_case(kb, 4)
  kw = dict(bits_a=bits, bits_b=bits, block_k=None if kb == 1 else 4)
  want = _oracle(a, b, ea, eb, **kw)
  bits_eq(ref.reference_gemm_numpy(a[None], b[None], ea[None], eb[None], **kw)[0], want)
  for cps in (None, 1, 2, 4):  # scan steps with padding chains past the last block
    got = ref.reference_gemm(jnp.asarray(a[None]), jnp.asarray(b[None]), jnp.asarray(ea[None]),
                             jnp.asarray(eb[None]), chains_per_step=cps, **kw)
    bits_eq(np.asarray(got)[0], want)
  for isa in isas:
    bits_eq(_run(a, b, ea, eb, isa=isa, **kw), want)
    if bits == 8:
      bits_eq(gemm_i8(jnp.asarray(a, jnp.int8), jnp.asarray(b, jnp.int8), jnp.asarray(ea), jnp.asarray(eb),
                      isa=isa, **kw), want)
  # Pin a few values directly: a flushed block or sum, the sign of the zeros it leaves.
  out = want[:, 0]
  rows = _ftz_rows(kb)
  for m, row in enumerate(rows):
    exact = sum(sj * 2.0**ej for sj, ej in row)
    if kb == 1 or row[1:] == [(0, 0)] * (kb - 1):
      assert out[m] == (np.float32(exact) if abs(exact) >= 2.0**-126 else 0.0), (row, out[m])
  if kb == 3:
    neg_tiny = rows.index([(-5, -127), (4, -127), (0, 0)])
    assert out[neg_tiny].view(np.int32) == 0                           # -0.0 + +0.0 = +0.0
    assert out[neg_tiny + 1].view(np.uint32) == 0x80000000             # -0.0 + -0.0 = -0.0
    assert out[rows.index([(100, -120), (1, -127), (0, 0)])] == np.float32(100 * 2.0**-120)


def test_lead_reference_random():
  ref = pytest.importorskip("jdfp._src.numerics.reference")
  rng = np.random.default_rng(9)
  for bits_a, bits_b, k, bk in ((14, 14, 300, None), (16, 15, 45, 5), (9, 11, 128, 32), (14, 14, 97, 24)):
    a, b, ea, eb = _rand_case(rng, (2,), (2,), 11, k, 13, bits_a, bits_b, bk)
    kw = dict(bits_a=bits_a, bits_b=bits_b, block_k=bk)
    want = np.asarray(ref.reference_gemm(jnp.asarray(a), jnp.asarray(b), jnp.asarray(ea), jnp.asarray(eb), **kw))
    bits_eq(_run(a, b, ea, eb, **kw), want)


def test_k_zero_gives_zeros():
  a = np.zeros((3, 0), np.int16)
  b = np.zeros((0, 4), np.int16)
  out = _run(a, b, np.zeros((3, 0), np.int32), np.zeros((0, 4), np.int32), bits_a=8, bits_b=8)
  bits_eq(out, np.zeros((3, 4), np.float32))


def test_trace_time_validation():
  a = jnp.zeros((4, 8), jnp.int16)
  b = jnp.zeros((8, 3), jnp.int16)
  ea = jnp.zeros((4, 1), jnp.int32)
  eb = jnp.zeros((1, 3), jnp.int32)
  kw = dict(bits_a=14, bits_b=14)
  g = kernels.gemm
  with pytest.raises(TypeError, match="a must have dtype"):
    g(a.astype(jnp.int32), b, ea, eb, **kw)
  with pytest.raises(TypeError, match="b must have dtype"):
    g(a, b.astype(jnp.float16), ea, eb, **kw)
  with pytest.raises(TypeError, match="ea must have dtype"):
    g(a, b, ea.astype(jnp.int16), eb, **kw)
  with pytest.raises(TypeError, match="eb must have dtype"):
    g(a, b, ea, eb.astype(jnp.float32), **kw)
  with pytest.raises(TypeError, match="a must be an array"):
    g([[1]], b, ea, eb, **kw)
  with pytest.raises(ValueError, match="rank"):
    g(a[0], b, ea, eb, **kw)
  with pytest.raises(ValueError, match="contraction"):
    g(a, b[:7], ea, eb, **kw)
  with pytest.raises(ValueError, match="ea must have shape"):
    g(a, b, ea[:3], eb, **kw)
  with pytest.raises(ValueError, match="eb must have shape"):
    g(a, b, ea, jnp.zeros((2, 3), jnp.int32), **kw)
  with pytest.raises(ValueError, match="KB"):
    g(a, b, ea, eb, block_k=4, **kw)
  with pytest.raises(ValueError, match="block_k"):
    g(a, b, ea, eb, block_k=0, **kw)
  with pytest.raises(ValueError, match="bits_a"):
    g(a, b, ea, eb, bits_a=17, bits_b=14)
  with pytest.raises(ValueError, match="bits_b"):
    g(a, b, ea, eb, bits_a=14, bits_b=1)
  with pytest.raises(ValueError, match="isa"):
    g(a, b, ea, eb, isa="sse9", **kw)
  with pytest.raises(ValueError, match="broadcast"):
    g(jnp.zeros((2, 4, 8), jnp.int16), jnp.zeros((3, 8, 3), jnp.int16), ea, eb, **kw)
  with pytest.raises(TypeError, match="transpose_a"):
    g(a, b, ea, eb, transpose_a=1, **kw)
  # also inside jit (trace time)
  with pytest.raises(TypeError, match="a must have dtype"):
    jax.jit(lambda a: g(a, b, ea, eb, **kw))(a.astype(jnp.uint16))


def test_jit_vmap_and_hlo():
  rng = np.random.default_rng(10)
  a, b, ea, eb = _rand_case(rng, (3,), (3,), 10, 70, 12, 14, 14, None)
  kw = dict(bits_a=14, bits_b=14)
  f = jax.jit(lambda a, b, ea, eb: kernels.gemm(a, b, ea, eb, **kw))
  want = _oracle(a, b, ea, eb, **kw)
  bits_eq(f(a, b, ea, eb), want)
  # vmap, all batched
  bits_eq(jax.vmap(lambda a, b, ea, eb: kernels.gemm(a, b, ea, eb, **kw))(a, b, ea, eb), want)
  # vmap with unbatched b / eb (expand_dims hands them a leading size-1 axis)
  got = jax.jit(jax.vmap(lambda a, ea: kernels.gemm(a, b[0], ea, eb[0], **kw)))(a, ea)
  bits_eq(got, _oracle(a, b[0], ea, eb[0], **kw))
  # vmap over a non-leading axis and nested vmap
  got = jax.vmap(lambda bt, ebt: kernels.gemm(a[1], bt, ea[1], ebt, **kw), in_axes=(2, 1))(
      np.moveaxis(b, 0, 2), np.moveaxis(eb, 0, 1))
  bits_eq(got, _oracle(a[1], b, ea[1], eb, **kw))
  nested = jax.vmap(jax.vmap(lambda a, ea: kernels.gemm(a, b[0], ea, eb[0], **kw)))
  bits_eq(nested(a[None], ea[None]), _oracle(a, b[0], ea, eb[0], **kw)[None])
  hlo = jax.jit(lambda a, b, ea, eb: kernels.gemm(a, b, ea, eb, **kw)).lower(a, b, ea, eb).as_text()
  assert library.TARGET_I16 in hlo
  hlo_q = jax.jit(lambda a, b, ea, eb: kernels.gemm(a, b, ea, eb, **kw)).lower(
      a.astype(np.float32), b, ea, eb).as_text()
  assert library.TARGET_Q in hlo_q


def test_pmap_and_shard_map_two_devices():
  # Separate process: the host device count must be set before JAX starts.
  code = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P
    from jdfp import kernels
    try:
      from jax import shard_map
    except ImportError:
      from jax.experimental.shard_map import shard_map
    rng = np.random.default_rng(0)
    # Small (runs inline) and large (uses the intra-op pool while the other device may sit in a
    # collective): both must complete and match the unsharded call.
    for m, k, n in ((16, 40, 24), (160, 400, 240)):
      a = rng.integers(-8191, 8192, (2, m, k), dtype=np.int16)
      b = rng.integers(-8191, 8192, (2, k, n), dtype=np.int16)
      ea = np.zeros((2, m, 1), np.int32); eb = np.ones((2, 1, n), np.int32)
      f = lambda a, b, ea, eb: kernels.gemm(a, b, ea, eb, bits_a=14, bits_b=14)
      want = np.asarray(f(a, b, ea, eb))
      g = lambda a, b, ea, eb: jax.lax.psum(f(a, b, ea, eb), "x")
      got = np.asarray(jax.pmap(f, axis_name="x")(a, b, ea, eb))
      assert np.array_equal(got.view(np.int32), want.view(np.int32))
      np.asarray(jax.pmap(g, axis_name="x")(a, b, ea, eb))  # kernel followed by a collective
      mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
      sm = shard_map(f, mesh=mesh, in_specs=(P("x"),) * 4, out_specs=P("x"))
      got = np.asarray(jax.jit(sm)(a, b, ea, eb))
      assert np.array_equal(got.view(np.int32), want.view(np.int32))
    print("OK")
  """)
  env = dict(os.environ)
  root = os.path.dirname(os.path.abspath(jdfp.__file__))  # the jdfp package folder
  env["PYTHONPATH"] = os.path.dirname(root) + os.pathsep + env.get("PYTHONPATH", "")
  # cwd: the directory holding the imported jdfp, so `python -c` (which puts cwd first on sys.path)
  # never picks up an unbuilt source checkout instead of the installed package.
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                     cwd=os.path.dirname(root))
  assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_unsupported_isa_is_an_ffi_error(monkeypatch, isas):
  # Every ISA may be present on this machine; at least check the C++ side rejects a bad code.
  a = jnp.zeros((2, 2), jnp.int16)
  e = jnp.zeros((2, 1), jnp.int32)
  eb = jnp.zeros((1, 2), jnp.int32)
  call = jax.ffi.ffi_call(library.TARGET_I16, jax.ShapeDtypeStruct((2, 2), jnp.float32))
  with pytest.raises(Exception, match="isa"):
    np.asarray(call(a, a, e, eb, bits_a=np.int32(8), bits_b=np.int32(8), block_k=np.int64(-1),
                    transpose_a=False, transpose_b=False, isa=np.int32(9)))
  with pytest.raises(Exception, match="bits_a"):
    np.asarray(call(a, a, e, eb, bits_a=np.int32(1), bits_b=np.int32(8), block_k=np.int64(-1),
                    transpose_a=False, transpose_b=False, isa=np.int32(0)))
  with pytest.raises(Exception, match="ea must be"):
    np.asarray(call(a, a, jnp.zeros((2, 3), jnp.int32), eb, bits_a=np.int32(8), bits_b=np.int32(8),
                    block_k=np.int64(-1), transpose_a=False, transpose_b=False, isa=np.int32(0)))
  missing = [i for i, n in enumerate(kernels.ISA_NAMES) if i and n not in isas]
  for code in missing:
    with pytest.raises(Exception, match="not supported"):
      np.asarray(call(a, a, e, eb, bits_a=np.int32(8), bits_b=np.int32(8), block_k=np.int64(-1),
                      transpose_a=False, transpose_b=False, isa=np.int32(code)))


def test_reused_jobs_carry_nothing_between_calls(isa):
  # Each thread reuses its last GEMM / conv job (storage only): a failed conv, then GEMMs of other
  # shapes, batch counts and block sizes, inline and pooled, must each give their own exact result
  # and their own error text.
  rng = np.random.default_rng(21)
  e1 = jnp.zeros((1,), jnp.int32)
  x = jnp.zeros((1, 5, 5, 4), jnp.int16).at[0, 2, 2, 1].set(-32768)
  with pytest.raises(Exception, match=r"jdfp conv: int16 operand x has a value outside"):
    jax.block_until_ready(kernels.conv(x, jnp.zeros((3, 3, 4, 2), jnp.int16), e1, e1, window_strides=(1, 1),
                                       padding="SAME", bits_x=14, bits_w=14, isa=isa))
  for batch, m, k, n, bk in (((3,), 7, 33, 5, 16), ((), 300, 500, 700, None), ((2,), 64, 64, 64, None),
                             ((), 1, 9, 1, None)):
    a, b, ea, eb = _rand_case(rng, batch, batch, m, k, n, 14, 14, bk)
    kw = dict(bits_a=14, bits_b=14, block_k=bk)
    bits_eq(_run(a, b, ea, eb, isa=isa, **kw), _oracle(a, b, ea, eb, **kw))
  a, b, ea, eb = _rand_case(rng, (), (), 20, 30, 40, 14, 14, None)
  bad = b.copy()
  bad[3, 4] = -32768
  with pytest.raises(Exception, match=r"jdfp gemm: int16 operand b has a value outside"):
    _run(a, bad, ea, eb, isa=isa, bits_a=14, bits_b=14)
  bits_eq(_run(a, b, ea, eb, isa=isa, bits_a=14, bits_b=14), _oracle(a, b, ea, eb, bits_a=14, bits_b=14))


@pytest.mark.parametrize("n", [1, 9, 16, 17, 700])
def test_narrow_outputs_bit_exact(isa, n):
  # N <= 16, or 13 <= M <= 16, runs on its own micro-tile shape on AVX-512 (16 x 16): narrow heads
  # and 16-channel convs, inline and pooled, one or several kc blocks, block exponents, transposes.
  rng = np.random.default_rng(100 + n)
  for batch, m, k, bk, ta, tb in (((), 37, 50, None, False, False), ((2,), 900, 700, None, True, False),
                                  ((), 300, 1000, 64, False, True), ((3,), 16, 2000, 96, True, True),
                                  ((), 13, 300, None, False, False), ((2,), 15, 900, 32, True, False)):
    a, b, ea, eb = _rand_case(rng, batch, batch, m, k, n, 14, 14, bk, ta, tb)
    kw = dict(bits_a=14, bits_b=14, block_k=bk, transpose_a=ta, transpose_b=tb)
    bits_eq(_run(a, b, ea, eb, isa=isa, **kw), _oracle(a, b, ea, eb, **kw))
