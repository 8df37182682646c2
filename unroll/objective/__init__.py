"""Objectives: weighted sums of terms, each term carrying its value, its derivative and its math.

    >>> from unroll.objective import Compression, L1
    >>> f = Compression(eps=0.5) + 0.1 * L1()
"""

from unroll.objective.base import Objective, ParamSpec, Term, Weighted
from unroll.objective.coding_rate import CodingRate
from unroll.objective.compression import Compression
from unroll.objective.custom import Custom
from unroll.objective.denoising import DenoisingScore
from unroll.objective.lasso import Lasso
from unroll.objective.sparsity import L1, NonNegative

__all__ = [
    "CodingRate",
    "Compression",
    "Custom",
    "DenoisingScore",
    "L1",
    "Lasso",
    "NonNegative",
    "Objective",
    "ParamSpec",
    "Term",
    "Weighted",
]
