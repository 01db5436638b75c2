"""The C++ implicit-GEMM INT16 convolution (jdfp.kernels.conv / conv_weight_grad /
conv_input_grad) bit for bit against the GEMM contract on an independent numpy im2col, on every ISA
and, where the CPU has them, on the AMX-INT8 tiles (isa "auto");
and `jdfp.conv_general_dilated` with backend "ffi" against backend "reference" (im2col in JAX +
`reference_gemm`) for all three training passes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jdfp
from jdfp import kernels
from jdfp._src.ffi import conv as ffi_conv
from jdfp._src.ffi import library
from jdfp._src.numerics import reference
from jdfp._src.ops import backend, conv_vjp
from kernel_testing import bits_eq, gemm_isas, qmax

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="libjdfp_ffi.so not built")

FFI = jdfp.Policy(backend="ffi")
REF = jdfp.Policy(backend="reference")



def im2col_np(x, ksp, strides, pads, ld, rd):
  """numpy im2col: x [N, *S, C] -> [N, *O, KK, C], taps row-major (independent of conv_vjp.patches)."""
  x = np.asarray(x)
  dil = [(s - 1) * d + 1 if s else 0 for s, d in zip(x.shape[1:-1], ld)]
  xd = np.zeros((x.shape[0],) + tuple(dil) + (x.shape[-1],), x.dtype)
  xd[(slice(None),) + tuple(slice(None, None, d) for d in ld)] = x
  for d, (lo, hi) in enumerate(pads):  # pad (or crop, for negative padding) one dim at a time
    ax = 1 + d
    xd = np.pad(xd, [(max(lo, 0), max(hi, 0)) if a == ax else (0, 0) for a in range(xd.ndim)])
    n = xd.shape[ax]
    xd = np.take(xd, np.arange(max(-lo, 0), n - max(-hi, 0)), axis=ax)
  out = kernels.conv_out_spatial(x.shape[1:-1], ksp, strides, pads, ld, rd)
  taps = []
  for offs in np.ndindex(*ksp):
    idx = tuple(slice(o * r, o * r + (n - 1) * s + 1, s) if n else slice(0, 0)
                for o, r, s, n in zip(offs, rd, strides, out))
    taps.append(xd[(slice(None),) + idx])
  return np.stack(taps, axis=-2), out


@functools.lru_cache(maxsize=None)
def _ref_fn(bits_a, bits_b):
  return jax.jit(functools.partial(reference.reference_gemm, bits_a=bits_a, bits_b=bits_b))


def ref_gemm(a, b, ea, eb, bits_a, bits_b):
  bsz, m, _ = a.shape
  return np.asarray(_ref_fn(bits_a, bits_b)(a, b, np.full((bsz, m, 1), ea, np.int32),
                                            np.full((bsz, 1, b.shape[2]), eb, np.int32)))


def oracle_fwd(x, w, ex, ew, strides, pads, ld, rd, g, bits_x, bits_w):
  p, out = im2col_np(x, w.shape[:-2], strides, pads, ld, rd)
  n, kk, i, o = x.shape[0], int(np.prod(w.shape[:-2])), w.shape[-2], w.shape[-1]
  rows = n * int(np.prod(out))
  pm = p.reshape(rows, kk, g, i).transpose(2, 0, 1, 3).reshape(g, rows, kk * i)
  wm = w.reshape(kk, i, g, o // g).transpose(2, 0, 1, 3).reshape(g, kk * i, o // g)
  y = ref_gemm(pm, wm, ex, ew, bits_x, bits_w)
  return y.transpose(1, 0, 2).reshape((n,) + out + (o,)), pm


def oracle_wgrad(pm, dy, ex, edy, ksp, g, bits_x, bits_dy):
  gsz, rows, kki = pm.shape
  o = dy.shape[-1]
  d3 = dy.reshape(rows, g, o // g).transpose(1, 0, 2)
  dw = ref_gemm(np.ascontiguousarray(pm.transpose(0, 2, 1)), d3, ex, edy, bits_x, bits_dy)
  i = kki // int(np.prod(ksp))
  return dw.reshape(g, -1, i, o // g).transpose(1, 2, 0, 3).reshape(tuple(ksp) + (i, o))


# (x shape, w shape, strides, padding, lhs_dil, rhs_dil, groups, bits_x, bits_w)
CASES = [
    ((2, 9, 9, 4), (3, 3, 4, 6), (1, 1), "SAME", None, None, 1, 14, 14),
    ((2, 9, 9, 4), (3, 3, 4, 6), (2, 2), "VALID", None, None, 1, 16, 16),  # chains of 2
    ((2, 9, 10, 6), (3, 3, 2, 6), (2, 1), ((1, 2), (0, 1)), None, None, 3, 14, 14),  # groups
    ((2, 7, 7, 6), (3, 3, 1, 12), (1, 1), "SAME", None, None, 6, 14, 14),  # depthwise, multiplier 2
    ((2, 5, 5, 4), (3, 3, 4, 6), (1, 1), ((2, 2), (2, 2)), (2, 2), None, 1, 14, 14),  # lhs dilation
    ((2, 9, 9, 4), (3, 3, 4, 6), (1, 2), "SAME", None, (2, 2), 1, 12, 14),  # rhs dilation
    ((2, 9, 9, 4), (3, 3, 4, 6), (1, 1), ((-1, 2), (1, -2)), None, None, 1, 14, 14),  # cropping
    ((3, 17, 5), (5, 5, 3), (2,), "SAME", None, None, 1, 13, 13),  # 1-D, odd channels
    ((1, 5, 6, 7, 4), (2, 3, 3, 4, 6), (1, 2, 1), "SAME", None, None, 1, 14, 14),  # 3-D
    ((2, 12, 12, 32), (3, 3, 32, 8), (1, 1), "SAME", None, None, 1, 16, 9),  # odd chain 257
    ((2, 16, 16, 64), (3, 3, 64, 64), (1, 1), "SAME", None, None, 1, 14, 14),  # threads, kc blocks
    ((2, 16, 16, 64), (1, 1, 64, 32), (2, 2), "VALID", None, None, 1, 14, 14),  # 1x1 projection
    # first layers (1 or 3 channels): the weight-gradient's patch panels are many short channel runs
    ((4, 12, 12, 1), (3, 3, 1, 32), (1, 1), "SAME", None, None, 1, 14, 14),
    ((2, 11, 10, 3), (5, 5, 3, 16), (2, 2), ((2, 1), (1, 3)), None, None, 1, 14, 14),
    ((1, 4, 5, 6, 3), (2, 3, 3, 3, 4), (1, 2, 1), "SAME", None, None, 1, 14, 14),  # 3-D, odd channels
    # groups on pool threads: each group's weight-gradient tiles split the taps into column ranges
    # and share dy^T's rows (a worker reuses the panels it packed: job_id per call)
    ((2, 16, 16, 64), (3, 3, 32, 64), (1, 1), "SAME", None, None, 2, 14, 14),
    # a deep weight gradient (4096 pixels against 24 x 144): one tile per worker (deep_split)
    ((4, 32, 32, 16), (3, 3, 16, 24), (1, 1), "SAME", None, None, 1, 14, 14),
    ((2, 9, 9, 8), (3, 3, 8, 40), (2, 2), "SAME", None, None, 1, 14, 14),  # chains straddle taps (bwd)
    ((2, 11, 10, 8), (3, 3, 8, 32), (3, 2), ((2, 1), (0, 2)), None, (2, 1), 1, 14, 14),  # phases, rd
]


def _case_id(c):
  return f"x{'x'.join(map(str, c[0]))}-w{'x'.join(map(str, c[1]))}-s{c[2]}-g{c[6]}-b{c[7]}_{c[8]}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_three_passes_bit_exact_every_isa(case):
  isas = gemm_isas()
  xs, ws, strides, padding, ld, rd, g, bx, bw = case
  nsp = len(xs) - 2
  ld, rd = ld or (1,) * nsp, rd or (1,) * nsp
  rng = np.random.default_rng(hash(case) % 2**32)
  x = rng.integers(-qmax(bx), qmax(bx) + 1, xs).astype(np.int16)
  w = rng.integers(-qmax(bw), qmax(bw) + 1, ws).astype(np.int16)
  pads = kernels.conv_padding(padding, xs[1:-1], ws[:-2], strides, ld, rd)
  ex, ew, ed = -7, -13, -20
  y_ref, pm = oracle_fwd(x, w, ex, ew, strides, pads, ld, rd, g, bx, bw)
  # Output gradient with the gradient's own bits (bx); backward-data = conv of dy with w flipped.
  dy = rng.integers(-qmax(bx), qmax(bx) + 1, y_ref.shape).astype(np.int16)
  dw_ref = oracle_wgrad(pm, dy, ex, ed, ws[:-2], g, bx, bx)
  wt, pads_t = ffi_conv.conv_input_grad_setup(jnp.asarray(w), xs[1:-1], strides, pads, ld, rd, g)
  dx_ref, _ = oracle_fwd(dy, np.asarray(wt), ed, ew, ld, pads_t, strides, rd, g, bx, bw)
  assert dx_ref.shape == xs

  kw = dict(window_strides=strides, padding=padding, lhs_dilation=ld, rhs_dilation=rd, feature_group_count=g)
  e = lambda v: jnp.full((1,), v, jnp.int32)
  for isa in isas:
    y = kernels.conv(x, w, e(ex), e(ew), bits_x=bx, bits_w=bw, isa=isa, **kw)
    bits_eq(y, y_ref)
    dw = kernels.conv_weight_grad(x, dy, e(ex), e(ed), kernel_spatial=ws[:-2], bits_x=bx, bits_dy=bx, isa=isa,
                                  **kw)
    bits_eq(dw, dw_ref)
    dx = kernels.conv_input_grad(dy, w, e(ed), e(ew), input_spatial=xs[1:-1], bits_dy=bx, bits_w=bw, isa=isa,
                                 **kw)
    bits_eq(dx, dx_ref)

  # backward-data and weight-gradient are the true VJP of the forward conv (float32 check).
  dn = lax.conv_dimension_numbers(xs, ws, ("NWC", "WIO", "NWC") if nsp == 1 else
                                  ("NHWC", "HWIO", "NHWC") if nsp == 2 else ("NDHWC", "DHWIO", "NDHWC"))
  xf, wf, dyf = (jnp.asarray(t, jnp.float32) for t in (x, w, dy))
  f = lambda a, b: lax.conv_general_dilated(a, b, strides, pads, ld, rd, dn, g, precision="highest")
  _, vjp = jax.vjp(f, xf, wf)
  dx32, dw32 = vjp(dyf)
  for got, want in ((dx_ref, np.asarray(dx32) * 2.0 ** (ed + ew)), (dw_ref, np.asarray(dw32) * 2.0 ** (ex + ed))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("bits", [16, 14])
def test_adversarial_all_max(bits):
  """Every product at qmax**2: any int32 chain longer than the contract's L would wrap."""
  isas = gemm_isas()
  q = qmax(bits)
  x = np.full((2, 10, 10, 64), q, np.int16)
  w = np.full((3, 3, 64, 32), -q, np.int16)
  w[..., ::2] = q
  dy = np.full((2, 10, 10, 32), -q, np.int16)
  e0 = jnp.zeros((1,), jnp.int32)
  pads = ((1, 1), (1, 1))
  y_ref, pm = oracle_fwd(x, w, 0, 0, (1, 1), pads, (1, 1), (1, 1), 1, bits, bits)
  dw_ref = oracle_wgrad(pm, dy, 0, 0, (3, 3), 1, bits, bits)
  kw = dict(window_strides=(1, 1), padding="SAME")
  for isa in isas:
    bits_eq(kernels.conv(x, w, e0, e0, bits_x=bits, bits_w=bits, isa=isa, **kw), y_ref)
    bits_eq(kernels.conv_weight_grad(x, dy, e0, e0, kernel_spatial=(3, 3), bits_x=bits, bits_dy=bits, isa=isa, **kw),
            dw_ref)
  # The centre output sums 576 products of q*q exactly up to FP32 rounding of the chain sums.
  assert abs(float(y_ref[0, 5, 5, 0]) - 576.0 * q * q) <= 576.0 * q * q * 2**-20


