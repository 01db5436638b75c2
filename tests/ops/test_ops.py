"""Differentiable ops: ffi == reference bit for bit, error bounds vs FP32, transformations, NaN."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jdfp
from jdfp._src.ffi.gemm_bf16 import gemm_bf16
from jdfp._src.ops.gemm import bf16_dot_isa, bf16_dot_kernel, f16_dot_kernel

FFI = jdfp.Policy(backend="ffi")
REF = jdfp.Policy(backend="reference")
needs_kernel = pytest.mark.skipif(not jdfp.kernels.kernel_available(), reason="kernel library not built")

MATMUL = (((1,), (0,)), ((), ()))

# (lhs shape, rhs shape, dimension numbers): plain, transposed layouts, batch dims, multi-dim contraction
DOT_CASES = [
    ((8, 16), (16, 5), MATMUL),
    ((16, 8), (16, 5), (((0,), (0,)), ((), ()))),  # lhs contracting first -> transpose_a
    ((8, 16), (5, 16), (((1,), (1,)), ((), ()))),  # rhs [N, K] -> transpose_b
    ((3, 7, 16), (3, 16, 4), (((2,), (1,)), ((0,), (0,)))),  # batched
    ((2, 3, 4, 6), (4, 6, 5), (((2, 3), (0, 1)), ((), ()))),  # two contracting dims
    ((4, 2, 6, 3), (3, 2, 6), (((1, 2), (1, 2)), ((), ()))),  # scattered dims -> permute
    ((2, 5, 3, 8), (2, 3, 8, 4), (((3,), (2,)), ((0, 2), (0, 1)))),  # two batch dims
]


def rand(key, shape, scale=1.0):
  return jax.random.normal(jax.random.key(key), shape) * scale


def bits_equal(a, b):
  chex.assert_trees_all_equal(jax.tree.map(lambda x: np.asarray(x).view(np.int32), a),
                              jax.tree.map(lambda x: np.asarray(x).view(np.int32), b))


def loss(policy, lhs, rhs, dims, key=None):
  return jnp.sum(jnp.tanh(jdfp.dot_general(lhs, rhs, dims, policy=policy, key=key)) ** 2)


@needs_kernel
@pytest.mark.parametrize("lhs_shape,rhs_shape,dims", DOT_CASES)
@pytest.mark.parametrize("base", [jdfp.Policy(), jdfp.policies.hbfp8(tile=4), jdfp.Policy(lhs=jdfp.DFP(8, axis=-1),
                                  rhs=jdfp.DFP(12, axis=-1, block=4), grad=jdfp.DFP(10))])
def test_ffi_equals_reference_forward_and_grads(lhs_shape, rhs_shape, dims, base):
  lhs, rhs = rand(0, lhs_shape), rand(1, rhs_shape)
  key = jax.random.key(3)
  outs = {}
  for backend in ("ffi", "reference"):
    p = base.replace(backend=backend)
    y = jax.jit(lambda a, b, k: jdfp.dot_general(a, b, dims, policy=p, key=k))(lhs, rhs, key)
    g = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=(0, 3))(p, lhs, rhs, dims, key)
    outs[backend] = (y, g)
  bits_equal(outs["ffi"], outs["reference"])
  assert outs["ffi"][0].shape == lax.dot_general(lhs, rhs, dims).shape


@pytest.mark.parametrize("lhs_shape,rhs_shape,dims", DOT_CASES)
def test_matches_fp32_within_bound(lhs_shape, rhs_shape, dims):
  """|y - y32| <= K (|x|max dw + |w|max dx + dx dw) + fp32 rounding, with d = half a step per operand."""
  lhs, rhs = rand(0, lhs_shape, 3.0), rand(1, rhs_shape)
  y32 = np.asarray(lax.dot_general(lhs, rhs, dims, precision="highest"), np.float64)
  k = int(np.prod([lhs_shape[d] for d in dims[0][0]]))
  errs = {}
  for bits in (8, 12, 16):
    f = jdfp.DFP(bits)
    y = np.asarray(jdfp.dot_general(lhs, rhs, dims, policy=jdfp.Policy(lhs=f, rhs=f, grad=f)), np.float64)
    mx, mw = float(jnp.max(jnp.abs(lhs))), float(jnp.max(jnp.abs(rhs)))
    dx = 2.0 ** (np.frexp(mx)[1] - (bits - 1)) / 2
    dw = 2.0 ** (np.frexp(mw)[1] - (bits - 1)) / 2
    bound = k * (mx * dw + mw * dx + dx * dw) + 1e-5 * np.abs(y32).max()
    errs[bits] = np.abs(y - y32).max()
    assert errs[bits] <= bound, (bits, errs[bits], bound)
  assert errs[16] < errs[12] < errs[8]


def test_mlp_and_cnn_gradients_close_to_fp32():
  x = rand(0, (16, 8, 8, 3))
  params = dict(c1=rand(1, (3, 3, 3, 8), 0.3), c2=rand(2, (3, 3, 8, 8), 0.2), d1=rand(3, (8 * 4 * 4, 32), 0.1),
                d2=rand(4, (32, 10), 0.2))
  labels = jnp.arange(16) % 10

  def model(p, x, conv, dot):
    h = jax.nn.relu(conv(x, p["c1"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    h = jax.nn.relu(conv(h, p["c2"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(dot(h, p["d1"], MATMUL))
    logits = dot(h, p["d2"], MATMUL)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  g32 = jax.grad(model)(params, x, lax.conv_general_dilated, lax.dot_general)
  pol = jdfp.policies.dfp16(grad_rounding="nearest")
  conv = functools.partial(jdfp.conv_general_dilated, policy=pol)
  dot = functools.partial(jdfp.dot_general, policy=pol)
  g = jax.jit(jax.grad(model), static_argnums=(2, 3))(params, x, conv, dot)
  for name in params:
    rel = float(jnp.linalg.norm(g[name] - g32[name]) / jnp.linalg.norm(g32[name]))
    assert rel < 5e-3, (name, rel)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
@pytest.mark.parametrize("policy", [FFI, REF, jdfp.policies.hbfp8(grad_rounding="nearest")])
def test_nonfinite_inputs_and_grads_stay_nonfinite(bad, policy):
  if policy.backend == "ffi" and not jdfp.kernels.kernel_available():
    pytest.skip("kernel library not built")
  lhs, rhs = rand(0, (8, 16)), rand(1, (16, 4))
  y = jdfp.dot_general(lhs.at[2, 3].set(bad), rhs, MATMUL, policy=policy)
  assert not np.all(np.isfinite(np.asarray(y)))
  assert not np.isfinite(np.asarray(y[2])).any()
  # a non-finite output gradient gives non-finite parameter gradients
  _, vjp = jax.vjp(lambda a, b: jdfp.dot_general(a, b, MATMUL, policy=policy), lhs, rhs)
  dl, dr = vjp(jnp.ones((8, 4)).at[1, 1].set(bad))
  assert not np.isfinite(np.asarray(dr)).all() and not np.isfinite(np.asarray(dl)).all()


def test_stochastic_needs_key_and_is_reproducible():
  pol = jdfp.policies.dfp16()
  lhs, rhs = rand(0, (8, 16)), rand(1, (16, 4))
  # The forward rounds to nearest: inference needs no key, and equals the keyed forward.
  bits_equal(jdfp.dot_general(lhs, rhs, MATMUL, policy=pol),
             jdfp.dot_general(lhs, rhs, MATMUL, policy=pol, key=jax.random.key(0)))
  # Its gradient rounds stochastically: differentiating without a key is a trace-time error.
  with pytest.raises(ValueError, match="key=jax.random.key"):
    jax.grad(lambda r: jnp.sum(jdfp.dot_general(lhs, r, MATMUL, policy=pol)))(rhs)
  with pytest.raises(ValueError, match="key"):
    jdfp.dot_general(lhs, rhs, MATMUL, policy=pol.replace(fwd_rounding="stochastic"))
  g1 = jax.grad(loss, argnums=2)(pol, lhs, rhs, MATMUL, jax.random.key(1))
  g1b = jax.grad(loss, argnums=2)(pol, lhs, rhs, MATMUL, jax.random.key(1))
  g2 = jax.grad(loss, argnums=2)(pol, lhs, rhs, MATMUL, jax.random.key(2))
  bits_equal(g1, g1b)
  assert not np.array_equal(np.asarray(g1), np.asarray(g2))


def test_bad_arguments_are_named():
  lhs, rhs = rand(0, (8, 16)), rand(1, (16, 4))
  with pytest.raises(TypeError, match="lhs"):
    jdfp.dot_general(lhs.astype(jnp.int32), rhs, MATMUL)
  # Shape and dimension-number errors are lax's own (same type and message).
  for args in ((lhs, rhs[:5], MATMUL), (lhs, rhs, "ij,jk")):
    with pytest.raises(Exception) as want:
      jax.lax.dot_general(*args)
    with pytest.raises(type(want.value), match=re.escape(str(want.value)[:40])):
      jdfp.dot_general(*args)
  with pytest.raises(TypeError, match="policy"):
    jdfp.dot_general(lhs, rhs, MATMUL, policy="dfp16")
  with pytest.raises(ValueError, match="backend"):
    jdfp.Policy(backend="gpu")
  with pytest.raises(ValueError, match="grad_rounding"):
    jdfp.Policy(grad_rounding="up")
  with pytest.raises(ValueError, match="recipe"):
    jdfp.policies.get("int4")


def test_forward_mode_fails_clearly():
  lhs, rhs = rand(0, (8, 16)), rand(1, (16, 4))
  with pytest.raises(TypeError, match="forward-mode|jvp"):
    jax.jvp(lambda a: jdfp.dot_general(a, rhs, MATMUL), (lhs,), (lhs,))


@needs_kernel
def test_transformations_jit_vmap_scan_remat():
  lhs, rhs = rand(0, (4, 8, 16)), rand(1, (16, 4))
  f = lambda a, b: jdfp.dot_general(a, b, MATMUL, policy=FFI)
  direct = jnp.stack([f(lhs[i], rhs) for i in range(4)])
  bits_equal(jax.jit(jax.vmap(f, in_axes=(0, None)))(lhs, rhs), direct)
  # both operands batched
  rhs_b = jnp.stack([rhs * (i + 1) for i in range(4)])
  bits_equal(jax.vmap(f)(lhs, rhs_b), jnp.stack([f(lhs[i], rhs_b[i]) for i in range(4)]))
  # scan + checkpoint + value_and_grad
  def body(c, x):
    return c + jnp.sum(jax.checkpoint(f)(x, rhs)), None
  v, g = jax.jit(jax.value_and_grad(lambda b: lax.scan(lambda c, x: (c + jnp.sum(f(x, b) ** 2), None), 0.0, lhs)[0]))(rhs)
  v32, g32 = jax.value_and_grad(lambda b: jnp.sum(jnp.einsum("bij,jk->bik", lhs, b) ** 2))(rhs)
  np.testing.assert_allclose(v, v32, rtol=1e-3)
  np.testing.assert_allclose(g, g32, rtol=2e-2, atol=2e-2 * float(jnp.abs(g32).max()))
  out, _ = lax.scan(body, 0.0, lhs)
  assert np.isfinite(out)


@needs_kernel
def test_pmap_and_shard_map_run_kernel_per_device():
  n = jax.device_count()
  if n < 2:
    pytest.skip("needs several devices (tests/conftest.py simulates 4)")
  lhs, rhs = rand(0, (n, 8, 16)), rand(1, (16, 4))
  f = lambda a, b: jdfp.dot_general(a, b, MATMUL, policy=FFI)
  expected = jnp.stack([f(lhs[i], rhs) for i in range(n)])
  bits_equal(jax.pmap(f, in_axes=(0, None))(lhs, rhs), expected)
  from jax.sharding import Mesh, PartitionSpec as P
  try:
    shard_map = jax.shard_map
  except AttributeError:
    from jax.experimental.shard_map import shard_map
  mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
  sm = shard_map(lambda a, b: f(a[0], b)[None], mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))
  bits_equal(jax.jit(sm)(lhs, rhs), expected)
  hlo = jax.jit(sm).lower(lhs, rhs).as_text()
  assert "jdfp_gemm" in hlo


@needs_kernel
def test_hlo_has_ffi_custom_call_and_explain_reports_it():
  x, w = rand(0, (8, 16)), rand(1, (16, 4))
  f = lambda x, w: jnp.sum(jdfp.dot_general(x, w, MATMUL, policy=FFI) ** 2)
  hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).as_text()
  assert hlo.count("jdfp_gemm") >= 3  # forward, backward-data, weight-gradient
  report = jdfp.explain(jax.grad(f, argnums=(0, 1)), x, w)
  assert report.kernel_calls == 3 and not report.float_ops
  mixed = lambda x, w: jnp.sum(jdfp.dot_general(x, w, MATMUL, policy=jdfp.policies.bf16()) @ jnp.ones((4, 2)))
  r = jdfp.explain(jax.grad(mixed, argnums=(0, 1)), x, w)
  # XLA dots of the widened operands, or the BF16 kernel where the CPU has AVX512_BF16 or AMX-BF16.
  mixed_kinds = (jdfp._src.ops.explain.MIXED, jdfp._src.ops.explain.MIXED_KERNEL,
                 jdfp._src.ops.explain.MIXED_AMX_KERNEL)
  assert sum(r.count(k) for k in mixed_kinds) == 3 and len(r.float_ops) >= 1
  r = jdfp.explain(lambda x, w: jdfp.dot_general(x, w, MATMUL, policy=REF), x, w)
  assert r.count(jdfp._src.ops.explain.REFERENCE) >= 1 and r.kernel_calls == 0
  assert "jdfp kernel" in str(report)


def test_float_recipes_use_fp32_accumulation():
  x, w = rand(0, (8, 16)), rand(1, (16, 4))
  for pol, dt in ((jdfp.policies.fp16(), jnp.float16), (jdfp.policies.bf16(), jnp.bfloat16)):
    y = jdfp.dot_general(x, w, MATMUL, policy=pol)
    exp = lax.dot_general(x.astype(dt), w.astype(dt), MATMUL, preferred_element_type=jnp.float32)
    if dt == jnp.bfloat16 and bf16_dot_kernel(pol):
      # The kernel sums in its own documented order (docs/arithmetic.md, "BF16 GEMM"; on AMX-BF16
      # CPUs the tile unit's), not XLA's: the same bits as its scalar path (the vdpbf16ps chain) or a
      # direct call on the tiles, and within the FP32-accumulation bound of XLA's dot.
      isa = bf16_dot_isa(pol)
      bits_equal(y, gemm_bf16(x.astype(dt), w.astype(dt), isa="amx_bf16" if isa == "amx_bf16" else "scalar"))
      bound = 2 * 16 * 2.0**-24 * (jnp.abs(x.astype(dt).astype(jnp.float32)) @ jnp.abs(w.astype(dt).astype(jnp.float32)))
      assert bool(jnp.all(jnp.abs(y - exp) <= bound))
    elif dt == jnp.float16 and f16_dot_kernel(pol):
      # AMX-BF16 tiles: exact products (float16 = two bfloat16), float32 sums in the tile unit's order.
      bound = 4 * 16 * 2.0**-24 * (jnp.abs(x.astype(dt).astype(jnp.float32)) @ jnp.abs(w.astype(dt).astype(jnp.float32)))
      assert bool(jnp.all(jnp.abs(y - exp) <= bound))
    else:
      bits_equal(y, exp)
    assert y.dtype == jnp.float32


def test_explain_names_the_amx_paths():
  """`jdfp.explain` marks the GEMMs that isa="auto" sends to the AMX-INT8 tiles: INT16 with K in
  [32, 16384] and one exponent pair per output (a named ISA, a short K, block formats stay off them),
  INT8 in blocks of <= 64 (HBFP8) unless the data's exponents say otherwise."""
  from jdfp._src.ffi.library import has_amx_int8
  from jdfp._src.ops import explain

  def engines(pol, k):
    r = jdfp.explain(lambda x, w: jdfp.dot_general(x, w, MATMUL, policy=pol), rand(0, (8, k)), rand(1, (k, 4)))
    return [op.engine for op in r.ops if op.kind == explain.KERNEL]

  amx = explain.AMX if has_amx_int8() else ""
  assert engines(jdfp.Policy(), 64) == [amx]
  assert engines(jdfp.Policy(), 16) == [""]
  assert engines(jdfp.Policy(isa="scalar"), 64) == [""]
  hbfp = engines(jdfp.policies.hbfp12(), 64)  # INT16 with block exponents along K: not on the tiles
  assert hbfp and set(hbfp) == {""}
  r = jdfp.explain(lambda x, w: jdfp.dot_general(x, w, MATMUL, policy=jdfp.policies.hbfp8()), rand(0, (8, 96)),
                   rand(1, (96, 4)))  # INT8 in 24-long blocks: on the tiles where the scales are exact
  assert [op.engine for op in r.ops if op.kind == explain.KERNEL_I8] == [explain.AMX_BLOCKS if amx else ""]
  # Convolutions: forward and backward-data of a conv of >= 2**26 products on the tiles, its weight
  # gradient and small convs on the AVX-512 kernel.
  dn = ("NHWC", "HWIO", "NHWC")
  conv = lambda x, w: jnp.sum(jdfp.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn) ** 2)
  kernel_engines = lambda r: sorted(op.engine for op in r.ops if op.kind == explain.KERNEL)
  big = jdfp.explain(jax.grad(conv, argnums=(0, 1)), rand(2, (8, 32, 32, 64)), rand(3, (3, 3, 64, 64)))
  assert kernel_engines(big) == sorted(["", amx, amx])
  small = jdfp.explain(jax.grad(conv, argnums=(0, 1)), rand(2, (1, 6, 6, 8)), rand(3, (3, 3, 8, 8)))
  assert kernel_engines(small) == ["", "", ""]
  # The printed report names the tiles exactly where they run ("" is in every string: test the label).
  text = str(jdfp.explain(lambda x, w: jdfp.dot_general(x, w, MATMUL), rand(0, (8, 64)), rand(1, (64, 4))))
  assert (explain.AMX in text) == bool(amx)


