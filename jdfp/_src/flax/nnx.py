"""`jdfp.quantize` for Flax NNX: swap the injectable GEMM functions of the model's layers.

NNX layers take their GEMM as an attribute: `nnx.Linear` / `nnx.LinearGeneral` ``dot_general``,
`nnx.Einsum` ``einsum_op``, `nnx.Conv` ``conv_general_dilated`` (and `nnx.MultiHeadAttention`
projects through `nnx.LinearGeneral`). `quantize` walks the model, resolves the rules by each
layer's path, and sets that attribute to a `JdfpOp`: an `nnx.Module` (so it lives in the model's
graph, through `nnx.split`/`merge`, `nnx.jit`, `nnx.grad` and checkpoints) holding

- ``state``: a `DfpState` variable, a float32 ``[3, 6]`` array (rows ``lhs``, ``rhs``, ``grad``;
  columns ``exponent, exponent_min, saturated, underflow, nonfinite, size``: see
  ``jdfp._src.flax.core``), updated in place by every forward call; its gradient (take
  ``nnx.grad`` with ``nnx.DiffState(0, nnx.Any(nnx.Param, jdfp.DfpState))``) is the new state
  including the backward statistics: `apply_state_grads` installs it;
- ``rngs``: the model's `nnx.Rngs` when the policy rounds stochastically (stream ``"dfp"``).

Not covered in NNX: `nnx.ConvTranspose` (no injection point), the attention-weight einsums inside
`nnx.dot_product_attention`, and direct ``jax.lax`` calls in users' own modules (call
`jdfp.dot_general` there). A layer used twice shares one state (last call wins; its backward
statistics add up); give each use its own layer if that matters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdfp._src import ops
from jdfp._src.flax import core
from jdfp._src.flax.rules import QuantizeReport, Site, resolve


class DfpState(nnx.Variable):
  """jdfp's per-op scale state and counters in an NNX model (a float32 ``[3, 6]`` array)."""


def pack(state: dict) -> jax.Array:
  return jnp.stack([jnp.stack([jnp.asarray(state[r][f], core.STATE_DTYPE) for f in core.FIELDS]) for r in core.ROLES])


def unpack(arr) -> dict:
  return {r: {f: arr[i, j] for j, f in enumerate(core.FIELDS)} for i, r in enumerate(core.ROLES)}


_KIND_ATTR = {"dot_general": "dot_general", "einsum": "einsum_op", "conv": "conv_general_dilated"}


def _kind_of(module) -> str | None:
  if isinstance(module, (nnx.Linear, nnx.LinearGeneral)):
    return "dot_general"
  if isinstance(module, nnx.Einsum):
    return "einsum"
  if isinstance(module, nnx.Conv) and not isinstance(module, getattr(nnx, "ConvTranspose", ())):
    return "conv"
  return None


def _iter_modules(model):
  it = getattr(nnx, "iter_modules", None)
  return it(model) if it is not None else model.iter_modules()


