"""Differentiable low-precision ops: drop-in `dot_general`, `einsum` and `conv_general_dilated`.

Each op is a `jax.custom_vjp`:
- forward: quantize both operands (per `Policy`) and run the GEMM on the backend;
- residuals: the quantized int16 operands + exponents (half the bytes of float32 copies), or for
  operands in ``Policy.float_residuals`` the float inputs themselves (re-quantized in the backward);
- backward: quantize the incoming gradient and run backward-data and weight-gradient GEMMs on the
  same backend, reusing the forward's int16 operands.

Every GEMM goes through `_gemm`, which maps any operand layout onto the kernel's
``[B, M, K] x [B, K, N]`` (with transpose flags instead of copies where the layout allows).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from jdfp._src import formats, kernels, quantize as qz, reference
from jdfp._src.policy import Policy
from jdfp._src.shard_types import match_varying, varying_axes

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]

_warned: set[str] = set()
# Every backend decision made while tracing, for `explain` and for users who want to check.
fallback_log: list[str] = []


def _warn_once(msg: str) -> None:
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
    if not kernels.kernel_available():
      raise RuntimeError(f"backend='ffi' but the jdfp kernel library is not loaded: {kernels._load_error}")
    return "ffi"
  if platform != "cpu":
    _warn_once(f"jdfp: no integer kernel for platform {platform!r}; DFP/BFP GEMMs run on the exact "
               "pure-JAX reference path (integer arithmetic in XLA, bit-identical to the CPU kernel).")
    return "reference"
  if not kernels.kernel_available():
    _warn_once(f"jdfp: the FFI kernel library is unavailable ({kernels._load_error}); DFP/BFP GEMMs run "
               "on the exact pure-JAX reference path, which is much slower.")
    return "reference"
  return "ffi"


# ------------------------------------------------------------------------------------------------
# Operand views.


@dataclasses.dataclass(frozen=True)
class _View:
  """How an operand of rank n maps onto a physical 3-D ``[B, R, C]`` array.

  ``perm`` is applied first (identity when no copy is needed); ``c_ax`` (1 or 2) is the physical
  axis holding the contraction dims of the *forward* GEMM; the other one holds the free dims.
  """

  perm: tuple[int, ...]
  shape3: tuple[int, int, int]
  c_ax: int

  @property
  def f_ax(self) -> int:
    return 3 - self.c_ax


def _prod(xs) -> int:
  return int(math.prod(xs))


def _make_view(shape, batch, contract, prefer_contract_last: bool) -> _View:
  ndim = len(shape)
  free = tuple(d for d in range(ndim) if d not in batch and d not in contract)
  b, k, f = _prod(shape[d] for d in batch), _prod(shape[d] for d in contract), _prod(shape[d] for d in free)
  ident = tuple(range(ndim))
  last = tuple(batch) + free + tuple(contract)
  first = tuple(batch) + tuple(contract) + free
  options = [(last, (b, f, k), 2), (first, (b, k, f), 1)]
  if not prefer_contract_last:
    options.reverse()
  for perm, shape3, c_ax in options:
    if perm == ident:
      return _View(perm, shape3, c_ax)
  perm, shape3, c_ax = options[0]
  return _View(perm, shape3, c_ax)


def _to3(x, view: _View):
  if view.perm != tuple(range(x.ndim)):
    x = jnp.transpose(x, view.perm)
  return x.reshape(view.shape3)


def _from3(x3, view: _View, shape):
  permuted_shape = tuple(shape[d] for d in view.perm)
  x = x3.reshape(permuted_shape)
  if view.perm != tuple(range(len(shape))):
    x = jnp.transpose(x, np.argsort(view.perm))
  return x


def _quantize3(x3, fmt, c_ax: int, rounding: str, key, axis_name=None, use_kernel=None) -> qz.QArray:
  """Quantize a physical 3-D operand; block formats read on its (batch, free, contraction) view.
  ``use_kernel``: the float -> int16 conversion on the C++ kernel (None: wherever it can run)."""
  if not fmt.is_integer:
    return qz.quantize_array(x3, fmt)
  return qz.quantize_blocks(x3, fmt, _block_shape3(x3.shape, fmt, c_ax), rounding=rounding, key=key,
                            axis_name=axis_name, use_kernel=use_kernel)


def _block_shape3(shape3, fmt, c_ax: int) -> tuple[int, ...]:
  """Physical block shape of a 3-D operand whose blocks are read on its (batch, free, contraction) view."""
  bsz, r, c = shape3
  logical = (bsz, c, r) if c_ax == 1 else (bsz, r, c)
  lb = fmt.block_shape(logical)
  return (lb[0], lb[2], lb[1]) if c_ax == 1 else tuple(lb)


def _kernel_quantize(policy: Policy) -> bool:
  """Whether this policy's operands are converted on the C++ kernel: only with the FFI GEMM (the
  reference backend stays pure JAX end to end)."""
  integer = any(f.is_integer for f in (policy.lhs, policy.rhs, policy.dlhs, policy.drhs))
  return integer and resolve_backend(policy) == "ffi"


# ------------------------------------------------------------------------------------------------
# One GEMM on quantized 3-D operands.


def _kernel_exponents(q: qz.QArray, c_ax: int, role: str):
  """Exponents of a kernel operand: ``[B', F', KB]`` for "a", ``[B', KB, F']`` for "b"; and block_k."""
  e = q.exponent
  bs = q.block_shape
  shape = q.values.shape
  f_ax = 3 - c_ax
  # Expand the batch and free axes of the grid to full size unless the exponent is shared.
  for ax in (0, f_ax):
    if e.shape[ax] not in (1, shape[ax]):
      e = formats.expand_blocks(e, tuple(bs[i] if i == ax else 1 for i in range(3)),
                                tuple(shape[i] if i == ax else e.shape[i] for i in range(3)))
  block = None if e.shape[c_ax] == 1 else bs[c_ax]
  order = (0, f_ax, c_ax) if role == "a" else (0, c_ax, f_ax)
  return jnp.transpose(e, order), block


def _align_blocks(e, block, target, k, axis):
  """Re-express per-block exponents (blocks of `block`, None = whole K) on blocks of `target`."""
  if block == target:
    return e
  kb = -(-k // target)
  if block is None:
    return jnp.broadcast_to(e, e.shape[:axis] + (kb,) + e.shape[axis + 1:])
  return lax.slice_in_dim(jnp.repeat(e, block // target, axis=axis), 0, kb, axis=axis)


def _gemm(qa: qz.QArray, a_c: int, qb: qz.QArray, b_c: int, policy: Policy, precision=None) -> jax.Array:
  """float32 ``[B, Fa, Fb]`` = sum over K of a * b, where a's contraction is physical axis a_c, b's b_c."""
  if not qa.fmt.is_integer:
    dims = (((a_c,), (b_c,)), ((0,), (0,)))
    return lax.dot_general(qa.values, qb.values, dims, precision=precision, preferred_element_type=jnp.float32)
  k = qa.values.shape[a_c]
  ea, bka = _kernel_exponents(qa, a_c, "a")
  eb, bkb = _kernel_exponents(qb, b_c, "b")
  if bka is None and bkb is None:
    block = None
  else:
    block = math.gcd(*(x for x in (bka, bkb) if x is not None))
    ea = _align_blocks(ea, bka, block, k, 2)
    eb = _align_blocks(eb, bkb, block, k, 1)
  bits_a, bits_b = qa.fmt.int_bits, qb.fmt.int_bits
  ta, tb = a_c == 1, b_c == 2
  if resolve_backend(policy) == "ffi":
    out = kernels.gemm(qa.values, qb.values, ea, eb, bits_a=bits_a, bits_b=bits_b, block_k=block,
                       transpose_a=ta, transpose_b=tb, isa=policy.isa)
    # An FFI call's result type carries no shard_map varying axes: give it its inputs' ones.
    return match_varying(out, qa.values, qb.values, ea, eb)
  return _reference_call(qa.values, qb.values, ea, eb, bits_a, bits_b, block, ta, tb)


@functools.partial(jax.named_call, name="jdfp_reference_gemm")
def _reference_call(a, b, ea, eb, bits_a, bits_b, block, ta, tb):
  a = jnp.swapaxes(a, 1, 2) if ta else a
  b = jnp.swapaxes(b, 1, 2) if tb else b
  bsz = max(a.shape[0], b.shape[0], ea.shape[0], eb.shape[0])
  m, n = a.shape[1], b.shape[2]
  a = jnp.broadcast_to(a, (bsz,) + a.shape[1:])
  b = jnp.broadcast_to(b, (bsz,) + b.shape[1:])
  ea = jnp.broadcast_to(ea, (bsz, m, ea.shape[2]))
  eb = jnp.broadcast_to(eb, (bsz, eb.shape[1], n))
  return reference.reference_gemm(a, b, ea, eb, bits_a=bits_a, bits_b=bits_b, block_k=block)


# ------------------------------------------------------------------------------------------------
# dot_general with a custom VJP.


def _check_float(name, x):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"jdfp ops take float operands; {name} has dtype {x.dtype}")


def _canonical_dims(dimension_numbers, lhs_ndim, rhs_ndim):
  try:
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(d) for d in ds) for ds in (lc, rc, lb, rb))
  except (TypeError, ValueError):
    raise ValueError(f"dimension_numbers must be ((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch)), "
                     f"got {dimension_numbers!r}") from None
  lc = tuple(d % lhs_ndim for d in lc)
  lb = tuple(d % lhs_ndim for d in lb)
  rc = tuple(d % rhs_ndim for d in rc)
  rb = tuple(d % rhs_ndim for d in rb)
  return (lc, rc), (lb, rb)


def _split_keys(key, n):
  if key is None:
    return (None,) * n
  return tuple(jax.random.split(key, n))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _dot_core(lhs, rhs, key, dims, policy, precision, out_dtype):
  out, _ = _dot_fwd(lhs, rhs, key, dims, policy, precision, out_dtype)
  return out


def _views(lhs_shape, rhs_shape, dims):
  (lc, rc), (lb, rb) = dims
  return (_make_view(lhs_shape, lb, lc, prefer_contract_last=True),
          _make_view(rhs_shape, rb, rc, prefer_contract_last=False))


def _out_shape(lhs_shape, rhs_shape, dims):
  (lc, rc), (lb, rb) = dims
  lf = [lhs_shape[d] for d in range(len(lhs_shape)) if d not in lc and d not in lb]
  rf = [rhs_shape[d] for d in range(len(rhs_shape)) if d not in rc and d not in rb]
  return tuple(lhs_shape[d] for d in lb) + tuple(lf) + tuple(rf)


def _dot_fwd(lhs, rhs, key, dims, policy, precision, out_dtype):
  lv, rv = _views(lhs.shape, rhs.shape, dims)
  k_fwd_l, k_fwd_r, k_bwd = _split_keys(key, 3)
  ax = policy.axis_name
  uk = _kernel_quantize(policy)
  ql = _quantize3(_to3(lhs, lv), policy.lhs, lv.c_ax, policy.fwd_rounding, k_fwd_l, ax, uk)
  qr = _quantize3(_to3(rhs, rv), policy.rhs, rv.c_ax, policy.fwd_rounding, k_fwd_r, ax, uk)
  out3 = _gemm(ql, lv.c_ax, qr, rv.c_ax, policy, precision)
  out = out3.reshape(_out_shape(lhs.shape, rhs.shape, dims)).astype(out_dtype)
  # Zero-size slices carry the operands' shapes, dtypes and shard_map types through the residuals.
  res = (_residual(ql, lhs, "lhs", policy), _residual(qr, rhs, "rhs", policy), k_bwd, lhs[None][:0], rhs[None][:0])
  return out, res


def _residual(q: qz.QArray, x, role: str, policy: Policy) -> qz.QArray:
  """What the backward keeps of a forward operand: its int16 QArray, or with
  ``Policy(float_residuals=...)`` the float input itself plus the forward's exponents."""
  if role not in policy.float_residuals:
    return q
  return qz.QArray(x, q.exponent, q.fmt, q.blocks)


