"""Rules (which modules run in which precision) and the report of what `jdfp.quantize` did."""

from __future__ import annotations

import dataclasses
import re
import threading
import warnings
from typing import Sequence

from jdfp._src.ops.policy import Policy

OP_KINDS = ("dot_general", "einsum", "conv", "conv_transpose")


@dataclasses.dataclass(frozen=True)
class Rule:
  """Selects modules by path; the first rule whose ``pattern`` matches wins.

  Args:
    pattern: a regular expression matched with `re.fullmatch` against the module path, the names
      from the root joined by "/" (Linen: ``"Block_0/Dense_1"``; NNX: attribute names, e.g.
      ``"layers/0/linear"``; the root module itself is ``""``). ``".*"`` matches everything.
    policy: the `jdfp.Policy` for the matched modules' GEMMs, or None to keep them in FP32.
    ops: optionally restrict the rule to op kinds (``"dot_general"``, ``"einsum"``, ``"conv"``,
      ``"conv_transpose"``); None means all.
  """

  pattern: str
  policy: Policy | None = None
  ops: tuple[str, ...] | None = None

  def __post_init__(self):
    if not isinstance(self.pattern, str):
      raise TypeError(f"Rule.pattern must be a regular expression string, got {self.pattern!r}")
    re.compile(self.pattern)
    if self.policy is not None and not isinstance(self.policy, Policy):
      raise TypeError(f"Rule.policy must be a jdfp.Policy or None (FP32), got {type(self.policy).__name__}")
    if self.ops is not None:
      ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
      bad = [o for o in ops if o not in OP_KINDS]
      if bad:
        raise ValueError(f"Rule.ops: unknown op kinds {bad}; expected some of {OP_KINDS}")
      object.__setattr__(self, "ops", ops)

  def matches(self, path: str, kind: str) -> bool:
    return re.fullmatch(self.pattern, path) is not None and (self.ops is None or kind in self.ops)


@dataclasses.dataclass
class Site:
  """One quantizable op found while tracing."""

  path: str        # module path
  name: str        # state variable name inside the module ("dot_general", "conv_1", ...)
  kind: str        # op kind
  policy: Policy | None
  rule: int | None  # index of the matching rule (None: the default policy / FP32 default)
  stateful: bool   # whether it has a state variable

  @property
  def precision(self) -> str:
    return "fp32" if self.policy is None else _policy_name(self.policy)


def _policy_name(p: Policy) -> str:
  return f"{p.lhs!r}/{p.rhs!r}/{p.grad!r}"


class QuantizeReport:
  """What `jdfp.quantize` did: the ops found per module path, and how many ops each rule matched.

  Filled while the quantized model is traced (init / apply); ``str(report)`` prints a table.
  """

  def __init__(self, rules: Sequence[Rule]):
    self.rules = tuple(rules)
    self._lock = threading.Lock()
    self.sites: dict[tuple[str, str], Site] = {}
    self.rule_hits = [0] * len(self.rules)
    self._warned: set[int] = set()
    self.traces = 0

  def record(self, site: Site):
    with self._lock:
      key = (site.path, site.name)
      if key not in self.sites:
        self.sites[key] = site
        if site.rule is not None:
          self.rule_hits[site.rule] += 1

  @property
  def unmatched_rules(self) -> tuple[Rule, ...]:
    """Rules that matched no op in any trace so far."""
    return tuple(r for r, n in zip(self.rules, self.rule_hits) if n == 0)

  def warn_unmatched(self):
    for i, (r, n) in enumerate(zip(self.rules, self.rule_hits)):
      if n == 0 and i not in self._warned:
        self._warned.add(i)
        warnings.warn(f"jdfp.quantize: rule {i} {r.pattern!r} matched no op (module paths seen: "
                      f"{sorted({s.path for s in self.sites.values()})})", UserWarning, stacklevel=4)

  @property
  def quantized(self) -> tuple[Site, ...]:
    return tuple(s for s in self.sites.values() if s.policy is not None)

  @property
  def fp32(self) -> tuple[Site, ...]:
    return tuple(s for s in self.sites.values() if s.policy is None)

  def __str__(self) -> str:
    lines = [f"{'module path':<36} {'op':<18} precision"]
    for s in self.sites.values():
      rule = "" if s.rule is None else f"   (rule {s.rule})"
      lines.append(f"{s.path or '<root>':<36} {s.name:<18} {s.precision}{rule}")
    for i, (r, n) in enumerate(zip(self.rules, self.rule_hits)):
      lines.append(f"rule {i}: {r.pattern!r} -> {'fp32' if r.policy is None else _policy_name(r.policy)}: "
                   f"{n} op(s){'   <- matched nothing' if n == 0 else ''}")
    return "\n".join(lines)

  __repr__ = __str__


def normalize_rules(policy, rules) -> tuple[Rule, ...]:
  if rules is None:
    rules = ()
  if isinstance(rules, Rule):
    rules = (rules,)
  rules = tuple(rules)
  for r in rules:
    if not isinstance(r, Rule):
      raise TypeError(f"rules must be jdfp.Rule objects, got {type(r).__name__}")
  if policy is not None and not isinstance(policy, Policy):
    raise TypeError(f"policy must be a jdfp.Policy or None, got {type(policy).__name__}")
  return rules


def resolve(rules, default: Policy | None, path: str, kind: str):
  """(policy, rule index) for an op of ``kind`` in the module at ``path``: first match wins."""
  for i, r in enumerate(rules):
    if r.matches(path, kind):
      return r.policy, i
  return default, None
