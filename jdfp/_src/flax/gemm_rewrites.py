"""GEMM-shaped JAX calls rewritten onto one dot function: a convolution as im2col + ``dot_fn``, a
transposed convolution through a swapped ``conv_general_dilated``, a two-operand einsum as one
``dot_general``. The Flax integration uses them to route every GEMM of a layer through its tracked
dot (with statistics); no jit inside, so state updates stay in the caller's trace."""

from __future__ import annotations

import string

import jax.numpy as jnp
from jax import lax

from jdfp._src.ops.conv import conv_general_dilated


def conv_via_dot(dot_fn, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                 precision=None, preferred_element_type=None, *, patch_conv=None):
  """`jdfp.conv_general_dilated`'s im2col arrangement with ``dot_fn`` as the GEMM;
  ``dot_fn(p, w, dims, precision, preferred_element_type)`` returns the product. With
  `jdfp.dot_general` this is bit-identical to the op's im2col path (tested). ``patch_conv(x, w3,
  geom, precision, preferred_element_type)``: where the op converts the patch matrix from its input
  (`jdfp._src.ops.patch_conv`), that op with the caller's statistics instead of ``dot_fn``."""
  return conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                  feature_group_count, batch_group_count, precision, preferred_element_type,
                                  _dot_general=dot_fn, _patch_conv=patch_conv)


def conv_transpose_via(conv_fn, lhs, rhs, strides, padding, rhs_dilation=None, dimension_numbers=None,
                       transpose_kernel=False, precision=None, preferred_element_type=None, **kw):
  """`jax.lax.conv_transpose` with its inner `conv_general_dilated` replaced by ``conv_fn``.

  jax's conv_transpose computes the padding and calls ``conv_general_dilated`` (a global of
  ``jax._src.lax.convolution``); that global is swapped for the duration of the call.
  """
  from jax._src.lax import convolution as conv_mod  # pylint: disable=import-outside-toplevel
  orig = conv_mod.conv_general_dilated
  conv_mod.conv_general_dilated = conv_fn
  try:
    return _ORIG_CONV_TRANSPOSE(lhs, rhs, strides, padding, rhs_dilation=rhs_dilation,
                                dimension_numbers=dimension_numbers, transpose_kernel=transpose_kernel,
                                precision=precision, preferred_element_type=preferred_element_type, **kw)
  finally:
    conv_mod.conv_general_dilated = orig


_ORIG_CONV_TRANSPOSE = lax.conv_transpose


def parse_einsum(subscripts: str, lhs_ndim: int, rhs_ndim: int):
  """``(dims, out_perm, lhs_sum_axes, rhs_sum_axes)`` for a two-operand einsum, or None when it is
  not a plain contraction (repeated letters in an operand, etc.)."""
  s = subscripts.replace(" ", "")
  if "->" in s:
    ins, out = s.split("->")
  else:
    ins, out = s, None
  parts = ins.split(",")
  if len(parts) != 2:
    return None
  ndims = (lhs_ndim, rhs_ndim)
  letters_used = set(c for c in s if c.isalpha())
  free_letters = [c for c in string.ascii_letters if c not in letters_used]
  n_ell = 0
  for part, nd in zip(parts, ndims):
    if "..." in part:
      n_ell = max(n_ell, nd - (len(part) - 3))
  if n_ell > len(free_letters):
    return None
  ell = "".join(free_letters[:n_ell])
  specs = []
  for part, nd in zip(parts, ndims):
    if "..." in part:
      k = nd - (len(part) - 3)
      if k < 0:
        return None
      # Broadcast ellipsis dims of differing rank: only allow equal ellipsis ranks.
      if k != n_ell:
        return None
      part = part.replace("...", ell[n_ell - k:])
    if len(part) != nd or not all(c.isalpha() for c in part) or len(set(part)) != len(part):
      return None
    specs.append(part)
  a, b = specs
  if out is None:
    counts = {c: (a + b).count(c) for c in set(a + b)}
    out = ell + "".join(sorted(c for c in counts if counts[c] == 1 and c not in ell))
  else:
    if "..." in out:
      out = out.replace("...", ell)
    if not all(c.isalpha() for c in out) or len(set(out)) != len(out) or any(c not in a + b for c in out):
      return None
  lhs_sum = tuple(i for i, c in enumerate(a) if c not in b and c not in out)
  rhs_sum = tuple(i for i, c in enumerate(b) if c not in a and c not in out)
  a2 = "".join(c for c in a if c in b or c in out)
  b2 = "".join(c for c in b if c in a or c in out)
  batch = [c for c in a2 if c in b2 and c in out]
  contract = [c for c in a2 if c in b2 and c not in out]
  dims = ((tuple(a2.index(c) for c in contract), tuple(b2.index(c) for c in contract)),
          (tuple(a2.index(c) for c in batch), tuple(b2.index(c) for c in batch)))
  res = batch + [c for c in a2 if c not in b2] + [c for c in b2 if c not in a2]
  if sorted(res) != sorted(out):
    return None
  perm = tuple(res.index(c) for c in out)
  return dims, perm, lhs_sum, rhs_sum


def einsum_via_dot(dot_fn, subscripts, lhs, rhs, precision=None, preferred_element_type=None):
  """A two-operand einsum through ``dot_fn``; None when the expression is not a plain contraction
  (the caller then falls back to `jdfp.einsum`)."""
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  parsed = parse_einsum(subscripts, lhs.ndim, rhs.ndim)
  if parsed is None:
    return None
  dims, perm, lsum, rsum = parsed
  if lsum:
    lhs = jnp.sum(lhs, axis=lsum)
  if rsum:
    rhs = jnp.sum(rhs, axis=rsum)
  (lc, rc), (lb, rb) = dims
  for x, y in zip(lc + lb, rc + rb):
    if lhs.shape[x] != rhs.shape[y]:
      return None  # broadcasting of size-1 dims: leave to jnp.einsum
  y = dot_fn(lhs, rhs, dims, precision, preferred_element_type)
  if perm != tuple(range(len(perm))):
    y = jnp.transpose(y, perm)
  return y
