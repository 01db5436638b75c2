"""``master_weights``: an FP32 master copy of low-precision parameters inside the optimizer state.

Why (docs/design.md §4): an update smaller than half a float16 ulp of the weight (1/2048 of it) is rounded
away when applied to a float16 weight, and one below 2**-24 vanishes outright; a speech model lost
80% relative accuracy that way. The same holds for weights kept on a DFP or BFP grid. So the
optimizer updates a float32 copy, and the low-precision parameters are re-derived from it every
step (Das et al.: "master weights are FP32 and are re-quantized every step").

How it plugs into optax: ``master_weights(inner, param_format)`` is the *outermost* transformation.
``inner`` (any optax optimizer: clipping, adamw, schedules, ``inject_hyperparams``...) sees float32
gradients and the float32 masters as ``params``; its updates are applied to the masters in float32;
the updates it returns are ``lowp(new_master) - params`` so that the usual
``optax.apply_updates(params, updates)`` yields the rounded masters.

Exactness of ``optax.apply_updates`` (which computes ``(p + u).astype(p.dtype)``): the updates are
computed in float32 (float64 under ``jax_enable_x64``) from the *current* params. In float32 the
difference ``t - p`` of two float16 values is exact unless ``|p| > 2**13 |t|`` (bfloat16:
``2**16``), and then ``p + (t - p)`` is ``t`` exactly; on DFP/BFP grids it is exact unless the
shared exponent jumps by more than ~8 binades in one step. In the remaining case (a weight that
collapses by a factor > 8192 in one step) the applied value is within ``2**-24 |p|`` of the target
and, because each step's update is recomputed from the current params, the very next step lands
exactly on the target: the error never accumulates. (One platform caveat: XLA on CPU flushes
float32 subnormals, below 2**-126, to zero, so bfloat16 weights that small are not represented.)
The masters are the source of truth; ``master_params(opt_state)`` reads them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jdfp._src.numerics import formats
from jdfp._src.ops import convert
from jdfp._src.optax.overwrite_state import overwrite_state, split_overwrite


class MasterWeightsState(NamedTuple):
  """State of ``master_weights``.

  Attributes:
    master: float32 copies of the params (the source of truth; the params are ``lowp(master)``).
    inner_state: the wrapped optimizer's state (initialized on the masters).
    key: PRNG key for ``rounding="stochastic"`` (None otherwise).
  """

  master: Any
  inner_state: Any
  key: Any = None


def _is_float(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _master_dtype(dtype):
  # float32, or float64 for float64 params (x64 mode): never narrower than the params.
  return jnp.promote_types(dtype, jnp.float32)


def _update_dtype(dtype):
  """Where ``target - params`` is computed: wide enough that ``p + (t - p)`` is exact in practice
  (float64 when enabled makes it exact for every pair of float16 values)."""
  wide = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  return jnp.promote_types(dtype, wide)


def _to_master(p):
  return jnp.asarray(p).astype(_master_dtype(p.dtype)) if _is_float(p) else p


def _fake_quantize(x, fmt, rounding, key):
  """`jdfp._src.numerics.quantize.fake_quantize` of float32 ``x``, converting on the C++ kernel where it applies (the
  per-step re-quantization of every param: in XLA it cost as much as the GEMMs of an HBFP step)."""
  return convert.fake_quantize(x, fmt, rounding=rounding, key=key)


def _round_float(x, fmt: formats.FloatFormat):
  """Round-to-nearest-even into fmt, saturating at its largest finite value: a weight that
  outgrows float16 should stay large and finite, not become Inf (and NaN the next step)."""
  big = float(jnp.finfo(fmt.dtype).max)
  clipped = jnp.where(jnp.isfinite(x), jnp.clip(x, -big, big), x)  # NaN/Inf stay non-finite
  return clipped.astype(fmt.dtype)


def _check_param_format(param_format):
  if param_format is None:
    return None
  return formats.check_format(param_format, "param_format")


def master_weights(inner: optax.GradientTransformation, param_format=None, *,
                   rounding: str = "nearest", key=None) -> optax.GradientTransformationExtraArgs:
  """Keeps float32 master weights in the optimizer state and low-precision params outside.

  Args:
    inner: the optimizer run on the masters (any optax ``GradientTransformation``; may be
      ``optax.inject_hyperparams(...)``, a chain with ``clip_by_global_norm``, ...).
    param_format: how the params are stored:

      - ``jdfp.FP16`` / ``jdfp.BF16``: params are that dtype (round to nearest even, saturating
        at the largest finite value);
      - ``jdfp.DFP(...)`` / ``jdfp.BFP(...)``: params stay float32 but lie on the format's grid
        (the HBFP recipe keeps a wide ``BFP(mantissa_bits=15)`` weight copy);
      - None: no rounding beyond the params' own dtype (plain masters).

      The params' dtype is whatever ``init`` saw (``optax.apply_updates`` keeps it); for FP16/BF16
      cast the params to that dtype before ``init``.
    rounding: rounding of the masters onto a DFP/BFP grid: ``"nearest"`` (default),
      ``"stochastic"`` (needs ``key``) or ``"biased"``. FP16/BF16 support only ``"nearest"``.
    key: PRNG key for stochastic rounding; it is kept (and split every step) in the state.

  Returns:
    An optax ``GradientTransformationExtraArgs`` with state ``MasterWeightsState``.
    ``update(grads, state, params)`` needs ``params``; it returns float32 updates (float64 under
    x64) with ``optax.apply_updates(params, updates) == lowp(new_master)``: see the module
    docstring for the exact guarantee.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"inner must be an optax.GradientTransformation, got {type(inner).__name__}")
  wrapped = split_overwrite(inner)
  if wrapped is not None:  # the overwritten state ("dfp") gets no master copy and no rounding
    tx, collections = wrapped
    return overwrite_state(master_weights(tx, param_format, rounding=rounding, key=key), collections)
  param_format = _check_param_format(param_format)
  if rounding not in formats.ROUNDING_MODES:
    raise ValueError(f"rounding must be one of {formats.ROUNDING_MODES}, got {rounding!r}")
  if rounding != "nearest":
    if param_format is None or isinstance(param_format, formats.FloatFormat):
      raise ValueError(
          f"rounding={rounding!r} needs an integer param_format (DFP or BFP); {param_format!r} "
          "rounds to nearest")
    if rounding == "stochastic" and key is None:
      raise ValueError("rounding='stochastic' needs a PRNG key: pass key=jax.random.key(...)")
  if rounding != "stochastic":
    key = None
  inner = optax.with_extra_args_support(inner)

  def lowp(master, param, leaf_key):
    """The master rounded to param_format, in the param's dtype."""
    if param_format is None:
      return master.astype(param.dtype)
    if isinstance(param_format, formats.FloatFormat):
      return _round_float(master, param_format).astype(param.dtype)
    return _fake_quantize(master.astype(jnp.float32), param_format, rounding, leaf_key).astype(param.dtype)

  def init(params):
    # The masters are copies even where the params are already float32: a state that shared the
    # params' buffers could not be donated together with them (`jit(..., donate_argnums=...)`).
    return MasterWeightsState(
        master=jax.tree.map(lambda p: jnp.array(_to_master(p), copy=True) if _is_float(p) else p, params),
        inner_state=inner.init(jax.tree.map(_to_master, params)),
        key=key,
    )

  def update(grads, state, params=None, **extra_args):
    if params is None:
      raise ValueError("master_weights.update needs params (tx.update(grads, opt_state, params))")
    if not isinstance(state, MasterWeightsState):
      raise TypeError(f"master_weights: state must be a MasterWeightsState, got {type(state).__name__}")
    grads32 = jax.tree.map(_to_master, grads)
    inner_updates, new_inner = inner.update(grads32, state.inner_state, state.master, **extra_args)
    # Accumulate in the masters (the reason they exist): updates far below the params' ulp stick.
    new_master = optax.apply_updates(state.master, inner_updates)

    leaves, treedef = jax.tree.flatten(params)
    new_key = state.key
    if state.key is not None:
      new_key, sub = jax.random.split(state.key)
      leaf_keys = list(jax.random.split(sub, max(len(leaves), 1)))
    else:
      leaf_keys = [None] * len(leaves)
    masters = treedef.flatten_up_to(new_master)

    def leaf_update(p, m, k):
      if not _is_float(p):
        return jnp.zeros_like(p)  # integer leaves are not trained
      t = lowp(m, p, k)
      dt = _update_dtype(p.dtype)
      return t.astype(dt) - jnp.asarray(p).astype(dt)

    updates = treedef.unflatten([leaf_update(p, m, k) for p, m, k in zip(leaves, masters, leaf_keys)])
    return updates, MasterWeightsState(master=new_master, inner_state=new_inner, key=new_key)

  return optax.GradientTransformationExtraArgs(init, update)


