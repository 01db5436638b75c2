"""Block-format convolutions whose lhs conversion gathers the patch matrix from the conv input
(`jdfp._src.ops.patch_conv`, the kernel call `quantize_patches_with_stats`): bit for bit the im2col
arrangement (`quantize_blocks_with_stats` of the stored patch matrix, `jdfp.dot_general` on it) and
the pure-JAX reference backend, for every rounding, ISA, int8 / int16 output, odd geometry and
special value; with Flax statistics, one merged kernel call per conv and the same state."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jdfp
from jdfp import kernels
from jdfp._src.ffi import block_quantize as ffi_block
from jdfp._src.ffi import conv as ffi_conv
from jdfp._src.numerics.formats import BFP, DFP

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="libjdfp_ffi.so not built")


def special_input(shape, seed):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(shape) * np.exp2(rng.integers(-3, 4, shape))).astype(np.float32)
  flat = x.reshape(-1)
  specials = np.array([0x7FC00001, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001, 0x807FFFFF],
                      np.uint32).view(np.float32)
  idx = rng.choice(flat.size, size=min(flat.size, 2), replace=False)
  flat[idx] = specials[rng.integers(0, specials.size, idx.size)]
  return jnp.asarray(x)


def assert_same(got, want):
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def patch_call_equals_materialized(x, geo, fmt, bshape, rounding, isa, out_dtype):
  key = jax.random.key(7) if rounding == "stochastic" else None
  p = ffi_conv.im2col(x, **geo)
  p3 = p.reshape(1, -1, p.shape[-2] * p.shape[-1])
  want = ffi_block.quantize_blocks_with_stats(p3, fmt, bshape, rounding=rounding, key=key, isa=isa,
                                              out_dtype=out_dtype)
  got = ffi_block.quantize_patches_with_stats(x, fmt, bshape, rounding=rounding, key=key, isa=isa,
                                              out_dtype=out_dtype, **geo)
  assert got[0].shape == p3.shape
  assert_same(got, want)


@pytest.mark.parametrize("isa", kernels.available_isas())
@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "biased"])
@pytest.mark.parametrize("fmt,bshape,out_dtype", [
    (BFP(7, block=(24, 24)), (1, 24, 24), jnp.int8),
    (BFP(11, block=(24, 24)), (1, 24, 24), jnp.int16),
    (BFP(7, block=32, axis=-1), (1, 1, 32), jnp.int16),
    (DFP(10), (1, 5, 16), jnp.int16),
])
def test_kernel_call_equals_materialized_patches(fmt, bshape, out_dtype, rounding, isa):
  x = special_input((3, 9, 10, 7), 0)
  geo = dict(kernel_spatial=(3, 3), window_strides=(2, 1), padding=((1, 2), (0, 1)), lhs_dilation=(1, 1),
             rhs_dilation=(1, 2))
  patch_call_equals_materialized(x, geo, fmt, bshape, rounding, isa, out_dtype)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_kernel_call_random_geometries(data):
  nsp = data.draw(st.integers(1, 3))
  xs = (data.draw(st.integers(1, 3)),) + tuple(data.draw(st.integers(1, 8)) for _ in range(nsp)) \
      + (data.draw(st.integers(1, 9)),)
  ksp = tuple(data.draw(st.integers(1, 3)) for _ in range(nsp))
  geo = dict(kernel_spatial=ksp, window_strides=tuple(data.draw(st.integers(1, 2)) for _ in range(nsp)),
             padding=tuple((data.draw(st.integers(-1, 2)), data.draw(st.integers(-1, 2))) for _ in range(nsp)),
             lhs_dilation=tuple(data.draw(st.integers(1, 2)) for _ in range(nsp)),
             rhs_dilation=tuple(data.draw(st.integers(1, 2)) for _ in range(nsp)))
  bshape = (1, data.draw(st.integers(1, 30)), data.draw(st.integers(1, 30)))
  rounding = data.draw(st.sampled_from(["nearest", "stochastic", "biased"]))
  x = special_input(xs, data.draw(st.integers(0, 2**16)))
  patch_call_equals_materialized(x, geo, BFP(7, block=bshape[1:]), bshape, rounding, "auto", jnp.int8)


POLICIES = {
    "hbfp8": jdfp.policies.hbfp8(),
    "hbfp12": jdfp.policies.hbfp12(),
    "mx": jdfp.Policy(lhs=BFP(7, block=16, axis=-1), rhs=BFP(7, block=16, axis=0), grad=BFP(7, block=16, axis=-1)),
    "stochastic_fwd": jdfp.policies.hbfp12(tile=8, fwd_rounding="stochastic"),
    "float_rhs": jdfp.policies.hbfp8(float_residuals=("rhs",)),
    "float_both": jdfp.policies.hbfp12(float_residuals=("lhs", "rhs"), grad_rounding="nearest"),
}


def conv_vjp(policy, x, w, ct, **kw):
  f = lambda x, w: jdfp.conv_general_dilated(x, w, dimension_numbers=("NHWC", "HWIO", "NHWC"), policy=policy,
                                             key=jax.random.key(3), **kw)
  y, vjp = jax.vjp(f, x, w)
  return (y,) + vjp(ct)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_op_bit_identical_to_reference(name):
  """Forward and both gradients of the drop-in conv equal the pure-JAX reference (XLA patches + the
  reference quantizer and GEMM), and the kernel path never stores the patch matrix."""
  pol = POLICIES[name]
  x = jax.random.normal(jax.random.key(0), (4, 11, 10, 9))
  w = jax.random.normal(jax.random.key(1), (3, 3, 9, 12)) * 0.2
  kw = dict(window_strides=(2, 1), padding=((1, 1), (2, 0)), rhs_dilation=(1, 2))
  ct = jax.random.normal(jax.random.key(2), (4, 6, 8, 12))
  f = jax.jit(lambda x, w, ct: conv_vjp(pol, x, w, ct, **kw))
  hlo = f.lower(x, w, ct).as_text()
  assert "jdfp_block_quantize_patches" in hlo and "jdfp_im2col" not in hlo
  want = jax.jit(lambda x, w, ct: conv_vjp(pol.replace(backend="reference"), x, w, ct, **kw))(x, w, ct)
  assert_same(f(x, w, ct), want)


def test_groups_keep_the_materialized_patches():
  pol = jdfp.policies.hbfp8()
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 8))
  ct = jnp.ones((2, 8, 8, 8))
  f = jax.jit(lambda x, w, ct: conv_vjp(pol, x, w, ct, window_strides=(1, 1), padding="SAME",
                                        feature_group_count=2))
  hlo = f.lower(x, w, ct).as_text()
  assert "jdfp_block_quantize_patches" not in hlo and "jdfp_im2col" in hlo
  want = conv_vjp(pol.replace(backend="reference"), x, w, ct, window_strides=(1, 1), padding="SAME",
                  feature_group_count=2)
  assert_same(f(x, w, ct), want)


class SmallCnn(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.Conv(24, (3, 3), strides=2)(x)
    return jnp.mean(x, axis=(1, 2))


@pytest.mark.parametrize("name", ["hbfp8", "hbfp12"])
def test_flax_statistics_merged_and_equal(name):
  """Through `jdfp.quantize` with statistics: one patch-conversion call per conv (the op's and the
  statistics' merged), no patch matrix stored, and loss, parameter gradients and the new "dfp" state
  (the statistics) equal the reference backend's."""
  x = jax.random.normal(jax.random.key(0), (8, 12, 12, 3))

  def grads(policy):
    m = jdfp.quantize(SmallCnn(), policy)
    v = m.init({"params": jax.random.key(1), "dfp": jax.random.key(2)}, x)

    def loss(v):
      y = m.apply(v, x, rngs={"dfp": jax.random.key(3)}, mutable=["dfp"])[0]
      return jnp.sum(y * y)
    f = jax.jit(jax.grad(loss))
    return f, v

  f, v = grads(POLICIES[name])
  compiled = f.lower(v).compile().as_text()
  assert compiled.count('custom_call_target="jdfp_block_quantize_patches_stats"') == 2
  assert "jdfp_im2col" not in compiled
  f_ref, v_ref = grads(POLICIES[name].replace(backend="reference"))
  got, want = jax.tree.leaves(f(v)), jax.tree.leaves(f_ref(v_ref))
  assert len(got) == len(want)
  assert_same(got, want)


def test_ffi_errors_not_crashes():
  from jdfp._src.ffi.library import TARGET_BLOCK_QUANTIZE_PATCHES
  x = jnp.zeros((1, 1, 4, 4, 2), jnp.float32)
  attrs = dict(block=np.array([1, 4, 4], np.int64), kind=np.int32(1), bits=np.int32(7), rounding=np.int32(0),
               isa=np.int32(0), window_strides=np.ones(3, np.int64), padding_lo=np.zeros(3, np.int64),
               padding_hi=np.zeros(3, np.int64), lhs_dilation=np.ones(3, np.int64),
               rhs_dilation=np.ones(3, np.int64), kernel_spatial=np.array([1, 3, 3], np.int64))
  key = jnp.zeros((2,), jnp.uint32)
  ok = (jax.ShapeDtypeStruct((1, 4, 18), jnp.int16), jax.ShapeDtypeStruct((1, 1, 5), jnp.int32))
  jax.block_until_ready(jax.ffi.ffi_call(TARGET_BLOCK_QUANTIZE_PATCHES, ok)(x, key, **attrs))
  for outs, kw, msg in (
      ((jax.ShapeDtypeStruct((1, 4, 17), jnp.int16), ok[1]), {}, "patch matrix"),
      (ok, {"window_strides": np.array([1, 0, 1], np.int64)}, "must be >= 1"),
      (ok, {"kernel_spatial": np.array([3, 3], np.int64)}, "kernel_spatial must have 3"),
  ):
    with pytest.raises(Exception, match=msg):
      jax.block_until_ready(jax.ffi.ffi_call(TARGET_BLOCK_QUANTIZE_PATCHES, outs)(x, key, **{**attrs, **kw}))


def residual_bytes(policy, x, w, **kw):
  f = lambda x, w: jdfp.conv_general_dilated(x, w, dimension_numbers=("NHWC", "HWIO", "NHWC"), policy=policy,
                                             key=jax.random.key(3), **kw)
  _, vjp = jax.vjp(f, x, w)
  return sum(np.asarray(t).nbytes for t in jax.tree.leaves(vjp))


@pytest.mark.parametrize("lean", [False, True])
def test_lhs_residual_is_the_input_where_smaller(lean):
  """A 3x3 conv's patch matrix holds 9x x's elements: by default (deterministic forward rounding) the
  backward keeps x, not the patch matrix's integers, and converts it again, as with
  ``Policy(float_residuals=("lhs",))``: gradients bit-identical to the reference backend."""
  x = jax.random.normal(jax.random.key(0), (4, 10, 10, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 24)) * 0.1
  ct = jax.random.normal(jax.random.key(2), (4, 10, 10, 24))
  kw = dict(window_strides=(1, 1), padding="SAME")
  pol = jdfp.policies.hbfp8(float_residuals=("lhs",) if lean else ())
  patch_ints = 4 * 10 * 10 * 9 * 16  # int8 patch matrix
  assert residual_bytes(pol, x, w, **kw) < x.nbytes + patch_ints // 4
  assert_same(jax.jit(lambda x, w, ct: conv_vjp(pol, x, w, ct, **kw))(x, w, ct),
              jax.jit(lambda x, w, ct: conv_vjp(pol.replace(backend="reference"), x, w, ct, **kw))(x, w, ct))


@pytest.mark.parametrize("case", ["1x1_stride2", "stochastic_fwd"])
def test_lhs_residual_is_the_patch_matrix_otherwise(case):
  """The patch matrix is kept where it is the smaller residual (a 1x1 stride-2 projection reads a
  quarter of x's pixels) or where the forward rounds stochastically (a second conversion would
  draw other bits); gradients bit-identical to the reference backend either way."""
  x = jax.random.normal(jax.random.key(0), (4, 10, 10, 16))
  if case == "1x1_stride2":
    pol, w, kw = jdfp.policies.hbfp8(), jax.random.normal(jax.random.key(1), (1, 1, 16, 24)) * 0.1, \
        dict(window_strides=(2, 2), padding="VALID")
    patch_ints, ct = 4 * 5 * 5 * 16, jnp.ones((4, 5, 5, 24))
  else:
    pol, w, kw = jdfp.policies.hbfp8(fwd_rounding="stochastic"), \
        jax.random.normal(jax.random.key(1), (3, 3, 16, 24)) * 0.1, dict(window_strides=(1, 1), padding="SAME")
    patch_ints, ct = 4 * 10 * 10 * 9 * 16, jnp.ones((4, 10, 10, 24))
  got = residual_bytes(pol, x, w, **kw)
  assert patch_ints <= got < x.nbytes + patch_ints
  assert_same(jax.jit(lambda x, w, ct: conv_vjp(pol, x, w, ct, **kw))(x, w, ct),
              jax.jit(lambda x, w, ct: conv_vjp(pol.replace(backend="reference"), x, w, ct, **kw))(x, w, ct))


def test_backward_conversion_waits_for_the_output_gradient():
  """The backward's second conversion of x reads the op's output gradient (as the key operand that
  nearest rounding ignores), so XLA cannot hoist it into the forward, where every layer's patch
  matrix would be alive at once: in the optimized HLO its key operand is not a constant."""
  import re
  x = jax.random.normal(jax.random.key(0), (4, 10, 10, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 24)) * 0.1
  ct = jax.random.normal(jax.random.key(2), (4, 10, 10, 24))
  f = jax.jit(lambda x, w, ct: conv_vjp(jdfp.policies.hbfp8(), x, w, ct, window_strides=(1, 1), padding="SAME"))
  hlo = f.lower(x, w, ct).compile().as_text()
  calls = [l for l in hlo.splitlines() if 'custom_call_target="jdfp_block_quantize_patches' in l]
  assert len(calls) == 2, calls  # the forward's and the backward's
  keys = [re.search(r"custom-call\(%[\w.-]+, %([\w.-]+)\)", l).group(1) for l in calls]
  defs = {m.group(1): m.group(2) for m in re.finditer(r"^\s*(?:ROOT )?%([\w.-]+) = (.*)$", hlo, re.M)}
  from_constants = [k for k in keys if re.fullmatch(r"[^(]*\((%constant[\w.-]*(, )?)*\).*", defs[k]) or
                    " constant(" in defs[k]]
  assert len(from_constants) == 1, [defs[k] for k in keys]  # the forward's zeros; the backward's reads ct


def test_after_leaves_the_conversion_unchanged():
  from jdfp._src.ffi import block_quantize as ffi_block
  from jdfp._src.numerics.formats import BFP
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 5))
  kw = dict(kernel_spatial=(3, 3), window_strides=(1, 1), padding=((1, 1), (1, 1)))
  fmt, bshape = BFP(7, block=(8, 8)), (1, 8, 8)
  want = ffi_block.quantize_patches_with_stats(x, fmt, bshape, **kw)
  for after in (jnp.float32(jnp.nan), jnp.full((3, 2), -jnp.inf), jnp.arange(4, dtype=jnp.int8)):
    assert_same(ffi_block.quantize_patches_with_stats(x, fmt, bshape, after=after, **kw), want)
  with pytest.raises(ValueError, match="deterministic rounding"):
    ffi_block.quantize_patches_with_stats(x, fmt, bshape, rounding="stochastic", key=jax.random.key(0),
                                          after=jnp.ones(2), **kw)
  with pytest.raises(ValueError, match="at least one element"):
    ffi_block.quantize_patches_with_stats(x, fmt, bshape, after=jnp.ones((0,)), **kw)


