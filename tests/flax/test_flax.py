"""Flax integration: jdfp.quantize for Linen and NNX, rules, the "dfp" state, training, checkpoints."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import jdfp
from jdfp._src.ops import explain as explain_mod
from jdfp import Rule, quantize, quantize_report
from jdfp._src.flax import state as core
from jdfp._src.flax.state import unpack
from jdfp._src.flax import tracked
from jdfp._src.flax import gemm_rewrites
from jdfp._src.flax import nnx as jnnx

DFP = jdfp.policies.dfp16()  # stochastic gradient rounding: needs the "dfp" RNG stream
NEAREST = jdfp.Policy()


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.Conv(8, (3, 3), strides=2)(x)
    x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(4)(x)


class TrainState(train_state.TrainState):
  batch_stats: dict


def _data():
  x = jax.random.normal(jax.random.key(0), (8, 6, 6, 3))
  y = jax.random.randint(jax.random.key(1), (8,), 0, 4)
  return x, y


def _kernel_paths(report):
  return [op.path for op in report.ops if op.kind == explain_mod.KERNEL]


def _float_paths(report):
  return [op.path for op in report.ops if op.kind == explain_mod.FLOAT]


@pytest.fixture(scope="module")
def cnn():
  model = CNN()
  qm = quantize(model, DFP, keep_first_and_last_fp32=True)
  x, y = _data()
  variables = jax.jit(qm.init)({"params": jax.random.key(2), "dfp": jax.random.key(3)}, x)
  return model, qm, variables, x, y


def test_linen_cnn_close_to_fp32_and_explain(cnn):
  model, qm, v, x, _ = cnn
  assert set(v) == {"params", "batch_stats", "dfp"}
  assert set(v["params"]) == set(model.init(jax.random.key(2), x)["params"])  # parameter tree unchanged
  assert set(v["dfp"]) == {"Conv_1", "Dense_0"}  # first conv and last dense stay FP32: no state

  def run(v, k):
    return qm.apply(v, x, rngs={"dfp": k}, mutable=["dfp", "batch_stats"])

  (yq, upd) = jax.jit(run)(v, jax.random.key(4))
  y32, _ = model.apply(v, x, mutable=["batch_stats"])
  assert float(jnp.max(jnp.abs(yq - y32))) < 2e-2 * float(jnp.max(jnp.abs(y32)))
  # State updates under a mutable apply: forward statistics of this batch.
  st = unpack(upd["dfp"]["Dense_0"]["dot_general"])
  assert float(st["lhs"]["size"]) == 8 * 72 and float(st["rhs"]["size"]) == 72 * 16
  assert set(upd) == {"dfp", "batch_stats"}

  # Forward and backward: every GEMM on the kernel except the FP32 first conv and last dense.
  def loss(p):
    out, _ = run({**v, "params": p}, jax.random.key(4))
    return jnp.sum(out)

  rep = jdfp.explain(jax.grad(loss), v["params"])
  kp = _kernel_paths(rep)
  assert len(kp) == 6 and all(("Conv_1" in p) or ("Dense_0" in p) for p in kp), str(rep)
  fp = _float_paths(rep)
  assert fp and all(("Conv_0" in p) or ("Dense_1" in p) for p in fp), str(rep)
  report = quantize_report(qm)
  assert {(s.path, s.precision == "fp32") for s in report.sites.values()} == {
      ("Conv_0", True), ("Conv_1", False), ("Dense_0", False), ("Dense_1", True)}


def test_linen_train_state_optax_lowers_loss(cnn):
  _, qm, v, x, y = cnn
  # TrainState.params holds {"params", "dfp"}: apply_fn(state.params, ...) works as is, and
  # jdfp.overwrite_state routes the "dfp" gradient (the new state) to an overwrite.
  tx = jdfp.overwrite_state(optax.adam(3e-3), collections=("dfp",))
  state = TrainState.create(apply_fn=qm.apply, params={"params": v["params"], "dfp": v["dfp"]}, tx=tx,
                            batch_stats=v["batch_stats"])

  @jax.jit
  def step(state, key):
    def loss_fn(variables):
      logits, upd = state.apply_fn({**variables, "batch_stats": state.batch_stats}, x, rngs={"dfp": key},
                                   mutable=["dfp", "batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads).replace(batch_stats=upd["batch_stats"])
    return state, loss, grads["dfp"], upd["dfp"]

  losses = []
  for i in range(8):
    state, loss, gdfp, fwd = step(state, jax.random.key(10 + i))
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.05, losses
  dfp = state.params["dfp"]
  # The optimizer overwrote the state with the gradient's value, bitwise.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), dfp, gdfp)
  g = unpack(dfp["Dense_0"]["dot_general"])["grad"]
  assert float(g["size"]) == 8 * 16 and float(g["exponent"]) < 0  # backward statistics arrived
  # Forward statistics are the same in the mutable output and in the gradient.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               unpack(gdfp["Conv_1"]["conv"])["lhs"], unpack(fwd["Conv_1"]["conv"])["lhs"])
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(dfp))


def test_state_matches_quantization():
  """Exponents and counters equal what jdfp's quantizers do to the same tensors."""
  x = jnp.array([[1e-9, 0.5, -3.0, 100.0], [0.0, 4e-2, 2.0, 1e-7]], jnp.float32)
  w = jnp.ones((4, 2), jnp.float32)
  dims = (((1,), (0,)), ((), ()))
  _, st = tracked.tracked_dot_general(x, w, dims, policy=NEAREST, state=core.empty_state())
  assert float(st["lhs"]["exponent"]) == _dfp_exponent(x) == -6
  assert float(st["lhs"]["exponent_min"]) == -6  # one exponent for the tensor
  assert float(st["lhs"]["underflow"]) == 2  # 1e-9 and 1e-7 flush to zero next to 100
  assert float(st["lhs"]["nonfinite"]) == 0 and float(st["lhs"]["size"]) == 8
  assert float(st["rhs"]["exponent"]) == _dfp_exponent(w) and float(st["rhs"]["saturated"]) == 0
  # Per-row exponents: the smallest in use is reported too.
  rows = NEAREST.replace(lhs=jdfp.DFP(14, axis=-1))
  _, st = tracked.tracked_dot_general(x, w, dims, policy=rows, state=core.empty_state())
  assert float(st["lhs"]["exponent"]) == -6 and float(st["lhs"]["exponent_min"]) == _dfp_exponent(x[1]) == -11
  assert float(st["lhs"]["underflow"]) == 2
  # A NaN makes the (per-tensor) group non-finite: counted, and the GEMM result is NaN.
  out, st = tracked.tracked_dot_general(x.at[1, 1].set(jnp.nan), w, dims, policy=NEAREST, state=core.empty_state())
  assert float(st["lhs"]["nonfinite"]) == 1
  assert bool(jnp.isnan(out).any())


