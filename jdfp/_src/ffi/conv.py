"""Python side of ``xla_ffi/conv_ffi.cc``: the implicit-GEMM convolutions (forward, backward-data,
weight-gradient) on int16 tensors with per-tensor exponents, exact per docs/arithmetic.md."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdfp._src.ffi.library import TARGET_CONV_FWD, TARGET_CONV_WGRAD, TARGET_IM2COL, check_bits, dtype_of, isa_attribute, require_lib
from jdfp._src.numerics.reference import safe_chain_length

__all__ = ["conv", "conv_input_grad", "conv_input_grad_setup", "conv_out_spatial", "conv_padding", "conv_weight_grad", "im2col",
           "input_grad_geometry", "input_grad_phases", "splits_by_phase"]


def _check_ints(name: str, v, n: int, lo: int) -> tuple[int, ...]:
  try:
    t = tuple(int(x) for x in v)
  except TypeError:
    raise TypeError(f"{name} must be a sequence of {n} ints, got {v!r}") from None
  if len(t) != n or any(x < lo for x in t) or any(isinstance(x, bool) for x in v):
    raise ValueError(f"{name} must be {n} ints >= {lo} (one per spatial dim), got {v!r}")
  return t


def conv_padding(padding, in_spatial, kernel_spatial, window_strides, lhs_dilation, rhs_dilation):
  """Explicit ``((lo, hi), ...)`` padding from "SAME" / "VALID" / explicit pairs (lax's rules, applied
  to the lhs-dilated input and the rhs-dilated kernel as `lax.conv_general_dilated` does)."""
  nsp = len(in_spatial)
  if isinstance(padding, str):
    in_d = [(s - 1) * d + 1 if s else 0 for s, d in zip(in_spatial, lhs_dilation)]
    k_d = [(k - 1) * d + 1 if k else 0 for k, d in zip(kernel_spatial, rhs_dilation)]
    try:
      pads = lax.padtype_to_pads(in_d, k_d, window_strides, padding)
    except Exception as e:  # unknown padding string
      raise ValueError(f"padding must be 'SAME', 'VALID', 'SAME_LOWER' or (lo, hi) pairs, got {padding!r}") from e
    return tuple((int(lo), int(hi)) for lo, hi in pads)
  try:
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  except (TypeError, ValueError):
    raise ValueError(f"padding must be a string or a sequence of (lo, hi) pairs, got {padding!r}") from None
  if len(pads) != nsp:
    raise ValueError(f"padding needs {nsp} (lo, hi) pairs, got {padding!r}")
  return pads


def conv_out_spatial(in_spatial, kernel_spatial, window_strides, pads, lhs_dilation, rhs_dilation):
  out = []
  for s, k, st, (lo, hi), ld, rd in zip(in_spatial, kernel_spatial, window_strides, pads, lhs_dilation,
                                         rhs_dilation):
    din = (s - 1) * ld + 1 if s else 0
    dk = (k - 1) * rd + 1 if k else 0
    span = din + lo + hi - dk
    out.append(span // st + 1 if span >= 0 else 0)
  return tuple(out)


def _conv_common(x, b, ex, eb, names, nsp_from, window_strides, lhs_dilation, rhs_dilation,
                 feature_group_count, bits_a, bits_b, isa):
  bits_a = check_bits(f"bits_{names[0]}", bits_a)
  bits_b = check_bits(f"bits_{names[1]}", bits_b)
  isa_code = isa_attribute(isa)
  for name, v, allowed in ((names[0], x, "int16"), (names[1], b, "int16"), ("e" + names[0], ex, "int32"),
                           ("e" + names[1], eb, "int32")):
    dt = dtype_of(name, v)
    if dt.name != allowed:
      raise TypeError(f"{name} must have dtype {allowed}, got {dt.name}")
  for name, v in (("e" + names[0], ex), ("e" + names[1], eb)):
    if np.size(v) != 1:
      raise ValueError(f"{name} must hold one (per-tensor) exponent, got shape {np.shape(v)}")
  nsp = np.ndim(nsp_from) - 2
  if not 1 <= nsp <= 3 or np.ndim(x) != nsp + 2 or np.ndim(b) != nsp + 2:
    raise ValueError(f"conv operands must have rank 3, 4 or 5 (1 to 3 spatial dims) and equal ranks, got "
                     f"{names[0]} {np.shape(x)} and {names[1]} {np.shape(b)}")
  strides = _check_ints("window_strides", window_strides, nsp, 1)
  ldil = _check_ints("lhs_dilation", lhs_dilation or (1,) * nsp, nsp, 1)
  rdil = _check_ints("rhs_dilation", rhs_dilation or (1,) * nsp, nsp, 1)
  if isinstance(feature_group_count, bool) or not isinstance(feature_group_count, (int, np.integer)) \
      or feature_group_count < 1:
    raise ValueError(f"feature_group_count must be an int >= 1, got {feature_group_count!r}")
  return nsp, strides, ldil, rdil, int(feature_group_count), bits_a, bits_b, isa_code


def to_5d(x, nsp):
  """``[N, *S, C]`` with 1 to 3 spatial dims as the handlers' ``[N, D, H, W, C]`` (size-1 leading dims)."""
  s = np.shape(x)
  return x.reshape((s[0],) + (1,) * (3 - nsp) + tuple(s[1:]))


