"""Helpers shared by the kernel tests (imported by name: pytest puts this folder on sys.path)."""

import numpy as np


def gemm_isas():
  """The GEMM kernels' ISA paths for tests: every named ISA this CPU runs, and "auto" where it means
  the AMX-INT8 tiles (the INT16 and INT8 GEMMs' own path there), all against the same oracle."""
  from jdfp import kernels
  if not kernels.kernel_available():
    return ()
  return kernels.available_isas() + (("auto",) if kernels.has_amx_int8() else ())


def qmax(bits):
  return 2 ** (bits - 1) - 1


def bits_eq(x, y):
  """Bit-for-bit equality of float32 arrays (NaN payloads included)."""
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.float32)
  assert x.shape == y.shape, (x.shape, y.shape)
  np.testing.assert_array_equal(x.view(np.int32), y.view(np.int32))


def draw_conv_geometry(data, max_images=3):
  """A random conv geometry for the col2im kernel tests (hypothesis ``st.data()``): x's shape
  ``(N, *S, C)`` with 1-3 spatial dims, kernel sizes (which may exceed the input: empty outputs),
  strides, paddings (negative ones crop), lhs and rhs dilations."""
  from hypothesis import strategies as st
  nsp = data.draw(st.integers(1, 3))
  xs = (data.draw(st.integers(1, max_images)),) + tuple(data.draw(st.integers(1, 7)) for _ in range(nsp)) \
      + (data.draw(st.integers(1, 5)),)
  ksp = tuple(data.draw(st.integers(1, 4)) for _ in range(nsp))
  strides = tuple(data.draw(st.integers(1, 3)) for _ in range(nsp))
  pads = tuple((data.draw(st.integers(-2, 3)), data.draw(st.integers(-2, 3))) for _ in range(nsp))
  ld = tuple(data.draw(st.integers(1, 3)) for _ in range(nsp))
  rd = tuple(data.draw(st.integers(1, 3)) for _ in range(nsp))
  return xs, ksp, strides, pads, ld, rd


def transposed_conv_reference(x, w, dy, strides, padding, ld, rd):
  """XLA's float32 transpose of the conv (x [N, *S, C], w [*K, C, O]) applied to dy, and the same with
  |w| and |dy| (the magnitudes of the error bounds of a backward-data pass): float64 arrays."""
  import jax
  import jax.numpy as jnp
  from jax import lax
  spec = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}[np.ndim(x) - 2]
  w32 = jnp.asarray(w, jnp.float32)
  conv = lambda a, b: lax.conv_general_dilated(a, b, strides, padding, ld, rd, dimension_numbers=spec,
                                              precision=lax.Precision.HIGHEST)
  x32, dy32 = jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32)
  want = jax.vjp(lambda a: conv(a, w32), x32)[1](dy32)[0]
  absum = jax.vjp(lambda a: conv(a, jnp.abs(w32)), x32)[1](jnp.abs(dy32))[0]
  return np.asarray(want, np.float64), np.asarray(absum, np.float64)
