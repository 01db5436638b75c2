"""Wall-clock training of the examples: the same runs as ``_common.train``, timed as a user would.

What is timed and what is not (so that every recipe is measured the same way):

- **setup** (its own column): initialising the parameters and optimizer state, compiling the train
  step once (``jit(step).lower(...).compile()``), compiling the evaluation, and one warm-up call of
  the compiled step whose result is thrown away (first-call allocations). It is paid once per recipe
  and process; later seeds reuse the executable, so their setup is small.
- **training time**: the loop over the steps. The loop does not wait for each step (no per-step
  host sync: the loss stays on the device, the progress bar counts dispatched steps); it blocks on
  the parameters only at the evaluation points, every ``eval_every`` steps and after the last step.
- **evaluation** (excluded from the training time, reported apart): test accuracy on the held-out
  set at those points, which gives the accuracy-against-wall-clock curve and the time each recipe
  needs to reach FP32's final accuracy.

Batches, dropout keys and initial weights are drawn per seed exactly as in ``_common.train``, and
the batches are put on the device before the clock starts.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np

import _common

# Minimum wall-clock speed-up over FP32 per recipe (the targets: DFP16 >= 1.5x, the block
# formats faster than FP32, FP16/BF16 not slower).
SPEED_TARGETS = {"dfp16": 1.5, "hbfp12": 1.0, "hbfp8": 1.0, "fp16": 1.0, "bf16": 1.0}


@dataclasses.dataclass
class TimedRun:
  recipe: str
  seed: int
  losses: np.ndarray  # per-step training loss (unscaled)
  eval_steps: list  # steps after which the model was evaluated
  eval_train_s: list  # training seconds (evaluation excluded) at those points
  eval_acc: list  # test accuracy at those points
  metrics: dict  # final evaluation
  train_s: float  # the training loop, evaluation excluded
  eval_s: float  # all periodic evaluations together
  setup_s: float  # init + compile + one warm-up step
  steps: int
  skipped_steps: int = 0
  final_loss_scale: float | None = None

  @property
  def steps_per_s(self) -> float:
    return self.steps / self.train_s if self.train_s > 0 else float("nan")

  def time_to(self, acc: float) -> float:
    """Training seconds until the first evaluation with accuracy >= ``acc`` (nan if never)."""
    for t, a in zip(self.eval_train_s, self.eval_acc):
      if a >= acc:
        return t
    return float("nan")


def train_timed(task: _common.Task, recipe: str, seed: int, steps: int, *, eval_every: int = 50,
                metric: str = "test_acc", progress: bool = True) -> TimedRun:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  import jdfp  # pylint: disable=import-outside-toplevel

  prog = _common.program(task, recipe, steps)
  k_init, k_drop = jax.random.split(jax.random.key(seed), 2)
  rng = np.random.default_rng(seed)
  batches = [tuple(jax.device_put(a) for a in task.sample(rng)) for _ in range(steps)]
  keys = list(jax.random.split(k_drop, max(steps, 1)))
  jax.block_until_ready((batches, keys))

  t0 = time.perf_counter()
  trained, batch_stats, opt_state = prog.init(k_init)
  step = getattr(prog, "compiled_step", None)
  if step is None:  # once per recipe and process: later seeds reuse the executable
    step = prog.compiled_step = prog.jstep.lower(trained, batch_stats, opt_state, *batches[0], keys[0]).compile()
  evaluate = lambda tr, bs: task.evaluate(lambda x: prog.jeval(tr, bs, jnp.asarray(x)))
  evaluate(trained, batch_stats)  # compiles the evaluation
  jax.block_until_ready(step(trained, batch_stats, opt_state, *batches[0], keys[0]))  # warm-up, discarded
  setup_s = time.perf_counter() - t0

  every = max(1, min(eval_every, steps))
  pbar = tqdm(total=steps, desc=f"{task.name} {recipe:>6} seed {seed}", disable=not progress, leave=False,
              dynamic_ncols=True)
  losses, ev_steps, ev_t, ev_acc = [], [], [], []
  train_s = eval_s = 0.0
  metrics: dict = {}
  seg = time.perf_counter()
  for i in range(steps):
    trained, batch_stats, opt_state, loss = step(trained, batch_stats, opt_state, *batches[i], keys[i])
    losses.append(loss)
    pbar.update(1)
    if (i + 1) % every == 0 or i == steps - 1:
      jax.block_until_ready((trained, batch_stats, opt_state, loss))  # the step is really done here
      now = time.perf_counter()
      train_s += now - seg
      metrics = evaluate(trained, batch_stats)
      ev_steps.append(i + 1)
      ev_t.append(train_s)
      ev_acc.append(metrics[metric])
      pbar.set_postfix(loss=f"{float(loss):.4f}", **{metric: f"{metrics[metric]:.4f}"})
      seg = time.perf_counter()
      eval_s += seg - now
  pbar.close()

  skipped, final_scale = 0, None
  if prog.scaled:
    st = jdfp.loss_scale_state(opt_state)
    skipped, final_scale = int(st.total_notfinite), float(st.loss_scale.loss_scale)
  return TimedRun(recipe, seed, np.asarray(jax.device_get(losses), dtype=np.float64), ev_steps, ev_t, ev_acc,
                  metrics, train_s, eval_s, setup_s, steps, skipped, final_scale)


def explain(task: _common.Task, recipe: str, steps: int, console=None) -> None:
  """Prints ``jdfp.explain`` of one training step's gradient (where each GEMM ran), seed 0's batch."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  import jdfp  # pylint: disable=import-outside-toplevel

  prog = _common.program(task, recipe, steps)
  trained, batch_stats, _ = prog.init(jax.random.key(0))
  x, y = (jnp.asarray(a) for a in task.sample(np.random.default_rng(0)))
  k = jax.random.key(1)
  loss = lambda tr: task.loss(prog.apply_train(tr, batch_stats, x, k)[0].astype(jnp.float32), y)
  summary = jdfp.explain(jax.grad(loss), trained).summary()
  text = (f"jdfp.explain (forward + backward of one {recipe} training step): "
          + ", ".join(f"{v} x {k}" for k, v in summary.items()))
  (console.print(text, highlight=False) if console is not None else print(text))


