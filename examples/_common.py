"""Shared training engine of the examples: one Flax Linen model, six precision recipes.

Every recipe trains the *same* model with the *same* hyper-parameters, initial parameters, batches
and number of steps; only two things change:

- the GEMMs (dots, einsums, convolutions) run through ``jdfp.quantize(model, policy=...)``
  (FP32 keeps the unmodified model);
- the optimizer is ``jdfp.recipes.optimizer(recipe, optax.adam(...))`` (FP32 master weights, and
  for fp16 dynamic loss scaling), wrapped in ``jdfp.overwrite_state`` so that the ``"dfp"``
  collection's "gradient" (the new scale statistics) overwrites the old state.

Not part of the library: the examples import it as ``_common`` (their own folder is on sys.path).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import numpy as np

RECIPES = ("fp32", "dfp16", "hbfp8", "hbfp12", "fp16", "bf16")
LABELS = {"fp32": "FP32", "dfp16": "DFP16", "hbfp8": "HBFP8", "hbfp12": "HBFP12",
          "fp16": "FP16 + loss scaling", "bf16": "BF16"}


def policy_for(recipe: str):
  import jdfp  # pylint: disable=import-outside-toplevel
  return None if recipe == "fp32" else jdfp.policies.get(recipe)


@dataclasses.dataclass
class Task:
  """A workload: a Linen model taking ``(x, train=...)``, a batch sampler and an evaluator.

  ``sample(rng) -> (x, y)`` draws one training batch (numpy) from a numpy Generator.
  ``loss(logits, y) -> scalar`` (float32). ``evaluate(apply) -> dict`` gets ``apply(x) -> logits``
  (eval mode, jitted) and returns metrics (e.g. ``{"test_acc": ...}``).
  """

  name: str
  model: Any
  example_x: np.ndarray
  sample: Callable
  loss: Callable
  evaluate: Callable
  lr: float = 3e-3
  warmup: int = 0


@dataclasses.dataclass
class RunResult:
  recipe: str
  seed: int
  losses: np.ndarray  # per-step training loss (unscaled)
  metrics: dict
  steps_per_s: float
  wall_s: float
  history: list  # "dfp" collection snapshots (host numpy) during training
  history_steps: list
  final_dfp: Any
  skipped_steps: int = 0
  final_loss_scale: float | None = None
  first_step_s: float = float("nan")  # compile + first step


def _schedule(lr, steps, warmup):
  import optax  # pylint: disable=import-outside-toplevel
  warmup = min(warmup, max(steps // 4, 0))
  if warmup > 0:
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.05)
  return optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.05)


_PROGRAMS: dict = {}


class _Program:
  """The jitted train step and evaluation of one (task, recipe, steps): built once, reused for
  every seed, so each recipe compiles once per process."""

  def __init__(self, task: Task, recipe: str, steps: int):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import optax  # pylint: disable=import-outside-toplevel

    import jdfp  # pylint: disable=import-outside-toplevel

    self.task, self.recipe = task, recipe
    self.policy = policy = policy_for(recipe)
    self.model = model = task.model if policy is None else jdfp.quantize(task.model, policy=policy)
    inner = optax.adam(_schedule(task.lr, steps, task.warmup))
    self.tx = tx = jdfp.overwrite_state(jdfp.recipes.optimizer(recipe, inner), collections=("dfp",))
    self.scaled = scaled = recipe == "fp16"
    x0 = jnp.asarray(task.example_x)
    # Initial parameters from the *unquantized* model, so every recipe starts from the same weights
    # (one compiled init per task, shared by the recipes).
    if getattr(task, "_init_params", None) is None:
      task._init_params = jax.jit(lambda k: task.model.init({"params": k}, x0, train=False))
    self.init_params = task._init_params
    self.dfp_shapes = None
    if policy is not None:
      # The "dfp" collection (scale statistics) of the quantized model. Only its structure is
      # needed (statistics, all zeros before the first step): eval_shape traces without compiling.
      self.dfp_shapes = jax.eval_shape(lambda k: model.init({"params": k, "dfp": k}, x0, train=False),
                                       jax.random.key(0))["dfp"]

    def apply_train(trained, batch_stats, x, k):
      v = {**trained, **({"batch_stats": batch_stats} if batch_stats else {})}
      mutable = ["batch_stats"] if batch_stats else []
      if policy is not None:
        mutable.append("dfp")
      return model.apply(v, x, train=True, rngs={"dfp": k, "dropout": jax.random.fold_in(k, 1)}, mutable=mutable)

    def step(trained, batch_stats, opt_state, x, y, k):
      scale = jdfp.current_loss_scale(opt_state) if scaled else jnp.float32(1.0)

      def loss_fn(tr):
        logits, upd = apply_train(tr, batch_stats, x, k)
        loss = task.loss(logits.astype(jnp.float32), y)
        return loss * scale, (loss, upd)

      (_, (loss, upd)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
      updates, opt_state = tx.update(grads, opt_state, trained)
      trained = optax.apply_updates(trained, updates)
      return trained, upd.get("batch_stats", batch_stats), opt_state, loss

    def apply_eval(trained, batch_stats, x):
      v = {**trained, **({"batch_stats": batch_stats} if batch_stats else {})}
      return model.apply(v, x, train=False, rngs={"dfp": jax.random.key(0)})

    self.apply_train = apply_train
    self._init_rest = None
    self.jstep = jax.jit(step)
    self.jeval = jax.jit(apply_eval)

  def init(self, k_init):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    import jdfp  # pylint: disable=import-outside-toplevel
    variables = self.init_params(k_init)
    if self._init_rest is None:
      def rest(params):
        trained = {"params": jdfp.recipes.optimizer_params(self.recipe, params)}
        if self.dfp_shapes is not None:
          trained["dfp"] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.dfp_shapes)
        return trained, self.tx.init(trained)
      self._init_rest = jax.jit(rest)  # one compile instead of many small eager ones
    trained, opt_state = self._init_rest(variables["params"])
    return trained, variables.get("batch_stats", {}), opt_state


def program(task: Task, recipe: str, steps: int) -> _Program:
  key = (id(task), recipe, steps)
  if key not in _PROGRAMS:
    _PROGRAMS[key] = _Program(task, recipe, steps)
  return _PROGRAMS[key]


def train(task: Task, recipe: str, seed: int, steps: int, *, progress: bool = True,
          history_points: int = 60, explain: bool = False, console=None) -> RunResult:
  """Train ``task.model`` with ``recipe`` for ``steps`` steps from seed ``seed``."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  import jdfp  # pylint: disable=import-outside-toplevel

  prog = program(task, recipe, steps)
  policy, scaled, jstep, jeval, apply_train = prog.policy, prog.scaled, prog.jstep, prog.jeval, prog.apply_train
  k_init, k_drop = jax.random.split(jax.random.key(seed), 2)
  t_start = time.perf_counter()
  trained, batch_stats, opt_state = prog.init(k_init)

  rng = np.random.default_rng(seed)
  batches = [task.sample(rng) for _ in range(steps)]
  keys = jax.random.split(k_drop, max(steps, 1))

  if explain and policy is not None:
    x, y = batches[0]
    x, y = jnp.asarray(x), jnp.asarray(y)

    def grad_fn(tr):
      return jax.grad(lambda t: task.loss(apply_train(t, batch_stats, x, keys[0])[0].astype(jnp.float32), y))(tr)

    rep = jdfp.explain(grad_fn, trained)
    _print_explain(rep, recipe, console)

  every = max(1, steps // max(history_points, 1))
  history, history_steps, losses = [], [], []
  pbar = tqdm(total=steps, desc=f"{task.name} {recipe:>6} seed {seed}", disable=not progress, leave=False,
              dynamic_ncols=True)
  t_after_first = None
  for i in range(steps):
    x, y = batches[i]
    trained, batch_stats, opt_state, loss = jstep(trained, batch_stats, opt_state, jnp.asarray(x),
                                                  jnp.asarray(y), keys[i])
    lf = float(loss)
    losses.append(lf)
    if i == 0:
      t_after_first = time.perf_counter()
    if policy is not None and (i % every == 0 or i == steps - 1):
      history.append(jax.device_get(trained["dfp"]))
      history_steps.append(i)
    pbar.update(1)
    if i % 10 == 0 or i == steps - 1:
      pbar.set_postfix(loss=f"{lf:.4f}")
  t_end = time.perf_counter()
  pbar.close()
  timed = steps - 1
  steps_per_s = timed / (t_end - t_after_first) if timed > 0 and t_end > t_after_first else float("nan")

  metrics = task.evaluate(lambda x: jeval(trained, batch_stats, jnp.asarray(x)))
  skipped, final_scale = 0, None
  if scaled:
    st = jdfp.loss_scale_state(opt_state)
    skipped, final_scale = int(st.total_notfinite), float(st.loss_scale.loss_scale)
  compile_s = t_after_first - t_start if t_after_first else float("nan")
  return RunResult(recipe, seed, np.asarray(losses), metrics, steps_per_s, t_end - t_start, history, history_steps,
                   jax.device_get(trained.get("dfp")), skipped, final_scale, compile_s)


def _print_explain(rep, recipe, console):
  summary = rep.summary()
  text = (f"jdfp.explain (forward + backward of one {recipe} training step): "
          + ", ".join(f"{v} x {k}" for k, v in summary.items()))
  if console is not None:
    console.print(text)
  else:
    print(text)


# ------------------------------------------------------------------------------------------------
# Statistics and reporting.


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  v = np.asarray(values, dtype=float)
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt_ms(values, scale=1.0, digits=2, suffix=""):
  m, s = mean_spread(np.asarray(values) * scale)
  if len(values) > 1:
    return f"{m:.{digits}f} ± {s:.{digits}f}{suffix}"
  return f"{m:.{digits}f}{suffix}"


def tail_mean(losses: np.ndarray, frac: float = 0.05) -> float:
  """Mean of the last ``frac`` of a loss curve (the "final loss", less noisy than the last step)."""
  n = max(1, int(math.ceil(len(losses) * frac)))
  return float(np.mean(losses[-n:]))


def results_table(title: str, results: dict, metric: str, metric_label: str, *, metric_scale=100.0,
                  metric_suffix="", targets: dict | None = None, lower_is_better=False, relative=False,
                  metric_digits=2):
  """A rich Table: recipe, metric (mean ± std), delta vs FP32 (paired per seed), final loss, steps/s.

  ``results``: ``{recipe: [RunResult per seed]}``. ``targets``: ``{recipe: allowed delta}``; the
  verdict column says whether the mean delta is within it (``relative``: delta in % of FP32)."""
  from rich.table import Table  # pylint: disable=import-outside-toplevel
  t = Table(title=title)
  for h in ("recipe", metric_label, "Δ vs FP32", "final train loss", "steps/s", "vs FP32", "target"):
    t.add_column(h, justify="left" if h == "recipe" else "right")
  base = results.get("fp32")
  base_sps = np.mean([r.steps_per_s for r in base]) if base else None
  rows = []
  for recipe, runs in results.items():
    vals = [r.metrics[metric] for r in runs]
    cell = fmt_ms(vals, metric_scale, metric_digits, metric_suffix)
    delta_cell, verdict = "", ""
    if base and recipe != "fp32":
      by_seed = {r.seed: r.metrics[metric] for r in base}
      d = [(r.metrics[metric] - by_seed[r.seed]) * metric_scale for r in runs if r.seed in by_seed]
      if relative:
        d = [100.0 * (r.metrics[metric] - by_seed[r.seed]) / by_seed[r.seed] for r in runs if r.seed in by_seed]
      if d:
        delta_cell = fmt_ms(d, 1.0, 2, "%" if relative else "")
        if d and len(d) > 1:
          delta_cell = ("+" if np.mean(d) >= 0 else "") + delta_cell
        if targets and recipe in targets:
          tol = targets[recipe]
          worse = np.mean(d) if lower_is_better else -np.mean(d)
          ok = worse <= tol
          unit = "%" if relative else " pp"
          verdict = f"[green]met (≤ {tol:g}{unit})[/green]" if ok else f"[red]missed (≤ {tol:g}{unit})[/red]"
    sps = [r.steps_per_s for r in runs]
    rel = f"{np.mean(sps) / base_sps:.2f}x" if base_sps else ""
    loss_cell = fmt_ms([tail_mean(r.losses) for r in runs], 1.0, 4)
    extra = ""
    if recipe == "fp16":
      extra = f" ({int(np.mean([r.skipped_steps for r in runs]))} skipped)"
    rows.append([LABELS.get(recipe, recipe), cell, delta_cell, loss_cell + extra, fmt_ms(sps, 1.0, 1), rel, verdict])
    t.add_row(*rows[-1])
  return t, rows


def markdown_table(headers, rows) -> str:
  import re  # pylint: disable=import-outside-toplevel
  clean = lambda s: re.sub(r"\[/?[a-z ]+\]", "", str(s))
  out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  out += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
  return "\n".join(out)


def smooth(y: np.ndarray, k: int) -> np.ndarray:
  if k <= 1 or len(y) < k:
    return y
  c = np.cumsum(np.insert(y, 0, 0.0))
  out = (c[k:] - c[:-k]) / k
  return np.concatenate([y[: k - 1] * np.nan, out])


def save_figure(path, results: dict, *, title: str, history_recipes: Sequence[str] = ("dfp16", "hbfp8"),
                roles: Sequence[str] = ("lhs", "rhs", "grad"), log_loss: bool = True):
  """A PNG: loss curves of every recipe (mean over seeds, smoothed) and, for the recipes in
  ``history_recipes``, the exponent in use per layer over training (seed of the first run)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  import jdfp  # pylint: disable=import-outside-toplevel

  hist_recipes = [r for r in history_recipes if r in results and results[r][0].history]
  ncols = 1 + len(hist_recipes)
  fig = Figure(figsize=(5.2 * ncols, 3.0 * len(roles)))
  FigureCanvasAgg(fig)
  grid = fig.add_gridspec(len(roles), ncols)
  nrows = len(roles)
  top = max(1, nrows - 1) if "fp32" in results and len(results) > 1 else nrows
  ax = fig.add_subplot(grid[:top, 0])
  base = None
  if top < nrows:
    n0 = min(len(r.losses) for r in results["fp32"])
    base = np.mean([r.losses[:n0] for r in results["fp32"]], axis=0)
    axd = fig.add_subplot(grid[top:, 0], sharex=ax)
  for j, (recipe, runs) in enumerate(results.items()):
    n = min(len(r.losses) for r in runs)
    y = np.mean([r.losses[:n] for r in runs], axis=0)
    k = max(1, n // 50)
    ax.plot(np.arange(n), smooth(y, k), label=LABELS.get(recipe, recipe), lw=1.2, color=f"C{j}")
    if base is not None and recipe != "fp32":
      m = min(n, len(base))
      axd.plot(np.arange(m), smooth(y[:m] - base[:m], k), lw=1, color=f"C{j}")
  if base is not None:
    axd.axhline(0, color="k", lw=0.6)
    axd.set_ylabel("loss − FP32 loss")
    axd.set_xlabel("step")
    axd.grid(True, alpha=0.3)
  if log_loss:
    ax.set_yscale("log")
  if base is None:
    ax.set_xlabel("step")
  ax.set_ylabel("training loss (moving average)")
  ax.set_title("loss curves (mean over seeds)")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="small")
  for j, recipe in enumerate(hist_recipes):
    run = results[recipe][0]
    hist = jdfp.telemetry.exponent_history(run.history)
    for i, role in enumerate(roles):
      a = fig.add_subplot(grid[i, 1 + j])
      for (op, r), ys in sorted(hist.items()):
        if r != role:
          continue
        yv = np.array([np.nan if v is None else v for v in ys], dtype=float)
        if role == "grad":
          yv[0] = np.nan  # before the first backward pass the gradient state is empty
        a.plot(run.history_steps, yv, marker=".", ms=2, lw=1, label=op.replace("/", "/\u200b"))
      a.set_ylabel(f"{role} exponent")
      a.grid(True, alpha=0.3)
      if i == 0:
        a.set_title(f"{LABELS.get(recipe, recipe)}: exponent per layer (seed {run.seed})", fontsize="medium")
        a.legend(fontsize="xx-small", ncol=2, loc="best")
      if i == len(roles) - 1:
        a.set_xlabel("step")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def parse_recipes(text: str, allowed=RECIPES) -> list[str]:
  out = [r.strip().lower() for r in text.split(",") if r.strip()]
  bad = [r for r in out if r not in allowed]
  if bad:
    raise SystemExit(f"unknown recipe(s) {bad}; choose from {list(allowed)}")
  if "fp32" in out:  # the baseline first: the table's relative columns need it
    out.remove("fp32")
    out.insert(0, "fp32")
  return out


def parse_seeds(text: str) -> list[int]:
  """``"3"`` -> seeds 0, 1, 2; ``"0,5,7"`` -> those seeds."""
  if "," in text:
    return [int(s) for s in text.split(",") if s.strip()]
  return list(range(int(text)))


def run_all(task: Task, recipes, seeds, steps, *, progress=True, console=None, explain_recipe="dfp16"):
  """``{recipe: [RunResult per seed]}``, seeds outermost (so partial results cover all recipes)."""
  results: dict = {r: [] for r in recipes}
  explained = False
  for seed in seeds:
    for recipe in recipes:
      do_explain = (not explained) and recipe == explain_recipe
      explained = explained or do_explain
      res = train(task, recipe, seed, steps, progress=progress, explain=do_explain, console=console)
      results[recipe].append(res)
      msg = (f"{task.name} {recipe:>6} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.metrics.items())
             + f", final loss {tail_mean(res.losses):.4f}, {res.steps_per_s:.1f} steps/s, {res.wall_s:.1f} s "
             f"(compile {res.first_step_s:.1f} s)")
      if recipe == "fp16":
        msg += f", loss scale {res.final_loss_scale:g}, {res.skipped_steps} skipped steps"
      (console.print(msg, highlight=False) if console is not None else print(msg))
  return results
