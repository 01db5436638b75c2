"""Numerics: formats (DFP, BFP, FP16, BF16), quantization and the exact reference GEMM, in pure JAX.

Nothing here knows about the C++ kernels, the ops or Flax/optax: everything else builds on it.
"""
