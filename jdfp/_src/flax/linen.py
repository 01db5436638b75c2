"""`jdfp.quantize` for Flax Linen: method interception + swapping JAX's GEMM functions.

Mechanism (the one Qwix uses for Linen, without editing the model's code):

- `quantize` copies the module and gives the copy a subclass of its class whose entry methods
  (``__call__`` by default) run inside a jdfp *frame*. Parameters, names and paths are unchanged.
- While a frame is active in this thread (`jdfp._src.flax.interception`), `nn.intercept_methods`
  keeps a stack of the Linen modules whose methods are running, and the public functions ``jax.lax.dot_general``,
  ``jax.lax.conv_general_dilated``, ``jax.lax.conv``, ``jax.lax.conv_transpose``,
  ``jax.numpy.einsum``, ``jax.numpy.dot`` and ``jax.numpy.matmul`` are replaced by dispatchers. A
  dispatcher asks the innermost running module for its path, resolves the rules, and runs the op
  through jdfp (with statistics in that module's ``"dfp"`` collection) or, for FP32, the original.
  Outside a frame (other threads, code after ``apply`` returns) the originals run.
- Covered: `nn.Dense`, `nn.DenseGeneral`, `nn.Einsum`, `nn.Conv`, `nn.ConvTranspose`, attention
  (`dot_product_attention`'s einsums and its Dense projections), and users' modules that call the
  functions above by their public names (``lax.dot_general(...)``, ``jnp.einsum(...)``, ...).
  Also the ``@`` operator (``Array.__matmul__`` calls ``jax._src.numpy.tensor_contractions.matmul``,
  swapped as well) and ``jnp.tensordot``.
  Not covered: ``jnp.inner``/``jnp.vdot``/private aliases of ``dot_general``; GEMMs traced inside a
  JAX transform the module's scope does not know (``jax.vmap`` in a module body, jitted
  ``jnp.linalg`` functions) stay in float, since they could not keep state. `jdfp.explain` lists such
  dots as float. Modules given their own ``dot_general=``/``dot_general_cls=`` keep them.

State: one variable per quantized op in the module that issued it, named after the op kind and its
order within that call of the module (``dot_general``, ``conv``, ``einsum_1``, ...). A module
called twice (weight sharing) gets one state per call (``dot_general`` and ``dot_general_1``): each
call's activations and gradients differ, and separate variables keep their backward statistics
from being summed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import tracers as flax_tracers

from jdfp._src.flax import interception, rng, tracked
from jdfp._src.flax.rules import QuantizeReport, Rule, Site, resolve
from jdfp._src.flax.state import empty_packed, pack
from jdfp._src.numerics import philox
from jdfp._src.ops.convert import counters_read
from jdfp._src.ops.policy import Policy


@dataclasses.dataclass
class Config:
  policy: Policy | None
  rules: tuple[Rule, ...]
  collection: str
  rng_stream: str
  keep_first_and_last_fp32: bool
  report: QuantizeReport
  methods: tuple[str, ...]
  first_last: frozenset | None = None  # {(path, name)} kept in FP32 by keep_first_and_last_fp32


class LinenFrame(interception.Frame):
  """A Linen model's frame: GEMMs go to the innermost running module of the quantized model."""

  def __init__(self, config: Config, discovery: list | None = None):
    self.config = config
    self.stack: list[nn.Module] = []
    self.counters: dict[int, tuple[Any, dict]] = {}
    self.discovery = discovery

  def next_name(self, module, kind: str) -> str:
    _, c = self.counters.setdefault(id(module), (module, {}))
    i = c.get(kind, 0)
    c[kind] = i + 1
    return kind if i == 0 else f"{kind}_{i}"

  def run(self, kind: str, compute, fallback):
    frame = self
    if not frame.stack:
      return fallback()
    module = frame.stack[-1]
    if getattr(module, "scope", None) is None:
      return fallback()
    # A GEMM traced inside a JAX transform that the module's scope does not know about (jax.vmap in
    # the module body, a jitted jnp.linalg function using `@`) cannot keep state: it stays in float.
    # (Flax's own lifted transforms, nn.scan / nn.remat / nn.jit, give their modules inner scopes.)
    level = getattr(module.scope, "trace_level", None)
    if level is not None and flax_tracers.current_trace() != level:
      return fallback()
    cfg = frame.config
    path = _module_path(module)
    name = frame.next_name(module, kind)
    if frame.discovery is not None:
      frame.discovery.append((path, name, kind))
      with interception.inside():
        return fallback()
    policy, rule = resolve(cfg.rules, cfg.policy, path, kind)
    if cfg.first_last is not None and (path, name) in cfg.first_last:
      policy, rule = None, None
    col = cfg.collection
    var = None
    if policy is not None:
      if module.has_variable(col, name) or module.is_mutable_collection(col):
        var = module.scope.variable(col, name, empty_packed, policy)
    cfg.report.record(Site(path, name, kind, policy, rule, var is not None))
    if policy is None:
      with interception.inside():
        return fallback()
    key = None
    if policy.needs_key:
      if module.has_rng(cfg.rng_stream):
        key = rng.make_rng(module, cfg.rng_stream)
      elif module.is_initializing():
        key = rng.make_rng(module, "params")
      elif policy.forward_needs_key:
        raise ValueError(
            f"jdfp: the policy of {path or '<root>'}/{name} rounds stochastically and needs a key, but "
            f"no {cfg.rng_stream!r} RNG stream was given: pass rngs={{'{cfg.rng_stream}': key}} to apply "
            "(or use a policy with nearest rounding)")
      # Else inference without the stream: the forward rounds to nearest. A backward that rounds
      # stochastically raises when it is traced (`check_backward_key`).
    calls = []

    def tracked_call(fn):
      """Run ``fn(state, key) -> (out, new_state)`` with this op's state (once; later calls stateless)."""
      if calls:  # one GEMM per op; a second one (never expected) runs without state
        out, _ = fn(None, None if key is None else philox.fold_in_words(key, len(calls)))
        return out
      calls.append(1)
      stored = var is not None and module.is_mutable_collection(col)
      with counters_read(stored):  # forward statistics nobody stores need no counting conversions
        out, new = fn(None if var is None else var.value, key)
      if stored:
        var.value = pack(new)
      return out

    # init creates the state but leaves amax histories empty: init's (often dummy) batch must not
    # set the exponents of the first training steps.
    update_history = not module.is_initializing()

    def dot_fn(lhs, rhs, dims, precision=None, preferred_element_type=None, **kw):
      return tracked_call(lambda state, k: tracked.tracked_dot_general(
          lhs, rhs, dims, precision, preferred_element_type, policy=policy, key=k, state=state,
          update_history=update_history, **kw))

    dot_fn.policy, dot_fn.key, dot_fn.tracked_call = policy, key, tracked_call
    dot_fn.update_history = update_history

    with interception.inside():
      return compute(dot_fn)


