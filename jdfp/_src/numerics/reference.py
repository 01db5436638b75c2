"""The exact DFP GEMM in pure JAX: the oracle the C++ kernel matches bit for bit.

The arithmetic (chains, their order, the FP32 spill, the scaling) is fixed in docs/arithmetic.md.
In short: int16 x int16 products are summed exactly in int32 chains that can never overflow, each
chain sum is converted to float32 and added to a float32 accumulator in increasing-K order.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from jdfp._src.numerics import formats
from jdfp._src.numerics.shard_types import match_varying

# Chains are capped so the safe length stays a small int and the reference's chunking stays sane.
MAX_CHAIN = 2**20
INT32_MAX = 2**31 - 1


def qmax_of_bits(bits: int) -> int:
  return 2 ** (bits - 1) - 1


def safe_chain_length(bits_a: int, bits_b: int) -> int:
  """Longest chain of int16 products that provably fits int32 (docs/design.md §2): L * qa * qb <= 2**31 - 1."""
  for name, bits in (("bits_a", bits_a), ("bits_b", bits_b)):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 16:
      raise ValueError(f"{name} must be an int in 2..16, got {bits!r}")
  return min(MAX_CHAIN, INT32_MAX // (qmax_of_bits(bits_a) * qmax_of_bits(bits_b)))


def chain_layout(k: int, block_k: int, chain: int) -> tuple[np.ndarray, np.ndarray]:
  """Index map from (chain, position) to K (static numpy), and the chain's block index.

  Returns ``idx`` of shape ``[num_chains, C]`` (-1 marks padding) and ``block_of_chain``.
  """
  c = min(chain, block_k)
  num_blocks = -(-k // block_k)
  per_block = -(-min(block_k, k) // c) if k else 0
  idx = np.full((num_blocks * per_block, c), -1, np.int64)
  blk = np.repeat(np.arange(num_blocks), per_block)
  for j in range(num_blocks):
    start, stop = j * block_k, min((j + 1) * block_k, k)
    for i in range(per_block):
      lo = start + i * c
      n = max(0, min(c, stop - lo))
      idx[j * per_block + i, :n] = np.arange(lo, lo + n)
  return idx, blk


def _gather_k(x: jax.Array, idx: np.ndarray, axis: int) -> jax.Array:
  """Take x along `axis` at idx (-1 -> 0), giving that axis the shape idx.shape."""
  safe = np.where(idx < 0, 0, idx)
  g = jnp.take(x, safe.reshape(-1), axis=axis)
  mask = (idx >= 0).reshape(-1)
  shape = [1] * g.ndim
  shape[axis] = mask.size
  g = jnp.where(mask.reshape(shape), g, jnp.zeros((), g.dtype))
  new_shape = x.shape[:axis] + idx.shape + x.shape[axis + 1 :]
  return g.reshape(new_shape)


def _check(a, b, ea, eb, block_k):
  for name, arr, dtype in (("a", a, jnp.int16), ("b", b, jnp.int16), ("ea", ea, jnp.int32), ("eb", eb, jnp.int32)):
    if arr.dtype != dtype:
      raise TypeError(f"{name} must be {jnp.dtype(dtype).name}, got {arr.dtype}")
    if arr.ndim != 3:
      raise ValueError(f"{name} must have rank 3, got shape {arr.shape}")
  bsz, m, k = a.shape
  if b.shape[0] != bsz or b.shape[1] != k:
    raise ValueError(f"b must have shape [{bsz}, {k}, N], got {b.shape}")
  n = b.shape[2]
  block_k = k if block_k is None else int(block_k)
  if block_k < 1:
    raise ValueError(f"block_k must be >= 1, got {block_k}")
  kb = max(1, -(-k // block_k))
  if ea.shape != (bsz, m, kb):
    raise ValueError(f"ea must have shape {(bsz, m, kb)} (KB = ceil(K / block_k)), got {ea.shape}")
  if eb.shape != (bsz, kb, n):
    raise ValueError(f"eb must have shape {(bsz, kb, n)}, got {eb.shape}")
  return block_k, kb


def reference_gemm(a, b, ea, eb, *, bits_a: int, bits_b: int, block_k: int | None = None,
                   chains_per_step: int | None = None) -> jax.Array:
  """Exact DFP GEMM ``[B, M, K] x [B, K, N] -> float32 [B, M, N]`` (docs/arithmetic.md).

  Args:
    a, b: int16 operands with values in ``[-qmax, qmax]`` for their bits.
    ea, eb: int32 exponents ``[B, M, KB]`` and ``[B, KB, N]``, ``KB = ceil(K / block_k)``.
    bits_a, bits_b: the operands' bits (sign included); they fix the safe chain length.
    block_k: exponent block length along K (None: K, a single block).
    chains_per_step: how many chains one scan step computes (memory/speed trade-off only; the
      result does not depend on it).
  """
  a, b, ea, eb = (jnp.asarray(t) for t in (a, b, ea, eb))
  block_k, kb = _check(a, b, ea, eb, block_k)
  bsz, m, k = a.shape
  n = b.shape[2]
  chain = safe_chain_length(bits_a, bits_b)
  if k == 0:
    return jnp.zeros((bsz, m, n), jnp.float32)
  idx, blk = chain_layout(k, block_k, chain)
  num_chains, c = idx.shape
  g = chains_per_step or max(1, min(num_chains, 256 // c if c < 256 else 1))
  steps = -(-num_chains // g)
  pad = steps * g - num_chains
  # Padding chains are all -1 (zero products): adding f(0) = +0.0 leaves acc unchanged.
  idx = np.concatenate([idx, np.full((pad, c), -1, np.int64)])
  blk = np.concatenate([blk, np.full((pad,), blk[-1] if blk.size else 0)])

  a_ch = _gather_k(a, idx, axis=2).astype(jnp.int32)  # [B, M, S*G, C]
  b_ch = _gather_k(b, idx, axis=1).astype(jnp.int32)  # [B, S*G, C, N]
  a_ch = a_ch.reshape(bsz, m, steps, g, c).transpose(2, 0, 1, 3, 4)  # [S, B, M, G, C]
  b_ch = b_ch.reshape(bsz, steps, g, c, n).transpose(1, 0, 2, 3, 4)  # [S, B, G, C, N]
  blk_steps = jnp.asarray(blk.reshape(steps, g), jnp.int32)

  clamp = formats.EXPONENT_CLAMP
  nonfinite = (jnp.any(ea == formats.NONFINITE_EXPONENT, axis=2)[:, :, None]
               | jnp.any(eb == formats.NONFINITE_EXPONENT, axis=1)[:, None, :])
  ea_c = jnp.clip(ea, -clamp, clamp)
  eb_c = jnp.clip(eb, -clamp, clamp)

  def step(acc, xs):
    a_s, b_s, blk_s = xs
    # Exact int32 chain sums: |sum| <= C * qa * qb <= 2**31 - 1, so no wrap.
    sums = jnp.einsum("bmgc,bgcn->gbmn", a_s, b_s, preferred_element_type=jnp.int32)
    for i in range(g):
      f = sums[i].astype(jnp.float32)
      if kb > 1:
        j = blk_s[i]
        e = (jnp.take(ea_c, j, axis=2)[:, :, None] + jnp.take(eb_c, j, axis=1)[:, None, :])
        f = formats.scale2(f, e)
      # optimization_barrier keeps XLA from fusing the scale multiply into an FMA with this add.
      acc = acc + jax.lax.optimization_barrier(f)
    return acc, None

  acc0 = match_varying(jnp.zeros((bsz, m, n), jnp.float32), a, b, ea, eb)
  acc, _ = jax.lax.scan(step, acc0, (a_ch, b_ch, blk_steps))
  # The contract's accumulator starts at +0.0, so it is never -0.0 (+0.0 + -0.0 = +0.0); XLA folds
  # the first `0 + x` to `x`, which would let an underflowed -0.0 chain through.
  acc = jnp.where(acc == 0, jnp.float32(0), acc)
  if kb == 1:
    acc = formats.scale2(acc, ea_c[:, :, 0][:, :, None] + eb_c[:, 0, :][:, None, :])
  return jnp.where(nonfinite, jnp.nan, acc)


def reference_gemm_numpy(a, b, ea, eb, *, bits_a, bits_b, block_k=None) -> np.ndarray:
  """The same contract in plain numpy (slow; an independent check of `reference_gemm`)."""
  a = np.asarray(a, np.int64)
  b = np.asarray(b, np.int64)
  ea = np.asarray(ea, np.int64)
  eb = np.asarray(eb, np.int64)
  bsz, m, k = a.shape
  n = b.shape[2]
  block_k = k if block_k is None else block_k
  kb = max(1, -(-k // block_k))
  chain = safe_chain_length(bits_a, bits_b)
  idx, blk = chain_layout(k, block_k, chain)
  big = formats.NONFINITE_EXPONENT
  nonfinite = (ea == big).any(2)[:, :, None] | (eb == big).any(1)[:, None, :]
  ea = np.clip(ea, -formats.EXPONENT_CLAMP, formats.EXPONENT_CLAMP)
  eb = np.clip(eb, -formats.EXPONENT_CLAMP, formats.EXPONENT_CLAMP)

  def sc2(x, e):
    e1 = np.clip(e, -126, 127)
    e2 = np.clip(e - e1, -126, 127)
    p1 = np.ldexp(np.float32(1), e1).astype(np.float32)
    p2 = np.ldexp(np.float32(1), e2).astype(np.float32)
    return ((x * p1).astype(np.float32) * p2).astype(np.float32)

  acc = np.zeros((bsz, m, n), np.float32)
  for ci in range(idx.shape[0]):
    ks = idx[ci][idx[ci] >= 0]
    s = np.einsum("bmk,bkn->bmn", a[:, :, ks], b[:, ks, :])
    assert np.abs(s).max(initial=0) <= INT32_MAX
    f = s.astype(np.float32)
    if kb > 1:
      j = blk[ci]
      f = sc2(f, ea[:, :, j][:, :, None] + eb[:, j, :][:, None, :])
    acc = (acc + f).astype(np.float32)
  if kb == 1:
    acc = sc2(acc, ea[:, :, 0][:, :, None] + eb[:, 0, :][:, None, :])
  return np.where(nonfinite, np.float32(np.nan), acc)


def exact_dot_float64(a, b, ea, eb, *, block_k=None) -> np.ndarray:
  """The mathematically exact product (int64/float64, no chains) for error bounds in tests."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  k = a.shape[2]
  block_k = k if block_k is None else block_k
  ea_full = np.repeat(np.asarray(ea), block_k, axis=2)[:, :, :k]
  eb_full = np.repeat(np.asarray(eb), block_k, axis=1)[:, :k, :]
  return np.einsum("bmk,bkn->bmn", a * np.exp2(ea_full), b * np.exp2(eb_full))