class Shared(nn.Module):
  @nn.compact
  def __call__(self, x):
    d = nn.Dense(8)
    return d(nn.relu(d(x)))


class Body(nn.Module):
  @nn.compact
  def __call__(self, c, _):
    return nn.tanh(nn.Dense(8)(c)) * 4.0, None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    s = nn.scan(Body, variable_axes={"params": 0, "dfp": 0}, split_rngs={"params": True, "dfp": True}, length=3)
    return s()(x, None)[0]


def _grads_of_dfp(qm, v, x):
  def loss(p, d):
    out, upd = qm.apply({"params": p, "dfp": d}, x, rngs={"dfp": jax.random.key(3)}, mutable=["dfp"])
    return jnp.sum(out ** 2), upd
  return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(v["params"], v["dfp"])


def _dfp_exponent(t):
  return int(jdfp.quantize_array(t, jdfp.DFP(14)).exponent.reshape(()))


def test_weight_sharing_and_scan_keep_separate_state():
  x = jax.random.normal(jax.random.key(0), (4, 8)) * 8.0
  # A Dense called twice: one state per call, each with its own activations and gradients.
  qm = quantize(Shared(), DFP)
  v = jax.jit(qm.init)({"params": jax.random.key(1), "dfp": jax.random.key(2)}, x)
  d = v["dfp"]["Dense_0"]
  assert set(d) == {"dot_general", "dot_general_1"}
  p = v["params"]["Dense_0"]
  h = nn.relu(x @ p["kernel"] + p["bias"])
  assert float(unpack(d["dot_general"])["lhs"]["exponent"]) == _dfp_exponent(x)
  assert float(unpack(d["dot_general_1"])["lhs"]["exponent"]) == _dfp_exponent(h)
  (_, gd), _ = _grads_of_dfp(qm, v, x)
  g0, g1 = unpack(gd["Dense_0"]["dot_general"])["grad"], unpack(gd["Dense_0"]["dot_general_1"])["grad"]
  assert float(g0["size"]) == 32 and float(g1["size"]) == 32
  # Not summed: each is a single tensor's exponent (a sum of two would not be an exponent of either).
  out = qm.apply(v, x, rngs={"dfp": jax.random.key(3)})
  assert float(g1["exponent"]) == _dfp_exponent(2 * out)

  # nn.scan with "dfp" in variable_axes: one state per iteration, stacked.
  qs = quantize(Scanned(), DFP)
  vs = jax.jit(qs.init)({"params": jax.random.key(1), "dfp": jax.random.key(2)}, x)
  st = unpack(vs["dfp"]["ScanBody_0"]["Dense_0"]["dot_general"])
  assert st["lhs"]["exponent"].shape == (3,)
  assert float(st["lhs"]["exponent"][0]) == _dfp_exponent(x)
  assert float(st["lhs"]["exponent"][1]) <= -10  # |tanh| * 4 <= 4 after the first iteration
  (_, gs), _ = _grads_of_dfp(qs, vs, x)
  gst = unpack(gs["ScanBody_0"]["Dense_0"]["dot_general"])["grad"]
  assert np.all(np.asarray(gst["size"]) == 32)


