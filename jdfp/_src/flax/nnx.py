"""`jdfp.quantize` for Flax NNX: swap the injectable GEMM functions of the model's layers.

NNX layers take their GEMM as an attribute: `nnx.Linear` / `nnx.LinearGeneral` ``dot_general``,
`nnx.Einsum` ``einsum_op``, `nnx.Conv` ``conv_general_dilated`` (and `nnx.MultiHeadAttention`
projects through `nnx.LinearGeneral`). `quantize` walks the model, resolves the rules by each
layer's path, and sets that attribute to a `JdfpOp`: an `nnx.Module` (so it lives in the model's
graph, through `nnx.split`/`merge`, `nnx.jit`, `nnx.grad` and checkpoints) holding

- ``state``: a `DfpState` variable, a float32 ``[3, 6]`` array (rows ``lhs``, ``rhs``, ``grad``;
  columns ``exponent, exponent_min, saturated, underflow, nonfinite, size``: see
  ``jdfp._src.flax.state``), updated in place by every forward call; its gradient (take
  ``nnx.grad`` with ``nnx.DiffState(0, nnx.Any(nnx.Param, jdfp.DfpState))``) is the new state
  including the backward statistics: `apply_state_grads` installs it;
- ``rngs``: the model's `nnx.Rngs` when the policy rounds stochastically (stream ``"dfp"``).

Layers without an injection point run their call inside a `JdfpScope` (an interception
frame: JAX's GEMM functions and the ``@`` operator are swapped for the call's duration, and the
n-th GEMM uses the scope's n-th `JdfpOp`): `nnx.ConvTranspose` (one op, created by `quantize`),
users' own modules (``x @ w``, ``jnp.einsum``, ``lax.dot_general``, ...; ops created at the first
call, so the first step's backward statistics of those are not recorded when that call happens
inside ``nnx.grad``), and `nnx.MultiHeadAttention`'s ``attention_fn`` (a `JdfpAttention` with two
einsum ops; `nnx.dot_product_attention` is steered to its einsum path, since its fused
``jax.nn.dot_product_attention`` path runs under ``vmap``). Layers a rule keeps in FP32 get a scope
that keeps every GEMM in float (so an enclosing quantized module does not take them).
GEMMs inside a JAX transform in a layer's body (``jax.vmap``) stay in float. A layer used twice
shares one state (last call wins; its backward statistics add up); give each use its own layer if
that matters. Delayed scaling: the ``DfpState`` array is ``[3, 6 + H]`` (the amax history after the
six fields).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import tracers as flax_tracers

from jdfp._src.flax import interception, rng, tracked
from jdfp._src.flax import state as dfp_state
from jdfp._src.flax.gemm_rewrites import einsum_via_dot
from jdfp._src.flax.rules import QuantizeReport, Site, resolve
from jdfp._src.ops.einsum import einsum


class DfpState(nnx.Variable):
  """jdfp's per-op scale state and counters in an NNX model (a float32 ``[3, 6]`` array)."""


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

  def __init__(self, kind: str, policy, path: str, rngs=None, rng_stream: str = "dfp", name: str | None = None):
    self.kind = kind
    self.policy = policy
    self.site_path = path
    self.site_name = kind if name is None else name  # the op's name in quantize_report and telemetry
    self.rng_stream = rng_stream
    self.rngs = rngs
    self.state = DfpState(dfp_state.empty_packed(policy))

  def _key(self):
    if not self.policy.needs_key:
      return None
    if self.rngs is None and not self.policy.forward_needs_key:
      return None  # inference needs no key; a stochastic backward raises when it is traced
    if self.rngs is None:
      raise ValueError(f"jdfp: the policy of {self.site_path or '<root>'} rounds stochastically and needs a key: pass "
                       f"rngs=nnx.Rngs(..., {self.rng_stream}=...) to jdfp.quantize (or use nearest rounding)")
    try:
      stream = getattr(self.rngs, self.rng_stream)
    except AttributeError:
      stream = self.rngs.default
    return rng.stream_key(stream)

  def _tracked_call(self, fn):
    out, new = fn(self.state[...], self._key())
    self.state[...] = dfp_state.pack(new)
    return out

  def _dot(self, lhs, rhs, dims, precision=None, preferred_element_type=None, **kw):
    return self._tracked_call(lambda state, key: tracked.tracked_dot_general(
        lhs, rhs, dims, precision, preferred_element_type, policy=self.policy, key=key, state=state, **kw))

  def __call__(self, *args, **kwargs):
    # jdfp's own dots must not be taken by an enclosing layer's frame; the name scope puts the
    # layer's path into the jaxpr (for `jdfp.explain`).
    with interception.inside(), jax.named_scope(self.site_path or "root"):
      return self._call(*args, **kwargs)

  def _call(self, *args, **kwargs):
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
      return tracked.conv(dot, tuple(full.get(n) for n in names))
    subscripts, *operands = args
    precision = kwargs.pop("precision", None)
    pet = kwargs.pop("preferred_element_type", None)
    extra = {k: v for k, v in kwargs.items() if v is not None}
    if len(operands) == 2 and not extra:
      y = einsum_via_dot(self._dot, subscripts, operands[0], operands[1], precision, pet)
      if y is not None:
        return y
    return einsum(subscripts, *operands, precision=precision, preferred_element_type=pet, policy=self.policy,
                      key=self._key(), **extra)


