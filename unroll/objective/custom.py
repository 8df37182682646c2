r"""The escape hatch: any smooth term given as a torch function, differentiated by autograd.

``fn`` maps one sample's tokens, as rows (N x d), to a scalar; the compiler takes
``torch.func.grad`` of it (vectorised over the batch with ``torch.func.vmap``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp
import torch

from unroll.expr.nodes import SmoothGrad
from unroll.objective.base import Gradient, Term


@dataclass(frozen=True, eq=False)
class Custom(Term):
    name: str = "f"
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    tex: str | None = None

    @property
    def label(self) -> str:  # type: ignore[override]
        return self.name

    def latex(self) -> str:
        return self.tex or r"\operatorname{%s}(Z)" % self.name

    def gradient(self, X: sp.MatrixExpr) -> Gradient:
        return Gradient(SmoothGrad(X, self.name))

    def row_grad(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Per-sample gradient on a batch of rows (B, N, d)."""
        return torch.func.vmap(torch.func.grad(self.fn))

    def value(self, Z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.vmap(self.fn)(Z.mT)