class Three(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name="Dense_0")(x)
    x = nn.Dense(8, name="Dense_1")(x)
    return nn.Dense(8, name="head")(x)


def test_rules_first_match_wins_none_keeps_fp32_unmatched_reported():
  x = jnp.ones((2, 8))
  rules = [Rule("Dense_0", None), Rule("Dense_.*", NEAREST), Rule("Dense_0", NEAREST), Rule("nothing_here", None)]
  qm = quantize(Three(), None, rules)
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    v = jax.jit(qm.init)(jax.random.key(0), x)
  assert any("nothing_here" in str(m.message) for m in w)
  rep = quantize_report(qm)
  assert [r.pattern for r in rep.unmatched_rules] == ["Dense_0", "nothing_here"]  # rule 2 shadowed by rule 0
  assert set(v["dfp"]) == {"Dense_1"}  # no default policy: "head" stays FP32 too
  ex = jdfp.explain(lambda v: qm.apply(v, x), v)
  assert [p.split("/")[-1] for p in _kernel_paths(ex)] == ["Dense_1"]
  assert sorted(p.split("/")[-1] for p in _float_paths(ex)) == ["Dense_0", "head"]
  assert "matched nothing" in str(rep)


def test_stochastic_policy_without_stream_is_a_clear_error():
  qm = quantize(Three(), DFP)
  x = jnp.ones((2, 8))
  v = jax.jit(qm.init)(jax.random.key(0), x)  # init falls back to the "params" stream
  # The forward rounds to nearest: inference needs no key, and is the keyed forward bit for bit.
  np.testing.assert_array_equal(np.asarray(qm.apply(v, x)), np.asarray(qm.apply(v, x, rngs={"dfp": jax.random.key(1)})))
  # The gradient rounds stochastically: differentiating without the stream is a trace-time error.
  with pytest.raises(ValueError, match=re.escape("rngs={'dfp': key}")):
    jax.grad(lambda p: jnp.sum(qm.apply({**v, "params": p}, x)))(v["params"])
  # A stochastic forward needs the stream for inference too.
  qs = quantize(Three(), DFP.replace(fwd_rounding="stochastic"))
  with pytest.raises(ValueError, match=re.escape("rngs={'dfp': key}")):
    qs.apply(v, x)


class Coverage(nn.Module):
  """Einsum, attention, ConvTranspose and a user's own lax / jnp calls."""

  @nn.compact
  def __call__(self, x):  # x [B, L, D]
    w = self.param("w", nn.initializers.normal(), (x.shape[-1], 8))
    h = jax.lax.dot_general(x, w, (((2,), (0,)), ((), ())))
    h = h + jnp.einsum("bld,de->ble", x, w)
    h = nn.Einsum((8, 8), "bld,de->ble")(h)
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(h)
    h = nn.ConvTranspose(4, (3,), strides=(2,))(h)
    return h + jnp.matmul(h, jnp.ones((4, 4)))


def test_coverage_einsum_attention_convtranspose_user_calls():
  x = jax.random.normal(jax.random.key(0), (2, 4, 8))
  model = Coverage()
  qm = quantize(model, NEAREST)
  v = jax.jit(qm.init)(jax.random.key(1), x)
  ex = jdfp.explain(lambda v: qm.apply(v, x), v)
  assert not _float_paths(ex), str(ex)
  # dot, einsum, Einsum, q/k/v/out projections, 2 attention einsums, conv transpose, matmul
  assert len(_kernel_paths(ex)) == 11, str(ex)
  yq = jax.jit(lambda v: qm.apply(v, x))(v)
  y32 = model.apply(v, x)
  np.testing.assert_allclose(yq, y32, atol=5e-3 * float(jnp.max(jnp.abs(y32))))
  # Outside apply, JAX's functions are the originals again.
  assert jax.lax.dot_general is jdfp._src.flax.interception._ORIG["dot_general"]
  assert jnp.einsum is jdfp._src.flax.interception._ORIG["einsum"]


