"""Smoke tests of the training examples: each main() runs a tiny configuration end to end and
produces its results table and PNG (the full runs and their numbers are in examples/RESULTS.md)."""

import importlib
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

pytest.importorskip("flax")
pytest.importorskip("optax")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("rich")
pytest.importorskip("tqdm")


def _example(name):
  if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)
  return importlib.import_module(name)


def _check(tmp_path, capsys, module, args, recipes, title):
  out_png = tmp_path / f"{module}.png"
  md = tmp_path / f"{module}.md"
  rc = _example(module).main(args + ["--recipes", ",".join(recipes), "--seeds", "1", "--no-progress",
                                     "--out", str(out_png), "--markdown", str(md)])
  assert rc == 0
  text = capsys.readouterr().out
  assert title in text
  for r in recipes:
    assert f"{r} seed 0" in text, text
  assert out_png.exists() and out_png.stat().st_size > 10_000
  table = md.read_text()
  assert table.count("\n") == 2 + len(recipes), table
  assert "nan" not in table.lower(), table
  return text


def test_train_cnn_tiny(tmp_path, capsys):
  text = _check(tmp_path, capsys, "train_cnn", ["--steps", "4", "--width", "4", "--batch", "16", "--stages", "1"],
                ["fp32", "dfp16"], "ResNet on digits")
  assert "jdfp kernel" in text  # jdfp.explain: the INT16 kernel is in the training step
  assert "DFP16 telemetry" in text


def test_train_lm_tiny(tmp_path, capsys):
  _check(tmp_path, capsys, "train_lm",
         ["--steps", "4", "--d-model", "16", "--heads", "2", "--layers", "1", "--seq", "16", "--batch", "4",
          "--val-windows", "8"], ["fp32", "dfp16"], "char transformer")


def test_train_mnist1d_tiny(tmp_path, capsys):
  # fp16: the loss-scaled optimizer path. --dataset synthetic needs no optional package.
  text = _check(tmp_path, capsys, "train_mnist1d", ["--steps", "4", "--width", "4", "--batch", "16",
                                                    "--dataset", "synthetic"], ["fp32", "fp16"], "1-D ResNet")
  assert "loss scale" in text


def test_seed_and_recipe_parsing():
  common = _example("_common")
  assert common.parse_seeds("3") == [0, 1, 2] and common.parse_seeds("0,4") == [0, 4]
  assert common.parse_recipes("dfp16,FP32") == ["fp32", "dfp16"]  # the baseline first
  with pytest.raises(SystemExit):
    common.parse_recipes("int4")


def test_demo_tiny(tmp_path, capsys):
  """The README's main command (its default task, the ResNet on shifted digits): accuracy and
  wall-clock columns side by side, compile apart, every convolution on the kernel."""
  timed = _example("_timed")
  text = _check(tmp_path, capsys, "demo", ["--steps", "4", "--eval-every", "2", "--width", "4", "--batch", "16"],
                ["fp32", "dfp16"], "ResNet on shifted digits")
  assert "jdfp kernel" in text and "12x12 canvas" in text
  header = (tmp_path / "demo.md").read_text().splitlines()[0]
  assert header.count("|") == len(timed.HEADERS) + 1


def test_demo_mlp_tiny(tmp_path, capsys):
  """``--task mlp``: the MLP on MNIST-1D (here its synthetic stand-in, no optional package)."""
  timed = _example("_timed")
  text = _check(tmp_path, capsys, "demo", ["--task", "mlp", "--steps", "6", "--eval-every", "3", "--width", "32",
                                           "--depth", "2",
                                           "--batch", "16", "--samples", "400", "--dataset", "synthetic",
                                           "--cache-dir", ""], ["fp32", "dfp16"], "MLP on synthetic")
  assert "setup" in text and "steps/s" in text
  assert "jdfp kernel" in text  # jdfp.explain of the DFP16 step: its GEMMs run on the INT16 kernel
  header = (tmp_path / "demo.md").read_text().splitlines()[0]
  for col in ("test accuracy %", "training s", "speed-up vs FP32", "setup s (compile)", "s to FP32's accuracy"):
    assert col in header, header
  assert header.count("|") == len(timed.HEADERS) + 1


def test_timed_run_bookkeeping():
  """Time to an accuracy: the training seconds of the first evaluation at or above it."""
  timed = _example("_timed")
  import numpy as np
  run = timed.TimedRun("dfp16", 0, np.zeros(4), [2, 4], [1.0, 2.5], [0.5, 0.8], {"test_acc": 0.8}, 2.5, 0.1, 3.0, 4)
  assert run.time_to(0.5) == 1.0 and run.time_to(0.7) == 2.5 and np.isnan(run.time_to(0.9))
  assert run.steps_per_s == 4 / 2.5
  base = timed.TimedRun("fp32", 0, np.zeros(4), [2, 4], [2.0, 5.0], [0.6, 0.8], {"test_acc": 0.8}, 5.0, 0.1, 1.0, 4)
  _, rows = timed.table("t", {"fp32": [base], "dfp16": [run]}, acc_targets={"dfp16": 0.5})
  assert rows[1][5] == "2.00x"  # FP32's 5.0 s over DFP16's 2.5 s
  assert rows[1][7] == "2.5"  # DFP16 reaches FP32's final 0.8 after 2.5 s
  assert "met" in rows[1][8] and "met" in rows[1][9]
