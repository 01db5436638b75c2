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
