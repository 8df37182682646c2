r"""The coding rate of the tokens, the expansion term of rate reduction.

.. math::  R(Z; \epsilon) = \tfrac12 \log\det(I_N + \alpha Z^T Z), \quad \alpha = \frac{d}{N \epsilon^2}

.. math::  \nabla_Z R = \alpha Z (I_N + \alpha Z^T Z)^{-1}

(sympy cannot differentiate log-determinants of matrix symbols, so the gradient is written here
and checked against autograd in the tests.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import Field

import sympy as sp
import torch

from unroll.expr.symbols import N, d
from unroll.objective.base import Gradient, logdet_gram, Term

alpha = sp.Symbol("alpha", positive=True)


@dataclass(frozen=True, eq=False)
class CodingRate(Term):
    eps: Annotated[float, Field(gt=0)] = 0.5
    label: ClassVar[str] = "R"

    def latex(self) -> str:
        return r"R(Z;\epsilon)"

    def constants(self) -> dict[str, float]:
        return {"epsilon": self.eps}

    def alpha_value(self) -> sp.Expr:
        return d / (N * sp.Symbol("epsilon", positive=True) ** 2)

    def gradient(self, X: sp.MatrixExpr) -> Gradient:
        gram = sp.Identity(X.shape[1]) + alpha * X.T * X
        return Gradient(alpha * X * sp.Inverse(gram), where=((alpha, self.alpha_value()),))

    def value(self, Z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per sample, ``Z`` of shape (B, d, N)."""
        _, dim, n = Z.shape
        a = dim / (n * self.eps**2)
        return 0.5 * logdet_gram(Z, a)  # d x d determinants once N > d
