"""Threefry-2x32 (20 rounds) in straight-line uint32 arithmetic: `jax.random.fold_in` of a threefry
key with the same bits, for the key derivations of every traced step.

Why not `jax.random.fold_in` itself: JAX lowers threefry on CPU as a 5-trip loop (to keep the HLO
small for large counter arrays). For one key that loop is an XLA ``while`` whose loop state XLA:CPU
initializes with a dozen copy thunks, and the extra independent thunks make XLA's thunk executor run
the step on its thread pool. On a small model's training step the two keys Flax derived for two
ops cost more than the step's GEMMs (docs/op_costs.md, "The small step through the recipes").
Unrolled, the 20 rounds of one key are ~100 scalar ops that XLA fuses into the fusion that consumes
them (or folds, for a constant key).

The algorithm is Threefry-2x32 of Salmon et al. (2011, "Parallel random numbers: as easy as 1, 2,
3"), the one JAX's default PRNG uses: key schedule ``(k0, k1, k0 ^ k1 ^ 0x1BD11BDA)``, rotations
13, 15, 26, 6 / 17, 29, 16, 24 alternating every four rounds, a key injection after each four.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["fold_in_args", "fold_in_words", "threefry2x32"]

_PARITY = 0x1BD11BDA  # Threefish's key-schedule parity constant
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x: jax.Array, r: int) -> jax.Array:
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(key, x) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 of the counter words ``x = (x0, x1)`` under ``key = (k0, k1)`` (uint32 arrays
  that broadcast together): the two output words."""
  k0, k1 = (jnp.asarray(k, jnp.uint32) for k in key)
  ks = (k0, k1, k0 ^ k1 ^ np.uint32(_PARITY))
  x0, x1 = (jnp.asarray(v, jnp.uint32) for v in x)
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):  # five groups of four rounds, a key injection after each
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = _rotl(x1, r) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def fold_in_words(words, data) -> jax.Array:
  """``jax.random.key_data(jax.random.fold_in(k, data))`` for a threefry key ``k`` with data words
  ``words`` (uint32[2]): threefry of the counter ``(0, data)`` (JAX's seed of a 32-bit ``data``).
  ``data``: a Python int in ``[0, 2**32)`` or a uint32 scalar array (e.g. NNX's traced stream count)."""
  return _fold_in(*fold_in_args(words, data))


def fold_in_args(words, data):
  """``(words, data)`` of a fold-in checked and as uint32 (also for the kernel's, `jdfp._src.ffi.threefry`)."""
  if isinstance(data, (int, np.integer)):
    if not 0 <= int(data) < 2**32:
      raise ValueError(f"fold_in_words: data must be in [0, 2**32), got {data}")
    data = np.uint32(int(data))
  elif jnp.shape(data) != () or jnp.result_type(data) != jnp.uint32:
    raise ValueError(f"fold_in_words: data must be an int or a uint32 scalar, got {jnp.result_type(data)}"
                     f"{list(jnp.shape(data))}")
  words = jnp.asarray(words, jnp.uint32)
  if words.shape != (2,):
    raise ValueError(f"fold_in_words: words must be uint32[2] threefry key data, got shape {words.shape}")
  return words, data


@jax.jit
def _fold_in(words, data):
  # Jitted so that the ~100 ops of the 20 rounds are traced once per process, not once per op of every
  # traced step (they were a quarter of a quantized MLP step's trace time); XLA inlines the call.
  k0, k1 = (lax.index_in_dim(words, i, keepdims=False) for i in (0, 1))
  y0, y1 = threefry2x32((k0, k1), (np.uint32(0), data))
  return lax.concatenate([y0[None], y1[None]], 0)