needs_amx = pytest.mark.skipif(not (kernels.kernel_available() and kernels.has_amx_int8()),
                               reason="no AMX-INT8 tiles on this CPU (or JDFP_AMX=0)")


@needs_amx
@pytest.mark.parametrize("xs,ws", [((4, 48, 64, 32), (3, 3, 32, 20)), ((2, 5, 7, 1820), (3, 3, 1820, 64))],
                         ids=["K288", "K16380"])
def test_amx_forward_all_max_at_the_k_limits(xs, ws):
  """On the AMX tiles (isa "auto", convs of >= 2**26 products) the forward gathers each pixel's patch
  row whole and splits it into bytes: all-max values with alternating signs at K = 288 and at
  K = 9 * 1820 = 16380, the longest the tiles' int32 byte sums take; bit for bit the oracle and the
  AVX-512 kernel."""
  q = qmax(16)
  x = np.full(xs, q, np.int16)
  x[1, :, ::2] = -q
  w = np.full(ws, q, np.int16)
  w[..., 1::3] = -q
  e0 = jnp.zeros((1,), jnp.int32)
  y_ref, _ = oracle_fwd(x, w, 0, 0, (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 1, 16, 16)
  kw = dict(window_strides=(1, 1), padding="SAME", bits_x=16, bits_w=16)
  got = kernels.conv(x, w, e0, e0, isa="auto", **kw)
  bits_eq(got, y_ref)
  bits_eq(got, kernels.conv(x, w, e0, e0, isa="avx512_vnni", **kw))
  assert float(np.asarray(got)[0, 2, 3, 0]) == np.float32(9.0 * xs[-1] * q * q)


@needs_amx
@pytest.mark.parametrize("case", [
    ((8, 40, 40, 64), (3, 3, 32, 64), (1, 1), "SAME", None, None, 2, 14, 14),  # groups
    ((8, 41, 39, 48), (3, 3, 48, 48), (2, 2), ((1, 2), (0, 1)), None, (2, 1), 1, 12, 14),  # strides, rhs dilation
    ((4, 30, 30, 40), (5, 5, 40, 24), (1, 1), "VALID", (2, 2), None, 1, 14, 14),  # lhs dilation (holes)
], ids=_case_id)
def test_amx_forward_and_backward_data_geometries(case):
  """The passes that gather A (forward; backward-data, the forward on dy with the flipped kernel and
  the stride as lhs dilation) on the tiles, for geometries large enough to take them: bit for bit the
  oracle and the AVX-512 kernel."""
  xs, ws, strides, padding, ld, rd, g, bx, bw = case
  ld, rd = ld or (1, 1), rd or (1, 1)
  rng = np.random.default_rng(7)
  x = rng.integers(-qmax(bx), qmax(bx) + 1, xs).astype(np.int16)
  w = rng.integers(-qmax(bw), qmax(bw) + 1, ws).astype(np.int16)
  pads = kernels.conv_padding(padding, xs[1:-1], ws[:-2], strides, ld, rd)
  y_ref, _ = oracle_fwd(x, w, -7, -13, strides, pads, ld, rd, g, bx, bw)
  dy = rng.integers(-qmax(bx), qmax(bx) + 1, y_ref.shape).astype(np.int16)
  wt, pads_t = ffi_conv.conv_input_grad_setup(jnp.asarray(w), xs[1:-1], strides, pads, ld, rd, g)
  dx_ref, _ = oracle_fwd(dy, np.asarray(wt), -20, -13, ld, pads_t, strides, rd, g, bx, bw)
  kw = dict(window_strides=strides, padding=padding, lhs_dilation=ld, rhs_dilation=rd, feature_group_count=g)
  e = lambda v: jnp.full((1,), v, jnp.int32)
  for isa in ("auto", "avx512_vnni"):
    bits_eq(kernels.conv(x, w, e(-7), e(-13), bits_x=bx, bits_w=bw, isa=isa, **kw), y_ref)
    bits_eq(kernels.conv_input_grad(dy, w, e(-20), e(-13), input_spatial=xs[1:-1], bits_dy=bx, bits_w=bw, isa=isa,
                                    **kw), dx_ref)


def test_nonfinite_exponent_gives_nan():
  x = np.ones((1, 4, 4, 2), np.int16)
  w = np.ones((3, 3, 2, 3), np.int16)
  y = kernels.conv(x, w, jnp.full((1,), 2**30, jnp.int32), jnp.zeros((1,), jnp.int32), window_strides=(1, 1),
                   padding="SAME", bits_x=14, bits_w=14)
  assert np.isnan(np.asarray(y)).all()


# ------------------------------------------------------------------------------------------------
# jdfp.conv_general_dilated: ffi == reference for the three passes.

OPS_CASES = [
    dict(lhs=(2, 4, 9, 9), rhs=(6, 4, 3, 3), strides=(2, 1), padding=((1, 2), (0, 1)), dn=("NCHW", "OIHW", "NCHW")),
    dict(lhs=(2, 9, 9, 8), rhs=(3, 3, 2, 8), strides=(2, 2), padding="SAME", dn=("NHWC", "HWIO", "NHWC"), groups=4),
    dict(lhs=(2, 10, 10, 4), rhs=(3, 3, 4, 6), strides=(1, 1), padding=((2, 1), (1, 3)), dn=("NHWC", "HWIO", "NHWC"),
         lhs_dil=(2, 1), rhs_dil=(1, 2)),
    dict(lhs=(3, 4, 17), rhs=(2, 4, 5), strides=(3,), padding="VALID", dn=("NCW", "OIW", "NCW")),
]


def _ops_fn(case, policy, key=None):
  kw = dict(lhs_dilation=case.get("lhs_dil"), rhs_dilation=case.get("rhs_dil"), dimension_numbers=case["dn"],
            feature_group_count=case.get("groups", 1))
  return lambda a, b: jdfp.conv_general_dilated(a, b, case["strides"], case["padding"], policy=policy, key=key,
                                                **kw)


OPS_POLICIES = [jdfp.Policy(), jdfp.policies.dfp16(),
                jdfp.Policy(lhs=jdfp.DFP(16), rhs=jdfp.DFP(12), grad=jdfp.BFP(11, block=None, axis=None)),
                jdfp.policies.dfp16(fwd_rounding="stochastic")]


@pytest.mark.parametrize("case,base", list(zip(OPS_CASES, OPS_POLICIES)))
def test_ops_ffi_equals_reference(case, base):
  lhs = jax.random.normal(jax.random.key(0), case["lhs"])
  rhs = jax.random.normal(jax.random.key(1), case["rhs"]) * 0.3
  key = jax.random.key(7)
  outs = {}
  for name in ("ffi", "reference"):
    f = _ops_fn(case, base.replace(backend=name), key)
    y = jax.jit(f)(lhs, rhs)
    g = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.sin(f(a, b))), argnums=(0, 1)))(lhs, rhs)
    outs[name] = (y, *g)
  for a, b in zip(outs["ffi"], outs["reference"]):
    bits_eq(a, b)
  y32 = lax.conv_general_dilated(lhs, rhs, case["strides"], case["padding"], case.get("lhs_dil"), case.get("rhs_dil"),
                                 case["dn"], case.get("groups", 1), precision="highest")
  np.testing.assert_allclose(outs["ffi"][0], y32, atol=1e-2 * float(jnp.abs(y32).max()))


