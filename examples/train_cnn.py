"""A small ResNet on scikit-learn's digits, trained in FP32, DFP16, HBFP8, HBFP12, FP16 and BF16.

Same model, same hyper-parameters, same initial weights, same batches, same number of steps for
every recipe. The GEMMs (every convolution and the classifier) run through
``jdfp.quantize(model, policy=jdfp.policies.<recipe>())``; the optimizer is
``jdfp.recipes.optimizer(recipe, optax.adam(...))`` (FP32 master weights; FP16 adds dynamic loss
scaling). BatchNorm, ReLU, pooling, softmax and the update stay FP32, as in the papers.

    PYTHONPATH=. python examples/train_cnn.py                  # 1 seed, all six recipes (~1-2 min)
    PYTHONPATH=. python examples/train_cnn.py --seeds 3        # the README table
    PYTHONPATH=. python examples/train_cnn.py --recipes fp32,dfp16 --steps 1000 --out cnn.png

Prints ``jdfp.explain`` (proof the INT16 kernel runs), a results table (test accuracy, paired
difference to FP32, final training loss, steps/s) and the DFP16 telemetry; saves a PNG with the
loss curves and the per-layer exponent history.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

DATASETS = ("digits", "digits16", "digits-shifted")
# The targets: allowed drop in test accuracy vs FP32 (percentage points).
TARGETS = {"dfp16": 0.5, "hbfp12": 0.5, "hbfp8": 1.0, "fp16": 0.5, "bf16": 0.5}


def load_data(name: str, seed: int = 0):
  """Train/test split of sklearn's digits as NHWC float32 in [0, 1] (built in, no download).

  ``digits``: the 8x8 images. ``digits16``: bilinearly upsampled to 16x16. ``digits-shifted``:
  8x8 placed at a random offset on a 12x12 canvas plus noise (a harder variant)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  from sklearn.model_selection import train_test_split  # pylint: disable=import-outside-toplevel

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
  y = y.astype(np.int32)
  if name == "digits16":
    import jax  # pylint: disable=import-outside-toplevel
    x = np.asarray(jax.image.resize(x, (x.shape[0], 16, 16, 1), "bilinear"))
  elif name == "digits-shifted":
    rng = np.random.default_rng(1234)
    canvas = np.zeros((x.shape[0], 12, 12, 1), np.float32)
    off = rng.integers(0, 5, size=(x.shape[0], 2))
    for i, (a, b) in enumerate(off):
      canvas[i, a:a + 8, b:b + 8] = x[i]
    x = np.clip(canvas + rng.normal(0, 0.15, canvas.shape).astype(np.float32), 0, 1)
  xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
  mean, std = xtr.mean(), xtr.std()
  return (xtr - mean) / std, ytr, (xte - mean) / std, yte


def make_model(width: int = 16, stages: int = 2):
  from flax import linen as nn  # pylint: disable=import-outside-toplevel

  class Block(nn.Module):
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
      bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
      r = nn.Conv(self.features, (3, 3), (self.stride, self.stride), use_bias=False, name="conv1")(x)
      r = nn.relu(bn("bn1")(r))
      r = nn.Conv(self.features, (3, 3), use_bias=False, name="conv2")(r)
      r = bn("bn2")(r)
      if self.stride != 1 or x.shape[-1] != self.features:
        x = nn.Conv(self.features, (1, 1), (self.stride, self.stride), use_bias=False, name="proj")(x)
        x = bn("bn_proj")(x)
      return nn.relu(x + r)

  class ResNet(nn.Module):
    """conv 3x3 -> BN -> ReLU, residual blocks (w; 2w stride 2; ...), global average pool, Dense(10)."""
    width: int = 16
    stages: int = 2
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = True):
      x = nn.Conv(self.width, (3, 3), use_bias=False, name="stem")(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x))
      x = Block(self.width, name="block1")(x, train)
      for i in range(1, self.stages):  # each further stage: stride 2, twice the channels
        x = Block(2 ** i * self.width, 2, name=f"block{i + 1}")(x, train)
      x = jnp_mean(x)
      return nn.Dense(self.num_classes, name="head")(x)

  def jnp_mean(x):
    return x.mean(axis=(1, 2))

  return ResNet(width=width, stages=stages)


