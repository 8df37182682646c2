r"""The data-fit term of sparse coding against a learnable dictionary D (d x m).

It acts on a latent code ``A`` (m x N) that must explain the tokens ``Z``:

.. math::  f(A; Z) = \tfrac12 \|Z - D A\|_F^2, \qquad \nabla_A f = D^T (D A - Z)

With a square dictionary (m = d) the code can be warm-started at ``A = Z``; an overcomplete one
(m > d) starts from ``A = 0`` and is decoded back to width d after the last iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import Field

import sympy as sp
import torch

from unroll.expr.symbols import d, m
from unroll.objective.base import Gradient, ParamSpec, Term

DICTIONARY = ParamSpec("D", d, m, ("kaiming", m), "sparse-coding dictionary")


@dataclass(frozen=True, eq=False)
class Lasso(Term):
    #: atoms of the dictionary as a multiple of the width (1: square, 4: CRATE-alpha)
    expansion: Annotated[int, Field(ge=1, le=16)] = 1
    label: ClassVar[str] = "lasso"
    codes: ClassVar[bool] = True

    def latex(self) -> str:
        return r"\tfrac{1}{2}\|Z - D A\|_F^2"

    def gradient(self, A: sp.MatrixExpr, data: sp.MatrixExpr) -> Gradient:  # type: ignore[override]
        D = DICTIONARY.symbol
        return Gradient(D.T * (D * A - data), params=(DICTIONARY,))

    def value(self, A: torch.Tensor, params: dict[str, torch.Tensor], data: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Per sample; ``A`` (B, m, N), ``data`` (B, d, N), ``params["D"]`` (d, m)."""
        return 0.5 * (data - params[DICTIONARY.attr] @ A).pow(2).flatten(1).sum(-1)
