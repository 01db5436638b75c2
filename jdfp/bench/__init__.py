"""Benchmarks: ``python -m jdfp.bench <subcommand> [options]``.

Subcommands live in modules of this package, each with ``add_arguments(parser)`` and
``main(args) -> int``; list a new one in ``SUBCOMMANDS`` (name -> module, help). ``host_memory()`` says how the process's
large buffers are paged in (recorded with every benchmark; the demo prints it too).
"""

from jdfp.bench._timing import host_memory  # noqa: F401

SUBCOMMANDS = {
    "gemm": ("jdfp.bench.gemm", "exact INT16 GEMM kernel vs XLA FP32 / int16 dots"),
    "gemm_bf16": ("jdfp.bench.gemm_bf16", "BF16 GEMM kernel (vdpbf16ps), FP16 GEMM (AMX-BF16) vs XLA dots"),
    "conv": ("jdfp.bench.conv", "exact INT16 conv kernel (3 training passes) vs XLA FP32 / int16 convs"),
    "ops": ("jdfp.bench.ops", "jdfp.dot_general / einsum / conv_general_dilated as users call them vs the lax ops"),
    "convert": ("jdfp.bench.convert", "per-tensor DFP conversion (nearest / stochastic / biased): kernel vs XLA"),
    "train": ("jdfp.bench.train", "end-to-end training steps: every recipe via jdfp.quantize vs FP32"),
}