def _reread(q: qz.QArray, view: _View, role: str, policy: Policy) -> qz.QArray:
  """The forward's quantized operand again (bit for bit) from what `_residual` kept."""
  if role not in policy.float_residuals:
    return q
  x3 = _to3(q.values, view)
  if not q.fmt.is_integer:
    return qz.quantize_array(x3, q.fmt)
  if resolve_backend(policy) == "ffi" and policy.fwd_rounding == "nearest":
    # The GEMM kernel quantizes float32 operands while packing them: no int16 copy is made.
    return qz.QArray(x3.astype(jnp.float32), q.exponent, q.fmt, q.blocks)
  return qz.quantize_given_exponent(qz.as_float_input(x3), q.exponent, q.fmt, policy.fwd_rounding, None, q.blocks,
                                    _kernel_quantize(policy))


def _dot_fwd_perturbed(lhs, rhs, key, dims, policy, precision, out_dtype):
  """fwd with symbolic zeros: an operand nobody differentiates (the input batch, say) needs no
  backward GEMM. A None marker in the residuals tells `_dot_bwd` to skip it."""
  key = jax.tree.map(lambda k: k.value, key, is_leaf=lambda k: isinstance(k, CustomVJPPrimal))
  out, res = _dot_fwd(lhs.value, rhs.value, key, dims, policy, precision, out_dtype)
  marker = lambda p: jnp.zeros((0,), jnp.int8) if p.perturbed else None
  return out, res + (marker(lhs), marker(rhs))