def test_ops_forward_and_wgrad_equal_im2col_dot_path():
  """The kernel's forward and weight-gradient are bit-identical to im2col + jdfp.dot_general."""
  from jdfp._src.flax import gemm_rewrites
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))  # 1x1 stride 2: half the inputs are unread
  k = jax.random.normal(jax.random.key(1), (1, 1, 4, 6))
  kw = dict(window_strides=(2, 2), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  dot = lambda a, b, d, p, t: jdfp.dot_general(a, b, d, p, t, policy=REF)
  x = x.at[:, 1::2].set(100.0)  # unread inputs must not change the exponent
  old = lambda a, b: gemm_rewrites.conv_via_dot(dot, a, b, **kw)
  new = lambda a, b: jdfp.conv_general_dilated(a, b, **kw, policy=FFI)
  bits_eq(jax.jit(new)(x, k), jax.jit(old)(x, k))
  gw = lambda f: jax.jit(jax.grad(lambda b: jnp.sum(jnp.sin(f(x, b)))))(k)
  bits_eq(gw(new), gw(old))


def test_ops_symbolic_zero_and_residuals_int16():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 16))
  f = lambda b: jnp.sum(jdfp.conv_general_dilated(x, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                  policy=FFI) ** 2)
  g = jax.jit(jax.grad(f))(w)
  assert g.shape == w.shape and bool(jnp.all(jnp.isfinite(g)))
  geom = conv_vjp.ConvGeom((8, 8), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 1)
  _, res = conv_vjp._conv_fwd(x, w, None, geom, FFI, jnp.float32)
  assert res[0].dtype == jnp.int16 and res[2].dtype == jnp.int16
  saved = sum(np.asarray(t).nbytes for t in jax.tree.leaves(res))
  assert saved <= 0.5 * (x.nbytes + w.nbytes) + 64  # no im2col copy is kept


