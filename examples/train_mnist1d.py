"""A 1-D residual CNN on MNIST-1D, generated locally, in FP32, DFP16, HBFP8, HBFP12, FP16 and BF16.

MNIST-1D (Greydanus, 2020; ``pip install mnist1d``) is a procedurally generated 10-class data set of
length-40 signals (digit templates, randomly padded, translated, sheared, scaled and noised): small,
but hard enough that architectures and precisions separate. ``mnist1d.data.make_dataset`` builds it
locally from its templates (no download; about 1 s). Without the package (``--dataset synthetic``, or
automatically when it is missing) a similar task is generated with scikit-learn's
``make_classification``.

    PYTHONPATH=. python examples/train_mnist1d.py                # 1 seed, all six recipes
    PYTHONPATH=. python examples/train_mnist1d.py --seeds 3      # the README table
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

TARGETS = {"dfp16": 0.5, "hbfp12": 0.5, "hbfp8": 1.0, "fp16": 0.5, "bf16": 0.5}


def load_data(name: str, num_samples: int = 5000):
  """(x_train [N, 40, 1], y_train, x_test, y_test, description)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  if name == "mnist1d":
    try:
      from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=import-outside-toplevel
    except ImportError:
      print("mnist1d is not installed (pip install mnist1d); using --dataset synthetic instead")
      name = "synthetic"
  if name == "mnist1d":
    a = get_dataset_args()
    a.num_samples = num_samples
    d = make_dataset(a)  # generated from templates with a fixed seed (42); the url is not used
    xtr, ytr, xte, yte = d["x"], d["y"], d["x_test"], d["y_test"]
    desc = f"MNIST-1D (generated locally, {num_samples} samples)"
  else:
    from sklearn.datasets import make_classification  # pylint: disable=import-outside-toplevel
    x, y = make_classification(n_samples=num_samples, n_features=40, n_informative=20, n_redundant=10,
                               n_classes=10, n_clusters_per_class=2, class_sep=1.5, random_state=0)
    split = int(0.8 * num_samples)
    xtr, ytr, xte, yte = x[:split], y[:split], x[split:], y[split:]
    desc = f"sklearn make_classification (40 features, 10 classes, {num_samples} samples)"
  f = lambda v: np.asarray(v, np.float32)[..., None]
  return f(xtr), np.asarray(ytr, np.int32), f(xte), np.asarray(yte, np.int32), desc


def make_model(width: int):
  from flax import linen as nn  # pylint: disable=import-outside-toplevel

  class Block(nn.Module):
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train):
      bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
      r = nn.relu(bn("bn1")(nn.Conv(self.features, (3,), (self.stride,), use_bias=False, name="conv1")(x)))
      r = bn("bn2")(nn.Conv(self.features, (3,), use_bias=False, name="conv2")(r))
      if self.stride != 1 or x.shape[-1] != self.features:
        x = bn("bn_proj")(nn.Conv(self.features, (1,), (self.stride,), use_bias=False, name="proj")(x))
      return nn.relu(x + r)

  class ResNet1D(nn.Module):
    width: int = 32

    @nn.compact
    def __call__(self, x, train: bool = True):
      x = nn.Conv(self.width, (5,), use_bias=False, name="stem")(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x))
      x = Block(self.width, 2, name="block1")(x, train)   # 40 -> 20
      x = Block(2 * self.width, 2, name="block2")(x, train)  # 20 -> 10
      x = x.reshape(x.shape[0], -1)  # keep position information (MNIST-1D is not shift invariant)
      return nn.Dense(10, name="head")(x)

  return ResNet1D(width)


def make_task(args):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  xtr, ytr, xte, yte, desc = load_data(args.dataset)

  def sample(rng):
    idx = rng.choice(len(xtr), size=args.batch, replace=False)
    return xtr[idx], ytr[idx]

  def loss(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def evaluate(apply):
    logits = np.asarray(apply(xte))
    return {"test_acc": float(np.mean(logits.argmax(-1) == yte)),
            "test_loss": float(loss(jnp.asarray(logits), jnp.asarray(yte)))}

  task = _common.Task(args.dataset, make_model(args.width), xtr[:2], sample, loss, evaluate, lr=args.lr, warmup=20)
  return task, (len(xtr), len(xte), desc)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 500)")
  ap.add_argument("--epochs", type=float, default=None, help="alternative to --steps")
  ap.add_argument("--seeds", default="1", help="number of seeds (0..n-1) or a comma list")
  ap.add_argument("--recipes", default=",".join(_common.RECIPES))
  ap.add_argument("--dataset", default="mnist1d", choices=("mnist1d", "synthetic"))
  ap.add_argument("--batch", type=int, default=100)
  ap.add_argument("--width", type=int, default=32)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--out", default="mnist1d_results.png")
  ap.add_argument("--markdown", default=None)
  ap.add_argument("--no-progress", action="store_true")
  args = ap.parse_args(argv)

  from rich.console import Console  # pylint: disable=import-outside-toplevel

  import jdfp  # pylint: disable=import-outside-toplevel

  console = Console() if sys.stdout.isatty() else Console(width=150)
  recipes = _common.parse_recipes(args.recipes)
  seeds = _common.parse_seeds(args.seeds)
  task, (ntr, nte, desc) = make_task(args)
  steps = args.steps
  if steps is None:
    steps = int(round(args.epochs * ntr / args.batch)) if args.epochs else 500
  console.print(f"[bold]jdfp {jdfp.__version__}[/bold]: 1-D ResNet (width {args.width}) on {desc}: {ntr} train / "
                f"{nte} test, batch {args.batch}, Adam lr {args.lr:g} cosine, {steps} steps "
                f"(~{steps * args.batch / ntr:.1f} epochs), recipes {', '.join(recipes)}, seeds {seeds}")
  t0 = time.perf_counter()
  results = _common.run_all(task, recipes, seeds, steps, progress=not args.no_progress, console=console)
  wall = time.perf_counter() - t0
  title = (f"1-D ResNet on {args.dataset}: {steps} steps, batch {args.batch}, {len(seeds)} seed(s) "
           f"(mean ± std; Δ paired per seed)")
  table, rows = _common.results_table(title, results, "test_acc", "test accuracy %", targets=TARGETS)
  console.print(table)
  path = _common.save_figure(args.out, results, title=title)
  console.print(f"saved {path}; total wall time {wall:.0f} s")
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(_common.markdown_table(["recipe", "test accuracy %", "Δ vs FP32 (pp)", "final train loss", "steps/s",
                                      "vs FP32", "target"], rows) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