def _dot_bwd(dims, policy, precision, out_dtype, res, g):
  ql, qr, k_bwd, lhs_dt, rhs_dt, need_l, need_r = res
  if isinstance(g, SymbolicZero):
    return None, None, None
  lhs_shape, rhs_shape = lhs_dt.shape[1:], rhs_dt.shape[1:]
  lv, rv = _views(lhs_shape, rhs_shape, dims)
  ql, qr = _reread(ql, lv, "lhs", policy), _reread(qr, rv, "rhs", policy)
  bsz, m, n = lv.shape3[0], lv.shape3[lv.f_ax], rv.shape3[rv.f_ax]
  g3 = g.astype(jnp.float32).reshape(bsz, m, n)
  k_dl, k_dr = _split_keys(k_bwd, 2)
  # Output gradient as the dlhs operand (contraction over N: physical axis 2) and as the drhs
  # operand (contraction over M: axis 1). Per-tensor formats give the same QArray: quantize once.
  ax = policy.axis_name
  uk = _kernel_quantize(policy)
  g_dl = _quantize3(g3, policy.dlhs, 2, policy.grad_rounding, k_dl, ax, uk)
  same = (policy.dlhs == policy.drhs and (not policy.dlhs.is_integer or
          _quantize_blocks_equal(policy.dlhs, g3.shape)))
  g_dr = g_dl if same else _quantize3(g3, policy.drhs, 1, policy.grad_rounding, k_dr, ax, uk)

  dlhs, drhs = backward_gemms(ql, qr, g_dl, g_dr, lhs_dt, rhs_dt, dims, policy, precision,
                              need_l is not None, need_r is not None)
  return dlhs, drhs, None


def backward_gemms(ql, qr, g_dl, g_dr, lhs_dt, rhs_dt, dims, policy, precision, need_l=True, need_r=True):
  """Backward-data and weight-gradient GEMMs from the quantized operands and output gradient, each
  produced directly in its operand's physical layout (no transposes of the results)."""
  lv, rv = _views(lhs_dt.shape[1:], rhs_dt.shape[1:], dims)
  dlhs = drhs = None
  if need_l:
    if lv.c_ax == 2:  # lhs3 = [B, M, K]: dlhs3 = g[B, M, N] . rhs^T
      dl3 = _gemm(g_dl, 2, qr, rv.f_ax, policy, precision)
    else:  # lhs3 = [B, K, M]: dlhs3 = rhs[., K, N] . g^T
      dl3 = _gemm(qr, rv.f_ax, g_dl, 2, policy, precision)
    dlhs = _as_cotangent_of(_from3(dl3, lv, lhs_dt.shape[1:]).astype(lhs_dt.dtype), lhs_dt)
  if need_r:
    if rv.c_ax == 1:  # rhs3 = [B, K, N]: drhs3 = lhs^T . g
      dr3 = _gemm(ql, lv.f_ax, g_dr, 1, policy, precision)
    else:  # rhs3 = [B, N, K]: drhs3 = g^T . lhs
      dr3 = _gemm(g_dr, 1, ql, lv.f_ax, policy, precision)
    drhs = _as_cotangent_of(_from3(dr3, rv, rhs_dt.shape[1:]).astype(rhs_dt.dtype), rhs_dt)
  return dlhs, drhs


