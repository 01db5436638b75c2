"""`jax.random.fold_in` of threefry key data on the C++ kernel (`JdfpThreefryFoldIn`).

The per-op key of a quantized Flax model is a threefry fold-in of the stream key (jdfp/_src/flax/rng.py).
Unrolled in XLA (`jdfp._src.numerics.threefry`) its ~100 scalar ops cost XLA:CPU ~15-20 ms of compile
time per op when the key is a step argument (docs/benchmarks.md, "AMD EPYC Zen 4"); as a custom call
they cost nothing to compile and one thunk per step. Same bits as `threefry.fold_in_words`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdfp._src.ffi.library import TARGET_THREEFRY_FOLD_IN, kernel_available, require_lib
from jdfp._src.numerics import threefry
from jdfp._src.numerics.shard_types import match_varying

__all__ = ["fold_in_words", "runs_here"]


def runs_here() -> bool:
  """Whether the kernel fold-in can run: the library is loaded and JAX's backend is CPU."""
  return kernel_available() and jax.default_backend() == "cpu"


def fold_in_words(words, data) -> jax.Array:
  """``jax.random.key_data(jax.random.fold_in(k, data))`` for threefry key data ``words``
  (uint32[2]) and ``data`` (an int in ``[0, 2**32)`` or a uint32 scalar array), on the kernel."""
  words, data = threefry.fold_in_args(words, data)
  require_lib()
  call = jax.ffi.ffi_call(TARGET_THREEFRY_FOLD_IN, jax.ShapeDtypeStruct((2,), jnp.uint32),
                          vmap_method="broadcast_all")
  data = jnp.asarray(data, jnp.uint32)
  return match_varying(call(words, data), words, data)
