"""The Flax integration: `jdfp.quantize` for Linen and NNX models.

interception (JAX's GEMM functions swapped while a frame is active) <- linen / nnx (the two
providers) ; tracked (ops plus statistics through a gradient tap) <- state (the "dfp" collection);
rules (first-match `Rule`s by module path); telemetry (tables and plots of the state).
"""
