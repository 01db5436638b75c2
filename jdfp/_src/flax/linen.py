"""`jdfp.quantize` for Flax Linen: method interception + swapping JAX's GEMM functions.

Mechanism (the one Qwix uses for Linen, without editing the model's code):

- `quantize` copies the module and gives the copy a subclass of its class whose entry methods
  (``__call__`` by default) run inside a jdfp *frame*. Parameters, names and paths are unchanged.
- While a frame is active in this thread, `nn.intercept_methods` keeps a stack of the Linen modules
  whose methods are running, and the public functions ``jax.lax.dot_general``,
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
import functools
import dataclasses
import threading
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import tracers as flax_tracers
from jax._src.numpy import tensor_contractions as jnp_tc

from jdfp._src import ops
from jdfp._src.flax import core
from jdfp._src.flax.rules import QuantizeReport, Rule, Site, resolve
from jdfp._src.policy import Policy

_tls = threading.local()
_patch_lock = threading.Lock()
_patch_depth = 0

_ORIG = {
    "dot_general": jax.lax.dot_general,
    "conv_general_dilated": jax.lax.conv_general_dilated,
    "conv": jax.lax.conv,
    "conv_transpose": jax.lax.conv_transpose,
    "einsum": jnp.einsum,
    "dot": jnp.dot,
    "matmul": jnp.matmul,
    "tensordot": jnp.tensordot,
}


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


class _Frame:
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


def _frames() -> list:
  f = getattr(_tls, "frames", None)
  if f is None:
    f = _tls.frames = []
  return f


def _active() -> _Frame | None:
  if getattr(_tls, "inside", 0):
    return None
  f = _frames()
  return f[-1] if f else None


@contextlib.contextmanager
def _inside():
  _tls.inside = getattr(_tls, "inside", 0) + 1
  try:
    yield
  finally:
    _tls.inside -= 1


# ------------------------------------------------------------------------------------------------
# The dispatchers that replace JAX's functions while a frame is active.


def _module_path(module) -> str:
  try:
    return "/".join(str(p) for p in module.path)
  except Exception:  # pylint: disable=broad-except
    return ""


def _run(kind: str, compute, fallback):
  frame = _active()
  if frame is None:
    return fallback()
  if hasattr(frame, "run"):  # an NNX layer's frame (jdfp._src.flax.nnx)
    return frame.run(kind, compute, fallback)
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
    with _inside():
      return fallback()
  policy, rule = resolve(cfg.rules, cfg.policy, path, kind)
  if cfg.first_last is not None and (path, name) in cfg.first_last:
    policy, rule = None, None
  col = cfg.collection
  var = None
  if policy is not None:
    if module.has_variable(col, name) or module.is_mutable_collection(col):
      var = module.scope.variable(col, name, core.empty_state, policy)
  cfg.report.record(Site(path, name, kind, policy, rule, var is not None))
  if policy is None:
    with _inside():
      return fallback()
  key = None
  if core.needs_key(policy):
    if module.has_rng(cfg.rng_stream):
      key = module.make_rng(cfg.rng_stream)
    elif module.is_initializing():
      key = module.make_rng("params")
    else:
      raise ValueError(
          f"jdfp: the policy of {path or '<root>'}/{name} rounds stochastically and needs a key, but "
          f"no {cfg.rng_stream!r} RNG stream was given: pass rngs={{'{cfg.rng_stream}': key}} to apply "
          "(or use a policy with nearest rounding)")
  calls = []

  def tracked_call(fn):
    """Run ``fn(state, key) -> (out, new_state)`` with this op's state (once; later calls stateless)."""
    if calls:  # one GEMM per op; a second one (never expected) runs without state
      out, _ = fn(None, None if key is None else jax.random.fold_in(key, len(calls)))
      return out
    calls.append(1)
    out, new = fn(None if var is None else var.value, key)
    if var is not None and module.is_mutable_collection(col):
      var.value = new
    return out

  # init creates the state but leaves amax histories empty: init's (often dummy) batch must not
  # set the exponents of the first training steps.
  update_history = not module.is_initializing()

  def dot_fn(lhs, rhs, dims, precision=None, preferred_element_type=None, **kw):
    return tracked_call(lambda state, k: core.tracked_dot_general(
        lhs, rhs, dims, precision, preferred_element_type, policy=policy, key=k, state=state,
        update_history=update_history, **kw))

  dot_fn.policy, dot_fn.key, dot_fn.tracked_call = policy, key, tracked_call
  dot_fn.update_history = update_history

  with _inside():
    return compute(dot_fn)


def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
  orig = lambda: _ORIG["dot_general"](lhs, rhs, dimension_numbers, precision, preferred_element_type, **kw)
  if _active() is None:
    return orig()
  if not (jnp.issubdtype(jnp.result_type(lhs), jnp.floating) and jnp.issubdtype(jnp.result_type(rhs), jnp.floating)):
    return orig()
  return _run("dot_general", lambda dot: dot(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kw),
              orig)