# ------------------------------------------------------------------------------------------------
# Layers without an injection point (nnx.ConvTranspose, users' own modules) and attention: a
# `JdfpScope` runs the layer's call inside a frame of the Linen mechanism (JAX's GEMM functions and
# the @ operator swapped for dispatchers, see linen.py); the n-th GEMM of a call uses the scope's
# n-th `JdfpOp` (created at quantize time for the known layers, at the first call otherwise).


class _NoSow:
  """Stands in for ``module=`` of `nnx.dot_product_attention` so that it takes its einsum path
  (with ``dropout_rate == 0`` and no module it calls ``jax.nn.dot_product_attention``, whose vmapped
  einsums cannot keep state) without sowing attention weights."""

  def sow(self, *args, **kwargs):
    del args, kwargs


class _ScopeFrame(interception.Frame):
  def __init__(self, scope):
    self.scope = scope
    self.count = 0
    self.level = flax_tracers.current_trace()

  def run(self, kind, compute, fallback):
    scope = self.scope
    if scope.policy is None or flax_tracers.current_trace() != self.level:
      # An FP32 layer (kept out by a rule) or a transform inside the layer's body (vmap): float.
      with interception.inside():
        return fallback()
    i, self.count = self.count, self.count + 1
    if i < len(scope.ops):
      op = scope.ops[i]
    else:
      op = JdfpOp(kind, scope.policy, scope.site_path, scope.rngs, scope.rng_stream, f"ops/{i}")
      scope.ops.append(op)
      if scope.report is not None:
        scope.report.record(Site(scope.site_path, f"ops/{i}", kind, scope.policy, scope.rule, True))

    def dot_fn(lhs, rhs, dims, precision=None, preferred_element_type=None, **kw):
      return op._dot(lhs, rhs, dims, precision, preferred_element_type, **kw)  # pylint: disable=protected-access

    dot_fn.policy, dot_fn.tracked_call = op.policy, op._tracked_call  # pylint: disable=protected-access
    dot_fn.key = op._key()  # pylint: disable=protected-access
    with interception.inside():
      return compute(dot_fn)


class JdfpScope(nnx.Module):
  """The quantized GEMMs of one NNX layer that has no injectable GEMM function: ``ops[i]`` is the
  `JdfpOp` (state, key stream) of the i-th GEMM the layer's call issues."""

  def __init__(self, policy, path: str, rngs=None, rng_stream: str = "dfp", kinds=(), rule=None, report=None):
    self.policy = policy
    self.site_path = path
    self.rngs = rngs
    self.rng_stream = rng_stream
    self.rule = rule
    self.report = report
    self.ops = nnx.List([JdfpOp(k, policy, path, rngs, rng_stream, f"ops/{i}") for i, k in enumerate(kinds)])

  def call(self, fn, *args, **kwargs):
    with interception.push_frame(_ScopeFrame(self)):
      return fn(*args, **kwargs)


class JdfpAttention(nnx.Module):
  """The injected ``attention_fn`` of an `nnx.MultiHeadAttention`: the wrapped function (default
  `nnx.dot_product_attention`) with its two einsums (weights, values) through jdfp."""

  def __init__(self, fn, scope: JdfpScope):
    self.fn = fn
    self.scope = scope

  def __call__(self, *args, **kwargs):
    if self.fn is nnx.dot_product_attention and kwargs.get("module") is None:
      kwargs["module"] = _NoSow()
    return self.scope.call(self.fn, *args, **kwargs)


_QUANTIZED_CLASSES: dict = {}