def test_bf16_dots_route_by_cpu():
  """BF16 dots: jdfp's GEMM on the AMX-BF16 tiles where they are ready (isa "auto"), else the vdpbf16ps
  kernel where the CPU has AVX512_BF16 (and always where the policy names an ISA); `jdfp.explain` says
  which. XLA's own bf16 dot is not used: from jax 0.12.1 on it runs at FP32's speed on those tiles."""
  from jdfp._src.ffi.gemm_bf16 import amx_bf16_ready, has_avx512_bf16
  from jdfp._src.ops import explain

  x, w = rand(0, (8, 16)), rand(1, (16, 4))
  auto, scalar = jdfp.policies.bf16(), jdfp.policies.bf16().replace(isa="scalar")
  tiles = amx_bf16_ready()
  assert bf16_dot_isa(auto) == ("amx_bf16" if tiles else "auto" if has_avx512_bf16() else None)
  assert bf16_dot_isa(scalar) == ("scalar" if has_avx512_bf16() else None)  # a named ISA is the kernel's
  assert bf16_dot_isa(jdfp.policies.bf16(backend="reference")) is None
  for pol in (auto, scalar):
    r = jdfp.explain(lambda x, w: jdfp.dot_general(x, w, MATMUL, policy=pol), x, w)
    isa = bf16_dot_isa(pol)
    kind = explain.MIXED_AMX_KERNEL if isa == "amx_bf16" else explain.MIXED_KERNEL if isa else explain.MIXED
    assert r.count(kind) == 1
  xc, wc = rand(2, (1, 6, 6, 8)), rand(3, (3, 3, 8, 8))
  conv = lambda x, w: jdfp.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                policy=auto)
  r = jdfp.explain(conv, xc, wc)
  # The conv kernel: its AMX-BF16 tiles where they are ready (isa auto), else the vdpbf16ps chain.
  assert r.count(explain.MIXED_AMX_KERNEL) == (1 if tiles else 0)
  assert r.count(explain.MIXED_KERNEL) == (1 if has_avx512_bf16() and not tiles else 0)
  # The weight gradient's x^T is read in place by the kernel (transpose_a): no copy, no XLA dot; the
  # gradients are the recipe's all the same.
  loss = lambda x, w: jnp.sum(jdfp.dot_general(x, w, MATMUL, policy=auto) ** 2)
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
  assert "jdfp_transpose16" not in hlo
  if bf16_dot_kernel(auto):
    assert hlo.count("jdfp_gemm_bf16") == 3 and "dot_general" not in hlo
  gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
  r16 = lambda v: v.astype(jnp.bfloat16).astype(jnp.float32)
  gy = r16(2 * jdfp.dot_general(x, w, MATMUL, policy=auto))  # the backward rounds the op's own dy
  for got, want, bound in ((gx, gy @ r16(w).T, jnp.abs(gy) @ jnp.abs(r16(w)).T),
                           (gw, r16(x).T @ gy, jnp.abs(r16(x)).T @ jnp.abs(gy))):
    assert bool(jnp.all(jnp.abs(got - want) <= 2 * 16 * 2.0**-24 * bound + 1e-30))

