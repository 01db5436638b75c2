"""The kernel tests' shared ISA fixtures: every SIMD path this CPU can run is tested against the
same reference (scalar first)."""

import pytest

from jdfp import kernels

AVAILABLE_ISAS = kernels.available_isas() if kernels.kernel_available() else ()


@pytest.fixture(params=AVAILABLE_ISAS, scope="module")
def isa(request) -> str:
  """Each ISA path in turn ("scalar", "avx2", "avx_vnni", "avx512_vnni" where present)."""
  return request.param


@pytest.fixture(scope="session")
def isas() -> tuple[str, ...]:
  """All ISA paths, for tests that compare them inside one test."""
  return AVAILABLE_ISAS
