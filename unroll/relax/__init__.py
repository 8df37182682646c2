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
from unroll.relax.tost import TOST_RELAXATIONS, NormalizedMemberships, ProjectionBias, ReciprocalGain

# ToST's relaxations live in their own module; registered here so that recipes can name them
RELAXATIONS.update({cls.name: cls for cls in TOST_RELAXATIONS})

__all__ = [
    "RELAXATIONS",
    "CompleteSubspaces",
    "Learnable",
    "Neumann",
    "NormalizedMemberships",
    "PreNorm",
    "ProjectionBias",
    "ReciprocalGain",
    "Relaxation",
    "Residual",
    "SoftmaxSimilarity",
    "UntieOutput",
    "apply_all",
]