def kernel_to_5d(w, nsp):
  """``[*K, I, O]`` with 1 to 3 spatial dims as the handlers' ``[KD, KH, KW, I, O]``."""
  s = np.shape(w)
  return w.reshape((1,) * (3 - nsp) + tuple(s))


def _attrs(nsp, strides, pads, ldil, rdil, groups, bits_a, bits_b, isa_code):
  pad3 = lambda v, fill: np.asarray((fill,) * (3 - nsp) + tuple(v), np.int64)
  return dict(window_strides=pad3(strides, 1), padding_lo=pad3([p[0] for p in pads], 0),
              padding_hi=pad3([p[1] for p in pads], 0), lhs_dilation=pad3(ldil, 1), rhs_dilation=pad3(rdil, 1),
              feature_group_count=np.int64(groups), bits_x=np.int32(bits_a), bits_w=np.int32(bits_b),
              isa=np.int32(isa_code))


def conv(x, w, ex, ew, *, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
         feature_group_count: int = 1, bits_x: int, bits_w: int, isa: str = "auto") -> jax.Array:
  """Exact DFP convolution on the C++ kernel (implicit GEMM, no im2col buffer): float32 ``[N, *O, O]``.

  Args:
    x: int16 ``[N, *S, C]`` with 1 to 3 spatial dims (NWC, NHWC, NDHWC), values in ``[-qmax_x, qmax_x]``.
    w: int16 ``[*K, C / G, O]`` (WIO, HWIO, DHWIO), values in ``[-qmax_w, qmax_w]``.
    ex, ew: int32 per-tensor exponents (one element each).
    window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count: as
      `jax.lax.conv_general_dilated` (padding "SAME", "VALID" or ``(lo, hi)`` pairs).
    bits_x, bits_w: the operands' bits (2..16); they fix the safe int32 chain length.
    isa: "auto" or one of `available_isas()`.

  The result is bit-identical to the GEMM contract (docs/arithmetic.md) on ``im2col(x)`` with K
  ordered as (kernel taps row-major, input channel), per group.  An int16 value outside
  ``[-qmax, qmax]`` that the conv reads makes the call fail at run time.
  """
  nsp, strides, ldil, rdil, g, bx, bw, isa_code = _conv_common(
      x, w, ex, ew, ("x", "w"), x, window_strides, lhs_dilation, rhs_dilation, feature_group_count,
      bits_x, bits_w, isa)
  sx, sw = tuple(np.shape(x)), tuple(np.shape(w))
  c, i, o = sx[-1], sw[-2], sw[-1]
  if c != i * g or o % g:
    raise ValueError(f"feature_group_count={g}: x features {c} must equal w input features {i} x groups, "
                     f"and w output features {o} must divide by groups")
  pads = conv_padding(padding, sx[1:-1], sw[:-2], strides, ldil, rdil)
  out_sp = conv_out_spatial(sx[1:-1], sw[:-2], strides, pads, ldil, rdil)
  require_lib()
  out5 = (sx[0],) + (1,) * (3 - nsp) + out_sp + (o,)
  call = jax.ffi.ffi_call(TARGET_CONV_FWD, jax.ShapeDtypeStruct(out5, jnp.float32), vmap_method="sequential")
  y = call(to_5d(x, nsp), kernel_to_5d(w, nsp), jnp.reshape(ex, (1,)), jnp.reshape(ew, (1,)),
           **_attrs(nsp, strides, pads, ldil, rdil, g, bx, bw, isa_code))
  return y.reshape((sx[0],) + out_sp + (o,))


