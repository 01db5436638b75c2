"""The C++ im2col kernel (`jdfp._src.ffi.conv.im2col`) that block-format convolutions use for their
patch matrix: bit for bit the independent numpy im2col and `conv_vjp.patches` (XLA's pad + strided
slices + stack) on every geometry of the conv kernel's tests plus random ones, NaN / -0.0 / subnormal
payloads kept; its VJP is XLA's col2im; bad arguments are errors, never crashes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jdfp
from jdfp import kernels
from jdfp._src.ffi import conv as ffi_conv
from jdfp._src.ops import conv_vjp
from kernel_testing import bits_eq
from test_conv_kernel import CASES, _case_id, im2col_np

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="libjdfp_ffi.so not built")


def special_input(shape, seed):
  """Normal values with NaN (two payloads), +-Inf, -0.0 and subnormals sprinkled in."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  flat = x.reshape(-1)
  specials = np.array([0x7FC00001, 0xFFC12345, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001, 0x807FFFFF],
                      np.uint32).view(np.float32)
  idx = rng.choice(flat.size, size=min(flat.size, 3 * specials.size), replace=False)
  flat[idx] = np.resize(specials, idx.size)
  return x


def kernel_im2col(x, ksp, strides, pads, ld, rd):
  return ffi_conv.im2col(jnp.asarray(x), kernel_spatial=ksp, window_strides=strides, padding=pads,
                         lhs_dilation=ld, rhs_dilation=rd)


def check_geometry(xs, ksp, strides, padding, ld, rd, seed=0):
  nsp = len(xs) - 2
  ld, rd = ld or (1,) * nsp, rd or (1,) * nsp
  pads = ffi_conv.conv_padding(padding, xs[1:-1], ksp, strides, ld, rd)
  x = special_input(xs, seed)
  got = kernel_im2col(x, ksp, strides, pads, ld, rd)
  want, out = im2col_np(x, ksp, strides, pads, ld, rd)
  assert got.shape == want.shape == (xs[0],) + tuple(out) + (int(np.prod(ksp)), xs[-1])
  bits_eq(got, want)
  padded = [(s - 1) * d + 1 + lo + hi for s, d, (lo, hi) in zip(xs[1:-1], ld, pads)]
  if np.prod(out) and min(padded) >= 0:  # (XLA's slices are never asked for degenerate geometries)
    xla, _ = conv_vjp.patches(jnp.asarray(x), ksp, strides, pads, ld, rd)
    bits_eq(got, xla)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bit_exact_on_conv_geometries(case):
  xs, ws, strides, padding, ld, rd, g = case[:7]
  check_geometry(xs, ws[:-2], strides, padding, ld, rd)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_bit_exact_random_geometries(data):
  nsp = data.draw(st.integers(1, 3))
  xs = (data.draw(st.integers(1, 3)),) + tuple(data.draw(st.integers(1, 7)) for _ in range(nsp)) \
      + (data.draw(st.integers(1, 5)),)
  ksp = tuple(data.draw(st.integers(1, 4)) for _ in range(nsp))  # may exceed the input: empty outputs
  strides = tuple(data.draw(st.integers(1, 3)) for _ in range(nsp))
  pads = tuple((data.draw(st.integers(-2, 3)), data.draw(st.integers(-2, 3))) for _ in range(nsp))
  ld = tuple(data.draw(st.integers(1, 3)) for _ in range(nsp))
  rd = tuple(data.draw(st.integers(1, 3)) for _ in range(nsp))
  check_geometry(xs, ksp, strides, pads, ld, rd, seed=data.draw(st.integers(0, 2**16)))


def test_vjp_is_xla_col2im():
  x = jnp.asarray(special_input((2, 9, 9, 5), 1))
  x = jnp.where(jnp.isfinite(x), x, 1.0)
  geo = ((3, 3), (2, 1), ((1, 2), (0, 1)), (1, 1), (2, 1))
  f_kernel = lambda x: jnp.sum(jnp.sin(conv_vjp.kernel_patches(x, *geo)))
  f_xla = lambda x: jnp.sum(jnp.sin(conv_vjp.patches(x, *geo)[0]))
  bits_eq(jax.jit(jax.grad(f_kernel))(x), jax.jit(jax.grad(f_xla))(x))


