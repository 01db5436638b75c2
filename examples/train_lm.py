"""A small character-level transformer language model on the Python standard library's source code.

The text ships with every Python install (a fixed list of modules next to ``os.py``), so nothing is
downloaded. The model (token + position embeddings, pre-LayerNorm blocks with causal
``nn.MultiHeadDotProductAttention`` and an MLP, a Dense read-out) is trained with the same
hyper-parameters, initial weights, batches and steps in each recipe; every GEMM, the attention
einsums included, runs through ``jdfp.quantize(model, policy=...)``.

    PYTHONPATH=. python examples/train_lm.py                        # FP32, DFP16, HBFP8; 1 seed
    PYTHONPATH=. python examples/train_lm.py --seeds 3              # the README table
    PYTHONPATH=. python examples/train_lm.py --recipes fp32,dfp16,bf16 --steps 1000 --layers 4

Reports the validation loss (nats per character on held-out text), its change relative to FP32,
the final training loss and steps/s; saves a PNG with loss curves and exponent histories.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

# Modules present in every CPython 3.x install (pure Python). Their text differs a little between
# Python versions, so absolute losses do too; the comparison between recipes does not depend on it.
SOURCES = ("argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "collections/__init__.py",
           "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "enum.py", "fnmatch.py",
           "fractions.py", "functools.py", "glob.py", "heapq.py", "inspect.py", "json/decoder.py",
           "json/encoder.py", "os.py", "pathlib.py", "pprint.py", "queue.py", "random.py", "shlex.py",
           "shutil.py", "statistics.py", "string.py", "tempfile.py", "textwrap.py", "threading.py",
           "tokenize.py", "typing.py", "uuid.py", "weakref.py", "zipfile.py")
VOCAB = 128  # ASCII; other bytes map to 0
TARGETS = {"dfp16": 1.0, "hbfp12": 1.0, "hbfp8": 2.0, "fp16": 1.0, "bf16": 1.0}  # % of FP32 val loss


def load_text(max_chars: int | None = None):
  """The standard library's sources as ASCII codes (uint8): (train, validation), 95% / 5%."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.__file__)
  chunks, used = [], []
  for rel in SOURCES:
    p = os.path.join(root, rel)
    if os.path.exists(p):
      with open(p, "rb") as f:
        chunks.append(f.read())
      used.append(rel)
  data = np.frombuffer(b"\n".join(chunks), dtype=np.uint8).copy()
  data[data >= VOCAB] = 0
  if max_chars:
    data = data[:max_chars]
  split = int(len(data) * 0.95)
  return data[:split], data[split:], used


def make_model(d_model: int, heads: int, layers: int, seq: int):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import linen as nn  # pylint: disable=import-outside-toplevel

  class Block(nn.Module):
    d: int
    heads: int

    @nn.compact
    def __call__(self, x, mask):
      h = nn.LayerNorm(name="ln1")(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h, mask=mask)
      h = nn.LayerNorm(name="ln2")(x)
      h = nn.Dense(4 * self.d, name="mlp_in")(h)
      return x + nn.Dense(self.d, name="mlp_out")(nn.gelu(h))

  class CharLM(nn.Module):
    vocab: int = VOCAB
    d: int = 64
    heads: int = 4
    layers: int = 2
    seq: int = 64

    @nn.compact
    def __call__(self, tokens, train: bool = True):
      del train
      x = nn.Embed(self.vocab, self.d, name="embed")(tokens)
      pos = self.param("pos", nn.initializers.normal(0.02), (self.seq, self.d))
      x = x + pos[None, : tokens.shape[1]]
      mask = nn.make_causal_mask(tokens)
      for i in range(self.layers):
        x = Block(self.d, self.heads, name=f"block{i}")(x, mask)
      return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="ln_f")(x))

  return CharLM(VOCAB, d_model, heads, layers, seq)


