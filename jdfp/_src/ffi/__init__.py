"""The Python side of the C++ kernels: one module per ``xla_ffi/*_ffi.cc`` handler file.

``library`` loads ``libjdfp_ffi.so`` and registers its FFI targets; ``gemm``, ``conv`` and
``quantize`` wrap the handlers of ``gemm_ffi.cc``, ``conv_ffi.cc`` and ``quantize_ffi.cc``.
"""
