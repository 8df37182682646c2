"""Named rewrites of a derived update: the approximations that turn an exact step into a layer.

Each relaxation is plain data with ``apply(update) -> update``; a step lists the ones it wants,
in order, and ``unroll explain`` prints the update after each.
"""

from unroll.relax.rules import (
    RELAXATIONS,
    CompleteSubspaces,
    Learnable,
    Neumann,
    PreNorm,
    Relaxation,
    Residual,
    SoftmaxSimilarity,
    UntieOutput,
    apply_all,
)

__all__ = [
    "RELAXATIONS",
    "CompleteSubspaces",
    "Learnable",
    "Neumann",
    "PreNorm",
    "Relaxation",
    "Residual",
    "SoftmaxSimilarity",
    "UntieOutput",
    "apply_all",
]