def test_ops_block_formats_take_reported_im2col_path():
  x = jax.random.normal(jax.random.key(0), (1, 6, 6, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 4))
  pol = jdfp.policies.hbfp8(tile=4, backend="ffi", grad_rounding="nearest")
  with pytest.warns(RuntimeWarning, match="im2col"):
    backend._warned.clear()
    y = jdfp.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), policy=pol)
  assert any("implicit-GEMM conv kernel" in m for m in backend.fallback_log)
  y_ref = jdfp.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    policy=pol.replace(backend="reference"))
  bits_eq(y, y_ref)


# ------------------------------------------------------------------------------------------------
# Bad inputs: Python errors at trace time, FFI errors (never a crash) at run time.


def test_bad_inputs_python():
  x = jnp.zeros((1, 5, 5, 4), jnp.int16)
  w = jnp.zeros((3, 3, 4, 2), jnp.int16)
  e = jnp.zeros((1,), jnp.int32)
  kw = dict(window_strides=(1, 1), padding="SAME", bits_x=14, bits_w=14)
  with pytest.raises(TypeError, match="int16"):
    kernels.conv(x.astype(jnp.float32), w, e, e, **kw)
  with pytest.raises(TypeError, match="int32"):
    kernels.conv(x, w, e.astype(jnp.float32), e, **kw)
  with pytest.raises(ValueError, match="feature_group_count"):
    kernels.conv(x, w, e, e, feature_group_count=3, **kw)
  with pytest.raises(ValueError, match="window_strides"):
    kernels.conv(x, w, e, e, window_strides=(0, 1), padding="SAME", bits_x=14, bits_w=14)
  with pytest.raises(ValueError, match="padding"):
    kernels.conv(x, w, e, e, window_strides=(1, 1), padding="FULL", bits_x=14, bits_w=14)
  with pytest.raises(ValueError, match="padding"):
    kernels.conv(x, w, e, e, window_strides=(1, 1), padding=((1, 1),), bits_x=14, bits_w=14)
  with pytest.raises(ValueError, match="bits_x"):
    kernels.conv(x, w, e, e, window_strides=(1, 1), padding="SAME", bits_x=17, bits_w=14)
  with pytest.raises(ValueError, match="one"):
    kernels.conv(x, w, jnp.zeros((2,), jnp.int32), e, **kw)
  with pytest.raises(ValueError, match="rank"):
    kernels.conv(x[0], w, e, e, **kw)
  with pytest.raises(ValueError, match="isa"):
    kernels.conv(x, w, e, e, window_strides=(1, 1), padding="SAME", bits_x=14, bits_w=14, isa="sse9")
  with pytest.raises(ValueError, match="dy must have shape"):
    kernels.conv_weight_grad(x, jnp.zeros((1, 4, 4, 2), jnp.int16), e, e, kernel_spatial=(3, 3),
                             window_strides=(1, 1), padding="SAME", bits_x=14, bits_dy=14)


