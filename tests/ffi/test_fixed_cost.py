"""The per-op fixed-cost paths of the kernels: GEMMs / convs run inline on the calling thread below
a work threshold (bit-identical to the pooled run), the exponent-only call (`dfp_exponents`), and
the conversion without counters (`quantize_dfp`) next to the counting one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdfp
from jdfp import kernels
from jdfp._src.ffi import library
from jdfp._src.ffi import quantize as ffi_quantize

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="libjdfp_ffi.so not built")


def _run_with_env(code: str, env_extra: dict, out_path: str) -> dict:
  env = dict(os.environ, **env_extra)
  root = os.path.dirname(os.path.abspath(jdfp.__file__))
  env["PYTHONPATH"] = os.path.dirname(root) + os.pathsep + env.get("PYTHONPATH", "")
  r = subprocess.run([sys.executable, "-c", code, out_path], capture_output=True, text=True, env=env, timeout=300,
                     cwd=os.path.dirname(root))
  assert r.returncode == 0, r.stdout + r.stderr
  with np.load(out_path) as z:
    return {k: z[k] for k in z.files}


_CASES = textwrap.dedent("""
  import sys
  import jax, jax.numpy as jnp, numpy as np
  import jdfp
  from jdfp import kernels
  rng = np.random.default_rng(0)
  out = {}
  # GEMMs from one tile to many (several tiles per worker when pooled), int16 and float32 inputs.
  for m, k, n in ((16, 40, 24), (64, 64, 64), (128, 128, 128), (200, 300, 520), (1, 700, 900), (400, 96, 1100)):
    a = rng.integers(-8191, 8192, (2, m, k), dtype=np.int16)
    b = rng.integers(-8191, 8192, (2, k, n), dtype=np.int16)
    ea = rng.integers(-20, 0, (2, m, 1)).astype(np.int32); eb = rng.integers(-20, 0, (2, 1, n)).astype(np.int32)
    out[f"i16_{m}_{k}_{n}"] = np.asarray(kernels.gemm(a, b, ea, eb, bits_a=14, bits_b=14))
    af = rng.standard_normal((m, k), dtype=np.float32); bf = rng.standard_normal((k, n), dtype=np.float32)
    out[f"f32_{m}_{k}_{n}"] = np.asarray(jax.jit(lambda x, y: jdfp.dot_general(x, y, (((1,), (0,)), ((), ()))))(af, bf))
  x = rng.standard_normal((4, 20, 20, 24), dtype=np.float32); w = rng.standard_normal((3, 3, 24, 40), dtype=np.float32)
  conv = lambda x, w: jdfp.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  out["conv"] = np.asarray(jax.jit(conv)(x, w))
  dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))(x, w)
  out["conv_dx"], out["conv_dw"] = np.asarray(dx), np.asarray(dw)
  np.savez(sys.argv[1], **out)
""")


def test_inline_path_is_bit_identical_to_the_pooled_path(tmp_path):
  """JDFP_INLINE_WORK=1 sends every GEMM / conv to XLA's pool, a huge threshold runs all of them on
  the calling thread (other tile sizes too): the results agree bit for bit."""
  pooled = _run_with_env(_CASES, {"JDFP_INLINE_WORK": "1"}, str(tmp_path / "pooled.npz"))
  inline = _run_with_env(_CASES, {"JDFP_INLINE_WORK": str(2**62)}, str(tmp_path / "inline.npz"))
  assert pooled.keys() == inline.keys()
  for k in pooled:
    np.testing.assert_array_equal(pooled[k].view(np.int32), inline[k].view(np.int32), err_msg=k)


@pytest.mark.parametrize("shape", [(5,), (64, 64), (3, 1000, 70), (300_000,), (0, 3)])
@pytest.mark.parametrize("scale", [1.0, 1e-40, 0.0, np.inf, np.nan])
def test_dfp_exponents_equal_quantize_dfp(shape, scale, isa):
  rng = np.random.default_rng(1)
  x = rng.standard_normal(shape).astype(np.float32)
  if np.isfinite(scale):
    x = x * np.float32(scale)  # 1e-40: subnormals, which read as zero
  elif x.size:
    x.flat[x.size // 2] = scale
  y = rng.standard_normal((7, 3)).astype(np.float32) * 100
  ex, ey = jax.jit(lambda a, b: ffi_quantize.dfp_exponents(a, b, bits=(14, 8), isa=isa))(x, y)
  for e, v, bits in ((ex, x, 14), (ey, y, 8)):
    _, want = kernels.quantize_dfp(v, bits=bits, isa=isa)
    assert e.shape == want.shape == (1,) * v.ndim and e.dtype == jnp.int32
    assert int(e.ravel()[0]) == int(np.asarray(want).ravel()[0])


def test_dfp_exponents_checks():
  with pytest.raises(ValueError, match="at least one"):
    ffi_quantize.dfp_exponents(bits=14)
  with pytest.raises(ValueError, match="entries"):
    ffi_quantize.dfp_exponents(jnp.ones(3), bits=(14, 8))
  with pytest.raises(TypeError, match="float32"):
    ffi_quantize.dfp_exponents(jnp.ones(3, jnp.int16), bits=14)
  call = jax.ffi.ffi_call(library.TARGET_DFP_EXPONENTS, (jax.ShapeDtypeStruct((2,), jnp.int32),))
  with pytest.raises(Exception, match="one int32"):
    jax.block_until_ready(call(jnp.ones(3), bits=np.asarray([14], np.int32), isa=np.int32(0)))


def test_quantize_dfp_without_counters_is_the_counting_call_minus_the_counters():
  x = jax.random.normal(jax.random.key(0), (300, 500)) * 7
  v, e = kernels.quantize_dfp(x, bits=12)
  v2, e2, counts = kernels.quantize_dfp_with_stats(x, bits=12)
  np.testing.assert_array_equal(np.asarray(v), np.asarray(v2))
  np.testing.assert_array_equal(np.asarray(e), np.asarray(e2))
  targets = lambda f: re.findall(r'custom_call_target="([^"]+)"', jax.jit(f).lower(x).compile().as_text())
  assert targets(lambda x: kernels.quantize_dfp(x, bits=12)) == [library.TARGET_QUANTIZE_DFP_NOCOUNT]
  assert targets(lambda x: kernels.quantize_dfp(x, bits=12, counted=True)) == [library.TARGET_QUANTIZE_DFP]
