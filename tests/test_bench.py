"""Smoke tests of `python -m jdfp.bench`: every subcommand runs a tiny configuration through the same
entry point users call and writes what it documents (tables; JSON with positive, finite timings and
ratios). The figures themselves are measured by hand (docs/benchmarks.md); these only keep the
commands working (`bench conv` was once broken by a refactor for a whole session without a test
noticing)."""

import json
import math

import pytest

from jdfp import kernels
from jdfp.bench import SUBCOMMANDS
from jdfp.bench.__main__ import main as bench_main

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="the benchmarks time the C++ kernels")

# One timing round, no warm-up beyond the first call: these check plumbing, not speed.
FAST = ["--repeats", "1", "--min-time", "0"]


def _run(capsys, argv):
  assert bench_main(argv) == 0
  return capsys.readouterr().out


def _positive(values):
  values = list(values)
  assert values and all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values), values


def _json(path):
  with open(path) as f:
    return json.load(f)


def test_every_subcommand_is_covered():
  assert set(SUBCOMMANDS) == {"gemm", "gemm_bf16", "conv", "ops", "convert", "train"}


@pytest.mark.parametrize("tunables, on", [(None, False), ("glibc.malloc.hugetlb=1", True),
                                          ("glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2", False),
                                          ("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2", True)])
def test_host_memory_reads_the_malloc_setting(monkeypatch, tunables, on):
  """Every benchmark records whether malloc asks for huge pages (docs/op_costs.md, section on page faults: it moves step times)."""
  from jdfp.bench import host_memory
  if tunables is None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  else:
    monkeypatch.setenv("GLIBC_TUNABLES", tunables)
  m = host_memory()
  assert m["malloc_hugepages"] is on and m["glibc_tunables"] == tunables


def test_gemm(tmp_path, capsys):
  out = _run(capsys, ["gemm", "--sizes", "64", "48x80x32", "--warmup", "1", "--json", str(tmp_path / "g.json")]
             + FAST)
  assert "jdfp GEMM" in out and "48x80x32" in out
  data = _json(tmp_path / "g.json")
  assert [(r["m"], r["k"], r["n"]) for r in data["results"]] == [(64, 64, 64), (48, 80, 32)]
  for r in data["results"]:
    assert set(r["gops"]) == {"xla_f32", "xla_i16", "jdfp_i16", "jdfp_f32q", "jdfp_i16b24", "jdfp_i8", "jdfp_i8b24",
                              "jdfp_i8b32"}
    _positive(r["gops"].values())
    _positive(r["speedup_vs_xla_f32"].values())
    assert r["speedup_vs_xla_f32"]["xla_f32"] == 1.0
  assert data["meta"]["isa"] == "auto = " + kernels.best_isa() + (" + AMX-INT8 tiles" if kernels.has_amx_int8() else "")
  assert data["meta"]["amx_int8"] == kernels.has_amx_int8()
  assert set(data["meta"]["memory"]) == {"libc", "glibc_tunables", "malloc_hugepages", "transparent_hugepage"}


def test_gemm_bf16(tmp_path, capsys):
  out = _run(capsys, ["gemm_bf16", "--sizes", "64", "--warmup", "1", "--json", str(tmp_path / "b.json")] + FAST)
  assert "jdfp BF16 GEMM" in out
  (r,) = _json(tmp_path / "b.json")["results"]
  fp16 = {"jdfp_f16", "jdfp_amx_bf16"} if kernels.amx_bf16_ready() else set()  # on the AMX-BF16 tiles
  assert set(r["gflops"]) == {"xla_f32", "xla_bf16_f32", "xla_bf16", "jdfp_bf16", "jdfp_f32r", "xla_f16_f32"} | fp16
  assert _json(tmp_path / "b.json")["meta"]["fp16_gemm_on_amx"] == kernels.amx_bf16_ready()
  _positive(r["gflops"].values())


def test_conv(tmp_path, capsys):
  out = _run(capsys, ["conv", "--layers", "3x3_64_28", "--batch", "1", "--warmup", "1", "--i16-repeats", "0",
                      "--json", str(tmp_path / "c.json")] + FAST)
  assert "3x3_64_28" in out
  data = _json(tmp_path / "c.json")
  passes = {r["pass"] for r in data["results"]} if isinstance(data.get("results"), list) else set()
  assert passes == {"forward", "backward-data", "weight-gradient", "train-op"}, data
  for r in data["results"]:
    _positive(v for k, v in r["seconds"].items() if k != "xla_i16")


def test_ops(tmp_path, capsys):
  out = _run(capsys, ["ops", "--cases", "dot:s16", "einsum:s64", "conv:cs16", "--warmup", "1",
                      "--json", str(tmp_path / "o.json")] + FAST)
  assert "s16" in out and "cs16" in out
  data = _json(tmp_path / "o.json")
  assert len(data["results"]) == 3 * 2  # cases x passes
  for r in data["results"]:
    _positive(r["us"].values())
    assert set(r["us"]) == {"lax", "jdfp", "dfp16"}


def test_ops_recipe_candidates(tmp_path, capsys):
  """Every recipe of jdfp.policies can be timed as a drop-in op (issue: HBFP8's drop-in target)."""
  recipes = ["hbfp8", "hbfp12", "fp16", "bf16"]
  _run(capsys, ["ops", "--cases", "dot:s32", "conv:cs16", "--passes", "fwd+bwd", "--candidates", "lax", *recipes,
                "--warmup", "1", "--json", str(tmp_path / "o.json")] + FAST)
  for r in _json(tmp_path / "o.json")["results"]:
    _positive(r["us"].values())
    assert set(r["vs_lax"]) == set(recipes)


def test_ops_parts(capsys):
  out = _run(capsys, ["ops", "--parts", "64", "--warmup", "1"] + FAST)
  assert "64" in out


def test_convert(capsys):
  out = _run(capsys, ["convert", "--sizes", "4096"] + FAST)
  assert "conversion of 4096 float32 elements" in out


def test_train(tmp_path, capsys):
  out = _run(capsys, ["train", "--workloads", "small", "--candidates", "fp32", "recipe:dfp16", "recipe:hbfp8",
                      "recipe:bf16", "--warmup", "1", "--json", str(tmp_path / "t.json")] + FAST)
  assert "train step: small" in out and "malloc huge pages" in out
  rows = _json(tmp_path / "t.json")["workloads"]["small"]
  assert set(rows) >= {"fp32", "recipe:dfp16", "recipe:hbfp8", "recipe:bf16"}, rows
  for name, st in rows.items():
    _positive([st["step_ms"], st["compile_s"]])