def _as_cotangent_of(d, primal):
  """Inside shard_map, the cotangent of an input that is invariant over an axis is the psum over it
  (as JAX's own autodiff does: the transpose of the implicit pvary), and carries the input's type."""
  extra = varying_axes(d) - varying_axes(primal)
  if extra:
    d = lax.psum(d, tuple(sorted(extra)))
  return match_varying(d, primal)


def _quantize_blocks_equal(fmt, shape3) -> bool:
  bsz, m, n = shape3
  a = fmt.block_shape((bsz, m, n))
  b = fmt.block_shape((bsz, n, m))
  return a == (bsz, m, n) and b == (bsz, n, m)


_dot_core.defvjp(_dot_fwd_perturbed, _dot_bwd, symbolic_zeros=True)


def _out_dtype(lhs, rhs, preferred_element_type):
  if preferred_element_type is not None:
    dt = jnp.dtype(preferred_element_type)
    if not jnp.issubdtype(dt, jnp.floating):
      raise TypeError(f"preferred_element_type must be a float dtype for jdfp ops, got {dt}")
    return dt
  return jnp.result_type(lhs.dtype, rhs.dtype)


def dot_general(lhs, rhs, dimension_numbers: DimensionNumbers, precision=None, preferred_element_type=None,
                *, policy: Policy | None = None, key=None, scale_state=None, **kwargs) -> jax.Array:
  """Drop-in for `jax.lax.dot_general` that runs the GEMM (and its two backward GEMMs) in DFP/BFP.

  Args:
    lhs, rhs, dimension_numbers, precision, preferred_element_type: as `jax.lax.dot_general`
      (`precision` applies to FP16/BF16 policies; integer GEMMs are exact).
    policy: a `jdfp.Policy` (default `Policy()`: DFP with 14 bits, nearest rounding, kernel on CPU).
    key: PRNG key, required when the policy rounds stochastically.
    scale_state: with ``Policy(scaling="delayed")``, the `jdfp.ScaleState` of this op; the call then
      returns ``(out, new_state)`` (see `jdfp._src.delayed` for how the gradient history flows).
  Other keyword arguments of newer `lax.dot_general` (e.g. ``out_sharding``) must be None.
  """
  for k_, v in kwargs.items():
    if v is not None:
      raise TypeError(f"jdfp.dot_general does not support {k_}={v!r}")
  policy = Policy() if policy is None else policy
  if not isinstance(policy, Policy):
    raise TypeError(f"policy must be a jdfp.Policy, got {type(policy).__name__}")
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  _check_float("lhs", lhs)
  _check_float("rhs", rhs)
  dims = _canonical_dims(dimension_numbers, lhs.ndim, rhs.ndim)
  (lc, rc), (lb, rb) = dims
  if len(lc) != len(rc) or len(lb) != len(rb):
    raise ValueError(f"dimension_numbers pair {len(lc)} lhs with {len(rc)} rhs contracting dims and "
                     f"{len(lb)} with {len(rb)} batch dims")
  for a, b in zip(lc + lb, rc + rb):
    if lhs.shape[a] != rhs.shape[b]:
      raise ValueError(f"lhs dim {a} (size {lhs.shape[a]}) and rhs dim {b} (size {rhs.shape[b]}) are paired "
                       "but differ in size")
  needs_key = ((policy.fwd_rounding == "stochastic" and not policy.is_float) or
               (policy.grad_rounding == "stochastic" and policy.grad.is_integer))
  if needs_key and key is None:
    raise ValueError("this policy rounds stochastically: pass key=jax.random.key(...) "
                     "(the Flax wrapper draws it from its 'dfp' RNG stream)")
  out_dtype = _out_dtype(lhs, rhs, preferred_element_type)
  if policy.scaling == "delayed":
    if scale_state is None:
      raise ValueError("Policy(scaling='delayed') needs scale_state=jdfp.init_scale_state(policy) "
                       "(the call then returns (out, new_state))")
    from jdfp._src import delayed  # pylint: disable=import-outside-toplevel
    return delayed.dot_general(lhs, rhs, dims, precision, out_dtype, policy=policy, key=key, scale_state=scale_state)
  if scale_state is not None:
    raise ValueError("scale_state= is for Policy(scaling='delayed'); this policy uses current scaling")
  return _dot_core(lhs, rhs, key, dims, policy, precision, out_dtype)


# ------------------------------------------------------------------------------------------------
# einsum: jnp.einsum's contraction planning, with every pairwise contraction through dot_general.


class _EinsumDot:
  """The `_dot_general` hook of jnp.einsum; hashed by identity, carries the policy and a key."""

  def __init__(self, policy, key):
    self.policy, self.key, self.count = policy, key, 0

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    key = None
    if self.key is not None:
      key = jax.random.fold_in(self.key, self.count)
      self.count += 1
    return dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                       policy=self.policy, key=key, **kw)


