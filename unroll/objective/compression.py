r"""Compression of the tokens against K learnable subspaces, the term attention descends.

.. math::  R^c(Z \mid U; \epsilon) = \tfrac12 \sum_{k=1}^K \log\det(I_N + \beta W_k^T W_k),
           \quad W_k = U_k^T Z, \quad \beta = \frac{p}{N \epsilon^2}

.. math::  \nabla_Z R^c = \beta \sum_{k=1}^K U_k W_k (I_N + \beta W_k^T W_k)^{-1}

``U_k`` (d x p) are the subspace bases, one per head; they are what the network learns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import Field

import sympy as sp
import torch

from unroll.expr.nodes import HeadSum
from unroll.expr.symbols import N, d, p
from unroll.objective.base import Gradient, logdet_gram, ParamSpec, Term

beta = sp.Symbol("beta", positive=True)
SUBSPACES = ParamSpec("U_k", d, p, ("uniform", d), "subspace bases (the attention's q = k = v projection)")


#: the name of the per-head projection of the tokens, which relaxations rewrite
PROJECTION = "W_k"


def projected(X: sp.MatrixExpr) -> sp.MatrixSymbol:
    """The per-head projection ``W_k = U_k^T X`` of the tokens (named so that it prints short)."""
    return sp.MatrixSymbol(PROJECTION, p, X.shape[1])


@dataclass(frozen=True, eq=False)
class Compression(Term):
    eps: Annotated[float, Field(gt=0)] = 0.5
    label: ClassVar[str] = "R^c"

    def latex(self) -> str:
        return r"R^{c}(Z \mid U;\epsilon)"

    def constants(self) -> dict[str, float]:
        return {"epsilon": self.eps}

    def gradient(self, X: sp.MatrixExpr) -> Gradient:
        U, W = SUBSPACES.symbol, projected(X)
        gram = sp.Identity(X.shape[1]) + beta * W.T * W
        expr = beta * HeadSum(U * W * sp.Inverse(gram))
        beta_value = p / (N * sp.Symbol("epsilon", positive=True) ** 2)
        return Gradient(expr, where=((beta, beta_value), (W, U.T * X)), params=(SUBSPACES,))

    def value(self, Z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per sample, ``Z`` of shape (B, d, N); ``params["U"]`` of shape (K, d, p)."""
        U = params[SUBSPACES.attr]
        n, dim_head = Z.shape[-1], U.shape[-1]
        b = dim_head / (n * self.eps**2)
        W = U.mT.unsqueeze(0) @ Z.unsqueeze(1)  # (B, K, p, N)
        return 0.5 * logdet_gram(W, b).sum(-1)  # p x p determinants once N > p
