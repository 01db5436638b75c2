"""Property tests: the drop-in ops behave like lax on any geometry. They raise exactly when lax raises
(same exception type), give lax's (possibly empty) shapes, and otherwise match lax within the
format's error bound, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

import jdfp

POLICY = jdfp.Policy()  # DFP(14) everywhere, nearest rounding
BITS = 14
SETTINGS = dict(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.filter_too_much])


def _bound(k: int, amax: float, bmax: float) -> float:
  """|quantized - exact| for a sum of k products: each operand is within half a step of its value,
  a step is at most max * 2**-(bits - 2); plus float32 rounding of the sum."""
  step_a, step_b = amax * 2.0**-(BITS - 2), bmax * 2.0**-(BITS - 2)
  return k * (amax * step_b / 2 + bmax * step_a / 2 + step_a * step_b / 4) + 1e-5 * k * amax * bmax + 1e-30


def _lax_outcome(fn):
  try:
    return fn(), None
  except Exception as e:  # noqa: BLE001 - whatever lax raises, jdfp must raise the same type
    return None, e


@st.composite
def dot_cases(draw):
  lr, rr = draw(st.integers(1, 3)), draw(st.integers(1, 3))
  size = st.integers(1, 5) if draw(st.integers(0, 3)) else st.integers(0, 2)  # mostly non-empty
  lshape = [draw(size) for _ in range(lr)]
  rshape = [draw(size) for _ in range(rr)]
  if draw(st.booleans()):  # valid dimension numbers: distinct dims, paired sizes equal
    lperm = draw(st.permutations(range(lr)))
    rperm = draw(st.permutations(range(rr)))
    nb = draw(st.integers(0, min(lr, rr) - 1))
    nc = draw(st.integers(0, min(lr, rr) - nb))
    lb, lc = lperm[:nb], lperm[nb:nb + nc]
    rb, rc = rperm[:nb], rperm[nb:nb + nc]
    for a, b in zip(lc + lb, rc + rb):
      rshape[b] = lshape[a]
  else:  # anything: out-of-range, duplicate, unpaired or mismatched dims
    dim = lambda r: st.integers(-1, r)
    nc, nb = draw(st.integers(0, 2)), draw(st.integers(0, 1))
    lc = [draw(dim(lr)) for _ in range(nc)]
    rc = [draw(dim(rr)) for _ in range(draw(st.sampled_from([nc, nc, nc + 1])))]
    lb = [draw(dim(lr)) for _ in range(nb)]
    rb = [draw(dim(rr)) for _ in range(nb)]
  return tuple(lshape), tuple(rshape), ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))


@settings(**SETTINGS)
@given(case=dot_cases(), seed=st.integers(0, 2**16))
def test_dot_general_like_lax(case, seed):
  lshape, rshape, dims = case
  ka, kb, kc = jax.random.split(jax.random.key(seed), 3)
  a = jax.random.normal(ka, lshape)
  b = jax.random.normal(kb, rshape)
  want, err = _lax_outcome(lambda: lax.dot_general(a, b, dims, precision="highest"))
  if err is not None:
    with pytest.raises(type(err)):
      jdfp.dot_general(a, b, dims, policy=POLICY)
    return
  got, vjp = jax.vjp(lambda x, y: jdfp.dot_general(x, y, dims, policy=POLICY), a, b)
  assert got.shape == want.shape and got.dtype == want.dtype
  k = int(np.prod([lshape[d] for d in dims[0][0]], dtype=np.int64))
  amax, bmax = float(jnp.max(jnp.abs(a), initial=0)), float(jnp.max(jnp.abs(b), initial=0))
  np.testing.assert_allclose(got, want, rtol=0, atol=_bound(k, amax, bmax))
  c = jax.random.normal(kc, want.shape)
  ga, gb = vjp(c)
  wa, wb = jax.vjp(lambda x, y: lax.dot_general(x, y, dims, precision="highest"), a, b)[1](c)
  assert ga.shape == a.shape and gb.shape == b.shape
  cmax = float(jnp.max(jnp.abs(c), initial=0))
  # Each gradient entry sums at most (output size / operand's free size) products of c with the other operand.
  n_out = max(int(np.prod(want.shape, dtype=np.int64)), 1)
  np.testing.assert_allclose(ga, wa, rtol=0, atol=_bound(n_out, cmax, bmax))
  np.testing.assert_allclose(gb, wb, rtol=0, atol=_bound(n_out, cmax, amax))


LAYOUTS = {1: [("NHC", "HIO", "NHC"), ("NCH", "OIH", "NCH")],
           2: [("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW"), ("NHWC", "OIHW", "NCHW")]}


@st.composite
def conv_cases(draw):
  nsp = draw(st.integers(1, 2))
  dn = draw(st.sampled_from(LAYOUTS[nsp]))
  groups = draw(st.integers(1, 2))
  n = draw(st.sampled_from([0, 1, 1, 2, 2]))
  cin = groups * draw(st.sampled_from([0, 1, 1, 2, 2]))
  cout = groups * draw(st.integers(1, 2)) + draw(st.sampled_from([0, 0, 0, 1]))  # sometimes not divisible
  spatial = [draw(st.integers(1, 6)) for _ in range(nsp)]
  ksp = [draw(st.integers(1, 4)) for _ in range(nsp)]  # may be larger than the input
  strides = tuple(draw(st.integers(1, 2)) for _ in range(nsp))
  lhs_dil = tuple(draw(st.integers(1, 2)) for _ in range(nsp))
  rhs_dil = tuple(draw(st.integers(1, 2)) for _ in range(nsp))
  padding = draw(st.one_of(st.sampled_from(["SAME", "VALID"]),
                           st.lists(st.tuples(st.integers(-1, 2), st.integers(0, 2)), min_size=nsp, max_size=nsp)))
  lhs_shape = {"N": n, "C": cin, **dict(zip("HW", spatial))}
  rhs_shape = {"O": cout, "I": cin // groups if draw(st.integers(0, 4)) or groups == 1 else cin, **dict(zip("HW", ksp))}
  lshape = tuple(lhs_shape[c] for c in dn[0])
  rshape = tuple(rhs_shape[c] for c in dn[1])
  return lshape, rshape, strides, padding, lhs_dil, rhs_dil, dn, groups


def _conv_reference(strides, padding, lhs_dil, rhs_dil, dn, groups):
  """lax's conv; with a negative (cropping) padding, the same conv as an explicit `lax.pad` (crop and
  lhs dilation) followed by an unpadded conv: XLA:CPU's conv with a negative low padding beside a
  positive high one returned wrong values on jax 0.10.2 (e.g. x [1, 2, 4, 2], w [2, 2, 2, 1],
  padding ((0, 0), (-1, 1)): 2.058 for an output whose exact value is 1.419)."""
  plain = lambda a, b: lax.conv_general_dilated(a, b, strides, padding, lhs_dil, rhs_dil, dn, groups,
                                                precision="highest")
  if isinstance(padding, str) or all(lo >= 0 and hi >= 0 for lo, hi in padding):
    return plain
  nsp = len(strides)

  def padded(a, b):
    cfg = [(0, 0, 0)] * a.ndim
    for i, ch in enumerate("HW"[:nsp]):
      cfg[dn[0].index(ch)] = (padding[i][0], padding[i][1], lhs_dil[i] - 1)
    return lax.conv_general_dilated(lax.pad(a, jnp.zeros((), a.dtype), cfg), b, strides, [(0, 0)] * nsp,
                                    (1,) * nsp, rhs_dil, dn, groups, precision="highest")
  return padded


@settings(**SETTINGS)
@given(case=conv_cases(), seed=st.integers(0, 2**16))
def test_conv_general_dilated_like_lax(case, seed):
  lshape, rshape, strides, padding, lhs_dil, rhs_dil, dn, groups = case
  ka, kb, kc = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(ka, lshape)
  w = jax.random.normal(kb, rshape)
  args = (strides, padding, lhs_dil, rhs_dil, dn, groups)
  want, err = _lax_outcome(lambda: lax.conv_general_dilated(x, w, *args, precision="highest"))
  ref = _conv_reference(*args)
  if err is None:
    want = ref(x, w)
  if err is not None:
    with pytest.raises(type(err)):
      jdfp.conv_general_dilated(x, w, *args, policy=POLICY)
    return
  got, vjp = jax.vjp(lambda a, b: jdfp.conv_general_dilated(a, b, *args, policy=POLICY), x, w)
  assert got.shape == want.shape and got.dtype == want.dtype
  k = int(np.prod(rshape, dtype=np.int64))  # a generous bound on the products per output
  xmax, wmax = float(jnp.max(jnp.abs(x), initial=0)), float(jnp.max(jnp.abs(w), initial=0))
  np.testing.assert_allclose(got, want, rtol=0, atol=_bound(k, xmax, wmax))
  c = jax.random.normal(kc, want.shape)
  gx, gw = vjp(c)
  wx, ww = jax.vjp(ref, x, w)[1](c)
  assert gx.shape == x.shape and gw.shape == w.shape
  cmax = float(jnp.max(jnp.abs(c), initial=0))
  n_out = max(int(np.prod(want.shape, dtype=np.int64)), 1)
  np.testing.assert_allclose(gx, wx, rtol=0, atol=_bound(max(k, n_out), cmax, wmax))
  np.testing.assert_allclose(gw, ww, rtol=0, atol=_bound(n_out, cmax, xmax))
