"""Interception: while a jdfp *frame* is active in this thread, JAX's public GEMM functions are
replaced by dispatchers that hand each GEMM to the frame (the mechanism Qwix uses; shared by the
Linen and the NNX integrations).

Swapped: ``jax.lax.dot_general``, ``jax.lax.conv_general_dilated``, ``jax.lax.conv``,
``jax.lax.conv_transpose``, ``jax.numpy.einsum``, ``jax.numpy.dot``, ``jax.numpy.matmul``,
``jax.numpy.tensordot`` and the ``@`` operator (``Array.__matmul__`` calls
``jax._src.numpy.tensor_contractions.matmul``). A dispatcher turns its call into
``frame.run(kind, compute, fallback)``: ``compute(dot)`` computes the call with the frame's dot
function, ``fallback()`` with JAX's original. Outside a frame (other threads, code after ``apply``
returns) and inside `inside()` (jdfp's own ops) the originals run.
"""

from __future__ import annotations

import contextlib
import threading

import jax
import jax.numpy as jnp
from jax._src.numpy import tensor_contractions as jnp_tc

from jdfp._src.flax import tracked
from jdfp._src.flax.gemm_rewrites import conv_transpose_via, conv_via_dot, einsum_via_dot, parse_einsum
from jdfp._src.ops.einsum import einsum

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


class Frame:
  """What a dispatcher hands its GEMM to. Subclasses decide per call: run ``compute(dot)`` with a
  jdfp dot function, or ``fallback()`` (JAX's original, e.g. for FP32 layers)."""

  def run(self, kind: str, compute, fallback):
    raise NotImplementedError


def frames() -> list:
  """This thread's stack of frames (innermost last)."""
  f = getattr(_tls, "frames", None)
  if f is None:
    f = _tls.frames = []
  return f


def active_frame() -> Frame | None:
  """The innermost frame, or None outside frames and inside `inside()`."""
  if getattr(_tls, "inside", 0):
    return None
  f = frames()
  return f[-1] if f else None


@contextlib.contextmanager
def inside():
  """Context in which the dispatchers run JAX's originals (jdfp's own ops inside a frame)."""
  _tls.inside = getattr(_tls, "inside", 0) + 1
  try:
    yield
  finally:
    _tls.inside -= 1


def _run(kind: str, compute, fallback):
  frame = active_frame()
  if frame is None:
    return fallback()
  return frame.run(kind, compute, fallback)


# ------------------------------------------------------------------------------------------------
# The dispatchers that replace JAX's functions while a frame is active.


def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
  orig = lambda: _ORIG["dot_general"](lhs, rhs, dimension_numbers, precision, preferred_element_type, **kw)
  if active_frame() is None:
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
  if active_frame() is None or batch_group_count != 1 or any(v is not None for v in kw.values()):
    return orig()
  return _run("conv", lambda dot: tracked.conv(dot, args), orig)


def _conv(lhs, rhs, window_strides, padding, precision=None, preferred_element_type=None):
  return _conv_general_dilated(lhs, rhs, window_strides, padding, precision=precision,
                               preferred_element_type=preferred_element_type)


def _conv_transpose(lhs, rhs, strides, padding, rhs_dilation=None, dimension_numbers=None, transpose_kernel=False,
                    precision=None, preferred_element_type=None, **kw):
  args = (lhs, rhs, strides, padding)
  kwargs = dict(rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers, transpose_kernel=transpose_kernel,
                precision=precision, preferred_element_type=preferred_element_type, **kw)
  orig = lambda: _ORIG["conv_transpose"](*args, **kwargs)
  if active_frame() is None:
    return orig()

  def compute(dot):
    def conv_fn(*a, **k):
      k.pop("batch_group_count", None)
      return conv_via_dot(dot, *a, **k)
    return conv_transpose_via(conv_fn, *args, **kwargs)

  return _run("conv_transpose", compute, orig)


def _einsum(subscripts, *operands, out=None, optimize="auto", precision=None, preferred_element_type=None,
            _dot_general=None, **kw):
  hook = _dot_general
  std_hook = hook is None or hook is _ORIG["dot_general"] or hook is _dot_general_patched()
  kwargs = dict(out=out, optimize=optimize, precision=precision, preferred_element_type=preferred_element_type, **kw)

  def orig():
    extra = {} if hook is None else {"_dot_general": hook}
    return _ORIG["einsum"](subscripts, *operands, **kwargs, **extra)

  if (active_frame() is None or not std_hook or not isinstance(subscripts, str) or len(operands) != 2 or out is not None
      or any(v is not None for v in kw.values())
      or not all(jnp.issubdtype(jnp.result_type(o), jnp.floating) for o in operands)):
    return orig()
  if parse_einsum(subscripts, jnp.ndim(operands[0]), jnp.ndim(operands[1])) is None:
    return orig()

  def compute(dot):
    y = einsum_via_dot(dot, subscripts, operands[0], operands[1], precision, preferred_element_type)
    if y is None:  # broadcasting einsum: jnp.einsum with jdfp contractions (no statistics)
      return einsum(subscripts, *operands, precision=precision, preferred_element_type=preferred_element_type,
                        policy=dot.policy, key=dot.key)
    return y
  return _run("einsum", compute, orig)


def _dot(a, b, *, precision=None, preferred_element_type=None, **kw):
  orig = lambda: _ORIG["dot"](a, b, precision=precision, preferred_element_type=preferred_element_type, **kw)
  if active_frame() is None or kw or jnp.ndim(a) == 0 or jnp.ndim(b) == 0:
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
  if active_frame() is None or any(v is not None for v in kw.values()):
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
  if active_frame() is None or any(v is not None for v in kw.values()) or not _floats(a, b):
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
def patched():
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


@contextlib.contextmanager
def push_frame(fr: Frame):
  """Make ``fr`` the innermost frame, with JAX's functions swapped, for the duration."""
  frames().append(fr)
  try:
    with patched():
      yield fr
  finally:
    frames().pop()
