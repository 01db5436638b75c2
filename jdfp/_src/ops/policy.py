"""`Policy`: which format and rounding each GEMM role of training uses, and on which backend.

Three GEMMs run per dot product in training (docs/design.md §1): the forward ``y = x . w``, backward-data
``dx = dy . w^T`` ("dlhs") and weight-gradient ``dw = x^T . dy`` ("drhs"). The forward quantizes both
operands; the backward reuses the forward's int16 operands (kept as residuals) and quantizes the
incoming gradient ``dy``, optionally with a different format per backward GEMM (as AQT's
fwd/dlhs/drhs split).

Block formats (per row, 1-D blocks, tiles) are read on each GEMM operand's ``[batch, free,
contraction]`` view: ``axis=-1`` means "along the contraction axis", ``block=(r, c)`` tiles
(free, contraction).
"""

from __future__ import annotations

import dataclasses

import jax

from jdfp._src.ffi.library import ISA_NAMES
from jdfp._src.numerics import formats
from jdfp._src.numerics.formats import BF16, BFP, DFP, FP16, Format

BACKENDS = ("auto", "ffi", "reference")
SCALINGS = ("current", "delayed")


@dataclasses.dataclass(frozen=True)
class Policy:
  """Per-role formats and rounding for jdfp's dot_general / einsum / conv_general_dilated.

  Args:
    lhs: format of the left operand (activations) in the forward GEMM.
    rhs: format of the right operand (weights) in the forward GEMM.
    grad: format of the output gradient in both backward GEMMs.
    dlhs_grad, drhs_grad: optional overrides of ``grad`` for backward-data / weight-gradient.
    fwd_rounding: rounding of the forward operands (the paper: nearest).
    grad_rounding: rounding of output gradients. ``Policy()`` defaults to ``"nearest"`` so the ops
      stay drop-in without a key; the ready-made recipes (`jdfp.policies`) use ``"stochastic"``,
      which needs ``key=`` (the Flax wrapper draws it from its RNG stream).
    scaling: ``"current"``: each tensor's exponent from its own max in this step (the paper);
      ``"delayed"``: from the largest of the last ``history_length`` maxima (beyond the paper; the op
      then takes ``scale_state=`` and returns ``(out, new_state)``, see `jdfp.init_scale_state`).
    history_length: length of the amax history for delayed scaling.
    backend: ``"auto"`` (the FFI kernel on CPU; elsewhere the reference path with a one-time
      warning), ``"ffi"`` (the kernel, error if unavailable) or ``"reference"`` (pure JAX, bit-identical).
    isa: SIMD path of the kernel: ``"auto"`` or one of `jdfp.kernels.available_isas()`.
    axis_name: data-parallel axis (inside `pmap` / `shard_map`) over which replicas share every
      operand's exponents (a `pmax` of the block max): the forward then equals single-device
      execution on the global batch bit for bit, and exponent state is identical on every replica.
      None (default): each replica takes exponents from its own shard. `jdfp.parallel` recipes set it.
    float_residuals: operands (``"lhs"``, ``"rhs"``) whose backward GEMM re-reads the float input
      instead of keeping the forward's int16 copy: it is quantized again with the forward's
      exponent (inside the kernel's packing for dot products), so gradients are bit-identical. Use it
      for operands that stay in memory anyway (the input batch; FP32 weights/master params): their
      int16 copies then cost nothing between forward and backward. For activations computed inside
      the step keep the default (their int16 copy is half of what a float residual holds).
      Needs deterministic forward rounding (``"nearest"`` or ``"biased"``) and current scaling.
      (Block-format convolutions keep their input rather than its patch matrix without being asked
      where the input is the smaller residual and the forward rounding is deterministic.)
  """

  # 14 effective bits (Intel's DFP16 setting): int32 chains of 32 products. DFP(16) is exact too but
  # allows chains of only 2, which makes the AVX-512 / AVX2 kernels ~3x slower (on AMX-INT8 tiles
  # every bit width runs alike).
  lhs: Format = DFP(14)
  rhs: Format = DFP(14)
  grad: Format = DFP(14)
  dlhs_grad: Format | None = None
  drhs_grad: Format | None = None
  fwd_rounding: str = "nearest"
  grad_rounding: str = "nearest"
  scaling: str = "current"
  history_length: int = 16
  backend: str = "auto"
  isa: str = "auto"
  axis_name: str | tuple[str, ...] | None = None
  float_residuals: tuple[str, ...] = ()

  def __post_init__(self):
    for name in ("lhs", "rhs", "grad"):
      formats.check_format(getattr(self, name), name)
    for name in ("dlhs_grad", "drhs_grad"):
      if getattr(self, name) is not None:
        formats.check_format(getattr(self, name), name)
    for name in ("fwd_rounding", "grad_rounding"):
      if getattr(self, name) not in formats.ROUNDING_MODES:
        raise ValueError(f"{name} must be one of {formats.ROUNDING_MODES}, got {getattr(self, name)!r}")
    if self.scaling not in SCALINGS:
      raise ValueError(f"scaling must be one of {SCALINGS}, got {self.scaling!r} "
                       "(delayed: exponents from a history of maxima, see jdfp.init_scale_state)")
    if isinstance(self.history_length, bool) or not isinstance(self.history_length, int) or self.history_length < 1:
      raise ValueError(f"history_length must be an int >= 1, got {self.history_length!r}")
    if self.backend not in BACKENDS:
      raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
    fr = self.float_residuals
    if isinstance(fr, str) or not isinstance(fr, (tuple, list)) or any(r not in ("lhs", "rhs") for r in fr):
      raise ValueError(f"float_residuals must be a tuple of 'lhs' and/or 'rhs', got {fr!r}")
    object.__setattr__(self, "float_residuals", tuple(sorted(set(fr))))  # hashable, canonical
    if fr and self.fwd_rounding == "stochastic":
      raise ValueError("float_residuals needs deterministic forward rounding ('nearest' or 'biased'): a "
                       "stochastic re-quantization in the backward would not match the forward's operand")
    if fr and self.scaling != "current":
      raise ValueError("float_residuals is supported with scaling='current' only")
    if self.isa not in ISA_NAMES:
      raise ValueError(f"isa must be one of {ISA_NAMES} (available here: jdfp.kernels.available_isas()), "
                       f"got {self.isa!r}")
    ax = self.axis_name
    if not (ax is None or isinstance(ax, str) or
            (isinstance(ax, (tuple, list)) and ax and all(isinstance(a, str) for a in ax))):
      raise ValueError(f"axis_name must be None, a mapped axis name (str) or a tuple of names, got {ax!r}")
    if isinstance(ax, list):
      object.__setattr__(self, "axis_name", tuple(ax))  # hashable
    float_ops = [f for f in (self.lhs, self.rhs) if not f.is_integer]
    if float_ops and len(float_ops) != 2:
      raise ValueError(f"lhs and rhs must both be integer formats or both FP16/BF16, got {self.lhs!r}, {self.rhs!r}")

  @property
  def dlhs(self) -> Format:
    return self.dlhs_grad or self.grad

  @property
  def drhs(self) -> Format:
    return self.drhs_grad or self.grad

  @property
  def is_float(self) -> bool:
    return not self.lhs.is_integer

  @property
  def forward_needs_key(self) -> bool:
    """The forward rounds an integer operand stochastically (so it needs a PRNG key)."""
    return self.fwd_rounding == "stochastic" and not self.is_float

  @property
  def backward_needs_key(self) -> bool:
    """The backward rounds an integer output gradient stochastically (so it needs a PRNG key)."""
    return self.grad_rounding == "stochastic" and (self.dlhs.is_integer or self.drhs.is_integer)

  @property
  def needs_key(self) -> bool:
    """A training step (forward + backward) with this policy needs a PRNG key."""
    return self.forward_needs_key or self.backward_needs_key

  def replace(self, **changes) -> "Policy":
    return dataclasses.replace(self, **changes)