class JdfpOp(nnx.Module):
  """The injected GEMM function of one NNX layer (see the module docstring)."""

  def __init__(self, kind: str, policy, path: str, rngs=None, rng_stream: str = "dfp"):
    self.kind = kind
    self.policy = policy
    self.site_path = path
    self.rng_stream = rng_stream
    self.rngs = rngs
    self.state = DfpState(pack(core.empty_state()))

  def _key(self):
    if not core.needs_key(self.policy):
      return None
    if self.rngs is None:
      raise ValueError(f"jdfp: the policy of {self.site_path or '<root>'} rounds stochastically and needs a key: pass "
                       f"rngs=nnx.Rngs(..., {self.rng_stream}=...) to jdfp.quantize (or use nearest rounding)")
    try:
      stream = getattr(self.rngs, self.rng_stream)
    except AttributeError:
      stream = self.rngs.default
    return stream()

  def _tracked_call(self, fn):
    out, new = fn(unpack(self.state[...]), self._key())
    self.state[...] = pack(new)
    return out

  def _dot(self, lhs, rhs, dims, precision=None, preferred_element_type=None, **kw):
    return self._tracked_call(lambda state, key: core.tracked_dot_general(
        lhs, rhs, dims, precision, preferred_element_type, policy=self.policy, key=key, state=state, **kw))

  def __call__(self, *args, **kwargs):
    if self.kind == "dot_general":
      return self._dot(*args, **kwargs)
    if self.kind == "conv":
      names = ("lhs", "rhs", "window_strides", "padding", "lhs_dilation", "rhs_dilation", "dimension_numbers",
               "feature_group_count", "batch_group_count", "precision", "preferred_element_type")
      full = dict(zip(names, args), **kwargs)
      full.setdefault("feature_group_count", 1)
      full.setdefault("batch_group_count", 1)
      def dot(*a, **k):
        return self._dot(*a, **k)
      dot.policy, dot.tracked_call = self.policy, self._tracked_call
      return core.conv(dot, tuple(full.get(n) for n in names))
    subscripts, *operands = args
    precision = kwargs.pop("precision", None)
    pet = kwargs.pop("preferred_element_type", None)
    extra = {k: v for k, v in kwargs.items() if v is not None}
    if len(operands) == 2 and not extra:
      y = core.einsum_via_dot(self._dot, subscripts, operands[0], operands[1], precision, pet)
      if y is not None:
        return y
    return ops.einsum(subscripts, *operands, precision=precision, preferred_element_type=pet, policy=self.policy,
                      key=self._key(), **extra)


def quantize_nnx(model, policy, rules, *, report: QuantizeReport, keep_first_and_last_fp32: bool = False,
                 rngs=None, rng_stream: str = "dfp", copy: bool = False):
  if copy:
    model = nnx.clone(model)
  layers = []
  for path, m in _iter_modules(model):
    kind = _kind_of(m)
    if kind is not None:
      layers.append(("/".join(str(p) for p in path), m, kind))
  first_last = set()
  if keep_first_and_last_fp32 and layers:
    first_last = {layers[0][0], layers[-1][0]}
  for path, m, kind in layers:
    pol, rule = resolve(rules, policy, path, kind)
    if path in first_last:
      pol, rule = None, None
    name = _KIND_ATTR[kind]
    report.record(Site(path, name, kind, pol, rule, pol is not None))
    if pol is None:
      continue
    if core.needs_key(pol) and rngs is None:
      raise ValueError(f"jdfp.quantize: the policy for {path or '<root>'} rounds stochastically and needs keys: pass "
                       f"rngs=nnx.Rngs({rng_stream}=...) to jdfp.quantize")
    op = JdfpOp(kind, pol, path, rngs if core.needs_key(pol) else None, rng_stream)
    # The layer declared the attribute static (a function); the op is graph data (it holds state).
    setattr(m, name, nnx.data(op) if hasattr(nnx, "data") else op)
  report.traces += 1
  report.warn_unmatched()
  return model


def state_of(model) -> dict:
  """``{path: state dict}`` of every `JdfpOp` in an NNX model (for `jdfp.telemetry`)."""
  out = {}
  for path, m in _iter_modules(model):
    if isinstance(m, JdfpOp):
      out["/".join(str(p) for p in path)] = unpack(m.state[...])
  return out


def apply_state_grads(model, grads):
  """Overwrite every `DfpState` of ``model`` with its gradient (the new state, backward statistics
  included) and return the remaining gradients (e.g. the `nnx.Param` ones for the optimizer).

  ``grads`` comes from ``nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Any(nnx.Param, jdfp.DfpState)))``.
  """
  dfp_grads, rest = nnx.split_state(grads, DfpState, ...)  # type: ignore[attr-defined]
  nnx.update(model, dfp_grads)
  return rest