def test_conv_arrangement_bitwise_equals_jdfp_conv():
  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 4))
  k = jax.random.normal(jax.random.key(1), (3, 3, 2, 6))
  kw = dict(window_strides=(2, 1), padding="SAME", rhs_dilation=(1, 2), feature_group_count=2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
  dot = lambda a, b, d, p, t: jdfp.dot_general(a, b, d, p, t, policy=NEAREST)
  a = jax.jit(lambda x, k: gemm_rewrites.conv_via_dot(dot, x, k, **kw))(x, k)
  b = jax.jit(lambda x, k: jdfp.conv_general_dilated(x, k, **kw, policy=NEAREST))(x, k)
  np.testing.assert_array_equal(a, b)


def test_orbax_round_trip(cnn, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  _, _, v, _, _ = cnn
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", v)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, v))
  assert jax.tree.structure(restored) == jax.tree.structure(v)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, v)


# ------------------------------------------------------------------------------------------------
# NNX


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(8, 32, rngs=rngs)
    self.l2 = nnx.Linear(32, 32, rngs=rngs)
    self.l3 = nnx.Linear(32, 4, rngs=rngs)

  def __call__(self, x):
    return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


def test_nnx_mlp():
  x = jax.random.normal(jax.random.key(0), (16, 8))
  y = jax.random.normal(jax.random.key(1), (16, 4))
  ref = MLP(nnx.Rngs(0))
  model = quantize(MLP(nnx.Rngs(0)), DFP, [Rule("l3", None)], rngs=nnx.Rngs(dfp=1))
  assert isinstance(model.l1.dot_general, jnnx.JdfpOp) and model.l3.dot_general is jax.lax.dot_general
  fwd = nnx.jit(lambda m, x: m(x))
  np.testing.assert_allclose(fwd(model, x), ref(x), atol=2e-3)
  ex = jdfp.explain(fwd, model, x)
  assert ex.kernel_calls == 2 and len(ex.float_ops) == 1
  st = jnnx.state_of(model)
  assert set(st) == {"l1/dot_general", "l2/dot_general"}
  assert float(st["l1/dot_general"]["lhs"]["size"]) == 16 * 8  # updated in place by the forward

  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(m, opt):
    def loss_fn(m):
      return jnp.mean((m(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Any(nnx.Param, jnnx.DfpState)))(m)
    grads = jnnx.apply_state_grads(m, grads)  # overwrite the DfpState variables; Param grads remain
    opt.update(m, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(6)]
  assert losses[-1] < losses[0], losses
  g = jnnx.state_of(model)["l2/dot_general"]["grad"]
  assert float(g["size"]) == 16 * 32 and float(g["exponent"]) < 0


def test_explain_takes_an_nnx_module_and_names_the_closure_mistake():
  x = jax.random.normal(jax.random.key(0), (4, 8))
  model = quantize(MLP(nnx.Rngs(0)), DFP, [Rule("l3", None)], rngs=nnx.Rngs(dfp=1))
  ex = jdfp.explain(model, x)
  assert ex.kernel_calls == 2 and len(ex.float_ops) == 1  # l3 kept in FP32
  with pytest.raises(TypeError, match="jdfp.explain\\(model, x\\)"):
    jdfp.explain(lambda: model(x))


def test_nnx_stochastic_needs_rngs():
  # Stochastic gradients: inference works without rngs; differentiating is a trace-time error.
  model = quantize(MLP(nnx.Rngs(0)), DFP)
  x = jnp.ones((2, 8))
  assert model(x).shape[0] == 2
  with pytest.raises(ValueError, match="rngs"):
    nnx.grad(lambda m: jnp.sum(m(x)))(model)
  # A stochastic forward needs rngs at once.
  with pytest.raises(ValueError, match="rngs"):
    quantize(MLP(nnx.Rngs(0)), DFP.replace(fwd_rounding="stochastic"))


class UserOps(nn.Module):
  """A user's module with the @ operator, jnp.tensordot, a batched matmul, and a vmap (stays float)."""

  @nn.compact
  def __call__(self, x):  # [B, L, D]
    w = self.param("w", nn.initializers.normal(0.3), (x.shape[-1], 8))
    h = x @ w + jnp.tensordot(x, w, axes=1)
    a = jnp.swapaxes(h, -1, -2) @ h  # [B, 8, 8], batch dims
    inner = jax.vmap(lambda r: r @ w)(x)  # a transform the module's scope does not know: float
    return (h @ a).sum(-1) + inner.sum(-1)


def test_linen_matmul_operator_tensordot_batched():
  x = jax.random.normal(jax.random.key(0), (2, 4, 8))
  model = UserOps()
  qm = quantize(model, NEAREST)
  v = jax.jit(qm.init)(jax.random.key(1), x)
  assert set(v["dfp"]) == {"dot_general", "dot_general_1", "dot_general_2", "dot_general_3"}
  ex = jdfp.explain(lambda v: qm.apply(v, x), v)
  assert ex.kernel_calls == 4, str(ex)
  assert len(ex.float_ops) == 1 and "vmap" in ex.float_ops[0].path, str(ex)
  yq = jax.jit(lambda v: qm.apply(v, x))(v)
  y32 = model.apply(v, x)
  np.testing.assert_allclose(yq, y32, rtol=2e-3, atol=2e-3 * float(jnp.max(jnp.abs(y32))))
  # The batched matmul's state: B x 8 x 4 operand (h^T), 2 x 4 x 8 (h); the @ restored afterwards.
  assert float(unpack(v["dfp"]["dot_general_2"])["lhs"]["size"]) == 2 * 8 * 4
  gv = jax.grad(lambda v: jnp.sum(qm.apply(v, x) ** 2))(v)
  assert float(unpack(gv["dfp"]["dot_general"])["grad"]["size"]) == 2 * 4 * 8
  assert jdfp._src.flax.interception.jnp_tc.matmul is jdfp._src.flax.interception._ORIG["matmul"]


class NNXCoverage(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 8)) * 0.3)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs)
    self.ct = nnx.ConvTranspose(8, 4, kernel_size=(3,), strides=(2,), rngs=rngs)

  def __call__(self, x):
    h = x @ self.w[...]
    return self.ct(self.attn(h))


