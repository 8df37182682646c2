r"""Tokens on the unit sphere: the indicator of ``‖z_j‖₂ = 1`` for every token (column) j.

.. math::  g(Z) = \sum_j \iota_{\{\|z\|_2 = 1\}}(z_j)

.. math::  \operatorname{prox}_{t g}(V)_{:,j} = \frac{v_j}{\max(\|v_j\|_2, \varepsilon)}

the projection of each token onto the sphere: the nearest unit vector to ``v_j`` is ``v_j /
‖v_j‖`` whatever the step t. The sphere is not convex, so this is a projection (a set-valued
one at 0, where every unit vector is nearest); at a zero token the floored norm
(ε = :data:`~unroll.expr.vocabulary.NORM_FLOOR`) gives 0, finite, with a finite gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import sympy as sp
import torch

from unroll.expr.vocabulary import column_norms, divide
from unroll.objective.base import Term


@dataclass(frozen=True, eq=False)
class UnitNorm(Term):
    """The indicator of unit-norm tokens: 0 where every column has norm 1, +inf elsewhere."""

    label: ClassVar[str] = "unit_norm"
    smooth: ClassVar[bool] = False
    convex: ClassVar[bool] = False
    #: 0 on every output of its prox (but zero tokens): nothing to measure after a step on it
    measured: ClassVar[bool] = False

    def latex(self) -> str:
        return r"\textstyle\sum_j \iota_{\|z_j\|_2 = 1}(Z)"

    def prox(self, V: sp.MatrixExpr, step: sp.Expr) -> sp.MatrixExpr:
        return divide(V, column_norms(V))

    def value(self, Z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per sample; a norm counts as 1 to within rounding (100 ulps)."""
        off = (torch.linalg.vector_norm(Z, dim=1) - 1).abs() > 100 * torch.finfo(Z.dtype).eps
        inf = torch.tensor(float("inf"), dtype=Z.dtype, device=Z.device)
        return torch.where(off.any(-1), inf, torch.zeros_like(inf))
