"""Data-parallel training: DFP-compressed all-reduce and exponent-synchronised policies.

See `jdfp._src.parallel.collectives` for the algorithm and its error bound.
"""

from jdfp._src.parallel.collectives import allreduce_bits, axis_size, error_bound, pmean, psum
from jdfp._src.parallel.data_parallel import data_parallel

__all__ = ["allreduce_bits", "axis_size", "data_parallel", "error_bound", "pmean", "psum"]