def make_task(dataset: str, batch: int, width: int, lr: float, stages: int = 2):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  xtr, ytr, xte, yte = load_data(dataset)

  def sample(rng):
    idx = rng.choice(len(xtr), size=batch, replace=False)
    return xtr[idx], ytr[idx]

  def loss(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def evaluate(apply):
    logits = np.asarray(apply(xte))
    return {"test_acc": float(np.mean(logits.argmax(-1) == yte)),
            "test_loss": float(loss(jnp.asarray(logits), jnp.asarray(yte)))}

  return _common.Task(f"cnn/{dataset}", make_model(width, stages), xtr[:2], sample, loss, evaluate, lr=lr, warmup=20), \
      (len(xtr), len(xte))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 400)")
  ap.add_argument("--epochs", type=float, default=None, help="alternative to --steps: passes over the training set")
  ap.add_argument("--seeds", default="1", help="number of seeds (0..n-1) or a comma list, e.g. 3 or 0,4,7")
  ap.add_argument("--recipes", default=",".join(_common.RECIPES), help="comma list of " + ",".join(_common.RECIPES))
  ap.add_argument("--dataset", default="digits", choices=DATASETS)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--width", type=int, default=16, help="channels of the first stage")
  ap.add_argument("--stages", type=int, default=2, help="residual stages (each after the first halves the size)")
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--out", default="cnn_results.png", help="PNG with loss curves and exponent histories")
  ap.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
  ap.add_argument("--no-progress", action="store_true")
  args = ap.parse_args(argv)

  from rich.console import Console  # pylint: disable=import-outside-toplevel

  import jdfp  # pylint: disable=import-outside-toplevel

  console = Console() if sys.stdout.isatty() else Console(width=150)
  recipes = _common.parse_recipes(args.recipes)
  seeds = _common.parse_seeds(args.seeds)
  task, (ntr, nte) = make_task(args.dataset, args.batch, args.width, args.lr, args.stages)
  steps = args.steps
  if steps is None:
    steps = int(round(args.epochs * ntr / args.batch)) if args.epochs else 400
  console.print(f"[bold]jdfp {jdfp.__version__}[/bold]: ResNet ({args.stages} stages, width {args.width}) on {args.dataset} "
                f"({ntr} train / {nte} test), batch {args.batch}, Adam lr {args.lr:g} cosine, {steps} steps "
                f"(~{steps * args.batch / ntr:.1f} epochs), recipes {', '.join(recipes)}, seeds {seeds}; "
                f"kernel: {jdfp.kernels.best_isa() if jdfp.kernels.kernel_available() else 'unavailable'}")
  t0 = time.perf_counter()
  results = _common.run_all(task, recipes, seeds, steps, progress=not args.no_progress, console=console)
  wall = time.perf_counter() - t0

  title = (f"ResNet on {args.dataset}: {steps} steps, batch {args.batch}, {len(seeds)} seed(s) "
           f"(mean ± std; Δ paired per seed)")
  table, rows = _common.results_table(title, results, "test_acc", "test accuracy %", targets=TARGETS)
  console.print(table)
  for name in ("dfp16", "hbfp8"):
    if name in results and results[name][0].final_dfp is not None:
      tel = jdfp.telemetry({"dfp": results[name][0].final_dfp})
      console.print(f"[bold]{_common.LABELS[name]}[/bold] telemetry after training (seed {seeds[0]}): "
                    f"{len(tel.lossy)} of {len(tel)} op/role rows lost precision in the last step")
      if name == "dfp16":
        console.print(tel.to_rich())
  path = _common.save_figure(args.out, results, title=title)
  console.print(f"saved {path}; total wall time {wall:.0f} s")
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(_common.markdown_table(["recipe", "test accuracy %", "Δ vs FP32 (pp)", "final train loss", "steps/s",
                                      "vs FP32", "target"], rows) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