def _conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                          preferred_element_type=None, **kw):
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
          batch_group_count, precision, preferred_element_type)
  orig = lambda: _ORIG["conv_general_dilated"](*args, **kw)
  if _active() is None or batch_group_count != 1 or any(v is not None for v in kw.values()):
    return orig()
  return _run("conv", lambda dot: core.conv(dot, args), orig)


def _conv(lhs, rhs, window_strides, padding, precision=None, preferred_element_type=None):
  return _conv_general_dilated(lhs, rhs, window_strides, padding, precision=precision,
                               preferred_element_type=preferred_element_type)


def _conv_transpose(lhs, rhs, strides, padding, rhs_dilation=None, dimension_numbers=None, transpose_kernel=False,
                    precision=None, preferred_element_type=None, **kw):
  args = (lhs, rhs, strides, padding)
  kwargs = dict(rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers, transpose_kernel=transpose_kernel,
                precision=precision, preferred_element_type=preferred_element_type, **kw)
  orig = lambda: _ORIG["conv_transpose"](*args, **kwargs)
  if _active() is None:
    return orig()

  def compute(dot):
    def conv_fn(*a, **k):
      k.pop("batch_group_count", None)
      return core.conv_via_dot(dot, *a, **k)
    return core.conv_transpose_via(conv_fn, *args, **kwargs)

  return _run("conv_transpose", compute, orig)


def _einsum(subscripts, *operands, out=None, optimize="auto", precision=None, preferred_element_type=None,
            _dot_general=None, **kw):
  hook = _dot_general
  std_hook = hook is None or hook is _ORIG["dot_general"] or hook is _dot_general_patched()
  kwargs = dict(out=out, optimize=optimize, precision=precision, preferred_element_type=preferred_element_type, **kw)

  def orig():
    extra = {} if hook is None else {"_dot_general": hook}
    return _ORIG["einsum"](subscripts, *operands, **kwargs, **extra)

  if (_active() is None or not std_hook or not isinstance(subscripts, str) or len(operands) != 2 or out is not None
      or any(v is not None for v in kw.values())
      or not all(jnp.issubdtype(jnp.result_type(o), jnp.floating) for o in operands)):
    return orig()
  if core._parse_einsum(subscripts, jnp.ndim(operands[0]), jnp.ndim(operands[1])) is None:
    return orig()

  def compute(dot):
    y = core.einsum_via_dot(dot, subscripts, operands[0], operands[1], precision, preferred_element_type)
    if y is None:  # broadcasting einsum: jnp.einsum with jdfp contractions (no statistics)
      return ops.einsum(subscripts, *operands, precision=precision, preferred_element_type=preferred_element_type,
                        policy=dot.policy, key=dot.key)
    return y
  return _run("einsum", compute, orig)


def _dot(a, b, *, precision=None, preferred_element_type=None, **kw):
  orig = lambda: _ORIG["dot"](a, b, precision=precision, preferred_element_type=preferred_element_type, **kw)
  if _active() is None or kw or jnp.ndim(a) == 0 or jnp.ndim(b) == 0:
    return orig()
  if not (jnp.issubdtype(jnp.result_type(a), jnp.floating) and jnp.issubdtype(jnp.result_type(b), jnp.floating)):
    return orig()
  na, nb = jnp.ndim(a), jnp.ndim(b)
  dims = (((na - 1,), (max(nb - 2, 0),)), ((), ()))
  return _run("dot_general", lambda dot: dot(a, b, dims, precision, preferred_element_type), orig)


def _floats(*xs) -> bool:
  return all(jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in xs)


def _matmul(a, b, *, precision=None, preferred_element_type=None, **kw):
  """jnp.matmul and the ``@`` operator (jax's ``Array.__matmul__`` calls
  ``jax._src.numpy.tensor_contractions.matmul``, which is swapped too)."""
  orig = lambda: _ORIG["matmul"](a, b, precision=precision, preferred_element_type=preferred_element_type, **kw)
  if _active() is None or any(v is not None for v in kw.values()):
    return orig()
  na, nb = jnp.ndim(a), jnp.ndim(b)
  if na == 0 or nb == 0 or not _floats(a, b):
    return orig()

  def compute(dot):
    x = jnp.asarray(a) if na > 1 else jnp.asarray(a)[None]
    y = jnp.asarray(b) if nb > 1 else jnp.asarray(b)[:, None]
    if y.ndim == 2:  # weights-like right operand: contract x's last axis with y's rows, no broadcast
      dims = (((x.ndim - 1,), (0,)), ((), ()))
    else:  # numpy broadcasting of the batch dims, then one batched GEMM
      batch = jnp.broadcast_shapes(x.shape[:-2], y.shape[:-2])
      x = jnp.broadcast_to(x, batch + x.shape[-2:])
      y = jnp.broadcast_to(y, batch + y.shape[-2:])
      nd = len(batch)
      dims = (((nd + 1,), (nd,)), (tuple(range(nd)), tuple(range(nd))))
    out = dot(x, y, dims, precision, preferred_element_type)
    if nb == 1:
      out = out[..., 0]
    if na == 1:
      out = out[..., 0, :] if nb > 1 else out[..., 0]
    return out

  return _run("dot_general", compute, orig)


