"""Differentiable low-precision ops: `dot_general`, `einsum`, `conv_general_dilated`, their `Policy`,
delayed scaling and `explain`.

Layering inside: policy -> backend / layout / convert -> gemm -> vjp (shared custom-VJP pieces) ->
dot_vjp / conv_vjp (the custom VJPs) -> delayed (the delayed-scaling siblings) -> dot / einsum / conv
(the public drop-ins).
"""