def master_weights_state(opt_state) -> MasterWeightsState:
  """The (single) ``MasterWeightsState`` inside an optimizer state, however deeply wrapped."""
  nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MasterWeightsState))
  found = [n for n in nodes if isinstance(n, MasterWeightsState)]
  if len(found) != 1:
    raise ValueError(
        f"expected exactly one jdfp.master_weights state in opt_state, found {len(found)}")
  return found[0]


def master_params(opt_state):
  """The float32 master weights kept in ``opt_state`` (the source of truth for the params)."""
  return master_weights_state(opt_state).master


def cast_params(params, param_format):
  """Params as ``master_weights(..., param_format)`` stores them: float16/bfloat16 leaves for
  FP16/BF16 (call before ``tx.init``), float32 rounded onto the grid for DFP/BFP, unchanged for
  None. Non-float leaves pass through."""
  param_format = _check_param_format(param_format)

  def cast(p):
    if not _is_float(p):
      return p
    if param_format is None:
      return p
    if isinstance(param_format, formats.FloatFormat):
      return _round_float(jnp.asarray(p).astype(jnp.float32), param_format)
    return _fake_quantize(jnp.asarray(p).astype(jnp.float32), param_format, "nearest", None).astype(p.dtype)

  return jax.tree.map(cast, params)