def conv_weight_grad(x, dy, ex, edy, *, kernel_spatial, window_strides, padding, lhs_dilation=None,
                     rhs_dilation=None, feature_group_count: int = 1, bits_x: int, bits_dy: int,
                     isa: str = "auto") -> jax.Array:
  """Weight-gradient of `conv` on the kernel: float32 ``[*K, C / G, O]``.

  ``dw[(tap, c), o] = sum over output pixels (n, *o) of im2col(x)[pixel, (tap, c)] * dy[pixel, o]``
  per group: the GEMM contract with K = the output pixels in row-major order (so bit-identical to
  ``reference_gemm(im2col(x)^T, dy)``).  ``dy``: int16 ``[N, *O, O]``, its exponent ``edy``.
  """
  nsp, strides, ldil, rdil, g, bx, bd, isa_code = _conv_common(
      x, dy, ex, edy, ("x", "dy"), x, window_strides, lhs_dilation, rhs_dilation, feature_group_count,
      bits_x, bits_dy, isa)
  ksp = _check_ints("kernel_spatial", kernel_spatial, nsp, 0)
  sx, sd = tuple(np.shape(x)), tuple(np.shape(dy))
  c, o = sx[-1], sd[-1]
  if c % g or o % g:
    raise ValueError(f"feature_group_count={g} must divide x features {c} and dy features {o}")
  pads = conv_padding(padding, sx[1:-1], ksp, strides, ldil, rdil)
  out_sp = conv_out_spatial(sx[1:-1], ksp, strides, pads, ldil, rdil)
  if sd != (sx[0],) + out_sp + (o,):
    raise ValueError(f"dy must have shape {(sx[0],) + out_sp + (o,)} (the conv output), got {sd}")
  require_lib()
  # The kernel writes dw^T per group, [G, O/G, *K, C/G]; the transpose of this small tensor is cheap.
  out6 = (g, o // g) + (1,) * (3 - nsp) + ksp + (c // g,)
  call = jax.ffi.ffi_call(TARGET_CONV_WGRAD, jax.ShapeDtypeStruct(out6, jnp.float32), vmap_method="sequential")
  dwt = call(to_5d(x, nsp), to_5d(dy, nsp), jnp.reshape(ex, (1,)), jnp.reshape(edy, (1,)),
             **_attrs(nsp, strides, pads, ldil, rdil, g, bx, bd, isa_code))
  dwt = dwt.reshape((g, o // g) + ksp + (c // g,))
  perm = tuple(range(2, 2 + nsp)) + (2 + nsp, 0, 1)
  return jnp.transpose(dwt, perm).reshape(ksp + (c // g, o))


def conv_input_grad_setup(w, in_spatial, window_strides, pads, lhs_dilation, rhs_dilation,
                          feature_group_count: int):
  """The backward-data conv of `conv`: ``dx = conv(dy, w_t, strides=lhs_dilation, padding=pads_t,
  lhs_dilation=window_strides, rhs_dilation=rhs_dilation, groups)``.  Returns ``(w_t, pads_t)``:
  ``w_t[*K, O/G, C]`` is w flipped spatially with the input and output features swapped per group
  (an exact int16 permutation), ``pads_t`` the adjusted padding (JAX's transpose rule)."""
  ksp = tuple(np.shape(w)[:-2])
  i, o = np.shape(w)[-2:]
  g = feature_group_count
  nsp = len(ksp)
  wt = lax.rev(w, tuple(range(nsp)))
  wt = wt.reshape(ksp + (i, g, o // g))
  wt = jnp.transpose(wt, tuple(range(nsp)) + (nsp + 2, nsp + 1, nsp)).reshape(ksp + (o // g, g * i))
  out_sp = conv_out_spatial(in_spatial, ksp, window_strides, pads, lhs_dilation, rhs_dilation)
  pads_t = []
  for s, k, st, (lo, _), ld, rd, os_ in zip(in_spatial, ksp, window_strides, pads, lhs_dilation, rhs_dilation,
                                             out_sp):
    din = (s - 1) * ld + 1 if s else 0
    dk = (k - 1) * rd + 1 if k else 0
    dout = (os_ - 1) * st + 1 if os_ else 0
    before = dk - lo - 1
    pads_t.append((int(before), int(din + dk - 1 - dout - before)))
  return wt, tuple(pads_t)


def input_grad_geometry(dy, w, input_spatial, window_strides, padding, lhs_dilation, rhs_dilation):
  """Checked geometry of the backward-data of a conv with kernel ``w`` on inputs of spatial size
  ``input_spatial``, ``dy`` checked against that conv's output: ``(nsp, in_sp, strides, pads, ldil, rdil)``."""
  nsp = np.ndim(dy) - 2
  if not 1 <= nsp <= 3 or np.ndim(w) != nsp + 2:
    raise ValueError(f"dy and w must have equal ranks 3..5, got {np.shape(dy)} and {np.shape(w)}")
  strides = _check_ints("window_strides", window_strides, nsp, 1)
  ldil = _check_ints("lhs_dilation", lhs_dilation or (1,) * nsp, nsp, 1)
  rdil = _check_ints("rhs_dilation", rhs_dilation or (1,) * nsp, nsp, 1)
  in_sp = _check_ints("input_spatial", input_spatial, nsp, 0)
  pads = conv_padding(padding, in_sp, np.shape(w)[:-2], strides, ldil, rdil)
  out_sp = conv_out_spatial(in_sp, np.shape(w)[:-2], strides, pads, ldil, rdil)
  if tuple(np.shape(dy)[1:-1]) != out_sp or np.shape(dy)[-1] != np.shape(w)[-1]:
    raise ValueError(f"dy must have shape {(np.shape(dy)[0],) + out_sp + (np.shape(w)[-1],)} (the conv output), "
                     f"got {np.shape(dy)}")
  return nsp, in_sp, strides, pads, ldil, rdil


def splits_by_phase(strides, lhs_dilation) -> bool:
  """A strided conv without lhs dilation: its backward-data can run per output phase (`input_grad_phases`)."""
  return any(s > 1 for s in strides) and all(d == 1 for d in lhs_dilation)


def conv_input_grad(dy, w, edy, ew, *, input_spatial, window_strides, padding, lhs_dilation=None,
                    rhs_dilation=None, feature_group_count: int = 1, bits_dy: int, bits_w: int,
                    isa: str = "auto") -> jax.Array:
  """Backward-data of `conv` on the kernel: float32 ``[N, *S, C]``, the conv of ``dy`` with the
  flipped, transposed kernel (`conv_input_grad_setup`), lhs dilation = the forward strides."""
  nsp, in_sp, strides, pads, ldil, rdil = input_grad_geometry(dy, w, input_spatial, window_strides, padding,
                                                              lhs_dilation, rhs_dilation)
  if isinstance(feature_group_count, bool) or not isinstance(feature_group_count, (int, np.integer)) \
      or feature_group_count < 1 or np.shape(w)[-1] % feature_group_count:
    raise ValueError(f"feature_group_count must be an int >= 1 dividing the output features, "
                     f"got {feature_group_count!r}")
  g = int(feature_group_count)
  wt, pads_t = conv_input_grad_setup(w, in_sp, strides, pads, ldil, rdil, g)
  kw = dict(feature_group_count=g, bits_x=bits_dy, bits_w=bits_w, isa=isa)
  if splits_by_phase(strides, ldil):
    bits_dy = check_bits("bits_dy", bits_dy)
    bits_w = check_bits("bits_w", bits_w)
    k_full = _prod(np.shape(wt)[:-1])
    og = np.shape(wt)[-2]
    chain = min(safe_chain_length(bits_dy, bits_w), max(k_full, 1))
    if chain == k_full or og % chain == 0:
      phase_conv = lambda wsub, pads, rd: conv(dy, wsub, edy, ew, window_strides=(1,) * nsp, padding=pads,
                                                rhs_dilation=rd, **kw)
      # nothing reads a phase without taps: +0.0 (NaN for a non-finite exponent), as the kernel
      bad = (jnp.reshape(edy, ()) == 2**30) | (jnp.reshape(ew, ()) == 2**30)
      empty = jnp.where(bad, jnp.float32(jnp.nan), jnp.float32(0))
      return input_grad_phases(dy, wt, in_sp, strides, pads_t, rdil, phase_conv, empty)
  return conv(dy, wt, edy, ew, window_strides=ldil, padding=pads_t, lhs_dilation=strides, rhs_dilation=rdil, **kw)


def _prod(xs) -> int:
  return int(math.prod(xs))


def input_grad_phases(dy, wt, in_sp, strides, pads_t, rdil, phase_conv, empty):
  """Backward-data of a strided conv without the zeros of the lhs-dilated dy: one stride-1 conv per
  output phase (dx[..., r::s, ...]) with the kernel taps that phase reads (sub-pixel decomposition).
  ``phase_conv(w_taps, padding, rhs_dilation)`` runs one phase's conv of dy; ``empty`` (a float32
  scalar) fills the phases that no tap reads.

  For the INT16 conv this is exact: the dropped taps read only dilation zeros, and the caller checked
  that every int32 chain of the full problem lies inside one tap (or is all of K), so the dropped taps
  are whole all-zero chains (each adds +0.0 to the FP32 accumulator, which is never -0.0) and the kept
  chains are the same.
  """
  nsp = len(in_sp)
  od = np.shape(dy)[1:-1]
  ksp = np.shape(wt)[:nsp]
  per_dim = []  # per dim: for each phase r, (count, taps, rhs dilation, (lo, hi)) or None (no taps)
  for d in range(nsp):
    s, rd, lo, size = strides[d], rdil[d], pads_t[d][0], in_sp[d]
    phases = []
    for r in range(s):
      cnt = len(range(r, size, s))
      taps = [k for k in range(ksp[d]) if (r + k * rd - lo) % s == 0]
      if cnt == 0 or not taps:
        phases.append((cnt, None, None, None))
        continue
      q = [(r + k * rd - lo) // s for k in taps]
      rd2 = q[1] - q[0] if len(q) > 1 else 1
      lo2 = -q[0]
      hi2 = cnt + (len(taps) - 1) * rd2 - od[d] - lo2
      phases.append((cnt, tuple(taps), rd2, (lo2, hi2)))
    per_dim.append(phases)
  nb, c = np.shape(dy)[0], np.shape(wt)[-1]
  blocks = [-(-size // s) for size, s in zip(in_sp, strides)]
  outs = []
  for ph in np.ndindex(*strides):
    sel = [per_dim[d][r] for d, r in enumerate(ph)]
    shape = (nb,) + tuple(x[0] for x in sel) + (c,)
    if any(x[1] is None for x in sel):
      y = jnp.broadcast_to(empty, shape)
    else:
      wsub = wt
      for d, x in enumerate(sel):
        if len(x[1]) != ksp[d]:
          wsub = jnp.take(wsub, np.asarray(x[1]), axis=d)
      y = phase_conv(wsub, tuple(x[3] for x in sel), tuple(x[2] for x in sel))
    # pad every phase to the block grid, then interleave
    outs.append(jnp.pad(y, [(0, 0)] + [(0, b - x[0]) for b, x in zip(blocks, sel)] + [(0, 0)]))
  st = jnp.stack(outs).reshape(tuple(strides) + (nb,) + tuple(blocks) + (c,))
  # [*s, N, *B, C] -> [N, B0, s0, B1, s1, ..., C]
  perm = (nsp,) + tuple(x for d in range(nsp) for x in (nsp + 1 + d, d)) + (2 * nsp + 1,)
  full = jnp.transpose(st, perm).reshape((nb,) + tuple(b * s for b, s in zip(blocks, strides)) + (c,))
  return full[(slice(None),) + tuple(slice(0, size) for size in in_sp)]


def patch_geometry(x_shape, kernel_spatial, window_strides, padding, lhs_dilation, rhs_dilation):
  """Checked geometry of the patch matrix of a conv input of shape ``x_shape``: ``(nsp, kernel_spatial,
  out_spatial, FFI attributes)``."""
  nsp = len(x_shape) - 2
  if not 1 <= nsp <= 3:
    raise ValueError(f"x must have rank 3, 4 or 5 (1 to 3 spatial dims), got shape {tuple(x_shape)}")
  ksp = _check_ints("kernel_spatial", kernel_spatial, nsp, 0)
  strides = _check_ints("window_strides", window_strides, nsp, 1)
  ldil = _check_ints("lhs_dilation", lhs_dilation or (1,) * nsp, nsp, 1)
  rdil = _check_ints("rhs_dilation", rhs_dilation or (1,) * nsp, nsp, 1)
  pads = conv_padding(padding, x_shape[1:-1], ksp, strides, ldil, rdil)
  out_sp = conv_out_spatial(x_shape[1:-1], ksp, strides, pads, ldil, rdil)
  pad3 = lambda v, fill: np.asarray((fill,) * (3 - nsp) + tuple(v), np.int64)
  attrs = dict(window_strides=pad3(strides, 1), padding_lo=pad3([q[0] for q in pads], 0),
               padding_hi=pad3([q[1] for q in pads], 0), lhs_dilation=pad3(ldil, 1), rhs_dilation=pad3(rdil, 1),
               kernel_spatial=pad3(ksp, 1))
  return nsp, ksp, out_sp, attrs


def im2col(x, *, kernel_spatial, window_strides, padding, lhs_dilation=None, rhs_dilation=None) -> jax.Array:
  """The patch matrix of a convolution on the C++ kernel: float32 ``[N, *O, KK, C]`` from x ``[N, *S, C]``
  (1 to 3 spatial dims), KK the kernel taps in row-major order; zeros where a tap reads padding or a
  hole of the lhs dilation. A pure copy, bit for bit ``lax.pad`` + one strided slice per tap + stack
  (`jdfp._src.ops.conv_vjp.patches`), in one pass."""
  if dtype_of("x", x).name != "float32":
    raise TypeError(f"x must have dtype float32, got {dtype_of('x', x).name}")
  sx = tuple(np.shape(x))
  nsp, ksp, out_sp, attrs = patch_geometry(sx, kernel_spatial, window_strides, padding, lhs_dilation, rhs_dilation)
  require_lib()
  kk = math.prod(ksp)
  out6 = (sx[0],) + (1,) * (3 - nsp) + out_sp + (kk, sx[-1])
  call = jax.ffi.ffi_call(TARGET_IM2COL, jax.ShapeDtypeStruct(out6, jnp.float32), vmap_method="sequential")
  return call(to_5d(x, nsp), **attrs).reshape((sx[0],) + out_sp + (kk, sx[-1]))

