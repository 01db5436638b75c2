"""The optimizer side of the ready-made precision recipes (the op side is `jdfp.policies`).

See `jdfp._src.optax.recipes` for what each recipe's optimizer does.
"""

from jdfp._src.optax.recipes import PARAM_FORMATS, RECIPES, optimizer, optimizer_params, param_format

__all__ = ["PARAM_FORMATS", "RECIPES", "optimizer", "optimizer_params", "param_format"]
