r"""Non-smooth terms that make codes sparse, known through their proximal operators.

.. math::  \operatorname{prox}_{t \lambda \|\cdot\|_1}(V) = \mathcal{S}_{t\lambda}(V) = \operatorname{sign}(V)\max(|V| - t\lambda, 0)

.. math::  \operatorname{prox}_{\iota_{\geq 0}}(V) = \max(V, 0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import Field

import sympy as sp
import torch

from unroll.expr.nodes import ReLU, SoftThreshold
from unroll.objective.base import Term

lam = sp.Symbol("lambda", positive=True)


@dataclass(frozen=True, eq=False)
class L1(Term):
    """``lambda ||Z||_1``."""

    lam: Annotated[float, Field(ge=0)] = 0.1
    label: ClassVar[str] = "l1"
    smooth: ClassVar[bool] = False
    separable: ClassVar[bool] = True

    def latex(self) -> str:
        return r"\lambda \|Z\|_1"

    def constants(self) -> dict[str, float]:
        return {lam.name: self.lam}

    def prox(self, V: sp.MatrixExpr, step: sp.Expr) -> sp.MatrixExpr:
        return SoftThreshold(V, step * lam)

    def threshold(self, values: dict) -> float:
        """λ as the step uses it: learned (``values[lambda]``) or as given."""
        return float(values.get(lam.name, self.lam))

    def value(self, Z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.threshold(params) * Z.abs().flatten(1).sum(-1)


@dataclass(frozen=True, eq=False)
class NonNegative(Term):
    """The indicator of the non-negative orthant: 0 where ``Z >= 0``, +inf elsewhere."""

    label: ClassVar[str] = "nonneg"
    smooth: ClassVar[bool] = False
    #: 0 at every output of its prox: the fraction of zeros says more
    measured: ClassVar[bool] = False
    separable: ClassVar[bool] = True

    def bounds(self) -> tuple[sp.Expr, sp.Expr]:
        return sp.Integer(0), sp.oo

    def latex(self) -> str:
        return r"\iota_{\geq 0}(Z)"

    def prox(self, V: sp.MatrixExpr, step: sp.Expr) -> sp.MatrixExpr:
        return ReLU(V)

    def value(self, Z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        inf = torch.tensor(float("inf"), dtype=Z.dtype, device=Z.device)
        return torch.where((Z < 0).flatten(1).any(-1), inf, torch.zeros_like(inf))
