"""The exact DFP GEMM in pure JAX: the oracle the C++ kernel matches bit for bit.

The arithmetic is fixed in docs/arithmetic.md.  In short: int16 x int16 products are summed exactly
in int32 chains that can never overflow; the chain sums of one exponent block are added exactly into
a 64-bit integer (kept here as two int32/uint32 words, since jax_enable_x64 is off); each block's sum
is rounded once to float32 (half to even), scaled by the block's power of two and, for KB > 1,
added to a float32 accumulator in increasing-K block order.
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
INT64_MAX = 2**63 - 1


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


def _add_words(hi, lo, s):
  """(hi, lo) + s: a 64-bit two's complement sum kept in two words (int32 hi, uint32 lo).

  ``s`` is an int32 chain sum, sign-extended: its high word is ``s >> 31`` (0 or -1), its low word
  the same 32 bits read as uint32.  The low words add modulo 2**32; a wrap (carry) shows as a sum
  smaller than the addend.  Exact while the true sum stays inside int64 (the contract's bound).
  """
  su = jax.lax.bitcast_convert_type(s, jnp.uint32)
  lo2 = lo + su
  carry = (lo2 < su).astype(jnp.int32)
  return hi + (s >> 31) + carry, lo2


def _shl64(hi, lo, n):
  """(hi, lo) << n for uint32 words and 0 <= n < 64 (the result's top word and low word)."""
  u32 = jnp.uint32
  n = n.astype(u32)
  small = n < 32
  ns = jnp.where(small, n, 0).astype(u32)             # shift for n < 32
  nb = jnp.where(small, 0, n - 32).astype(u32)         # shift for n >= 32
  spill = jnp.where(ns == 0, u32(0), lo >> jnp.where(ns == 0, u32(1), u32(32) - ns))
  top = jnp.where(small, (hi << ns) | spill, lo << nb)
  low = jnp.where(small, lo << ns, u32(0))
  return top, low


def int64_words_to_float32(hi, lo):
  """The int64 ``hi * 2**32 + lo`` (int32 hi, uint32 lo) as float32, rounded once, half to even.

  Int32/uint32 ops only (runs with jax_enable_x64 off): take the magnitude, normalize it so its top
  bit is bit 63, keep 24 bits, and round on the next bit and a sticky OR of the rest.
  """
  u32 = jnp.uint32
  neg = hi < 0
  hu = jax.lax.bitcast_convert_type(hi, u32)
  # |x| in two words (two's complement negation; |int64 min| = 2**63 still fits the unsigned words).
  mlo = jnp.where(neg, (~lo) + u32(1), lo)
  mhi = jnp.where(neg, (~hu) + (lo == 0).astype(u32), hu)
  n = jnp.where(mhi != 0, jax.lax.clz(mhi), 32 + jax.lax.clz(mlo))  # leading zeros, 64 for 0
  top, low = _shl64(mhi, mlo, jnp.minimum(n, 63))
  mant = top >> 8                                                    # 24 bits, bit 23 set
  rnd = (top >> 7) & u32(1)
  sticky = ((top & u32(0x7F)) != 0) | (low != 0)
  mant = mant + (rnd & (sticky.astype(u32) | (mant & u32(1))))
  exp = (63 - n).astype(u32)
  carry = mant >> 24                                                 # rounded up to 2**24
  mant = mant >> carry
  exp = exp + carry
  bits = ((exp + u32(127)) << 23) | (mant & u32(0x7FFFFF)) | (neg.astype(u32) << 31)
  bits = jnp.where(n == 64, u32(0), bits)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def flush_subnormals(x: jax.Array) -> jax.Array:
  """float32 x with every subnormal replaced by a zero of its sign (FTZ), in integer ops.

  XLA:CPU runs with FTZ/DAZ, but it may also contract ``acc + x * 2**e`` into an FMA whose product is
  never rounded or flushed (jax 0.10.2 does inside lax.scan, dropping optimization_barrier), so the
  reference flushes explicitly after every rounded op that can underflow (docs/arithmetic.md).
  """
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  tiny = (bits & jnp.uint32(0x7F800000)) == 0
  return jax.lax.bitcast_convert_type(jnp.where(tiny, bits & jnp.uint32(0x80000000), bits), jnp.float32)


def scale2_ftz(x: jax.Array, e: jax.Array) -> jax.Array:
  """The contract's scale2, (x * 2**e1) * 2**e2, flushed.  x is an integer-valued float32 (|x| >= 1
  or 0), so the first product (e1 >= -126) is never subnormal: only the second needs the flush,
  which also keeps XLA from contracting it with the following add into an FMA."""
  return flush_subnormals(formats.scale2(x, e))


def add_ftz(acc: jax.Array, f: jax.Array) -> jax.Array:
  """acc + f rounded and flushed, for flushed acc and f.  Two zeros give -0.0 only if both are -0.0
  (IEEE), set explicitly because XLA folds ``+0.0 + x`` to ``x``."""
  ua = jax.lax.bitcast_convert_type(acc, jnp.uint32)
  uf = jax.lax.bitcast_convert_type(f, jnp.uint32)
  mag = jnp.uint32(0x7FFFFFFF)
  zeros = ((ua & mag) == 0) & ((uf & mag) == 0)
  return jnp.where(zeros, jax.lax.bitcast_convert_type(ua & uf, jnp.float32), flush_subnormals(acc + f))


def _step_size(num_chains: int, per_block: int, c: int, kb: int, chains_per_step: int | None) -> int:
  """Chains per scan step.  With several chains per block and KB > 1, steps are aligned so that
  block ends fall on the same positions in every step (g a multiple or a divisor of per_block)."""
  g = chains_per_step or max(1, min(num_chains, 256 // c if c < 256 else 1))
  if kb > 1 and per_block > 1:
    if per_block <= g:
      g = per_block * (g // per_block)
    else:
      g = max(d for d in range(1, g + 1) if per_block % d == 0)
  return g


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
  _check_block_bound(min(block_k, k), bits_a, bits_b)
  if k == 0:
    return jnp.zeros((bsz, m, n), jnp.float32)
  idx, blk = chain_layout(k, block_k, chain)
  num_chains, c = idx.shape
  per_block = num_chains // kb
  g = _step_size(num_chains, per_block, c, kb, chains_per_step)
  steps = -(-num_chains // g)
  pad = steps * g - num_chains
  # Padding chains are all -1 (zero products) and close no block: adding their +0.0 to acc would
  # turn a -0.0 acc into +0.0, which the kernels, adding only real blocks, do not.
  idx = np.concatenate([idx, np.full((pad, c), -1, np.int64)])
  blk = np.concatenate([blk, np.full((pad,), blk[-1] if blk.size else 0)])
  ends = np.arange(steps * g) % per_block == per_block - 1  # chain closes its block
  ends[num_chains:] = False
  ends = ends.reshape(steps, g)
  always_end, ever_end = ends.all(0), ends.any(0)

  a_ch = _gather_k(a, idx, axis=2).astype(jnp.int32)  # [B, M, S*G, C]
  b_ch = _gather_k(b, idx, axis=1).astype(jnp.int32)  # [B, S*G, C, N]
  a_ch = a_ch.reshape(bsz, m, steps, g, c).transpose(2, 0, 1, 3, 4)  # [S, B, M, G, C]
  b_ch = b_ch.reshape(bsz, steps, g, c, n).transpose(1, 0, 2, 3, 4)  # [S, B, G, C, N]
  blk_steps = jnp.asarray(blk.reshape(steps, g), jnp.int32)
  end_steps = jnp.asarray(ends)

  clamp = formats.EXPONENT_CLAMP
  nonfinite = (jnp.any(ea == formats.NONFINITE_EXPONENT, axis=2)[:, :, None]
               | jnp.any(eb == formats.NONFINITE_EXPONENT, axis=1)[:, None, :])
  ea_c = jnp.clip(ea, -clamp, clamp)
  eb_c = jnp.clip(eb, -clamp, clamp)

  def block_scale(j):
    return jnp.take(ea_c, j, axis=2)[:, :, None] + jnp.take(eb_c, j, axis=1)[:, None, :]

  def step(carry, xs):
    acc, hi, lo = carry
    a_s, b_s, blk_s, end_s = xs
    # Exact int32 chain sums: |sum| <= C * qa * qb <= 2**31 - 1, so no wrap.
    sums = jnp.einsum("bmgc,bgcn->gbmn", a_s, b_s, preferred_element_type=jnp.int32)
    for i in range(g):
      if kb > 1 and per_block == 1:
        # One chain per block: the block sum is this int32 chain sum, rounded once by convert.
        new = add_ftz(acc, scale2_ftz(sums[i].astype(jnp.float32), block_scale(blk_s[i])))
        acc = new if always_end[i] else jnp.where(end_s[i], new, acc)
        continue
      hi, lo = _add_words(hi, lo, sums[i])
      if kb > 1 and ever_end[i]:
        # The block's exact sum, rounded once to float32, scaled, added to acc (K order).
        new = add_ftz(acc, scale2_ftz(int64_words_to_float32(hi, lo), block_scale(blk_s[i])))
        if always_end[i]:
          acc, hi, lo = new, jnp.zeros_like(hi), jnp.zeros_like(lo)
        else:
          acc = jnp.where(end_s[i], new, acc)
          hi = jnp.where(end_s[i], 0, hi)
          lo = jnp.where(end_s[i], jnp.uint32(0), lo)
    return (acc, hi, lo), None

  zeros = jnp.zeros((bsz, m, n), jnp.float32)
  acc0 = match_varying(zeros, a, b, ea, eb)
  hi0 = match_varying(jnp.zeros((bsz, m, n), jnp.int32), a, b, ea, eb)
  lo0 = match_varying(jnp.zeros((bsz, m, n), jnp.uint32), a, b, ea, eb)
  (acc, hi, lo), _ = jax.lax.scan(step, (acc0, hi0, lo0), (a_ch, b_ch, blk_steps, end_steps))
  if kb == 1:
    # One block: out = scale2(f(S), ea + eb), S the exact sum over all of K.
    out = scale2_ftz(int64_words_to_float32(hi, lo), ea_c[:, :, 0][:, :, None] + eb_c[:, 0, :][:, None, :])
  else:
    out = acc  # -0.0 where the last rounded add flushed a negative sum (as the kernels)
  return jnp.where(nonfinite, jnp.nan, out)


def _check_block_bound(block_len: int, bits_a: int, bits_b: int) -> None:
  """The exact block sum is an int64: |S| <= block_len * qmax_a * qmax_b must stay below 2**63."""
  if block_len * qmax_of_bits(bits_a) * qmax_of_bits(bits_b) > INT64_MAX:
    raise ValueError(f"block of {block_len} products of {bits_a}/{bits_b}-bit values could leave int64 "
                     "(docs/arithmetic.md: block_k * qmax_a * qmax_b <= 2**63 - 1)")


def int64_to_float32_numpy(s) -> np.ndarray:
  """int64 -> float32 rounded once, half to even (through an exact extended-precision value)."""
  s = np.asarray(s, np.int64)
  if np.finfo(np.longdouble).nmant >= 63:
    return s.astype(np.longdouble).astype(np.float32)
  # No 64-bit-mantissa long double on this platform: round each value with Python ints.
  out = np.empty(s.shape, np.float32)
  for i, v in np.ndenumerate(s):
    out[i] = round_int_to_float32(int(v))
  return out


def round_int_to_float32(v: int) -> np.float32:
  """Python-int oracle of the single round-half-to-even conversion to float32 (|v| < 2**127)."""
  mag = abs(v)
  if mag < 2**24:
    return np.float32(v)
  shift = mag.bit_length() - 24
  q, r = divmod(mag, 1 << shift)
  half = 1 << (shift - 1)
  if r > half or (r == half and q & 1):
    q += 1
  return np.float32(np.ldexp(np.float64(q), shift) * (1 if v > 0 else -1))


def reference_gemm_numpy(a, b, ea, eb, *, bits_a, bits_b, block_k=None) -> np.ndarray:
  """The same contract in plain numpy (slow; an independent check of `reference_gemm`).

  Each block's sum is computed directly in int64 (no chains: the integer sum is exact either way).
  """
  a = np.asarray(a, np.int64)
  b = np.asarray(b, np.int64)
  ea = np.asarray(ea, np.int64)
  eb = np.asarray(eb, np.int64)
  bsz, m, k = a.shape
  n = b.shape[2]
  block_k = k if block_k is None else block_k
  kb = max(1, -(-k // block_k))
  safe_chain_length(bits_a, bits_b)  # validates the bits
  _check_block_bound(min(block_k, k), bits_a, bits_b)
  big = formats.NONFINITE_EXPONENT
  nonfinite = (ea == big).any(2)[:, :, None] | (eb == big).any(1)[:, None, :]
  ea = np.clip(ea, -formats.EXPONENT_CLAMP, formats.EXPONENT_CLAMP)
  eb = np.clip(eb, -formats.EXPONENT_CLAMP, formats.EXPONENT_CLAMP)

  def ftz(x):  # numpy runs without FTZ: flush subnormals to a zero of their sign here
    x = np.asarray(x, np.float32)
    return np.where(np.abs(x) < np.float32(2.0**-126), x * np.float32(0), x)

  def sc2(x, e):
    e1 = np.clip(e, -126, 127)
    e2 = np.clip(e - e1, -126, 127)
    p1 = np.ldexp(np.float32(1), e1).astype(np.float32)
    p2 = np.ldexp(np.float32(1), e2).astype(np.float32)
    with np.errstate(over="ignore"):
      return ftz(ftz(x * p1) * p2)

  if k == 0:
    return np.where(nonfinite, np.float32(np.nan), np.zeros((bsz, m, n), np.float32))
  acc = np.zeros((bsz, m, n), np.float32)
  for j in range(kb):
    ks = slice(j * block_k, min((j + 1) * block_k, k))
    s = np.einsum("bmk,bkn->bmn", a[:, :, ks], b[:, ks, :])  # exact int64 block sum
    f = sc2(int64_to_float32_numpy(s), ea[:, :, j][:, :, None] + eb[:, j, :][:, None, :])
    acc = f if kb == 1 else ftz(acc + f)
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


