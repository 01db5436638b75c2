"""Philox-4x32-10 in pure JAX uint32 arithmetic: the random bits of stochastic rounding.

The C++ conversion kernels (``xla_ffi/philox.h``) implement the same generator, so the pure-JAX
quantizer and the kernel give the same bits for the same key and element (docs/arithmetic.md,
"Stochastic rounding"). Counter-based: element ``i`` of a tensor uses word ``i % 4`` of block
``i // 4`` under the key's two words, so any chunk of the tensor can be generated independently.
Works with ``jax_enable_x64`` off (the 32x32 -> 64-bit products are formed from 16-bit halves).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1", "fold_in_words", "key_words", "philox4x32",
           "philox_bits", "split_words"]

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
PHILOX_ROUNDS = 10
# Counters are (uint32(j), uint32(j >> 32), 0, 0) for block j; this pure-JAX version forms only the
# low word (jnp.arange in uint32), so it stops at 2**32 blocks (2**34 elements, 64 GiB of float32).
MAX_ELEMENTS = 4 * 2**32

_MASK16 = np.uint32(0xFFFF)


def _mulhilo(a: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """(high, low) 32-bit words of the 64-bit product a * m (uint32 a, constant m), without uint64."""
  m_lo, m_hi = np.uint32(m & 0xFFFF), np.uint32(m >> 16)
  a_lo, a_hi = a & _MASK16, a >> np.uint32(16)
  ll, lh, hl, hh = a_lo * m_lo, a_lo * m_hi, a_hi * m_lo, a_hi * m_hi  # each < 2**32: exact
  mid = (ll >> np.uint32(16)) + (lh & _MASK16) + (hl & _MASK16)  # < 3 * 2**16: no wrap
  hi = hh + (lh >> np.uint32(16)) + (hl >> np.uint32(16)) + (mid >> np.uint32(16))
  return hi, a * np.uint32(m)  # uint32 multiply wraps: the low word


def philox4x32(counter, key) -> tuple[jax.Array, ...]:
  """Philox-4x32-10 of the counter words ``(c0, c1, c2, c3)`` under ``(k0, k1)`` (uint32 arrays that
  broadcast together): the four output words."""
  c0, c1, c2, c3 = (jnp.asarray(c, jnp.uint32) for c in counter)
  k0, k1 = (jnp.asarray(k, jnp.uint32) for k in key)
  for r in range(PHILOX_ROUNDS):
    if r:  # the key schedule: bumped before every round but the first
      k0, k1 = k0 + np.uint32(PHILOX_W0), k1 + np.uint32(PHILOX_W1)
    hi0, lo0 = _mulhilo(c0, PHILOX_M0)
    hi1, lo1 = _mulhilo(c2, PHILOX_M1)
    c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
  return c0, c1, c2, c3


def _is_typed_key(key) -> bool:
  return jnp.issubdtype(getattr(key, "dtype", None) or np.float32, jax.dtypes.prng_key)


def key_words(key) -> jax.Array:
  """The generator key ``uint32[2]`` of a JAX PRNG key (docs/arithmetic.md).

  A typed key of the default ``threefry2x32`` impl gives its two data words; a raw ``uint32[2]`` key
  (``jax.random.PRNGKey``) is used as is; a key of another impl (typed, or raw data of the default
  impl when that is not threefry) gives ``jax.random.bits(key, (2,), uint32)``.
  """
  if key is None:
    raise ValueError("key: stochastic rounding needs a PRNG key (jax.random.key(...)), got None")
  if _is_typed_key(key):
    if jnp.shape(key) != ():
      raise ValueError(f"key must be a single PRNG key, got a key array of shape {jnp.shape(key)} "
                       "(split keys go through jax.vmap)")
    if str(jax.random.key_impl(key)) == "threefry2x32":
      return jax.random.key_data(key)
    return jax.random.bits(key, (2,), jnp.uint32)
  dt = getattr(key, "dtype", None)
  if dt is None:
    key = jnp.asarray(key)
    dt = key.dtype
  if jnp.dtype(dt) != jnp.uint32:
    raise TypeError(f"key must be a JAX PRNG key or its raw uint32 data, got dtype {jnp.dtype(dt)}")
  if jnp.shape(key) == (2,):
    return jnp.asarray(key)
  try:  # raw data of another default impl (e.g. rbg's uint32[4])
    return jax.random.bits(jax.random.wrap_key_data(key), (2,), jnp.uint32)
  except (TypeError, ValueError) as e:
    raise ValueError(f"key must be a single PRNG key (typed, or raw uint32[2]), got shape {jnp.shape(key)}: {e}"
                     ) from None


def philox_bits(key, shape) -> jax.Array:
  """``uint32[shape]`` random words: element ``i`` (row-major) is word ``i % 4`` of Philox block
  ``i // 4`` (counter ``(i // 4, 0, 0, 0)``) under `key_words` ``(key)``."""
  shape = tuple(int(d) for d in shape)
  words = key_words(key)
  n = int(np.prod(shape, dtype=np.int64))
  if n > MAX_ELEMENTS:
    raise ValueError(f"philox_bits: {n} elements exceed the {MAX_ELEMENTS} this generator counts")
  if n == 0:
    return jnp.zeros(shape, jnp.uint32)
  # Every element computes its whole block and keeps its word: 4x the arithmetic, but one plain
  # elementwise fusion. Computing each block once and interleaving the four words (stack/concatenate)
  # makes XLA:CPU fuse the rounds into the concatenate and run ~50x slower (measured, jax 0.10).
  grid = (-(-n // 4), 4)
  block = lax.broadcasted_iota(jnp.uint32, grid, 0)
  word = lax.broadcasted_iota(jnp.uint32, grid, 1)
  zero = jnp.zeros((), jnp.uint32)
  x0, x1, x2, x3 = philox4x32((block, zero, zero, zero), (words[0], words[1]))
  out = jnp.where(word == 0, x0, jnp.where(word == 1, x1, jnp.where(word == 2, x2, x3)))
  return out.reshape(-1)[:n].reshape(shape)


# Child keys: (k0 * SPLIT_M0 + 2i + 1, k1 * SPLIT_M1 + SPLIT_C) mod 2**32 for child i. Philox takes its
# key as a stream identifier (Salmon et al. 2011, Random123: keys such as thread ids), so children
# need to be distinct keys, not hashed ones: distinct i give distinct k0, and with odd multipliers
# no child equals its parent. Two multiply-adds, where a threefry (or Philox) split is a few hundred
# scalar ops and several fusions: the key splits were half of a quantized step's compile time.
SPLIT_M0, SPLIT_M1, SPLIT_C = 0x9E3779B1, 0x85EBCA6B, 0x6A09E667


def split_words(key, n: int) -> tuple[jax.Array, ...]:
  """``n`` child keys (raw ``uint32[2]``) of ``key``: child ``i`` is ``(k0 * SPLIT_M0 + 2i + 1,
  k1 * SPLIT_M1 + SPLIT_C)`` of `key_words` ``(key)`` (docs/arithmetic.md, "Keys of an op")."""
  # One multiply-add for all children and a lax slice each: this runs for every op of every traced
  # step, and numpy-style indexing costs ~10x the trace time of lax ops.
  inc = np.stack([2 * np.arange(n, dtype=np.uint32) + 1, np.full(n, SPLIT_C, np.uint32)], axis=1)
  kids = key_words(key)[None, :] * np.array([SPLIT_M0, SPLIT_M1], np.uint32) + inc
  return tuple(lax.index_in_dim(kids, i, 0, keepdims=False) for i in range(n))


def fold_in_words(key, data: int) -> jax.Array:
  """Child ``data`` (an int in ``[0, 2**31)``) of `split_words`, without the other children."""
  if not 0 <= int(data) < 2**31:
    raise ValueError(f"fold_in_words: data must be in [0, 2**31), got {data}")
  inc = np.array([2 * int(data) + 1, SPLIT_C], np.uint32)
  return key_words(key) * np.array([SPLIT_M0, SPLIT_M1], np.uint32) + inc