@needs_kernel
def test_einsum_attention_shapes_and_equivalence():
  q, k = rand(0, (2, 3, 5, 8)), rand(1, (2, 3, 7, 8))
  s = jdfp.einsum("bhqd,bhkd->bhqk", q, k, policy=FFI)
  s_ref = jdfp.einsum("bhqd,bhkd->bhqk", q, k, policy=REF)
  bits_equal(s, s_ref)
  np.testing.assert_allclose(s, jnp.einsum("bhqd,bhkd->bhqk", q, k), atol=5e-3)
  three = jdfp.einsum("ij,jk,kl->il", rand(2, (4, 5)), rand(3, (5, 6)), rand(4, (6, 3)), policy=FFI)
  assert three.shape == (4, 3)


CONV_CASES = [
    dict(lhs=(2, 9, 9, 4), rhs=(3, 3, 4, 6), strides=(1, 1), padding="SAME", dn=("NHWC", "HWIO", "NHWC")),
    dict(lhs=(2, 9, 9, 4), rhs=(3, 3, 4, 6), strides=(2, 2), padding="VALID", dn=("NHWC", "HWIO", "NHWC")),
    dict(lhs=(2, 4, 9, 9), rhs=(6, 4, 3, 3), strides=(2, 1), padding=((1, 2), (0, 1)), dn=("NCHW", "OIHW", "NCHW")),
    dict(lhs=(2, 9, 9, 4), rhs=(3, 3, 4, 6), strides=(1, 1), padding="SAME", dn=("NHWC", "HWIO", "NHWC"), rhs_dil=(2, 2)),
    dict(lhs=(2, 5, 5, 4), rhs=(3, 3, 4, 6), strides=(1, 1), padding=((2, 2), (2, 2)), dn=("NHWC", "HWIO", "NHWC"), lhs_dil=(2, 2)),
    dict(lhs=(2, 9, 9, 6), rhs=(3, 3, 2, 6), strides=(1, 1), padding="SAME", dn=("NHWC", "HWIO", "NHWC"), groups=3),
    dict(lhs=(2, 9, 9, 6), rhs=(3, 3, 1, 6), strides=(1, 1), padding="SAME", dn=("NHWC", "HWIO", "NHWC"), groups=6),
    dict(lhs=(3, 17, 4), rhs=(5, 4, 2), strides=(2,), padding="SAME", dn=("NWC", "WIO", "NWC")),
    dict(lhs=(2, 8, 8, 4), rhs=(1, 1, 4, 8), strides=(2, 2), padding="VALID", dn=("NHWC", "HWIO", "NHWC")),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_matches_lax_and_backends_agree(case):
  lhs, rhs = rand(0, case["lhs"]), rand(1, case["rhs"], 0.3)
  kw = dict(lhs_dilation=case.get("lhs_dil"), rhs_dilation=case.get("rhs_dil"), dimension_numbers=case["dn"],
            feature_group_count=case.get("groups", 1))
  y32 = lax.conv_general_dilated(lhs, rhs, case["strides"], case["padding"], precision="highest", **kw)
  f = lambda pol: (lambda a, b: jdfp.conv_general_dilated(a, b, case["strides"], case["padding"], policy=pol, **kw))
  grad = lambda fn: jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.sin(fn(a, b))), argnums=(0, 1)))
  y = jax.jit(f(REF))(lhs, rhs)
  assert y.shape == y32.shape
  np.testing.assert_allclose(y, y32, atol=3e-3 * float(jnp.abs(y32).max()))
  g32 = jax.grad(lambda a, b: jnp.sum(jnp.sin(lax.conv_general_dilated(a, b, case["strides"], case["padding"], **kw))),
                 argnums=(0, 1))(lhs, rhs)
  gr = grad(f(REF))(lhs, rhs)
  for a, b in zip(gr, g32):
    np.testing.assert_allclose(a, b, atol=5e-3 * float(jnp.abs(b).max()))
  if jdfp.kernels.kernel_available():
    bits_equal(jax.jit(f(FFI))(lhs, rhs), y)
    bits_equal(grad(f(FFI))(lhs, rhs), gr)