def run_all(task, recipes, seeds, steps, *, eval_every=50, metric="test_acc", progress=True, console=None):
  """``{recipe: [TimedRun per seed]}``; seeds outermost, FP32 first in each seed."""
  results: dict = {r: [] for r in recipes}
  for seed in seeds:
    for recipe in recipes:
      res = train_timed(task, recipe, seed, steps, eval_every=eval_every, metric=metric, progress=progress)
      results[recipe].append(res)
      msg = (f"{task.name} {recipe:>6} seed {seed}: {metric} {res.metrics[metric]:.4f}, final loss "
             f"{_common.tail_mean(res.losses):.4f}, training {res.train_s:.1f} s ({res.steps_per_s:.1f} steps/s), "
             f"setup {res.setup_s:.1f} s, evaluation {res.eval_s:.1f} s")
      if recipe == "fp16":
        msg += f", loss scale {res.final_loss_scale:g}, {res.skipped_steps} skipped steps"
      (console.print(msg, highlight=False) if console is not None else print(msg))
  return results


HEADERS = ("recipe", "test accuracy %", "Δ vs FP32 (pp)", "training s", "steps/s", "speed-up vs FP32",
           "setup s (compile)", "s to FP32's accuracy", "accuracy target", "speed target")


def _verdict(ok: bool, text: str) -> str:
  return f"[green]met ({text})[/green]" if ok else f"[red]missed ({text})[/red]"


