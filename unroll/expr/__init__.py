"""The algebra of update steps: sympy matrix expressions in the papers' column convention.

Tokens are the columns of ``Z`` (d x N). Symbols whose name ends in ``_k`` belong to head k and
only appear under a :class:`HeadSum`.
"""

from unroll.expr.nodes import (
    HeadSoftmax,
    HeadSum,
    LayerNorm,
    ReLU,
    SmoothGrad,
    SoftThreshold,
    Softmax,
    is_per_head,
)
from unroll.expr.printing import to_latex, to_text

__all__ = [
    "HeadSoftmax",
    "HeadSum",
    "LayerNorm",
    "ReLU",
    "SmoothGrad",
    "SoftThreshold",
    "Softmax",
    "is_per_head",
    "to_latex",
    "to_text",
]