@pytest.mark.parametrize("batch", [4, 16])
@pytest.mark.parametrize("ksize", [3, 1])
def test_shard_map_per_shard_equals_single_device(batch, ksize):
  """Under shard_map (batch split over the devices, check_vma on), each shard's forward and input
  gradient equal the op on that shard alone, and the weight gradient (of the replicated kernel:
  summed over the shards by shard_map's transpose) the sum of theirs: with 1 image per
  device (the GEMM, then XLA's col2im) and with 4 (the fused GEMM + col2im kernel); x converted
  again in the backward (3x3) or the patch matrix kept (1x1, stride 2)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  shard_map = getattr(jax, "shard_map", None)
  if shard_map is None:
    from jax.experimental.shard_map import shard_map
  mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
  pol = jdfp.policies.hbfp8()
  x = jax.random.normal(jax.random.key(0), (batch, 8, 8, 16))
  w = jax.random.normal(jax.random.key(1), (ksize, ksize, 16, 8)) * 0.1
  out_hw = 8 if ksize == 3 else 4
  ct = jax.random.normal(jax.random.key(2), (batch, out_hw, out_hw, 8))
  kw = dict(window_strides=(1, 1), padding="SAME") if ksize == 3 else dict(window_strides=(2, 2), padding="VALID")

  spec = (P("d"), P(), P("d"))
  f = jax.jit(shard_map(lambda x, w, ct: conv_vjp(pol, x, w, ct, **kw), mesh=mesh, in_specs=spec, out_specs=(P("d"), P("d"), P())))
  y, dx, dw = f(*(jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip((x, w, ct), spec)))
  parts = [jax.jit(lambda x, w, ct: conv_vjp(pol, x, w, ct, **kw))(xs, w, cs)
           for xs, cs in zip(jnp.split(x, 4), jnp.split(ct, 4))]
  assert_same(y, jnp.concatenate([p[0] for p in parts]))
  assert_same(dx, jnp.concatenate([p[1] for p in parts]))
  np.testing.assert_allclose(dw, sum(p[2] for p in parts), rtol=1e-6, atol=1e-6)
