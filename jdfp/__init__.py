"""jdfp: dynamic fixed point (DFP16), HBFP and mixed-precision training for JAX with exact INT16 kernels.

Layers, each building on the ones before: numerics (formats, quantization, the exact reference
GEMM) -> kernels (C++ through XLA FFI: `jdfp.kernels`) -> ops (differentiable drop-ins with a
`Policy`) -> integrations (Flax `quantize`, optax transforms, `jdfp.parallel`).
"""

# Numerics: formats, quantization, the exact reference GEMM.
from jdfp._src.numerics.formats import BF16, BFP, DFP, FP16, NONFINITE_EXPONENT, FloatFormat
from jdfp._src.numerics.quantize import QArray, dequantize, fake_quantize, quantize_array
from jdfp._src.numerics.reference import reference_gemm, safe_chain_length

# Kernels (C++, XLA FFI).
from jdfp import kernels

# Ops: policies, the drop-in ops, delayed scaling, explain.
from jdfp._src.ops.conv import conv_general_dilated
from jdfp._src.ops.delayed import ScaleState, delayed_state_update, init_scale_state
from jdfp._src.ops.dot import dot_general
from jdfp._src.ops.einsum import einsum
from jdfp._src.ops.explain import explain
from jdfp._src.ops.policy import Policy, policies

# Flax.
from jdfp._src.flax.nnx import DfpState, apply_state_grads, state_of as nnx_state
from jdfp._src.flax.quantize import fp32_first_and_last, quantize, quantize_report
from jdfp._src.flax.rules import QuantizeReport, Rule
from jdfp._src.flax.telemetry import Telemetry, telemetry

# optax.
from jdfp._src.optax.loss_scaled import LossScaledState, current_loss_scale, loss_scale_state, loss_scaled
from jdfp._src.optax.master_weights import MasterWeightsState, cast_params, master_params, master_weights
from jdfp._src.optax.overwrite_state import OverwriteState, overwrite_state
from jdfp._src.optax.scales import (DynamicLossScale, LossScale, NoOpLossScale, StaticLossScale, all_finite,
                                    select_tree)
from jdfp import recipes

# Data parallel.
from jdfp import parallel

__version__ = "0.1.0"

__all__ = [
    # numerics
    "BF16",
    "BFP",
    "DFP",
    "FP16",
    "FloatFormat",
    "NONFINITE_EXPONENT",
    "QArray",
    "dequantize",
    "fake_quantize",
    "quantize_array",
    "reference_gemm",
    "safe_chain_length",
    # kernels
    "kernels",
    # ops
    "Policy",
    "ScaleState",
    "conv_general_dilated",
    "delayed_state_update",
    "dot_general",
    "einsum",
    "explain",
    "init_scale_state",
    "policies",
    # flax
    "DfpState",
    "QuantizeReport",
    "Rule",
    "Telemetry",
    "apply_state_grads",
    "fp32_first_and_last",
    "nnx_state",
    "quantize",
    "quantize_report",
    "telemetry",
    # optax
    "DynamicLossScale",
    "LossScale",
    "LossScaledState",
    "MasterWeightsState",
    "NoOpLossScale",
    "OverwriteState",
    "StaticLossScale",
    "all_finite",
    "cast_params",
    "current_loss_scale",
    "loss_scale_state",
    "loss_scaled",
    "master_params",
    "master_weights",
    "overwrite_state",
    "recipes",
    "select_tree",
    # data parallel
    "parallel",
]