def test_nnx_convtranspose_attention_and_user_matmul():
  x = jax.random.normal(jax.random.key(0), (2, 4, 8))
  ref = NNXCoverage(nnx.Rngs(0))
  model = quantize(NNXCoverage(nnx.Rngs(0)), DFP, rngs=nnx.Rngs(dfp=1))
  fwd = nnx.jit(lambda m, x: m(x))
  y32 = ref(x)
  np.testing.assert_allclose(fwd(model, x), y32, atol=5e-3 * float(jnp.max(jnp.abs(y32))))
  ex = jdfp.explain(fwd, model, x)
  # user @, q/k/v/out projections, the two attention einsums, the transposed conv
  assert ex.kernel_calls == 8 and not ex.float_ops, str(ex)
  st = jnnx.state_of(model)
  # Named as in quantize_report: module path / op name.
  assert {"ops/0", "attn/ops/0", "attn/ops/1", "ct/ops/0"} <= set(st)
  assert set(st) == {"/".join(p for p in (s.path, s.name) if p) for s in quantize_report(model).sites.values()}
  assert float(st["attn/ops/0"]["lhs"]["size"]) == 2 * 4 * 2 * 4  # q: [B, L, heads, d]
  assert float(st["ct/ops/0"]["rhs"]["size"]) == 3 * 8 * 4
  # Backward statistics of the scoped ops arrive through the DfpState gradients.
  opt = nnx.Optimizer(model, optax.sgd(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(m, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2),
                                     argnums=nnx.DiffState(0, nnx.Any(nnx.Param, jnnx.DfpState)))(m)
    opt.update(m, jnnx.apply_state_grads(m, grads))
    return loss

  losses = [float(step(model, opt)) for _ in range(3)]
  assert losses[-1] < losses[0]
  st = jnnx.state_of(model)
  for k in ("ops/0", "attn/ops/1", "ct/ops/0"):
    assert float(st[k]["grad"]["size"]) > 0, k
  # A rule keeping the attention in FP32 leaves its einsums (and projections) float.
  m2 = quantize(NNXCoverage(nnx.Rngs(0)), NEAREST, [Rule("attn.*", None)])
  ex2 = jdfp.explain(nnx.jit(lambda m, x: m(x)), m2, x)
  assert ex2.kernel_calls == 2 and len(ex2.float_ops) == 6, str(ex2)
