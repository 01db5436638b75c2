"""`jdfp.telemetry`: the "dfp" scale state of a quantized model as a per-layer table and plots.

``jdfp.telemetry(x)`` accepts a Linen variable dict (``{"params": ..., "dfp": ...}``), the ``"dfp"``
collection itself, a `flax.training.train_state.TrainState` (or anything with ``.dfp`` /
``.params`` holding one of those) or an NNX model quantized by `jdfp.quantize`. It returns a
`Telemetry`: one row per quantized op and tensor role (``lhs`` = activations, ``rhs`` = weights,
``grad`` = output gradients) with the exponent in use, the smallest exponent, and the elements
saturated / flushed to zero / non-finite in the last update (counts and fractions); with delayed
scaling also ``history_max`` (the amax the exponent came from) and ``history_filled``. Ops inside
``nn.scan`` have one row per iteration (``path[i]``).

``jdfp.telemetry.plot_exponent_history(history, path)`` draws the exponent of every op and role
over steps from a list of such states collected during training (matplotlib, no global backend
change) and writes it to ``path``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np

from jdfp._src.flax.state import FIELDS, ROLES, is_packed, unpack
COLUMNS = ("path", "role", "exponent", "exponent_min", "saturated", "underflow", "nonfinite", "size",
           "saturated_frac", "underflow_frac")


def _is_op_state(x) -> bool:
  return (isinstance(x, Mapping) and set(x.keys()) == set(ROLES)
          and all(isinstance(x[r], Mapping) and set(x[r].keys()) >= set(FIELDS) for r in ROLES))


def _find_collection(x, collection: str):
  """The dfp collection (a nested mapping) or ``{path: op state}`` for NNX models."""
  try:  # NNX model quantized by jdfp
    from flax import nnx  # pylint: disable=import-outside-toplevel
    if isinstance(x, nnx.Module):
      from jdfp._src.flax import nnx as jnnx  # pylint: disable=import-outside-toplevel
      return {"/".join(k.split("/")): v for k, v in jnnx.state_of(x).items()}, True
  except ImportError:  # pragma: no cover
    pass
  for attr in (collection, "params"):
    if not isinstance(x, Mapping) and hasattr(x, attr):
      inner = getattr(x, attr)
      if isinstance(inner, Mapping):
        found = _find_collection(inner, collection)
        if found[0]:
          return found
  if isinstance(x, Mapping):
    if collection in x and isinstance(x[collection], Mapping):
      return x[collection], False
    return x, False
  raise TypeError(f"jdfp.telemetry: cannot find a {collection!r} collection in a {type(x).__name__}")


def _walk(tree, prefix, out):
  if _is_op_state(tree):
    out.append((prefix, tree))
    return
  if is_packed(tree):  # a Linen op's state array
    out.append((prefix, unpack(np.asarray(tree))))
    return
  if isinstance(tree, Mapping):
    for k in tree:
      _walk(tree[k], f"{prefix}/{k}" if prefix else str(k), out)


def _op_states(x, collection="dfp"):
  coll, flat = _find_collection(x, collection)
  found: list = []
  if flat:
    found = list(coll.items())
  else:
    _walk(coll, "", found)
  return found


def _rows(x, collection="dfp") -> list[dict]:
  rows = []
  for path, st in _op_states(x, collection):
    arrs = {r: {f: np.asarray(st[r][f]) for f in FIELDS} for r in ROLES}
    shape = arrs["lhs"]["exponent"].shape
    for idx in np.ndindex(*shape):
      p = path + ("" if not shape else "[" + ",".join(map(str, idx)) + "]")
      for r in ROLES:
        vals = {f: float(arrs[r][f][idx]) for f in FIELDS}
        size = vals["size"]
        row = {"path": p, "role": r}
        row.update({f: int(vals[f]) for f in FIELDS})
        row["saturated_frac"] = vals["saturated"] / size if size else 0.0
        row["underflow_frac"] = vals["underflow"] / size if size else 0.0
        if "amax_history" in st[r]:  # delayed scaling: the max the exponent came from, and its depth
          h = np.asarray(st[r]["amax_history"])[idx]
          row["history_max"] = float(h.max(initial=0.0))
          row["history_filled"] = int((h > 0).sum())
        rows.append(row)
  return rows


class Telemetry(Sequence):
  """Per-op, per-role statistics: a sequence of dicts (``COLUMNS``); ``str()`` renders a table,
  ``to_rich()`` a `rich.table.Table`. ``size == 0`` marks a role never updated (e.g. ``grad`` before
  the first backward pass)."""

  def __init__(self, rows: list[dict]):
    self.rows = rows

  def __getitem__(self, i):
    return self.rows[i]

  def __len__(self):
    return len(self.rows)

  def where(self, path: str | None = None, role: str | None = None) -> "Telemetry":
    """Rows whose path contains ``path`` (substring) and whose role is ``role``."""
    return Telemetry([r for r in self.rows if (path is None or path in r["path"]) and (role is None or r["role"] == role)])

  @property
  def lossy(self) -> "Telemetry":
    """Rows where precision was lost: any saturated, flushed-to-zero or non-finite element."""
    return Telemetry([r for r in self.rows if r["saturated"] or r["underflow"] or r["nonfinite"]])

  @property
  def _delayed(self) -> bool:
    return any("history_max" in r for r in self.rows)

  def _cells(self, r):
    cells = [r["path"], r["role"], str(r["exponent"]), str(r["exponent_min"]), str(r["saturated"]),
             f"{r['saturated_frac']:.2%}", str(r["underflow"]), f"{r['underflow_frac']:.2%}", str(r["nonfinite"]),
             str(r["size"])]
    if self._delayed:
      cells += [f"{r['history_max']:.3g}" if "history_max" in r else "", str(r.get("history_filled", ""))]
    return cells

  _BASE_HEAD = ["op", "role", "exp", "exp_min", "saturated", "sat %", "underflow", "uflow %", "nonfinite", "size"]

  @property
  def _HEAD(self):
    return self._BASE_HEAD + (["hist max", "hist n"] if self._delayed else [])

  def __str__(self) -> str:
    table = [self._HEAD] + [self._cells(r) for r in self.rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(self._HEAD))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

  def __repr__(self) -> str:
    return f"Telemetry({len(self.rows)} rows)\n{self}"

  def to_rich(self):
    from rich.table import Table  # pylint: disable=import-outside-toplevel
    t = Table(title="jdfp telemetry")
    for h in self._HEAD:
      t.add_column(h, justify="left" if h in ("op", "role") else "right")
    for r in self.rows:
      style = "red" if (r["saturated"] or r["nonfinite"]) else ("yellow" if r["underflow"] else None)
      t.add_row(*self._cells(r), style=style)
    return t

  def __rich__(self):
    return self.to_rich()


def telemetry(variables_or_state: Any, collection: str = "dfp") -> Telemetry:
  """A per-layer table of the ``"dfp"`` scale state (see the module docstring)."""
  return Telemetry(_rows(variables_or_state, collection))


def exponent_history(history: Sequence[Any], role: str | None = None, collection: str = "dfp") -> dict:
  """``{(op path, role): [exponent per step]}`` from a list of states collected during training."""
  out: dict = {}
  for step, st in enumerate(history):
    for r in _rows(st, collection):
      if role is not None and r["role"] != role:
        continue
      out.setdefault((r["path"], r["role"]), [None] * len(history))[step] = r["exponent"]
  return out


def plot_exponent_history(history: Sequence[Any], path, roles: Sequence[str] = ROLES, collection: str = "dfp"):
  """Plot the exponent of each op over steps (one panel per role) and save it to ``path``.

  Returns ``path``. Uses matplotlib's Agg canvas directly (the global backend is untouched)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  hist = exponent_history(history, collection=collection)
  roles = tuple(roles)
  fig = Figure(figsize=(7, 2.6 * len(roles)))
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(roles), 1, squeeze=False, sharex=True)[:, 0]
  steps = np.arange(len(history))
  for ax, role in zip(axes, roles):
    for (op, r), ys in sorted(hist.items()):
      if r != role:
        continue
      y = np.array([np.nan if v is None else v for v in ys], dtype=float)
      ax.plot(steps, y, marker=".", label=op)
    ax.set_ylabel(f"{role} exponent")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize="x-small", loc="best")
  axes[-1].set_xlabel("step")
  fig.suptitle("jdfp: exponent in use per op")
  fig.tight_layout()
  fig.savefig(path)
  return path


telemetry.plot_exponent_history = plot_exponent_history
telemetry.exponent_history = exponent_history
telemetry.Telemetry = Telemetry