def make_task(args):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  train, val, used = load_text()
  seq = args.seq
  # A fixed validation set: non-overlapping windows of held-out text.
  n_val = min(args.val_windows, (len(val) - 1) // seq)
  starts = np.arange(n_val) * seq
  vx = np.stack([val[s:s + seq] for s in starts]).astype(np.int32)
  vy = np.stack([val[s + 1:s + seq + 1] for s in starts]).astype(np.int32)

  def sample(rng):
    s = rng.integers(0, len(train) - seq - 1, size=args.batch)
    idx = s[:, None] + np.arange(seq)[None]
    return train[idx].astype(np.int32), train[idx + 1].astype(np.int32)

  def loss(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def evaluate(apply):
    tot = 0.0
    for i in range(0, len(vx), 64):
      logits = apply(vx[i:i + 64])
      tot += float(loss(logits.astype(jnp.float32), jnp.asarray(vy[i:i + 64]))) * len(vx[i:i + 64])
    return {"val_loss": tot / len(vx)}

  model = make_model(args.d_model, args.heads, args.layers, seq)
  task = _common.Task("lm", model, vx[:2], sample, loss, evaluate, lr=args.lr, warmup=max(1, args.steps // 10))
  return task, (len(train), len(val), len(vx), len(used))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--seeds", default="1", help="number of seeds (0..n-1) or a comma list")
  ap.add_argument("--recipes", default="fp32,dfp16,hbfp8", help="comma list of " + ",".join(_common.RECIPES))
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--d-model", type=int, default=64)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--val-windows", type=int, default=256, help="held-out windows of --seq characters")
  ap.add_argument("--out", default="lm_results.png")
  ap.add_argument("--markdown", default=None)
  ap.add_argument("--no-progress", action="store_true")
  args = ap.parse_args(argv)

  from rich.console import Console  # pylint: disable=import-outside-toplevel

  import jdfp  # pylint: disable=import-outside-toplevel

  console = Console() if sys.stdout.isatty() else Console(width=150)
  recipes = _common.parse_recipes(args.recipes)
  seeds = _common.parse_seeds(args.seeds)
  task, (ntr, nval, nwin, nfiles) = make_task(args)
  console.print(f"[bold]jdfp {jdfp.__version__}[/bold]: char transformer (d {args.d_model}, {args.layers} layers, "
                f"{args.heads} heads, context {args.seq}) on {nfiles} stdlib modules ({ntr} train / {nval} val chars, "
                f"{nwin} val windows), batch {args.batch}, Adam lr {args.lr:g} warmup+cosine, {args.steps} steps, "
                f"recipes {', '.join(recipes)}, seeds {seeds}")
  t0 = time.perf_counter()
  results = _common.run_all(task, recipes, seeds, args.steps, progress=not args.no_progress, console=console)
  wall = time.perf_counter() - t0
  title = (f"char transformer on stdlib source: {args.steps} steps, batch {args.batch}x{args.seq}, "
           f"{len(seeds)} seed(s) (mean ± std; Δ relative, paired per seed)")
  table, rows = _common.results_table(title, results, "val_loss", "val loss (nats/char)", metric_scale=1.0,
                                      targets=TARGETS, lower_is_better=True, relative=True,
                                      metric_digits=4)
  console.print(table)
  if "dfp16" in results and results["dfp16"][0].final_dfp is not None:
    tel = jdfp.telemetry({"dfp": results["dfp16"][0].final_dfp})
    console.print(f"DFP16 telemetry after training (seed {seeds[0]}): {len(tel.lossy)} of {len(tel)} op/role rows "
                  "lost precision (saturated or flushed to zero) in the last step")
  path = _common.save_figure(args.out, results, title=title, log_loss=False)
  console.print(f"saved {path}; total wall time {wall:.0f} s")
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(_common.markdown_table(["recipe", "val loss (nats/char)", "Δ vs FP32", "final train loss", "steps/s",
                                      "vs FP32", "target"], rows) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
