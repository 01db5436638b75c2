"""Side-by-side timing helpers shared by the benchmark subcommands."""

from __future__ import annotations

import os
import platform
import time
from typing import Callable, Sequence

import numpy as np


def _block(x):
  for leaf in (x if isinstance(x, (tuple, list)) else (x,)):
    leaf.block_until_ready()


def time_side_by_side(fns: dict[str, Callable[[], object]], *, repeats: int = 7, warmup: int = 2,
                      min_time: float = 0.02) -> dict[str, float]:
  """Median seconds per call of each fn, measured round-robin in the same process.

  Round-robin (one timing of each candidate per round) makes load from other processes hit all
  candidates alike, so the ratios stay meaningful on a shared machine.  Each timing runs a fn
  `number` times back to back (enough for >= min_time) and blocks on every result.
  """
  number = {}
  for name, fn in fns.items():
    for _ in range(warmup):
      _block(fn())
    t0 = time.perf_counter()
    _block(fn())
    dt = max(time.perf_counter() - t0, 1e-6)
    number[name] = max(1, int(min_time / dt))
  samples: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      n = number[name]
      t0 = time.perf_counter()
      outs = [fn() for _ in range(n)]
      for o in outs:
        _block(o)
      samples[name].append((time.perf_counter() - t0) / n)
  return {name: float(np.median(s)) for name, s in samples.items()}


def parse_shape(text: str) -> tuple[int, int, int]:
  """'1024' -> (1024, 1024, 1024); 'MxKxN' -> (M, K, N)."""
  parts = [int(p) for p in text.lower().split("x")]
  if len(parts) == 1:
    return (parts[0],) * 3
  if len(parts) == 3:
    return tuple(parts)  # type: ignore[return-value]
  raise ValueError(f"size must be N or MxKxN, got {text!r}")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
  try:
    from rich.console import Console
    from rich.table import Table
  except ImportError:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print(title)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
      print("  ".join(v.rjust(w) for v, w in zip(r, widths)))
    return
  table = Table(title=title)
  for c in columns:
    table.add_column(c, justify="right")
  for r in rows:
    table.add_row(*r)
  Console(width=max(120, sum(len(c) + 3 for c in columns))).print(table)


def isa_label() -> str | None:
  """What ``isa="auto"`` runs here, for titles and JSON: the best ISA, plus the AMX-INT8 tiles where
  the INT16 / INT8 GEMMs use them; None without the library."""
  from jdfp import kernels
  if not kernels.kernel_available():
    return None
  return kernels.best_isa() + (" + AMX-INT8 tiles" if kernels.has_amx_int8() else "")


def cpu_name() -> str:
  """The CPU model as /proc/cpuinfo names it (for benchmark records)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def host_memory() -> dict:
  """How this process's large allocations are paged in, recorded with every benchmark because it
  moves step times (docs/op_costs.md, "Page faults"): XLA:CPU allocates a step's temp buffer per execution, and
  glibc serves blocks above 32 MiB with fresh mmaps, faulted in 4 KiB at a time unless its malloc
  asks for transparent huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, read at start-up)."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  settings = dict(t.split("=", 1) for t in tunables.split(":") if "=" in t)
  thp = None
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      thp = f.read().split("[", 1)[1].split("]", 1)[0]
  except (OSError, IndexError):
    pass
  return {"libc": " ".join(platform.libc_ver()).strip() or None, "glibc_tunables": tunables or None,
          "malloc_hugepages": settings.get("glibc.malloc.hugetlb", "0") != "0", "transparent_hugepage": thp}
