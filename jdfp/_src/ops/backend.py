"""Where an op's integer GEMMs run ("ffi": the C++ kernel, "reference": pure JAX) and the one-time
warnings that make every fallback visible (`fallback_log`, shown by `jdfp.explain`)."""

from __future__ import annotations

import warnings

import jax

from jdfp._src.ffi import library
from jdfp._src.ops.policy import Policy

_warned: set[str] = set()
# Every backend decision made while tracing, for `explain` and for users who want to check.
fallback_log: list[str] = []


def warn_once(msg: str) -> None:
  """Warn (once per message) and record the message in `fallback_log`."""
  if msg not in _warned:
    _warned.add(msg)
    fallback_log.append(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def resolve_backend(policy: Policy) -> str:
  """The backend an integer-format GEMM runs on now: "ffi" or "reference"."""
  if policy.backend == "reference":
    return "reference"
  platform = jax.default_backend()
  if policy.backend == "ffi":
    if platform != "cpu":
      raise ValueError(f"backend='ffi' runs on CPU only; the default backend is {platform!r}. "
                       "Use backend='auto' or 'reference'.")
    if not library.kernel_available():
      raise RuntimeError(f"backend='ffi' but the jdfp kernel library is not loaded: {library.load_error()}")
    return "ffi"
  if platform != "cpu":
    warn_once(f"jdfp: no integer kernel for platform {platform!r}; DFP/BFP GEMMs run on the exact "
               "pure-JAX reference path (integer arithmetic in XLA, bit-identical to the CPU kernel).")
    return "reference"
  if not library.kernel_available():
    warn_once(f"jdfp: the FFI kernel library is unavailable ({library.load_error()}); DFP/BFP GEMMs run "
               "on the exact pure-JAX reference path, which is much slower.")
    return "reference"
  return "ffi"


def kernel_quantize(policy: Policy) -> bool:
  """Whether this policy's operands are converted on the C++ kernel: only with the FFI GEMM (the
  reference backend stays pure JAX end to end)."""
  integer = any(f.is_integer for f in (policy.lhs, policy.rhs, policy.dlhs, policy.drhs))
  return integer and resolve_backend(policy) == "ffi"
