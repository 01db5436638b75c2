"""Data-parallel training: DFP-compressed all-reduce and exponent-synchronised policies.

See `jdfp._src.parallel` for the algorithm and its error bound.
"""

from jdfp._src.parallel import allreduce_bits, axis_size, data_parallel, error_bound, pmean, psum

__all__ = ["allreduce_bits", "axis_size", "data_parallel", "error_bound", "pmean", "psum"]
