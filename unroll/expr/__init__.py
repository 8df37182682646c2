"""The algebra of update steps: sympy matrix expressions in the papers' column convention.

Tokens are the columns of ``Z`` (d x N). Symbols whose name ends in ``_k`` belong to head k and
only appear under a :class:`HeadSum`. :mod:`unroll.expr.vocabulary` is the public vocabulary
for writing a term's proximal operator.
"""

from unroll.expr.nodes import (
    AbsValue,
    Clamp,
    Divide,
    HeadSoftmax,
    HeadSum,
    LayerNorm,
    Norm,
    ReLU,
    Sign,
    SmoothGrad,
    SoftThreshold,
    Softmax,
    is_per_head,
)
from unroll.expr.printing import to_latex, to_text
from unroll.expr.vocabulary import (
    NORM_FLOOR,
    absolute,
    clamp,
    column_norms,
    divide,
    group_norms,
    maximum,
    minimum,
    multiply,
    ones_like,
    relu,
    row_norms,
    sign,
    soft_threshold,
)

__all__ = [
    "AbsValue",
    "Clamp",
    "Divide",
    "HeadSoftmax",
    "HeadSum",
    "LayerNorm",
    "NORM_FLOOR",
    "Norm",
    "ReLU",
    "Sign",
    "SmoothGrad",
    "SoftThreshold",
    "Softmax",
    "absolute",
    "clamp",
    "column_norms",
    "divide",
    "group_norms",
    "is_per_head",
    "maximum",
    "minimum",
    "multiply",
    "ones_like",
    "relu",
    "row_norms",
    "sign",
    "soft_threshold",
    "to_latex",
    "to_text",
]
