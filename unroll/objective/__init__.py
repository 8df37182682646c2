"""Objectives: weighted sums of terms, each term carrying its value, its derivative and its math.

    >>> from unroll.objective import Compression, L1
    >>> f = Compression(eps=0.5) + 0.1 * L1()
"""

from unroll.objective.base import Objective, ParamSpec, Term, Weighted
from unroll.objective.box import Box
from unroll.objective.class_rate import ClassRate
from unroll.objective.coding_rate import CodingRate
from unroll.objective.compression import Compression
from unroll.objective.custom import Custom, Param
from unroll.objective.denoising import DenoisingScore
from unroll.objective.elastic_net import ElasticNet
from unroll.objective.group_sparsity import GroupSparsity
from unroll.objective.lasso import Lasso
from unroll.objective.sparsity import L1, NonNegative
from unroll.objective.unit_norm import UnitNorm
from unroll.objective.variational import VariationalCompression

__all__ = [
    "Box",
    "ClassRate",
    "CodingRate",
    "Compression",
    "Custom",
    "DenoisingScore",
    "ElasticNet",
    "GroupSparsity",
    "L1",
    "Lasso",
    "NonNegative",
    "Objective",
    "Param",
    "ParamSpec",
    "Term",
    "UnitNorm",
    "VariationalCompression",
    "Weighted",
]