def einsum(subscripts, *operands, precision=None, preferred_element_type=None, optimize="auto",
           policy: Policy | None = None, key=None, **kwargs):
  """Drop-in for `jnp.einsum` whose contractions run through `jdfp.dot_general`."""
  hook = _EinsumDot(Policy() if policy is None else policy, key)
  return jnp.einsum(subscripts, *operands, precision=precision, preferred_element_type=preferred_element_type,
                    optimize=optimize, _dot_general=hook, **kwargs)


# ------------------------------------------------------------------------------------------------
# Convolution: im2col (strided slices, cheap to differentiate) + the GEMM above.


def _patches(x, kernel_spatial, strides, pads, lhs_dil, rhs_dil):
  """x ``[N, *S, C]`` -> patches ``[N, *O, KK, C]`` (KK = prod(kernel_spatial), row-major offsets)."""
  nsp = len(kernel_spatial)
  cfg = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(pads, lhs_dil)] + [(0, 0, 0)]
  x = lax.pad(x, jnp.zeros((), x.dtype), cfg)
  sizes = x.shape[1:1 + nsp]
  eff = [(k - 1) * d + 1 for k, d in zip(kernel_spatial, rhs_dil)]
  out = [max(0, (s - e) // st + 1) for s, e, st in zip(sizes, eff, strides)]
  slices = []
  for offs in np.ndindex(*kernel_spatial):
    start = [0] + [o * d for o, d in zip(offs, rhs_dil)] + [0]
    limit = [x.shape[0]] + [st0 + (o_ - 1) * st + 1 if o_ > 0 else st0
                            for st0, o_, st in zip(start[1:-1], out, strides)] + [x.shape[-1]]
    slices.append(lax.slice(x, start, limit, [1] + list(strides) + [1]))
  return jnp.stack(slices, axis=-2), tuple(out)


# Integer per-tensor policies: a custom VJP whose three passes are convolutions on the int16 tensors
# (x and w quantized once, never their im2col copies), each one GEMM of the contract on the im2col
# matrix with K ordered (kernel taps row-major, input channel):
#   forward          y  = conv(x, w)
#   backward-data    dx = conv(dy, w flipped with in/out features swapped, lhs dilation = strides)
#   weight-gradient  dw = im2col(x)^T . dy   (K = the output pixels)
# backend "ffi": the implicit-GEMM conv kernel (no im2col buffer); "reference": im2col in JAX + the
# reference GEMM -- bit-identical.  Other formats (block exponents, FP16/BF16) take the im2col +
# `dot_general` path below.


@dataclasses.dataclass(frozen=True)
class _ConvGeom:
  """Static geometry of a conv on canonical layouts (x ``[N, *S, C]``, w ``[*K, C/G, O]``)."""

  in_sp: tuple[int, ...]
  k_sp: tuple[int, ...]
  strides: tuple[int, ...]
  pads: tuple[tuple[int, int], ...]
  lhs_dil: tuple[int, ...]
  rhs_dil: tuple[int, ...]
  groups: int

  @property
  def out_sp(self) -> tuple[int, ...]:
    return kernels.conv_out_spatial(self.in_sp, self.k_sp, self.strides, self.pads, self.lhs_dil, self.rhs_dil)

  def covered(self):
    """Per spatial dim, which input positions some output reads (None: all of them), as a static mask."""
    masks, all_read = [], True
    for s, k, st, (lo, _), ld, rd, o in zip(self.in_sp, self.k_sp, self.strides, self.pads, self.lhs_dil,
                                             self.rhs_dil, self.out_sp):
      pos = (np.arange(o)[:, None] * st + np.arange(k)[None, :] * rd - lo).ravel()
      pos = pos[(pos >= 0) & (pos % ld == 0)] // ld
      m = np.zeros(s, bool)
      m[pos[pos < s]] = True
      masks.append(m)
      all_read &= bool(m.all())
    return None if all_read else masks


def _per_tensor(fmt) -> bool:
  return fmt.is_integer and fmt.block is None and fmt.axis is None


def _conv_kernel_eligible(policy: Policy, x_shape, w_shape, geom: _ConvGeom) -> bool:
  if not all(_per_tensor(f) for f in (policy.lhs, policy.rhs, policy.dlhs, policy.drhs)):
    return False
  # Degenerate (empty) convolutions keep the im2col path, whose edge cases are already defined.
  return (len(geom.in_sp) <= 3 and _prod(x_shape) > 0 and _prod(w_shape) > 0 and _prod(geom.out_sp) > 0)


def _quantize_conv_operand(x, fmt, rounding, key, axis_name, masks=None, use_kernel=False):
  """Per-tensor quantization of a conv operand: int16 values and a ``(1,)`` exponent.

  ``masks`` (per spatial dim, static) restrict the max to the input positions the conv reads, so the
  exponent is the one of the im2col matrix (what the GEMM sees) even when a stride skips inputs.
  ``use_kernel``: the float -> int16 conversion on the C++ kernel (nearest rounding only)."""
  if masks is None:
    q = qz.quantize_blocks(x, fmt, fmt.block_shape(jnp.shape(x)), rounding=rounding,
                           key=key if rounding == "stochastic" else None, axis_name=axis_name,
                           use_kernel=use_kernel)
    return q.values, q.exponent.reshape(1)
  x = qz.as_float_input(x)
  nsp = len(masks)
  mask = functools.reduce(np.logical_and, [m.reshape((1,) + tuple(-1 if j == d else 1 for j in range(nsp)) + (1,))
                                           for d, m in enumerate(masks)])
  ax = jnp.where(jnp.isnan(x), jnp.inf, jnp.abs(x))  # as formats.block_amax
  amax = jnp.max(jnp.where(mask, ax, 0.0))
  if axis_name is not None:
    amax = lax.pmax(amax, qz._axis(axis_name))
  e = qz.group_exponent(amax, fmt)
  return _convert_conv_operand(x, e, fmt, rounding, key, use_kernel), e.reshape(1)


def _convert_conv_operand(x, e, fmt, rounding, key, use_kernel):
  """int16 values of a conv operand for the (scalar) exponent ``e``."""
  if use_kernel and rounding == "nearest" and x.size:
    # Unread positions may convert to any in-range value (NaN -> 0, Inf -> +-qmax): never read.
    return kernels.quantize(x, e, bits=fmt.bits)
  nonfinite = e == formats.NONFINITE_EXPONENT
  # Unread non-finite inputs must not leak into int16 (they are never read, but keep them 0).
  xs = jnp.where(nonfinite | ~jnp.isfinite(x), 0.0, x)
  y = formats.scale2(xs, -jnp.where(nonfinite, 0, e))
  i = jnp.clip(qz.round_to_int(y, rounding, key), -fmt.qmax, fmt.qmax)
  return i.astype(jnp.int16)


def _conv_int(x, ex, w, ew, geom: _ConvGeom, bits_x: int, bits_w: int, policy: Policy):
  """float32 ``[N, *O, O]`` = conv of int16 x ``[N, *S, C]`` and w ``[*K, C/G, O]`` (per-tensor exponents)."""
  kw = dict(window_strides=geom.strides, padding=geom.pads, lhs_dilation=geom.lhs_dil, rhs_dilation=geom.rhs_dil,
            feature_group_count=geom.groups)
  if resolve_backend(policy) == "ffi":
    y = kernels.conv(x, w, ex, ew, bits_x=bits_x, bits_w=bits_w, isa=policy.isa, **kw)
    return match_varying(y, x, w, ex, ew)
  g, n = geom.groups, x.shape[0]
  kk, i, o = _prod(geom.k_sp), w.shape[-2], w.shape[-1]
  p, out_sp = _patches(x, geom.k_sp, geom.strides, geom.pads, geom.lhs_dil, geom.rhs_dil)
  rows = n * _prod(out_sp)
  p = p.reshape(rows, kk, g, i).transpose(2, 0, 1, 3).reshape(g, rows, kk * i)
  w3 = w.reshape(kk, i, g, o // g).transpose(2, 0, 1, 3).reshape(g, kk * i, o // g)
  y = _reference_call(p, w3, ex.reshape(1, 1, 1), ew.reshape(1, 1, 1), bits_x, bits_w, None, False, False)
  return y.transpose(1, 0, 2).reshape((n,) + out_sp + (o,))


def _conv_wgrad_int(x, ex, dy, edy, geom: _ConvGeom, bits_x: int, bits_dy: int, policy: Policy):
  """float32 ``[*K, C/G, O]`` = im2col(x)^T . dy per group (K = output pixels, row-major)."""
  kw = dict(window_strides=geom.strides, padding=geom.pads, lhs_dilation=geom.lhs_dil, rhs_dilation=geom.rhs_dil,
            feature_group_count=geom.groups)
  if resolve_backend(policy) == "ffi":
    dw = kernels.conv_weight_grad(x, dy, ex, edy, kernel_spatial=geom.k_sp, bits_x=bits_x, bits_dy=bits_dy,
                                  isa=policy.isa, **kw)
    return match_varying(dw, x, dy, ex, edy)
  g, n = geom.groups, x.shape[0]
  kk, c, o = _prod(geom.k_sp), x.shape[-1], dy.shape[-1]
  i = c // g
  p, out_sp = _patches(x, geom.k_sp, geom.strides, geom.pads, geom.lhs_dil, geom.rhs_dil)
  rows = n * _prod(out_sp)
  p = p.reshape(rows, kk, g, i).transpose(2, 0, 1, 3).reshape(g, rows, kk * i)
  d3 = dy.reshape(rows, g, o // g).transpose(1, 0, 2)
  dw = _reference_call(p, d3, ex.reshape(1, 1, 1), edy.reshape(1, 1, 1), bits_x, bits_dy, None, True, False)
  return dw.reshape(g, kk, i, o // g).transpose(1, 2, 0, 3).reshape(geom.k_sp + (i, o))


def _conv_input_grad_int(dy, edy, w, ew, geom: _ConvGeom, bits_dy: int, bits_w: int, policy: Policy):
  """float32 ``[N, *S, C]``: the backward-data conv (kernels.conv_input_grad_setup), either backend."""
  wt, pads_t = kernels.conv_input_grad_setup(w, geom.in_sp, geom.strides, geom.pads, geom.lhs_dil,
                                             geom.rhs_dil, geom.groups)
  gt = _ConvGeom(geom.out_sp, geom.k_sp, geom.lhs_dil, pads_t, geom.strides, geom.rhs_dil, geom.groups)
  return _conv_int(dy, edy, wt, ew, gt, bits_dy, bits_w, policy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _conv_core(x, w, key, geom, policy, out_dtype):
  out, _ = _conv_fwd(x, w, key, geom, policy, out_dtype)
  return out


def _conv_fwd(x, w, key, geom, policy, out_dtype):
  k_x, k_w, k_bwd = _split_keys(key, 3)
  ax = policy.axis_name
  uk = _kernel_quantize(policy)
  xq, ex = _quantize_conv_operand(x, policy.lhs, policy.fwd_rounding, k_x, ax, geom.covered(), uk)
  wq, ew = _quantize_conv_operand(w, policy.rhs, policy.fwd_rounding, k_w, ax, use_kernel=uk)
  y = _conv_int(xq, ex, wq, ew, geom, policy.lhs.int_bits, policy.rhs.int_bits, policy).astype(out_dtype)
  # Residuals: the int16 tensors (or, per Policy.float_residuals, the float inputs) + exponents;
  # zero-size slices carry shapes, dtypes and shard_map types.
  xr = x if "lhs" in policy.float_residuals else xq
  wr = w if "rhs" in policy.float_residuals else wq
  return y, (xr, ex, wr, ew, k_bwd, x[None][:0], w[None][:0])


def _conv_fwd_perturbed(x, w, key, geom, policy, out_dtype):
  """fwd with symbolic zeros: an operand nobody differentiates (the input images) needs no pass."""
  key = jax.tree.map(lambda k: k.value, key, is_leaf=lambda k: isinstance(k, CustomVJPPrimal))
  out, res = _conv_fwd(x.value, w.value, key, geom, policy, out_dtype)
  marker = lambda p: jnp.zeros((0,), jnp.int8) if p.perturbed else None
  return out, res + (marker(x), marker(w))


def _conv_bwd(geom, policy, out_dtype, res, g):
  xq, ex, wq, ew, k_bwd, x_dt, w_dt, need_x, need_w = res
  if isinstance(g, SymbolicZero):
    return None, None, None
  k_dl, k_dr = _split_keys(k_bwd, 2)
  ax = policy.axis_name
  g = g.astype(jnp.float32)
  dx = dw = None
  gl = gr = None
  uk = _kernel_quantize(policy)
  # Float residuals: the forward's int16 operands again, with the forward's exponents (bit for bit).
  if "lhs" in policy.float_residuals and need_w is not None:
    xq = _convert_conv_operand(qz.as_float_input(xq), ex[0], policy.lhs, policy.fwd_rounding, None, uk)
  if "rhs" in policy.float_residuals and need_x is not None:
    wq = _convert_conv_operand(qz.as_float_input(wq), ew[0], policy.rhs, policy.fwd_rounding, None, uk)
  if need_x is not None:
    gl = _quantize_conv_operand(g, policy.dlhs, policy.grad_rounding, k_dl, ax, use_kernel=uk)
    dx = _conv_input_grad_int(*gl, wq, ew, geom, policy.dlhs.int_bits, policy.rhs.int_bits, policy)
    dx = _as_cotangent_of(dx.astype(x_dt.dtype), x_dt)
  if need_w is not None:
    gr = gl if (gl is not None and policy.drhs == policy.dlhs) else \
        _quantize_conv_operand(g, policy.drhs, policy.grad_rounding, k_dr, ax, use_kernel=uk)
    dw = _conv_wgrad_int(xq, ex, *gr, geom, policy.lhs.int_bits, policy.drhs.int_bits, policy)
    dw = _as_cotangent_of(dw.astype(w_dt.dtype), w_dt)
  return dx, dw, None


_conv_core.defvjp(_conv_fwd_perturbed, _conv_bwd, symbolic_zeros=True)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None, *, policy: Policy | None = None,
                         key=None, scale_state=None, _dot_general=None) -> jax.Array:
  """Drop-in for `jax.lax.conv_general_dilated` (any dimension numbers, strides, padding, lhs/rhs
  dilation, feature groups) with forward, backward-data and weight-gradient in low precision.

  Integer formats with per-tensor exponents (`DFP` / `BFP` with ``axis=None, block=None``, the
  default): x, w and the output gradient are quantized once and each pass is a convolution of the
  int16 tensors -- on the C++ implicit-GEMM conv kernel (backend "ffi") or, bit-identically, im2col
  + the reference GEMM (backend "reference").  Backward-data is the conv of the output gradient
  with the flipped kernel (lhs dilation = strides), weight-gradient im2col(x)^T . dy.
  Other formats (block exponents, FP16/BF16): im2col patches in JAX + `jdfp.dot_general` (on the
  kernel, the block-format case is logged in `fallback_log`).
  ``scale_state``: with ``Policy(scaling="delayed")`` (per-tensor formats), the op's `jdfp.ScaleState`;
  the call then returns ``(out, new_state)`` as `jdfp.dot_general` does."""
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  _check_float("lhs", lhs)
  _check_float("rhs", rhs)
  if batch_group_count != 1:
    raise NotImplementedError("jdfp.conv_general_dilated: batch_group_count > 1 is not supported")
  nsp = lhs.ndim - 2
  if nsp < 1 or rhs.ndim != lhs.ndim:
    raise ValueError(f"lhs and rhs must have the same rank >= 3, got {lhs.shape} and {rhs.shape}")
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  strides = tuple(window_strides)
  lhs_dil = tuple(lhs_dilation or (1,) * nsp)
  rhs_dil = tuple(rhs_dilation or (1,) * nsp)
  if len(strides) != nsp or len(lhs_dil) != nsp or len(rhs_dil) != nsp:
    raise ValueError(f"window_strides, lhs_dilation and rhs_dilation need {nsp} entries each")
  # Canonical layouts: lhs [N, *S, C], rhs [*K, I, O].
  x = jnp.transpose(lhs, (dn.lhs_spec[0],) + tuple(dn.lhs_spec[2:]) + (dn.lhs_spec[1],))
  w = jnp.transpose(rhs, tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[1], dn.rhs_spec[0]))
  ksp = w.shape[:nsp]
  c, i, o = x.shape[-1], w.shape[-2], w.shape[-1]
  g = int(feature_group_count)
  if g < 1 or c != i * g or o % g:
    raise ValueError(f"feature_group_count={g}: lhs features {c} must equal rhs input features {i} x groups, "
                     f"and rhs output features {o} must divide by groups")
  if isinstance(padding, str):
    in_sp = [(s - 1) * d + 1 for s, d in zip(x.shape[1:1 + nsp], lhs_dil)]
    k_eff = [(k - 1) * d + 1 for k, d in zip(ksp, rhs_dil)]
    pads = lax.padtype_to_pads(in_sp, k_eff, strides, padding)
  else:
    pads = tuple(tuple(p) for p in padding)
  if (any(st > 1 for st in strides) and all(k == 1 for k in ksp) and all(d == 1 for d in lhs_dil)
      and all(tuple(p) == (0, 0) for p in pads)):
    # A strided 1x1 conv (ResNet's projection shortcut) reads only x[:, ::s, ::s]: slice first, so the
    # int16 operand and its backward residual hold just that part. Exponents (taken over the read
    # positions anyway), outputs and gradients are unchanged; JAX scatters dx back through the slice.
    x = lax.slice(x, (0,) * x.ndim, x.shape, (1,) + strides + (1,))
    strides = (1,) * nsp
  policy = Policy() if policy is None else policy
  if not isinstance(policy, Policy):
    raise TypeError(f"policy must be a jdfp.Policy, got {type(policy).__name__}")
  geom = _ConvGeom(tuple(int(s) for s in x.shape[1:1 + nsp]), tuple(int(k) for k in ksp),
                   tuple(int(s) for s in strides), tuple((int(lo), int(hi)) for lo, hi in pads),
                   tuple(int(d) for d in lhs_dil), tuple(int(d) for d in rhs_dil), g)
  if policy.scaling == "delayed" or scale_state is not None:  # returns (out, new_state): jdfp._src.delayed
    from jdfp._src import delayed  # pylint: disable=import-outside-toplevel
    y, new_state = delayed.conv_general_dilated(x, w, geom, policy=policy, key=key, scale_state=scale_state,
                                                out_dtype=_out_dtype(lhs, rhs, preferred_element_type))
    return jnp.transpose(y, _conv_out_perm(dn, nsp)), new_state
  # `_dot_general` (as jnp.einsum's hook): force the im2col arrangement with that GEMM (the Flax
  # integration passes its statistics-tracking dot for block formats).
  if _dot_general is None and _conv_kernel_eligible(policy, x.shape, w.shape, geom):
    needs_key = policy.fwd_rounding == "stochastic" or policy.grad_rounding == "stochastic"
    if needs_key and key is None:
      raise ValueError("this policy rounds stochastically: pass key=jax.random.key(...) "
                       "(the Flax wrapper draws it from its 'dfp' RNG stream)")
    y = _conv_core(x, w, key, geom, policy, _out_dtype(lhs, rhs, preferred_element_type))
    return jnp.transpose(y, _conv_out_perm(dn, nsp))
  if _dot_general is None and policy.lhs.is_integer and resolve_backend(policy) == "ffi":
    _warn_once(f"jdfp.conv_general_dilated: formats with block exponents ({policy.lhs!r}, {policy.rhs!r}, "
               f"{policy.grad!r}) run the conv as an im2col GEMM on the GEMM kernel (patches materialised "
               "in JAX); the implicit-GEMM conv kernel takes per-tensor exponents only.")
  p, out_sp = _patches(x, ksp, strides, pads, lhs_dil, rhs_dil)  # [N, *O, KK, C]
  n = x.shape[0]
  kk = _prod(ksp)
  rows = n * _prod(out_sp)
  # [G, rows, KK*I] . [G, KK*I, O/G] -> [G, rows, O/G]
  p = p.reshape(rows, kk, g, i).transpose(2, 0, 1, 3).reshape(g, rows, kk * i)
  w = w.reshape(kk, i, g, o // g).transpose(2, 0, 1, 3).reshape(g, kk * i, o // g)
  dims = (((2,), (1,)), ((0,), (0,)))
  if _dot_general is None:
    y = dot_general(p, w, dims, precision, preferred_element_type, policy=policy, key=key)
  else:
    y = _dot_general(p, w, dims, precision, preferred_element_type)
  y = y.transpose(1, 0, 2).reshape((n,) + out_sp + (o,))
  return jnp.transpose(y, _conv_out_perm(dn, nsp))


def _conv_out_perm(dn, nsp):
  """Permutation from the canonical output ``[N, *O, C]`` to the requested layout."""
  out_perm = [0] * (nsp + 2)
  out_perm[dn.out_spec[0]] = 0
  out_perm[dn.out_spec[1]] = nsp + 1
  for j, d in enumerate(dn.out_spec[2:]):
    out_perm[d] = 1 + j
  return tuple(out_perm)