class policies:  # noqa: N801 - a namespace of ready-made recipes, like optax's aliases
  """Ready-made policies for the three recipes. Each is a function returning a `Policy`."""

  @staticmethod
  def dfp16(bits: int = 14, **kw) -> Policy:
    """DFP16 (Das et al.): int16 storage, 14 effective bits as Intel's GxM (32-long int32 chains)."""
    f = DFP(bits)
    return Policy(lhs=f, rhs=f, grad=f, grad_rounding=kw.pop("grad_rounding", "stochastic"), **kw)

  @staticmethod
  def hbfp(mantissa_bits: int, tile: int = 24, **kw) -> Policy:
    """HBFP (Drumond et al.): BFP tiles (tile x tile) for every GEMM operand, stochastic gradients."""
    f = BFP(mantissa_bits, block=(tile, tile))
    return Policy(lhs=f, rhs=f, grad=f, grad_rounding=kw.pop("grad_rounding", "stochastic"), **kw)

  @staticmethod
  def hbfp8(**kw) -> Policy:
    return policies.hbfp(7, **kw)

  @staticmethod
  def hbfp12(**kw) -> Policy:
    return policies.hbfp(11, **kw)

  @staticmethod
  def fp16(**kw) -> Policy:
    """FP16 mixed precision (Micikevicius et al.): fp16 operands, fp32 accumulation."""
    return Policy(lhs=FP16, rhs=FP16, grad=FP16, **kw)

  @staticmethod
  def bf16(**kw) -> Policy:
    return Policy(lhs=BF16, rhs=BF16, grad=BF16, **kw)

  @staticmethod
  def get(name: str, **kw) -> Policy:
    table = {"dfp16": policies.dfp16, "hbfp8": policies.hbfp8, "hbfp12": policies.hbfp12,
             "fp16": policies.fp16, "bf16": policies.bf16}
    if name not in table:
      raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(table)}")
    return table[name](**kw)


def check_key(policy: Policy, key) -> None:
  """Trace-time check of an op's ``key``: one PRNG key, required when the forward rounds
  stochastically. (A backward that rounds stochastically checks again when it is traced, so
  inference needs no key.)"""
  if key is not None:
    shape = getattr(key, "shape", None)
    typed = hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if shape is None or (typed and shape != ()) or (not typed and tuple(shape) != (2,)):
      raise ValueError(f"key must be one PRNG key (jax.random.key(0)), got an array of shape {shape}; for a batch "
                       "of keys, jax.vmap the op (one key per call), or split one key per op")
  if policy.forward_needs_key and key is None:
    raise ValueError("this policy rounds the forward operands stochastically: pass key=jax.random.key(...) "
                     "(the Flax wrapper draws it from its 'dfp' RNG stream)")


def check_backward_key(policy: Policy, key) -> None:
  """Called while the backward pass is traced: stochastic gradient rounding needs the op's key."""
  if policy.backward_needs_key and key is None:
    raise ValueError("this policy rounds gradients stochastically (grad_rounding='stochastic'): differentiating "
                     "the op needs key=jax.random.key(...); Flax Linen: apply(..., rngs={'dfp': key}); NNX: "
                     "jdfp.quantize(model, policy, rngs=nnx.Rngs(dfp=0)). Inference (no gradient) needs no key.")
