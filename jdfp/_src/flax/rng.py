"""The stream key of an op: the key Linen's `module.make_rng` (or an NNX `nnx.RngStream`) returns,
derived in straight-line uint32 ops.

Flax derives the key as ``jax.random.fold_in(stream_key, sha1(path suffix, call counter)[:4])``.
On CPU JAX lowers that threefry as a loop: an XLA ``while`` plus a dozen copy thunks per key, which
on a small model's step cost more than its GEMMs (docs/op_costs.md, "The small step through the
recipes"). `make_rng` lets Flax do its bookkeeping (the checks and the counter) and then computes
the same fold-in, on the C++ kernel where it runs (`jdfp._src.ffi.threefry`: nothing for XLA to
compile, where the unrolled rounds cost ~15-20 ms of compile time per op with the key a step
argument), else with `jdfp._src.numerics.threefry`; Flax's own key is left unused, so jit drops it
as dead code. NNX streams fold in their traced count the same way (`stream_key`). Keys of another
PRNG impl, or streams Flax does not hold as expected, keep Flax's key as is.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import config as flax_config
from flax import nnx
from flax.core.scope import LazyRng

from jdfp._src.ffi import threefry as ffi_threefry
from jdfp._src.numerics import threefry

__all__ = ["make_rng", "stream_key"]


def _static_hash(suffix) -> int:
  """The 32-bit value Flax folds into the stream key for ``suffix`` (strings and ints): the first
  four bytes of their SHA-1, as `flax.core.scope` hashes them."""
  m = hashlib.sha1()
  for x in suffix:
    if getattr(flax_config, "flax_fix_rng_separator", False):
      m.update(b"\00")
    if isinstance(x, str):
      m.update(x.encode("utf-8"))
    elif isinstance(x, int):
      m.update(x.to_bytes((x.bit_length() + 7) // 8, byteorder="big"))
    else:
      raise ValueError(f"Expected int or string, got: {x}")
  return int.from_bytes(m.digest()[:4], byteorder="big")


def _fold_in(words, data):
  """`threefry.fold_in_words`, on the kernel where it runs (the same bits)."""
  if ffi_threefry.runs_here():
    return ffi_threefry.fold_in_words(words, data)
  return threefry.fold_in_words(words, data)


def _threefry_words(rng):
  """The uint32[2] data of a single threefry key (typed, or raw under a threefry default impl), and
  whether it was typed; None for any other key."""
  dtype = getattr(rng, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    if jnp.shape(rng) != () or str(jax.random.key_impl(rng)) != "threefry2x32":
      return None
    return jax.random.key_data(rng), True
  if dtype == np.uint32 and jnp.shape(rng) == (2,) and jax.config.jax_default_prng_impl == "threefry2x32":
    return rng, False
  return None


def make_rng(module, name: str):
  """``module.make_rng(name)``: the same key (same type, same bits), without the threefry loop."""
  key = module.make_rng(name)
  scope = module.scope
  lazy = scope.rngs.get(name)
  found = _threefry_words(lazy.rng) if isinstance(lazy, LazyRng) else None
  if found is None:
    return key
  words, typed = found
  suffix = lazy.suffix + (scope.rng_counters[name],)  # what make_rng just folded in
  out = _fold_in(words, _static_hash(suffix))
  return jax.random.wrap_key_data(out, impl="threefry2x32") if typed else out


def stream_key(stream):
  """``stream()`` of an NNX RNG stream: the same key (same type, same bits), without the threefry
  loop. NNX's key is ``fold_in(stream.key, stream.count)`` before the count's increment."""
  key = stream()  # NNX's checks and the count's increment; this key is left to jit's dead-code pass
  if not isinstance(stream, nnx.RngStream):
    return key
  found = _threefry_words(stream.key[...])
  count = stream.count[...]
  if found is None or jnp.shape(count) != () or jnp.result_type(count) != jnp.uint32:
    return key
  words, typed = found
  out = _fold_in(words, count - np.uint32(1))  # the count stream() just folded in
  return jax.random.wrap_key_data(out, impl="threefry2x32") if typed else out