def _scoped_class(cls):
  """A subclass of ``cls`` whose ``__call__`` runs inside the instance's `JdfpScope`."""
  if getattr(cls, "_jdfp_scoped", False):
    return cls
  if cls not in _QUANTIZED_CLASSES:
    base_call = cls.__call__

    def __call__(self, *args, **kwargs):  # noqa: N807
      scope = getattr(self, "_jdfp_scope", None)
      if scope is None:
        return base_call(self, *args, **kwargs)
      return scope.call(base_call, self, *args, **kwargs)

    functools.update_wrapper(__call__, base_call)
    new = type(cls.__name__, (cls,), {"__call__": __call__, "_jdfp_scoped": True,
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    _QUANTIZED_CLASSES[cls] = new
  return _QUANTIZED_CLASSES[cls]


def _is_users_module(m) -> bool:
  """Modules defined outside Flax and jdfp (their own GEMMs are intercepted through a scope)."""
  mod = type(m).__module__ or ""
  return callable(m) and not mod.startswith(("flax.", "jdfp."))


def _fp32_scope(m, path):
  """Run ``m``'s call in a frame that keeps every GEMM in float."""
  m._jdfp_scope = JdfpScope(None, path)  # pylint: disable=protected-access
  object.__setattr__(m, "__class__", _scoped_class(type(m)))


def is_quantized(model) -> bool:
  """Whether ``model`` already holds jdfp ops or scopes (it went through `jdfp.quantize`)."""
  return any(isinstance(m, (JdfpOp, JdfpScope)) for _, m in _iter_modules(model))


def quantize_nnx(model, policy, rules, *, report: QuantizeReport, keep_first_and_last_fp32: bool = False,
                 rngs=None, rng_stream: str = "dfp", copy: bool = False):
  if copy:
    model = nnx.clone(model)
  layers = []
  scoped = []
  for path, m in list(_iter_modules(model)):
    p = "/".join(str(x) for x in path)
    kind = _kind_of(m)
    if kind is not None:
      layers.append((p, m, kind))
    elif isinstance(m, nnx.ConvTranspose) or isinstance(m, nnx.MultiHeadAttention) or _is_users_module(m):
      scoped.append((p, m))
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
      _fp32_scope(m, path)  # not taken by an enclosing quantized module's frame either
      continue
    if pol.forward_needs_key and rngs is None:
      raise ValueError(f"jdfp.quantize: the policy for {path or '<root>'} rounds stochastically and needs keys: pass "
                       f"rngs=nnx.Rngs({rng_stream}=...) to jdfp.quantize")
    op = JdfpOp(kind, pol, path, rngs if pol.needs_key else None, rng_stream, name)
    # The layer declared the attribute static (a function); the op is graph data (it holds state).
    setattr(m, name, nnx.data(op) if hasattr(nnx, "data") else op)
  for path, m in scoped:
    if isinstance(m, nnx.ConvTranspose):
      kind, kinds = "conv_transpose", ("conv_transpose",)
    elif isinstance(m, nnx.MultiHeadAttention):
      kind, kinds = "einsum", ("einsum", "einsum")
    else:
      kind, kinds = "dot_general", ()
    pol, rule = resolve(rules, policy, path, kind)
    if pol is None:
      if kinds:
        report.record(Site(path, "attention_fn" if kind == "einsum" else "conv_transpose", kind, None, rule, False))
      _fp32_scope(m, path)
      continue
    if pol.forward_needs_key and rngs is None:
      raise ValueError(f"jdfp.quantize: the policy for {path or '<root>'} rounds stochastically and needs keys: pass "
                       f"rngs=nnx.Rngs({rng_stream}=...) to jdfp.quantize")
    scope = JdfpScope(pol, path, rngs if pol.needs_key else None, rng_stream, kinds, rule,
                      None if kinds else report)
    for i, k in enumerate(kinds):
      report.record(Site(path, f"ops/{i}", k, pol, rule, True))
    if isinstance(m, nnx.MultiHeadAttention):
      m.attention_fn = nnx.data(JdfpAttention(m.attention_fn, scope)) if hasattr(nnx, "data") else \
          JdfpAttention(m.attention_fn, scope)
    else:
      m._jdfp_scope = scope  # pylint: disable=protected-access
      object.__setattr__(m, "__class__", _scoped_class(type(m)))
  report.traces += 1
  report.warn_unmatched()
  return model


def state_of(model) -> dict:
  """``{"module path/op name": state dict}`` of every `JdfpOp` in an NNX model (for `jdfp.telemetry`;
  the names of `jdfp.quantize_report`)."""
  out = {}
  for _, m in _iter_modules(model):
    if isinstance(m, JdfpOp):
      out["/".join(p for p in (m.site_path, m.site_name) if p)] = dfp_state.unpack(m.state[...])
  return out


def apply_state_grads(model, grads):
  """Overwrite every `DfpState` of ``model`` with its gradient (the new state, backward statistics
  included) and return the remaining gradients (e.g. the `nnx.Param` ones for the optimizer).

  ``grads`` comes from ``nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Any(nnx.Param, jdfp.DfpState)))``.
  """
  dfp_grads, rest = nnx.split_state(grads, DfpState, ...)  # type: ignore[attr-defined]
  nnx.update(model, dfp_grads)
  return rest
