"""Every jdfp number format at work on real weights.

Trains a small MLP on scikit-learn's digits in FP32 (a few seconds), then quantizes its weights and
activations with each format and prints the relative error and the test accuracy of the model run
with weights rounded onto that format's grid.

    python examples/formats_demo.py
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jdfp

FORMATS = {
    "DFP16 (14 effective bits)": jdfp.DFP(14),
    "DFP16 (16 bits)": jdfp.DFP(16),
    "DFP8": jdfp.DFP(8),
    "DFP8 per row": jdfp.DFP(8, axis=-1),
    "HBFP12 (24x24 tiles)": jdfp.BFP(11),
    "HBFP8 (24x24 tiles)": jdfp.BFP(7),
    "HBFP8 per row": jdfp.BFP(7, block=None, axis=-1),
    "MX-like: 8-bit, blocks of 32": jdfp.BFP(7, block=32, axis=-1),
    "FP16": jdfp.FP16,
    "BF16": jdfp.BF16,
}


def mlp(params, x):
  for i, (w, b) in enumerate(params):
    x = x @ w + b
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return x


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=400)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=args.seed)

  key = jax.random.key(args.seed)
  sizes = [64, 128, 128, 10]
  params = []
  for din, dout in zip(sizes[:-1], sizes[1:]):
    key, sub = jax.random.split(key)
    params.append((jax.random.normal(sub, (din, dout)) * jnp.sqrt(2.0 / din), jnp.zeros(dout)))
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, xb, yb):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(mlp(p, xb), yb).mean()
    l, g = jax.value_and_grad(loss)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, l

  rng = np.random.default_rng(args.seed)
  for _ in range(args.steps):
    i = rng.integers(0, len(xtr), 128)
    params, opt, _ = step(params, opt, xtr[i], ytr[i])

  def accuracy(p):
    return float(jnp.mean(jnp.argmax(mlp(p, xte), -1) == yte))

  acts = jax.nn.relu(xte @ params[0][0] + params[0][1])
  table = Table(title=f"jdfp formats on a digits MLP (FP32 test accuracy {accuracy(params):.4f})")
  for col in ("format", "weights rel. error", "activations rel. error", "test acc. (rounded weights)"):
    table.add_column(col, justify="right" if col != "format" else "left")
  for name, fmt in FORMATS.items():
    qp = [(jdfp.fake_quantize(w, fmt), jdfp.fake_quantize(b, fmt)) for w, b in params]
    werr = np.mean([float(jnp.linalg.norm(q - w) / jnp.linalg.norm(w)) for (q, _), (w, _) in zip(qp, params)])
    aerr = float(jnp.linalg.norm(jdfp.fake_quantize(acts, fmt) - acts) / jnp.linalg.norm(acts))
    table.add_row(name, f"{werr:.2e}", f"{aerr:.2e}", f"{accuracy(qp):.4f}")
  Console().print(table)


if __name__ == "__main__":
  main()
