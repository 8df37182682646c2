r"""The elastic net: an l1 penalty for sparsity plus a ridge penalty that shrinks and stabilises.

.. math::  g(Z) = \lambda_1 \|Z\|_1 + \tfrac12 \lambda_2 \|Z\|_F^2

.. math::  \operatorname{prox}_{t g}(V) = \frac{\mathcal{S}_{t\lambda_1}(V)}{1 + t\lambda_2}

(entrywise, ``t g(x) + ½(x - v)²`` is minimised where ``(1 + tλ₂) x = v - tλ₁ sign(x)``).
Separable and convex, so a proximal step may combine it with a box constraint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import Field

import sympy as sp
import torch

from unroll.expr.vocabulary import soft_threshold
from unroll.objective.base import Term

#: named apart from the l1 term's ``lambda``: constants of one step are merged by name
lam1, lam2 = sp.symbols("lambda_1 lambda_2", positive=True)


@dataclass(frozen=True, eq=False)
class ElasticNet(Term):
    """``λ₁ ‖Z‖₁ + ½ λ₂ ‖Z‖²_F``."""

    l1: Annotated[float, Field(ge=0, le=1e6)] = 0.1
    l2: Annotated[float, Field(ge=0, le=1e6)] = 0.1
    label: ClassVar[str] = "elastic_net"
    smooth: ClassVar[bool] = False
    separable: ClassVar[bool] = True

    def latex(self) -> str:
        return r"\lambda_1 \|Z\|_1 + \tfrac{1}{2}\lambda_2 \|Z\|_F^2"

    def constants(self) -> dict[str, float]:
        return {"lambda_1": self.l1, "lambda_2": self.l2}

    def prox(self, V: sp.MatrixExpr, step: sp.Expr) -> sp.MatrixExpr:
        return soft_threshold(V, step * lam1) / (1 + step * lam2)

    def value(self, Z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per sample; λ₁ and λ₂ as the step uses them (learned, in ``params``) or as given."""
        l1, l2 = (float(params.get(name, given)) for name, given in self.constants().items())
        flat = Z.flatten(1)
        return l1 * flat.abs().sum(-1) + 0.5 * l2 * flat.pow(2).sum(-1)
