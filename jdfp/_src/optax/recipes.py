"""Optimizer side of the ready-made precision recipes.

``optimizer(name, inner)`` wraps any optax optimizer the way each recipe needs (the op side, which
tensors each GEMM quantizes, is the op policy's job):

=========  ==================================================================================
name       optimizer
=========  ==================================================================================
fp32       ``inner`` unchanged.
dfp16      FP32 masters; params float32 on the ``DFP(bits=16)`` grid, re-quantized every step
           (Das et al. 2018). DFP needs no loss scaling: its exponent follows the tensor.
hbfp8      FP32 masters; params float32 on the wide ``BFP(mantissa_bits=15, block=(24, 24))``
hbfp12     grid, the HBFP "16-bit weight storage" (the GEMMs quantize to m = 7 / 11).
fp16       FP32 masters, float16 params, dynamic loss scaling (start 2**15, docs/design.md §4); the scale
           is unscaled before ``inner`` so clipping and weight decay see true gradients.
bf16       FP32 masters, bfloat16 params; no loss scaling (bfloat16 has float32's range).
=========  ==================================================================================

Usage::

    tx = jdfp.recipes.optimizer("fp16", optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)))
    params = jdfp.recipes.optimizer_params("fp16", params)   # float16 copies
    opt_state = tx.init(params)
"""

from __future__ import annotations

import optax

from jdfp._src.numerics import formats
from jdfp._src.optax import scales as ls_lib
from jdfp._src.optax.loss_scaled import loss_scaled
from jdfp._src.optax.master_weights import cast_params, master_weights
from jdfp._src.optax.overwrite_state import overwrite_state

RECIPES = ("fp32", "dfp16", "hbfp8", "hbfp12", "fp16", "bf16")

# Storage format of the params per recipe (None: plain float32, no masters needed).
PARAM_FORMATS = {
    "fp32": None,
    "dfp16": formats.DFP(bits=16),
    "hbfp8": formats.BFP(mantissa_bits=15, block=(24, 24)),
    "hbfp12": formats.BFP(mantissa_bits=15, block=(24, 24)),
    "fp16": formats.FP16,
    "bf16": formats.BF16,
}

_NO_LOSS_SCALE = object()


def _check_name(name) -> str:
  if not isinstance(name, str):
    raise TypeError(f"name must be a recipe name (one of {RECIPES}), got {name!r}")
  key = name.lower()
  if key not in RECIPES:
    raise ValueError(f"unknown recipe name {name!r}; expected one of {RECIPES}")
  return key


def param_format(name: str):
  """The params' storage format of a recipe (None for fp32)."""
  return PARAM_FORMATS[_check_name(name)]


def optimizer(name: str, inner: optax.GradientTransformation, *, loss_scale=_NO_LOSS_SCALE,
              axis_name=None, collections=None) -> optax.GradientTransformation:
  """The optax transformation for recipe ``name`` wrapped around ``inner``.

  Args:
    name: ``"fp32"``, ``"dfp16"``, ``"hbfp8"``, ``"hbfp12"``, ``"fp16"`` or ``"bf16"``.
    inner: the optimizer proper (clipping, adamw, schedules...); it sees float32 gradients and
      float32 master weights.
    loss_scale: override the recipe's loss scaling: a ``jdfp`` loss scale (e.g.
      ``NoOpLossScale()`` to only skip non-finite steps, ``StaticLossScale(8.)``) or None for no
      loss-scaling wrapper at all. Default: ``DynamicLossScale()`` for fp16, none otherwise.
    axis_name: ``pmap``/``shard_map`` axis name(s) for the loss scale's finite check.
    collections: top-level variable collections overwritten by their "gradient" instead of trained,
      e.g. ``("dfp",)`` for a model from `jdfp.quantize` (see `jdfp.overwrite_state`); the params
      and grads are then ``{"params": ..., "dfp": ...}``. None: the params are trained as given.

  Returns:
    An optax transformation. With loss scaling the loss must be multiplied by
    ``jdfp.current_loss_scale(opt_state)`` before differentiation.
  """
  key = _check_name(name)
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"inner must be an optax.GradientTransformation, got {type(inner).__name__}")
  if loss_scale is _NO_LOSS_SCALE:
    loss_scale = ls_lib.DynamicLossScale() if key == "fp16" else None
  elif loss_scale is not None:
    ls_lib.check_loss_scale(loss_scale)
  if loss_scale is None and axis_name is not None:
    raise ValueError("axis_name is only used with loss scaling; pass loss_scale=... as well")

  tx = inner if key == "fp32" else master_weights(inner, PARAM_FORMATS[key])
  if loss_scale is not None:
    # Outermost, so that a non-finite step never reaches the masters or inner's state.
    tx = loss_scaled(tx, loss_scale, axis_name=axis_name)
  if collections is not None:
    tx = overwrite_state(tx, collections)
  return tx


def optimizer_params(name: str, params):
  """``params`` stored as recipe ``name`` keeps them (float16 for fp16, on the DFP grid for
  dfp16, ...); call before ``tx.init``."""
  return cast_params(params, PARAM_FORMATS[_check_name(name)])