def _module_path(module) -> str:
  try:
    return "/".join(str(p) for p in module.path)
  except Exception:  # pylint: disable=broad-except
    return ""


def _tracker(next_fun, args, kwargs, context):
  frame = _active_frame_any()
  if frame is None:
    return next_fun(*args, **kwargs)
  frame.stack.append(context.module)
  try:
    return next_fun(*args, **kwargs)
  finally:
    frame.stack.pop()


def _active_frame_any() -> LinenFrame | None:
  f = interception.frames()
  return f[-1] if f and isinstance(f[-1], LinenFrame) else None


@contextlib.contextmanager
def frame(config: Config, module, discovery=None):
  fr = LinenFrame(config, discovery)
  fr.stack.append(module)
  interception.frames().append(fr)
  try:
    with interception.patched(), nn.intercept_methods(_tracker):
      yield fr
  finally:
    interception.frames().pop()


def _struct(x):
  if isinstance(x, (jax.Array, jnp.ndarray)) or hasattr(x, "shape") and hasattr(x, "dtype"):
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
  return x


def _discover(module, method_name, args, kwargs, config: Config):
  """Abstractly run an unbound copy of ``module`` to find its first and last op (for
  keep_first_and_last_fp32)."""
  found: list = []
  leaves, treedef = jax.tree.flatten((args, kwargs))
  arr = [i for i, x in enumerate(leaves) if hasattr(x, "shape") and hasattr(x, "dtype")]
  structs = [_struct(leaves[i]) for i in arr]
  streams = set(getattr(module.scope, "rngs", {}) or {}) | {"params", config.rng_stream}
  unbound = module.clone(parent=None)

  def run(*xs):
    ls = list(leaves)
    for i, x in zip(arr, xs):
      ls[i] = x
    a, k = jax.tree.unflatten(treedef, ls)
    rngs = {s: jax.random.key(0) for s in streams}
    return unbound.init_with_output(rngs, *a, method=method_name, **k)

  fr = LinenFrame(config, found)
  interception.frames().append(fr)
  try:
    with interception.patched(), nn.intercept_methods(_tracker):
      jax.eval_shape(run, *structs)
  finally:
    interception.frames().pop()
  if not found:
    return frozenset()
  return frozenset({found[0][:2], found[-1][:2]})


def _wrap_method(method, config: Config, method_name: str):
  def wrapped(self, *args, **kwargs):
    if getattr(self, "scope", None) is None:
      return method(self, *args, **kwargs)
    frames = interception.frames()
    if frames and getattr(frames[-1], "config", None) is config:
      # Nested call of the same quantized model (e.g. inside nn.scan): already inside its frame.
      return method(self, *args, **kwargs)
    if frames and getattr(frames[-1], "discovery", None) is not None:
      frames[-1].stack.append(self)
      try:
        return method(self, *args, **kwargs)
      finally:
        frames[-1].stack.pop()
    if config.keep_first_and_last_fp32 and config.first_last is None:
      config.first_last = _discover(self, method_name, args, kwargs, config)
    with frame(config, self):
      out = method(self, *args, **kwargs)
    config.report.traces += 1
    config.report.warn_unmatched()
    return out

  functools.update_wrapper(wrapped, method)  # keeps `compact` and the signature
  return wrapped


def quantize_linen(module: nn.Module, config: Config) -> nn.Module:
  cls = type(module)
  base = getattr(cls, "_jdfp_unquantized_type", cls)
  fields = {"_jdfp_unquantized_type": base, "_jdfp_config": config}
  for name in config.methods:
    method = getattr(base, name)
    wrapped = False
    while hasattr(method, "method_handler_wrapped"):
      method = method.__wrapped__
      wrapped = True
    new = _wrap_method(method, config, name)
    if wrapped:
      new = nn.module.wrap_method_once(new)
    fields[name] = new
  new_cls = type(base.__name__, (base,), fields)
  new_cls.__module__ = base.__module__
  out = module.copy() if hasattr(module, "copy") else module.clone()
  object.__setattr__(out, "__class__", new_cls)
  return out
