"""Helpers shared by the kernel tests (imported by name: pytest puts this folder on sys.path)."""

import numpy as np


def qmax(bits):
  return 2 ** (bits - 1) - 1


def bits_eq(x, y):
  """Bit-for-bit equality of float32 arrays (NaN payloads included)."""
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.float32)
  assert x.shape == y.shape, (x.shape, y.shape)
  np.testing.assert_array_equal(x.view(np.int32), y.view(np.int32))