def test_residuals_are_int16():
  x, w = rand(0, (64, 32)), rand(1, (32, 16))
  _, res = jdfp._src.ops.dot_vjp._dot_fwd(x, w, None, jdfp._src.ops.layout.canonical_dims(MATMUL, 2, 2), FFI, None, jnp.float32)
  ql, qr = res[0], res[1]
  assert ql.values.dtype == jnp.int16 and qr.values.dtype == jnp.int16
  saved = sum(np.asarray(l).nbytes for l in jax.tree.leaves(res))
  assert saved <= 0.5 * (x.nbytes + w.nbytes) + 64


def test_kernel_library_is_loaded():
  """The kernel-dependent tests skip without the library; this one makes a missing build fail loudly
  (set JDFP_ALLOW_NO_KERNEL=1 only on platforms where the extension cannot be built)."""
  import os
  if os.environ.get("JDFP_ALLOW_NO_KERNEL"):
    pytest.skip("JDFP_ALLOW_NO_KERNEL is set")
  assert jdfp.kernels.kernel_available(), jdfp._src.ffi.library.load_error()
  assert jdfp.kernels.best_isa() in jdfp.kernels.available_isas()


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("shape,strides", [((2, 9, 9, 6), (2, 2)), ((3, 8, 10, 4), (2, 3)), ((2, 7, 7, 4), (3, 1))])
def test_strided_1x1_conv_slices_first_bit_identical(backend, shape, strides):
  """A strided 1x1 conv quantizes (and keeps for the backward) only the positions it reads; values and
  gradients equal the unsliced strided conv bit for bit, an unread NaN included."""
  from jax._src.ad_checkpoint import saved_residuals

  from jdfp._src.ops import conv_vjp

  k1, k2 = jax.random.split(jax.random.key(1))
  x = jax.random.normal(k1, shape).at[0, -1, -1, 0].set(jnp.nan)
  if (shape[1] - 1) % strides[0] == 0:  # keep the NaN where the conv does not read it
    x = x.at[0, -1, -1, 0].set(1.0)
  w = jax.random.normal(k2, (1, 1, shape[-1], 5))
  policy = jdfp.Policy(backend=backend)
  dn = ("NHWC", "HWIO", "NHWC")
  sliced = lambda x, w: jnp.sum(jnp.sin(jdfp.conv_general_dilated(x, w, strides, "SAME", dimension_numbers=dn,
                                                                  policy=policy)))
  geom = conv_vjp.ConvGeom(shape[1:3], (1, 1), strides, ((0, 0), (0, 0)), (1, 1), (1, 1), 1)
  unsliced = lambda x, w: jnp.sum(jnp.sin(conv_vjp.conv_core(x, w, None, geom, policy, jnp.float32)))
  got = jax.jit(jax.value_and_grad(sliced, argnums=(0, 1)))(x, w)
  want = jax.jit(jax.value_and_grad(unsliced, argnums=(0, 1)))(x, w)
  assert np.isfinite(float(got[0]))
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
  out_sp = tuple(-(-n // s) for n, s in zip(shape[1:3], strides))
  ints = [tuple(a.shape) for a, _ in saved_residuals(sliced, x, w) if a.dtype == jnp.int16]
  assert (shape[0],) + out_sp + (shape[-1],) in ints and shape not in ints
