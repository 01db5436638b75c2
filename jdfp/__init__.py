"""jdfp: dynamic fixed point (DFP16), HBFP and mixed-precision training for JAX with exact INT16 kernels.

Layers: formats (``DFP``, ``BFP``, ``FP16``, ``BF16``) -> quantization (``quantize_array``) ->
exact reference arithmetic (``reference_gemm``) -> FFI kernels -> differentiable ops -> Flax / optax /
parallel integrations.
"""

from jdfp._src.formats import BF16, BFP, DFP, FP16, FloatFormat, NONFINITE_EXPONENT
from jdfp._src.quantize import QArray, dequantize, fake_quantize, quantize_array
from jdfp._src.reference import reference_gemm, safe_chain_length
from jdfp._src.policy import Policy, policies
from jdfp._src.ops import conv_general_dilated, dot_general, einsum
from jdfp._src import kernels
from jdfp._src.explain import explain
from jdfp._src.delayed import ScaleState, delayed_state_update, init_scale_state
from jdfp._src.loss_scale import (DynamicLossScale, LossScale, NoOpLossScale, StaticLossScale, all_finite,
                                  select_tree)
from jdfp._src.loss_scaled import LossScaledState, current_loss_scale, loss_scale_state, loss_scaled
from jdfp._src.master_weights import MasterWeightsState, cast_params, master_params, master_weights
from jdfp._src.overwrite_state import OverwriteState, overwrite_state
from jdfp._src import recipes_optax as recipes
from jdfp import parallel
from jdfp._src.flax import QuantizeReport, Rule, fp32_first_and_last, quantize, quantize_report
from jdfp._src.flax.nnx import DfpState, apply_state_grads, state_of as nnx_state
from jdfp._src.telemetry import Telemetry, telemetry

__version__ = "0.1.0"

__all__ = [
    "ScaleState",
    "delayed_state_update",
    "init_scale_state",
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
    "parallel",
    "recipes",
    "select_tree",
    "BF16",
    "BFP",
    "DFP",
    "FP16",
    "FloatFormat",
    "NONFINITE_EXPONENT",
    "QArray",
    "Policy",
    "conv_general_dilated",
    "dequantize",
    "dot_general",
    "einsum",
    "explain",
    "kernels",
    "policies",
    "fake_quantize",
    "quantize_array",
    "reference_gemm",
    "safe_chain_length",
]
