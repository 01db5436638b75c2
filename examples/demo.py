"""The demo: FP32's accuracy in less wall-clock time. An MLP on MNIST-1D, FP32 against the recipes.

Both halves of the claim in one run: every recipe trains the same MLP (40 -> 1024 -> 1024 -> 1024
-> 10, ReLU; its 1024 x 1024 layers are GEMMs of 256 x 1024 x 1024 per step, large enough for the
integer arithmetic to matter) with the same hyper-parameters, initial weights, batches and number of
steps; only ``jdfp.quantize(model, policy=jdfp.policies.<recipe>())`` and
``jdfp.recipes.optimizer(recipe, optax.adam(...))`` change. MNIST-1D (Greydanus, 2020) is generated
locally by the ``mnist1d`` package (no download; cached after the first run); an MLP does not solve
it (about 87 % test accuracy after 1000 steps), so recipes that lose accuracy show it.

    PYTHONPATH=. python examples/demo.py                            # FP32, DFP16, BF16; 1 seed (< 5 min)
    PYTHONPATH=. python examples/demo.py --recipes all --seeds 3    # the README's full table

Per recipe it reports test accuracy, the training wall-clock (evaluation excluded), steps/s, the
speed-up over FP32, the setup time (compilation, in its own column) and the training seconds until
the test accuracy first reaches FP32's final accuracy; it saves a PNG with the training loss, and the
test accuracy against steps and against wall-clock seconds. How the clock is run: examples/_timed.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import _timed  # noqa: E402

DEFAULT_RECIPES = "fp32,dfp16,bf16"
ACC_TARGETS = {"dfp16": 0.5, "hbfp12": 0.5, "hbfp8": 1.0, "fp16": 0.5, "bf16": 0.5}  # pp below FP32


def load_data(name: str, num_samples: int, cache_dir: str | None):
  """(x_train [N, 40], y_train, x_test, y_test, description), inputs standardised with the training
  set's mean and std. MNIST-1D takes a few CPU seconds per 10k samples to generate; the arrays are
  cached in ``cache_dir`` (the generator is seeded, so the cache only saves time)."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  import train_mnist1d  # pylint: disable=import-outside-toplevel

  path = os.path.join(cache_dir, f"{name}_{num_samples}.npz") if cache_dir else None
  if path and os.path.exists(path):
    with np.load(path) as z:
      xtr, ytr, xte, yte, desc = z["xtr"], z["ytr"], z["xte"], z["yte"], str(z["desc"])
  else:
    xtr, ytr, xte, yte, desc = train_mnist1d.load_data(name, num_samples)
    if path and "MNIST-1D" in desc:  # only the generated data set is worth caching
      os.makedirs(cache_dir, exist_ok=True)
      np.savez(path, xtr=xtr, ytr=ytr, xte=xte, yte=yte, desc=desc)
  xtr, xte = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)
  mean, std = xtr.mean(), xtr.std()
  return (xtr - mean) / std, ytr, (xte - mean) / std, yte, desc


def make_model(width: int, depth: int):
  from flax import linen as nn  # pylint: disable=import-outside-toplevel

  class MLP(nn.Module):
    width: int = 1024
    depth: int = 3

    @nn.compact
    def __call__(self, x, train: bool = True):
      del train
      for i in range(self.depth):
        x = nn.relu(nn.Dense(self.width, name=f"dense{i}")(x))
      return nn.Dense(10, name="head")(x)

  return MLP(width, depth)


def make_task(args):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  xtr, ytr, xte, yte, desc = load_data(args.dataset, args.samples, args.cache_dir or None)

  def sample(rng):
    idx = rng.choice(len(xtr), size=args.batch, replace=False)
    return xtr[idx], ytr[idx]

  def loss(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def evaluate(apply):
    logits = np.asarray(apply(xte))
    return {"test_acc": float(np.mean(logits.argmax(-1) == yte)),
            "test_loss": float(loss(jnp.asarray(logits), jnp.asarray(yte)))}

  task = _common.Task(f"mlp/{args.dataset}", make_model(args.width, args.depth), xtr[:2], sample, loss, evaluate,
                      lr=args.lr, warmup=args.warmup)
  return task, (len(xtr), len(xte), desc)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=1000, help="training steps per run")
  ap.add_argument("--seeds", default="1", help="number of seeds (0..n-1) or a comma list, e.g. 3 or 0,4,7")
  ap.add_argument("--recipes", default=DEFAULT_RECIPES,
                  help="'all' or a comma list of " + ",".join(_common.RECIPES) + f" (default {DEFAULT_RECIPES})")
  ap.add_argument("--dataset", default="mnist1d", choices=("mnist1d", "synthetic"))
  ap.add_argument("--samples", type=int, default=25000, help="MNIST-1D samples generated (80%% train, 20%% test)")
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--width", type=int, default=1024)
  ap.add_argument("--depth", type=int, default=3, help="hidden layers")
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--warmup", type=int, default=50)
  ap.add_argument("--eval-every", type=int, default=50, help="steps between evaluations on the test set")
  ap.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "jdfp-examples"),
                  help="where the generated data set is cached ('' = no cache)")
  ap.add_argument("--out", default="demo_results.png", help="PNG: loss, accuracy against steps and wall-clock")
  ap.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
  ap.add_argument("--no-progress", action="store_true")
  args = ap.parse_args(argv)

  from rich.console import Console  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  import jdfp  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  console = Console() if sys.stdout.isatty() else Console(width=200)
  recipes = _common.parse_recipes(",".join(_common.RECIPES) if args.recipes == "all" else args.recipes)
  seeds = _common.parse_seeds(args.seeds)
  task, (ntr, nte, desc) = make_task(args)
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  console.print(f"[bold]jdfp {jdfp.__version__}[/bold], jax {jax.__version__}, kernel "
                f"{jdfp.kernels.best_isa() if jdfp.kernels.kernel_available() else 'unavailable'}, "
                f"{os.cpu_count()} CPUs (load average {load:.1f}): MLP 40-{'-'.join([str(args.width)] * args.depth)}-10 "
                f"on {desc}: {ntr} train / {nte} test, batch {args.batch}, Adam lr {args.lr:g} warm-up + cosine, "
                f"{args.steps} steps (~{args.steps * args.batch / ntr:.1f} epochs), evaluation every "
                f"{args.eval_every} steps, recipes {', '.join(recipes)}, seeds {seeds}")
  if "dfp16" in recipes:
    _timed.explain(task, "dfp16", args.steps, console)
  results = _timed.run_all(task, recipes, seeds, args.steps, eval_every=args.eval_every,
                           progress=not args.no_progress, console=console)
  title = (f"MLP on {args.dataset}: {args.steps} steps, batch {args.batch}, {len(seeds)} seed(s), jax "
           f"{jax.__version__} (mean ± std; Δ and speed-up paired per seed)")
  table, rows = _timed.table(title, results, acc_targets=ACC_TARGETS)
  console.print(table)
  path = _timed.save_figure(args.out, results, title=title)
  wall = time.perf_counter() - t0
  load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  console.print(f"saved {path}; total wall time {wall:.0f} s (load average {load:.1f} at the start, "
                f"{load_end:.1f} at the end)")
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(_timed.summary_markdown(rows) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