def test_bad_inputs_ffi_errors():
  x = jnp.zeros((1, 5, 5, 4), jnp.int16)
  w = jnp.zeros((3, 3, 4, 2), jnp.int16)
  e = jnp.zeros((1,), jnp.int32)
  kw = dict(window_strides=(1, 1), padding="SAME", bits_x=14, bits_w=14)
  bad = x.at[0, 2, 2, 1].set(-32768)
  with pytest.raises(Exception, match=r"x has a value outside \[-qmax, qmax\]"):
    jax.block_until_ready(kernels.conv(bad, w, e, e, **kw))
  with pytest.raises(Exception, match=r"w has a value outside"):
    jax.block_until_ready(kernels.conv(x, w.at[1, 1, 0, 0].set(9000), e, e, **kw))
  # The handler checks shapes itself (a direct ffi_call with a wrong output shape).
  call = jax.ffi.ffi_call(library.TARGET_CONV_FWD, jax.ShapeDtypeStruct((1, 1, 5, 4, 2), jnp.float32))
  attrs = ffi_conv._attrs(2, (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 1, 14, 14, 0)
  with pytest.raises(Exception, match=r"jdfp conv: out must be \[N, OD, OH, OW, O\]"):
    jax.block_until_ready(call(x[:, None], w[None], e, e, **attrs))
  attrs["feature_group_count"] = np.int64(0)
  with pytest.raises(Exception, match="feature_group_count must be >= 1"):
    jax.block_until_ready(call(x[:, None], w[None], e, e, **attrs))
  # Still usable afterwards.
  assert kernels.conv(x, w, e, e, **kw).shape == (1, 5, 5, 2)


def test_vmap_and_jit():
  x = jnp.asarray(np.random.default_rng(0).integers(-100, 100, (3, 2, 6, 6, 4)), jnp.int16)
  w = jnp.asarray(np.random.default_rng(1).integers(-100, 100, (3, 3, 4, 5)), jnp.int16)
  e = jnp.zeros((1,), jnp.int32)
  f = lambda a: kernels.conv(a, w, e, e, window_strides=(1, 1), padding="SAME", bits_x=14, bits_w=14)
  yv = jax.jit(jax.vmap(f))(x)
  for i in range(3):
    bits_eq(yv[i], f(x[i]))


_CACHE_MIX_SCRIPT = """
import sys, numpy as np, jax.numpy as jnp
from jdfp import kernels
rng = np.random.default_rng(0); q = 2**13 - 1
e, e1 = jnp.zeros((1, 1), jnp.int32), jnp.zeros((1,), jnp.int32)
a = jnp.asarray(rng.integers(-q, q + 1, (4096, 288)), jnp.int16)
b = jnp.asarray(rng.integers(-q, q + 1, (288, 64)), jnp.int16)
x = jnp.asarray(rng.integers(-q, q + 1, (16, 16, 16, 32)), jnp.int16)
w = jnp.asarray(rng.integers(-q, q + 1, (3, 3, 32, 64)), jnp.int16)
gemm = lambda: np.asarray(kernels.gemm(a, b, e, e, bits_a=14, bits_b=14))
conv = lambda: np.asarray(kernels.conv(x, w, e1, e1, bits_x=14, bits_w=14, window_strides=(1, 1), padding="SAME"))
first, second = (gemm, conv) if sys.argv[1] == "gemm" else (conv, gemm)
r1, r2 = first(), second()
np.savez(sys.argv[2], **{sys.argv[1]: r1, "other": r2})
"""


def test_packed_panel_caches_never_mix_calls(tmp_path):
  # The workers' packed-panel caches are keyed by a per-call job id. The GEMM and the conv (same
  # driver, same tile shape here) once drew ids from separate counters: in a fresh process the first
  # GEMM and the first conv had the same id, and the second call reused the first's packed B.
  import os
  import subprocess
  import sys
  # The children import the jdfp this process imported (installed or source tree), from a neutral cwd.
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(jdfp.__file__)), env.get("PYTHONPATH", "")])
  outs = {}
  for order in ("gemm", "conv"):
    path = tmp_path / f"{order}.npz"
    subprocess.run([sys.executable, "-c", _CACHE_MIX_SCRIPT, order, str(path)], check=True, cwd=tmp_path, env=env)
    outs[order] = np.load(path)
  # gemm-first: (gemm, conv); conv-first: (conv, gemm). Each op must give the same bits either way.
  bits_eq(outs["gemm"]["gemm"], outs["conv"]["other"])
  bits_eq(outs["gemm"]["other"], outs["conv"]["conv"])
