"""The optax integration: FP32 master weights, loss scales and the `loss_scaled` wrapper, the
`overwrite_state` wrapper for the "dfp" collection, and each recipe's optimizer. Every transform is
a factory returning an `optax.GradientTransformation` with a NamedTuple state."""