@pytest.mark.skipif(jax.__version_info__ >= (0, 12),
                    reason="jaxlib 0.12.0.1's LLVM spends 2.5+ minutes (unbounded in CI) in its loop vectorizer "
                           "(llvm::vputils::onlyFirstLaneUsed) compiling this step on the 2026-12 Zen 5 VMs; "
                           "the same code, before and after this round's changes; passes on jax 0.10.2")
def test_block_format_conv_uses_it_and_matches_reference():
  """An HBFP conv (im2col arrangement) on backend "ffi" builds its patches on the kernel; output and
  gradients bit-identical to backend "reference" (XLA patches + the pure-JAX GEMM)."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 6))
  w = jax.random.normal(jax.random.key(1), (3, 3, 6, 8))
  pol = jdfp.policies.hbfp8(tile=4, backend="ffi", grad_rounding="nearest")

  def loss(policy):
    return lambda x, w: jnp.sum(jnp.sin(jdfp.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), policy=policy)))

  hlo = jax.jit(jax.grad(loss(pol), (0, 1))).lower(x, w).as_text()
  assert "jdfp_im2col" in hlo
  got = jax.jit(jax.value_and_grad(loss(pol), (0, 1)))(x, w)
  want = jax.jit(jax.value_and_grad(loss(pol.replace(backend="reference")), (0, 1)))(x, w)
  assert "jdfp_im2col" not in jax.jit(loss(pol.replace(backend="reference"))).lower(x, w).as_text()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    bits_eq(a, b)


def test_bad_arguments():
  x = jnp.zeros((1, 4, 4, 2))
  kw = dict(kernel_spatial=(3, 3), window_strides=(1, 1), padding="SAME")
  with pytest.raises(TypeError, match="x must have dtype float32"):
    ffi_conv.im2col(x.astype(jnp.bfloat16), **kw)
  with pytest.raises(ValueError, match="rank 3, 4 or 5"):
    ffi_conv.im2col(jnp.zeros((4, 2)), **kw)
  with pytest.raises(ValueError, match="window_strides"):
    ffi_conv.im2col(x, **{**kw, "window_strides": (0, 1)})
  with pytest.raises(ValueError, match="kernel_spatial"):
    ffi_conv.im2col(x, **{**kw, "kernel_spatial": (3,)})


def test_ffi_errors_not_crashes():
  """Attributes the Python wrapper would refuse, sent straight to the handler: an FFI error."""
  from jdfp._src.ffi.library import TARGET_IM2COL
  x = jnp.zeros((1, 1, 4, 4, 2), jnp.float32)
  ok = dict(window_strides=np.ones(3, np.int64), padding_lo=np.zeros(3, np.int64),
            padding_hi=np.zeros(3, np.int64), lhs_dilation=np.ones(3, np.int64), rhs_dilation=np.ones(3, np.int64),
            kernel_spatial=np.array([1, 3, 3], np.int64))
  good = jax.ShapeDtypeStruct((1, 1, 2, 2, 9, 2), jnp.float32)
  jax.ffi.ffi_call(TARGET_IM2COL, good)(x, **ok).block_until_ready()
  for bad_out, attrs, msg in (
      (jax.ShapeDtypeStruct((1, 1, 2, 2, 9, 3), jnp.float32), ok, "out must be"),
      (good, {**ok, "window_strides": np.array([1, 0, 1], np.int64)}, "must be >= 1"),
      (good, {**ok, "kernel_spatial": np.array([1, 3], np.int64)}, "kernel_spatial must have 3"),
  ):
    with pytest.raises(Exception, match=msg):
      jax.ffi.ffi_call(TARGET_IM2COL, bad_out)(x, **attrs).block_until_ready()