def table(title: str, results: dict, *, metric: str = "test_acc", acc_targets: dict | None = None,
          speed_targets: dict | None = None):
  """A rich Table (and its rows as strings): accuracy and wall-clock side by side, per recipe.

  Differences and speed-ups are paired per seed (same initial weights and batches as FP32's run);
  "s to FP32's accuracy" is the training time until the first evaluation at or above FP32's final
  accuracy of the same seed (mean over the seeds that reach it)."""
  from rich.table import Table  # pylint: disable=import-outside-toplevel
  acc_targets = acc_targets or {}
  speed_targets = SPEED_TARGETS if speed_targets is None else speed_targets
  t = Table(title=title)
  for h in HEADERS:
    t.add_column(h, justify="left" if h == "recipe" else "right")
  base = {r.seed: r for r in results.get("fp32", [])}
  rows = []
  for recipe, runs in results.items():
    acc = [r.metrics[metric] for r in runs]
    cells = [_common.LABELS.get(recipe, recipe), _common.fmt_ms(acc, 100.0, 2)]
    paired = [(r, base[r.seed]) for r in runs if r.seed in base]
    d = [100.0 * (r.metrics[metric] - b.metrics[metric]) for r, b in paired]
    sp = [b.train_s / r.train_s for r, b in paired]
    cells.append("" if recipe == "fp32" or not d else ("+" if np.mean(d) >= 0 else "") + _common.fmt_ms(d, 1.0, 2))
    cells.append(_common.fmt_ms([r.train_s for r in runs], 1.0, 1))
    cells.append(_common.fmt_ms([r.steps_per_s for r in runs], 1.0, 1))
    cells.append(_common.fmt_ms(sp, 1.0, 2, "x") if sp else "")
    cells.append(f"{runs[0].setup_s:.1f}")  # the first run compiles; later seeds reuse it
    reach = [r.time_to(b.metrics[metric]) for r, b in paired]
    got = [v for v in reach if np.isfinite(v)]
    cell = _common.fmt_ms(got, 1.0, 1) if got else "never"
    if got and len(got) < len(reach):
      cell += f" ({len(got)}/{len(reach)} seeds)"
    cells.append(cell if reach else "")
    acc_v = speed_v = ""
    if recipe in acc_targets and d:
      acc_v = _verdict(-np.mean(d) <= acc_targets[recipe], f"≥ −{acc_targets[recipe]:g} pp")
    if recipe in speed_targets and sp:
      lim, strict = speed_targets[recipe], recipe.startswith("hbfp")  # HBFP: *faster* than FP32
      ok = np.mean(sp) > lim if strict else np.mean(sp) >= lim
      speed_v = _verdict(ok, f"{'>' if strict else '≥'} {lim:g}x")
    cells += [acc_v, speed_v]
    if recipe == "fp16":
      cells[1] += f" ({int(np.mean([r.skipped_steps for r in runs]))} skipped)"
    rows.append(cells)
    t.add_row(*cells)
  return t, rows


def save_figure(path, results: dict, *, title: str, metric: str = "test_acc", metric_label: str = "test accuracy %"):
  """A PNG with three panels: training loss against steps, and the held-out metric against steps and
  against wall-clock training seconds (mean over seeds; dashed: FP32's final value)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  fig = Figure(figsize=(16, 4.4))
  FigureCanvasAgg(fig)
  ax_loss, ax_step, ax_time = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
  for j, (recipe, runs) in enumerate(results.items()):
    label, color = _common.LABELS.get(recipe, recipe), f"C{j}"
    n = min(len(r.losses) for r in runs)
    y = np.mean([r.losses[:n] for r in runs], axis=0)
    ax_loss.plot(np.arange(1, n + 1), _common.smooth(y, max(1, n // 50)), lw=1.2, color=color, label=label)
    m = min(len(r.eval_acc) for r in runs)
    acc = 100.0 * np.mean([r.eval_acc[:m] for r in runs], axis=0)
    ax_step.plot(runs[0].eval_steps[:m], acc, marker=".", lw=1.2, color=color, label=label)
    secs = np.mean([r.eval_train_s[:m] for r in runs], axis=0)
    ax_time.plot(secs, acc, marker=".", lw=1.2, color=color, label=label)
  if "fp32" in results:
    final = 100.0 * np.mean([r.metrics[metric] for r in results["fp32"]])
    for a in (ax_step, ax_time):
      a.axhline(final, color="k", lw=0.7, ls="--", label="FP32 final")
  ax_loss.set_yscale("log")
  ax_loss.set(xlabel="step", ylabel="training loss (moving average)", title="training loss")
  ax_step.set(xlabel="step", ylabel=metric_label, title=f"{metric_label} against steps")
  ax_time.set(xlabel="wall-clock training seconds (evaluation excluded)", ylabel=metric_label,
              title=f"{metric_label} against wall-clock")
  lo = min(100.0 * np.mean([r.eval_acc[len(r.eval_acc) // 4] for r in runs]) for runs in results.values())
  for a in (ax_loss, ax_step, ax_time):
    a.grid(True, alpha=0.3)
  for a in (ax_step, ax_time):
    a.set_ylim(bottom=max(0.0, lo - 5.0))
  ax_time.legend(fontsize="small", loc="lower right")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def summary_markdown(rows: Sequence[Sequence[str]]) -> str:
  return _common.markdown_table(HEADERS, rows)
