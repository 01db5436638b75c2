"""jdfp.telemetry: per-layer table of the "dfp" state and the exponent-history plot."""

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax import nnx

import jdfp
from jdfp import quantize
from jdfp._src.flax.telemetry import COLUMNS, Telemetry, exponent_history, plot_exponent_history, telemetry


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class Body(nn.Module):
  @nn.compact
  def __call__(self, c, _):
    return nn.Dense(4)(c), None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.scan(Body, variable_axes={"params": 0, "dfp": 0}, split_rngs={"params": True}, length=2)()(x, None)[0]


@pytest.fixture(scope="module")
def trained():
  qm = quantize(Net(), jdfp.Policy())
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 2))
  v = jax.jit(qm.init)(jax.random.key(1), x)

  @jax.jit
  def step(params, dfp, scale):
    def loss(p, d):
      out, _ = qm.apply({"params": p, "dfp": d}, x * scale, mutable=["dfp"])
      return jnp.sum(out ** 2)
    gp, gd = jax.grad(loss, argnums=(0, 1))(params, dfp)
    return jax.tree.map(lambda p, g: p - 1e-3 * g, params, gp), gd

  params, dfp, history = v["params"], v["dfp"], [v["dfp"]]
  for i in range(4):
    params, dfp = step(params, dfp, 2.0 ** i)  # growing inputs: the activation exponent climbs
    history.append(dfp)
  return {"params": params, "dfp": dfp}, history


def test_table_contents(trained):
  variables, history = trained
  t = telemetry(variables)
  assert isinstance(t, Telemetry) and len(t) == 6  # 2 ops x (lhs, rhs, grad)
  assert all(set(r) == set(COLUMNS) for r in t)
  assert [r["path"] for r in t.where(role="lhs")] == ["Conv_0/conv", "Dense_0/dot_general"]
  conv = t.where(path="Conv_0", role="lhs")[0]
  # per-tensor convs run on the conv kernel: the statistics are those of the conv's input tensor
  assert conv["size"] == 2 * 5 * 5 * 2 and conv["exponent"] == int(
      jdfp.quantize_array(jnp.ones(()) * 8.0 * jnp.max(jnp.abs(jax.random.normal(jax.random.key(0), (2, 5, 5, 2)))),
                          jdfp.DFP(14)).exponent.reshape(()))
  grad = t.where(path="Dense_0", role="grad")[0]
  assert grad["size"] == 2 * 3 and grad["exponent"] != 0
  assert telemetry(variables["dfp"]).rows == t.rows  # the collection alone works too
  s = str(t)
  assert "Conv_0/conv" in s and "underflow" in s and "exp" in s.splitlines()[0]
  assert len(s.splitlines()) == 2 + len(t)
  assert t.to_rich().row_count == len(t)
  # Exponent history: the activation exponent of the first conv climbs with the input scale.
  h = exponent_history(history, role="lhs")
  ys = h[("Conv_0/conv", "lhs")]
  assert ys[1:] == sorted(ys[1:]) and ys[-1] - ys[1] == 3


def test_plot_file_created(trained, tmp_path):
  pytest.importorskip("matplotlib")
  _, history = trained
  out = tmp_path / "exp.png"
  assert jdfp._src.flax.telemetry.telemetry.plot_exponent_history is plot_exponent_history
  plot_exponent_history(history, out)
  assert out.exists() and out.stat().st_size > 1000
  assert out.read_bytes()[:4] == b"\x89PNG"


def test_scan_rows_and_nnx_model():
  qm = quantize(Scanned(), jdfp.Policy())
  v = jax.jit(qm.init)(jax.random.key(0), jnp.ones((2, 4)))
  t = telemetry(v)
  assert [r["path"] for r in t.where(role="rhs")] == ["ScanBody_0/Dense_0/dot_general[0]",
                                                       "ScanBody_0/Dense_0/dot_general[1]"]

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(4, 4, rngs=rngs)
      self.b = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.b(self.a(x))

  m = quantize(MLP(nnx.Rngs(0)), jdfp.Policy())
  nnx.jit(lambda m, x: m(x))(m, jnp.ones((3, 4)))
  t = telemetry(m)
  assert [r["path"] for r in t.where(role="lhs")] == ["a/dot_general", "b/dot_general"]
  assert t.where(path="b/", role="lhs")[0]["size"] == 12
  assert len(t.lossy) == 0
