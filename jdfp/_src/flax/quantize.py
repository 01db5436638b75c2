"""`jdfp.quantize`: the entry point of the Flax integration (Linen and NNX), and its report.

See ``linen.py`` (method interception, ``interception.py``) and ``nnx.py`` (injected GEMM functions)
for the mechanisms, ``tracked.py`` for how the backward statistics leave the custom VJP and
``state.py`` for the state layout.
"""

from __future__ import annotations

import weakref
from typing import Sequence

from jdfp._src.flax.rules import QuantizeReport, Rule, normalize_rules
from jdfp._src.ops.policy import Policy

__all__ = ["Rule", "QuantizeReport", "quantize", "quantize_report", "fp32_first_and_last"]

_nnx_reports: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def quantize(module, policy: Policy | None = Policy(), rules: Sequence[Rule] | Rule | None = None, *,
             keep_first_and_last_fp32: bool = False, collection: str = "dfp", rng_stream: str = "dfp",
             methods: Sequence[str] = ("__call__",), rngs=None, copy: bool = False):
  """Run a Flax model's GEMMs (dots, einsums, convolutions) through jdfp, without editing its code.

  Args:
    module: a Flax Linen ``nn.Module`` (returns a quantized copy: same fields, same parameter tree)
      or an NNX ``nnx.Module`` (quantized in place and returned; ``copy=True`` clones it first).
    policy: the `jdfp.Policy` of every op no rule matches; default ``jdfp.Policy()`` (DFP with 14
      bits, nearest rounding). ``policy=None`` keeps unmatched ops in FP32 (an explicit choice: use
      it with ``rules`` to quantize some layers only).
    rules: `jdfp.Rule` objects, first match wins (regular expression on the module path).
    keep_first_and_last_fp32: keep the first and the last GEMM of the model in FP32 (Intel's DFP16
      configurations kept the first conv and the last fully-connected layer in FP32). Linen finds
      them by an abstract trace at the first call; NNX by layer order (`iter_modules`).
    collection: the Linen variable collection for the scale state (default ``"dfp"``).
    rng_stream: the RNG stream for stochastic rounding (Linen: ``rngs={"dfp": key}`` in ``apply``;
      NNX: a stream of ``rngs``).
    methods: Linen methods that open a quantization scope (default ``("__call__",)``).
    rngs: NNX only: the `nnx.Rngs` used for stochastic rounding keys.

  The report of what was quantized (and which rules matched nothing) is `quantize_report(model)`.
  """
  rules = normalize_rules(policy, rules)
  report = QuantizeReport(rules)
  try:
    from flax import linen as nn  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover
    raise ImportError("jdfp.quantize needs flax") from e
  if isinstance(module, nn.Module):
    from jdfp._src.flax import linen  # pylint: disable=import-outside-toplevel
    if getattr(type(module), "_jdfp_config", None) is not None:
      raise ValueError("jdfp.quantize: this Linen model is already quantized (returned by jdfp.quantize); "
                       "quantize the original model once, with rules= for per-layer policies")
    if rngs is not None:
      raise ValueError("rngs= is for NNX models; Linen models take rngs={'dfp': key} in apply")
    cfg = linen.Config(policy, rules, collection, rng_stream, keep_first_and_last_fp32, report, tuple(methods))
    return linen.quantize_linen(module, cfg)
  from flax import nnx  # pylint: disable=import-outside-toplevel
  if isinstance(module, nnx.Module):
    from jdfp._src.flax import nnx as jnnx  # pylint: disable=import-outside-toplevel
    if jnnx.is_quantized(module):
      raise ValueError("jdfp.quantize: this NNX model is already quantized (it holds jdfp ops); quantize the "
                       "original model once, with rules= for per-layer policies")
    out = jnnx.quantize_nnx(module, policy, rules, report=report, keep_first_and_last_fp32=keep_first_and_last_fp32,
                            rngs=rngs, rng_stream=rng_stream, copy=copy)
    _nnx_reports[out] = report
    return out
  raise TypeError(f"jdfp.quantize takes a flax.linen.Module or flax.nnx.Module, got {type(module).__name__}")


def quantize_report(model) -> QuantizeReport:
  """The `QuantizeReport` of a model returned by `quantize` (filled as the model is traced)."""
  cfg = getattr(type(model), "_jdfp_config", None)
  if cfg is not None:
    return cfg.report
  try:
    return _nnx_reports[model]
  except (KeyError, TypeError):
    raise ValueError("quantize_report: this model was not returned by jdfp.quantize") from None


def fp32_first_and_last(first: str, last: str) -> list[Rule]:
  """Rules keeping the modules at paths ``first`` and ``last`` (exact names) in FP32; put them
  before your other rules. (`quantize(..., keep_first_and_last_fp32=True)` finds them for you.)"""
  import re  # pylint: disable=import-outside-toplevel
  return [Rule(re.escape(first), None), Rule(re.escape(last), None)]