def _tensordot(a, b, axes=2, *, precision=None, preferred_element_type=None, **kw):
  orig = lambda: _ORIG["tensordot"](a, b, axes, precision=precision, preferred_element_type=preferred_element_type,
                                    **kw)
  if _active() is None or any(v is not None for v in kw.values()) or not _floats(a, b):
    return orig()
  na, nb = jnp.ndim(a), jnp.ndim(b)
  try:
    if isinstance(axes, int):
      ca, cb = tuple(range(na - axes, na)), tuple(range(axes))
    else:
      ca, cb = axes
      ca = (ca,) if isinstance(ca, int) else tuple(ca)
      cb = (cb,) if isinstance(cb, int) else tuple(cb)
      ca, cb = tuple(int(d) % na for d in ca), tuple(int(d) % nb for d in cb)
  except (TypeError, ValueError):
    return orig()
  if len(ca) != len(cb) or na == 0 or nb == 0:
    return orig()
  dims = ((ca, cb), ((), ()))
  return _run("dot_general", lambda dot: dot(a, b, dims, precision, preferred_element_type), orig)


_PATCHES = {
    (jax.lax, "dot_general"): _dot_general,
    (jax.lax, "conv_general_dilated"): _conv_general_dilated,
    (jax.lax, "conv"): _conv,
    (jax.lax, "conv_transpose"): _conv_transpose,
    (jnp, "einsum"): _einsum,
    (jnp, "dot"): _dot,
    (jnp, "matmul"): _matmul,
    (jnp, "tensordot"): _tensordot,
    # `Array.__matmul__` (the @ operator) calls jax._src.numpy.tensor_contractions.matmul.
    (jnp_tc, "matmul"): _matmul,
}
_SAVED = {(id(mod), name): getattr(mod, name) for (mod, name) in _PATCHES}


def _dot_general_patched():
  return _dot_general


@contextlib.contextmanager
def _patched():
  global _patch_depth
  with _patch_lock:
    if _patch_depth == 0:
      for (mod, name), fn in _PATCHES.items():
        setattr(mod, name, fn)
    _patch_depth += 1
  try:
    yield
  finally:
    with _patch_lock:
      _patch_depth -= 1
      if _patch_depth == 0:
        for (mod, name), _ in _PATCHES.items():
          setattr(mod, name, _SAVED[(id(mod), name)])


def _tracker(next_fun, args, kwargs, context):
  frame = _active_frame_any()
  if frame is None:
    return next_fun(*args, **kwargs)
  frame.stack.append(context.module)
  try:
    return next_fun(*args, **kwargs)
  finally:
    frame.stack.pop()


def _active_frame_any():
  f = _frames()
  return f[-1] if f else None


@contextlib.contextmanager
def push_frame(fr):
  """Make ``fr`` the innermost frame (with JAX's functions swapped) for the duration; NNX layers use
  it with a frame that has a ``run(kind, compute, fallback)`` method."""
  _frames().append(fr)
  try:
    with _patched():
      yield fr
  finally:
    _frames().pop()


def inside():
  """Context in which the dispatchers run JAX's originals (jdfp's own ops inside a frame)."""
  return _inside()


@contextlib.contextmanager
def frame(config: Config, module, discovery=None):
  fr = _Frame(config, discovery)
  fr.stack.append(module)
  _frames().append(fr)
  try:
    with _patched(), nn.intercept_methods(_tracker):
      yield fr
  finally:
    _frames().pop()


# ------------------------------------------------------------------------------------------------
# The quantized Linen class.


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

  fr = _Frame(config, found)
  _frames().append(fr)
  try:
    with _patched(), nn.intercept_methods(_tracker):
      jax.eval_shape(run, *structs)
  finally:
    _frames().pop()
  if not found:
    return frozenset()
  return frozenset({found[0][:2], found[-1][:2]})


def _wrap_method(method, config: Config, method_name: str):
  def wrapped(self, *args, **kwargs):
    if getattr(self, "scope", None) is None:
      return method(self, *args, **kwargs)
    frames = _frames()
    if frames and frames[-1].config is config:
      # Nested call of the same quantized model (e.g. inside nn.scan): already inside its frame.
      return method(self, *args, **kwargs)
    if frames and frames[-1].discovery is not None:
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
