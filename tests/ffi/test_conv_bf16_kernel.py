"""The C++ BF16 convolution (jdfp/_src/ffi/gemm_bf16.py: conv_bf16, its weight- and input-gradients)
against its contract, bit for bit.

Contract (docs/arithmetic.md, "BF16 convolutions"): the forward is the BF16 GEMM's chains on the
patch matrix, ``gemm_bf16(im2col(x), w)`` with K ordered (kernel taps row-major, channel); the
weight-gradient is ``gemm_bf16(dy^T, im2col(x))^T`` with K the output pixels in row-major order; the
backward-data is the forward on dy with the flipped, transposed kernel.  The reference here is the
BF16 GEMM (itself checked against an independent numpy model in test_gemm_bf16_kernel.py) on a
numpy im2col, so any gather mistake (a wrong tap, channel, pixel, padding or pair) shows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

import jdfp
from jdfp import kernels
from jdfp._src.ffi.conv import conv_input_grad_setup
from kernel_testing import bits_eq, draw_conv_geometry
from test_conv_kernel import im2col_np
from test_gemm_bf16_kernel import BF16_ISAS, needs_bf16

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="libjdfp_ffi.so not built")

if kernels.kernel_available():
  from jdfp._src.ffi.gemm_bf16 import conv_bf16, conv_bf16_input_grad, conv_bf16_weight_grad, gemm_bf16

# (x shape, w shape, strides, padding, lhs dilation, rhs dilation): one group each.
CASES = [
    ((2, 9, 9, 4), (3, 3, 4, 6), (1, 1), "SAME", None, None),
    ((2, 9, 9, 4), (3, 3, 4, 6), (2, 2), "VALID", None, None),
    ((2, 5, 5, 4), (3, 3, 4, 6), (1, 1), ((2, 2), (2, 2)), (2, 2), None),  # lhs dilation
    ((2, 9, 9, 4), (3, 3, 4, 6), (1, 2), "SAME", None, (2, 2)),  # rhs dilation
    ((2, 9, 9, 4), (3, 3, 4, 6), (1, 1), ((-1, 2), (1, -2)), None, None),  # cropping
    ((3, 17, 5), (5, 5, 3), (2,), "SAME", None, None),  # 1-D, odd channels (pairs straddle taps)
    ((1, 5, 6, 7, 4), (2, 3, 3, 4, 6), (1, 2, 1), "SAME", None, None),  # 3-D
    ((2, 12, 12, 32), (3, 3, 32, 33), (1, 1), "SAME", None, None),  # a column past one 32-wide panel
    ((2, 16, 16, 64), (3, 3, 64, 64), (1, 1), "SAME", None, None),  # threads, kc blocks (K = 576)
    ((2, 16, 16, 64), (1, 1, 64, 32), (2, 2), "VALID", None, None),  # 1x1 projection
    # weight-gradient on pool threads with every row (O = 32) in each tile and the taps split into
    # column ranges: each worker reuses the dy^T it packed
    ((2, 16, 16, 64), (3, 3, 64, 32), (1, 1), "SAME", None, None),
    # a deep weight gradient (4096 pixels against 24 x 144): one tile per worker (deep_split)
    ((4, 32, 32, 16), (3, 3, 16, 24), (1, 1), "SAME", None, None),
    ((2, 11, 10, 8), (3, 3, 8, 32), (3, 2), ((2, 1), (0, 2)), None, (2, 1)),
]


def _case_id(c):
  return f"x{'x'.join(map(str, c[0]))}-w{'x'.join(map(str, c[1]))}-s{c[2]}"


def _bf16_values(shape, rng, specials=False):
  """bfloat16-representable float32 values; with `specials`, a few NaN / Inf / -0 / subnormals."""
  v = (rng.standard_normal(shape) * rng.choice([1.0, 2.0**-10, 2.0**10], shape)).astype(np.float32)
  v = np.array(jnp.asarray(v).astype(jnp.bfloat16).astype(jnp.float32))
  if specials and v.size >= 8:
    flat = v.reshape(-1)
    idx = rng.choice(flat.size, 4, replace=False)
    flat[idx] = [np.nan, np.inf, -0.0, 2.0**-130]
  return v


def _kw(strides, padding, ld, rd):
  return dict(window_strides=strides, padding=padding, lhs_dilation=ld, rhs_dilation=rd)


def _patches(x, ksp, strides, padding, ld, rd):
  """numpy im2col [pixels, taps * C] of float32 x holding bf16 values, as bfloat16."""
  nsp = len(ksp)
  ld, rd = ld or (1,) * nsp, rd or (1,) * nsp
  pads = kernels.conv_padding(padding, x.shape[1:-1], ksp, strides, ld, rd)
  p, out = im2col_np(x, ksp, strides, pads, ld, rd)
  return jnp.asarray(p.reshape(-1, p.shape[-2] * p.shape[-1])).astype(jnp.bfloat16), out


def check(xs, ws, strides, padding, ld, rd, *, seed=0, isa="scalar", specials=False):
  """Forward and weight-gradient bit for bit against gemm_bf16 on the numpy patch matrix."""
  rng = np.random.default_rng(seed)
  x, w = _bf16_values(xs, rng, specials), _bf16_values(ws, rng, specials)
  ksp, o = ws[:-2], ws[-1]
  p, out_sp = _patches(x, ksp, strides, padding, ld, rd)
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  y = conv_bf16(xb, wb, isa=isa, **_kw(strides, padding, ld, rd))
  assert y.shape == (xs[0],) + tuple(out_sp) + (o,)
  bits_eq(y, gemm_bf16(p, wb.reshape(-1, o), isa="scalar").reshape(y.shape))
  dy = jnp.asarray(_bf16_values(y.shape, rng, specials), jnp.bfloat16)
  dw = conv_bf16_weight_grad(xb, dy, kernel_spatial=ksp, isa=isa, **_kw(strides, padding, ld, rd))
  bits_eq(dw, jnp.moveaxis(gemm_bf16(dy.reshape(-1, o).T, p, isa="scalar").reshape((o,) + ws[:-1]), 0, -1))
  return xb, wb, y, dy, dw


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_and_weight_grad_bit_exact_every_isa(case):
  for isa in BF16_ISAS:
    check(*case, isa=isa)


@pytest.mark.parametrize("case", CASES[:6], ids=_case_id)
def test_nonfinite_and_subnormal_values_propagate_as_the_gemm(case):
  for isa in BF16_ISAS:
    _, _, y, _, dw = check(*case, isa=isa, specials=True, seed=3)
    if case is CASES[0]:  # SAME, stride 1: every input is read, so the NaN reaches outputs and dw
      assert np.isnan(np.asarray(y)).any() and np.isnan(np.asarray(dw)).any()


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_input_grad_is_the_transposed_conv(case):
  """Backward-data equals XLA's transpose of the conv within the FP32-accumulation bound, and every
  ISA path gives the same bits."""
  xs, ws, strides, padding, ld, rd = case
  rng = np.random.default_rng(1)
  x, w = _bf16_values(xs, rng), _bf16_values(ws, rng)
  nsp = len(xs) - 2
  kw = _kw(strides, padding, ld, rd)
  spec = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}[nsp]
  f = lambda a: lax.conv_general_dilated(a, jnp.asarray(w), strides, padding, ld, rd, dimension_numbers=spec,
                                         precision=lax.Precision.HIGHEST)
  y, vjp = jax.vjp(f, jnp.asarray(x))
  dy = _bf16_values(y.shape, rng)
  want = np.asarray(vjp(jnp.asarray(dy))[0], np.float64)
  got = [np.asarray(conv_bf16_input_grad(jnp.asarray(dy, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16),
                                         input_spatial=xs[1:-1], isa=isa, **kw)) for isa in BF16_ISAS]
  for g in got[1:]:
    bits_eq(g, got[0])
  nsp_ones = (1,) * nsp
  if any(st_ > 1 for st_ in strides) and ld is None and ws[-1] % 2 == 0:
    # Strided: one conv per output phase, without the zeros of the dilated dy; with an even O the
    # kept k-pairs are the dilated form's, so on finite data the bits are the same.
    pads = kernels.conv_padding(padding, xs[1:-1], ws[:-2], strides, nsp_ones, rd or nsp_ones)
    wt, pads_t = conv_input_grad_setup(jnp.asarray(w, jnp.bfloat16), xs[1:-1], strides, pads, nsp_ones,
                                               rd or nsp_ones, 1)
    bits_eq(got[0], conv_bf16(jnp.asarray(dy, jnp.bfloat16), wt, window_strides=nsp_ones, padding=pads_t,
                              lhs_dilation=strides, rhs_dilation=rd))
  # |error| <= K * 2**-23 * sum |dy| |w| (each of the <= K float32 adds rounds once).
  absum = np.asarray(jax.vjp(lambda a: lax.conv_general_dilated(a, jnp.abs(jnp.asarray(w)), strides, padding, ld, rd,
                                                                 dimension_numbers=spec), jnp.asarray(x))[1](
      jnp.abs(jnp.asarray(dy)))[0], np.float64)
  k = int(np.prod(ws[:-2])) * ws[-1]
  assert np.all(np.abs(got[0] - want) <= k * 2.0**-23 * absum + 1e-30)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_bit_exact_random_geometries(data):
  xs, ksp, strides, pads, ld, rd = draw_conv_geometry(data)
  o = data.draw(st.integers(1, 40))
  isa = data.draw(st.sampled_from(BF16_ISAS))
  check(xs, ksp + (xs[-1], o), strides, pads, ld, rd, seed=data.draw(st.integers(0, 2**16)), isa=isa)


def test_errors_name_the_argument():
  x = jnp.zeros((2, 6, 6, 4), jnp.bfloat16)
  w = jnp.zeros((3, 3, 4, 5), jnp.bfloat16)
  with pytest.raises(TypeError, match="x must have dtype bfloat16"):
    conv_bf16(x.astype(jnp.float32), w, window_strides=(1, 1), padding="SAME")
  with pytest.raises(ValueError, match="one group"):
    conv_bf16(x, jnp.zeros((3, 3, 2, 5), jnp.bfloat16), window_strides=(1, 1), padding="SAME")
  with pytest.raises(ValueError, match="equal ranks"):
    conv_bf16(x, jnp.zeros((3, 4, 5), jnp.bfloat16), window_strides=(1, 1), padding="SAME")
  with pytest.raises(ValueError, match="window_strides"):
    conv_bf16(x, w, window_strides=(0, 1), padding="SAME")
  with pytest.raises(ValueError, match="isa"):
    conv_bf16(x, w, window_strides=(1, 1), padding="SAME", isa="avx9000")
  with pytest.raises(ValueError, match="dy must have shape"):
    conv_bf16_weight_grad(x, jnp.zeros((2, 5, 6, 5), jnp.bfloat16), kernel_spatial=(3, 3), window_strides=(1, 1),
                          padding="SAME")
  with pytest.raises(ValueError, match="dy must have shape"):
    conv_bf16_input_grad(jnp.zeros((2, 5, 6, 5), jnp.bfloat16), w, input_spatial=(6, 6), window_strides=(1, 1),
                         padding="SAME")


def test_handler_rejects_bad_buffers_with_an_ffi_error():
  """Shapes that bypass the Python checks reach the handler: an error, not a crash."""
  from jdfp._src.ffi import gemm_bf16 as mod
  x = jnp.zeros((1, 1, 6, 6, 4), jnp.bfloat16)
  attrs = dict(window_strides=np.ones(3, np.int64), padding_lo=np.zeros(3, np.int64), padding_hi=np.zeros(3, np.int64),
               lhs_dilation=np.ones(3, np.int64), rhs_dilation=np.ones(3, np.int64))
  with pytest.raises(Exception, match="out must be"):
    mod._conv_call(x, jnp.zeros((1, 3, 3, 4, 5), jnp.bfloat16), (1, 1, 4, 4, 6), attrs, False, "auto").block_until_ready()
  with pytest.raises(Exception, match="C = x's channels"):
    mod._conv_call(x, jnp.zeros((1, 3, 3, 2, 5), jnp.bfloat16), (1, 1, 4, 4, 5), attrs, False, "auto").block_until_ready()
  with pytest.raises(Exception, match="C = x's channels"):
    mod._conv_call(x, jnp.zeros((1, 4, 4, 4, 5), jnp.bfloat16), (5, 1, 3, 3, 2), attrs, True, "auto").block_until_ready()
  with pytest.raises(Exception, match="x must be bfloat16"):
    mod._conv_call(x.astype(jnp.float32), jnp.zeros((1, 3, 3, 4, 5), jnp.bfloat16), (1, 1, 4, 4, 5), attrs, False,
                   "auto").block_until_ready()


# ------------------------------------------------------------------ the BF16 recipe's convolutions

def _loss(policy, dn=("NHWC", "HWIO", "NHWC"), groups=1):
  def f(x, w):
    y = jdfp.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=groups,
                                  policy=policy)
    return jnp.sum(jnp.tanh(y) * jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) / y.size)
  return f


def _kinds(fn, *args):
  return [op.kind for op in jdfp.explain(fn, *args).ops]


def _on_kernel(kinds):
  """How many of `kinds` are BF16 conv kernel calls (vdpbf16ps, or the AMX-BF16 tiles where ready)."""
  from jdfp._src.ops import explain
  return sum(k in (explain.MIXED_KERNEL, explain.MIXED_AMX_KERNEL) for k in kinds)


@needs_bf16
def test_recipe_runs_all_three_passes_on_the_kernel_bit_identical_to_direct_calls():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 10, 10, 16)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 16, 8)), jnp.float32)
  policy = jdfp.policies.bf16()
  f = _loss(policy)
  kinds = _kinds(jax.grad(f, (0, 1)), x, w)
  assert _on_kernel(kinds) == 3, kinds
  from jdfp._src.ops.float_conv import bf16_conv_isa
  isa = bf16_conv_isa(policy)  # the tiles where they are ready, else the vdpbf16ps chain
  y = jdfp.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), policy=policy)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  bits_eq(y, conv_bf16(xb, wb, window_strides=(1, 1), padding="SAME", isa=isa))
  gx, gw = jax.grad(f, (0, 1))(x, w)
  dy = jax.grad(lambda yy: jnp.sum(jnp.tanh(yy) * jnp.arange(yy.size, dtype=jnp.float32).reshape(yy.shape) / yy.size))(y)
  dyb = dy.astype(jnp.bfloat16)
  bits_eq(gx, conv_bf16_input_grad(dyb, wb, input_spatial=(10, 10), window_strides=(1, 1), padding="SAME", isa=isa))
  bits_eq(gw, conv_bf16_weight_grad(xb, dyb, kernel_spatial=(3, 3), window_strides=(1, 1), padding="SAME", isa=isa))
  # Against the float path of the recipe (XLA's FP32 conv on the rounded operands): the same products,
  # sums in another order.
  rx, rw = jax.grad(_loss(jdfp.policies.bf16(backend="reference")), (0, 1))(x, w)
  np.testing.assert_allclose(gx, rx, rtol=0, atol=1e-3 * float(jnp.abs(rx).max()))
  np.testing.assert_allclose(gw, rw, rtol=0, atol=1e-3 * float(jnp.abs(rw).max()))


@needs_bf16
@pytest.mark.parametrize("shape, groups, why", [((4, 8, 8, 3), 1, "3 channels"), ((4, 8, 8, 16), 2, "2 groups"),
                                                ((4, 8, 8, 6), 1, "6 channels")])
def test_recipe_keeps_xla_conv_where_the_kernel_does_not_apply(shape, groups, why):
  x = jnp.ones(shape, jnp.float32)
  w = jnp.ones((3, 3, shape[-1] // groups, 8), jnp.float32)
  from jdfp._src.ops import backend
  backend._warned.clear()
  with pytest.warns(RuntimeWarning, match="not on the BF16 conv kernel"):
    kinds = _kinds(jax.grad(_loss(jdfp.policies.bf16(), groups=groups), (0, 1)), x, w)
  assert _on_kernel(kinds) == 0, why
  assert any("not on the BF16 conv kernel" in m and why.split()[0] in m for m in backend.fallback_log)


@needs_bf16
def test_recipe_other_layouts_and_fp16_stay_as_before():
  x = jnp.ones((2, 16, 8, 8), jnp.float32)  # NCHW
  w = jnp.ones((8, 16, 3, 3), jnp.float32)  # OIHW
  kinds = _kinds(jax.grad(_loss(jdfp.policies.bf16(), dn=("NCHW", "OIHW", "NCHW")), (0, 1)), x, w)
  assert _on_kernel(kinds) == 3, kinds
  kinds = _kinds(jax.grad(_loss(jdfp.policies.fp16(), dn=("NCHW", "OIHW", "NCHW")), (0, 1)), x, w)
  assert _on_kernel(kinds) == 0


@needs_bf16
def test_recipe_conv_under_shard_map_and_vmap_equals_per_shard():
  """Batch-sharded x and dy, w varying per device: each device's outputs and gradients are the
  single-device kernel's bits, and so are vmap's."""
  try:
    shard_map = jax.shard_map
  except AttributeError:  # jax < 0.7
    from jax.experimental.shard_map import shard_map
  from jax.sharding import Mesh, PartitionSpec as P
  n = jax.device_count()
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2 * n, 8, 8, 16)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 16, 8)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((2 * n, 8, 8, 8)), jnp.float32)
  policy = jdfp.policies.bf16()
  conv = lambda xs, ws: jdfp.conv_general_dilated(xs, ws, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                  policy=policy)

  def local(xs, ws, dys):
    y, vjp = jax.vjp(conv, xs, ws)
    return (y,) + vjp(dys)

  def per_device(xs, ws, dys):
    y, gx, gw = local(xs, lax.pcast(ws, "d", to="varying"), dys)  # w's gradient per device, not summed
    return y, gx, gw[None]

  mesh = Mesh(np.array(jax.devices()), ("d",))
  got = jax.jit(shard_map(per_device, mesh=mesh, in_specs=(P("d"), P(), P("d")), out_specs=P("d")))(x, w, dy)
  per = [jax.jit(local)(x[2 * i:2 * i + 2], w, dy[2 * i:2 * i + 2]) for i in range(n)]
  want = (jnp.concatenate([p[0] for p in per]), jnp.concatenate([p[1] for p in per]), jnp.stack([p[2] for p in per]))
  for g, wv in zip(got, want):
    bits_eq(g, wv)
  vy, vx, vw = jax.vmap(local, in_axes=(0, None, 0))(x.reshape(n, 2, 8, 8, 16), w, dy.reshape(n, 2, 8, 8, 8))
  bits_eq(vy.reshape(want[0].shape), want[0])
  bits_eq(vx.reshape(x.shape), want[1])
  bits_eq(vw, want[2])
