r"""Group sparsity (the group lasso): whole groups of coordinates of a token switch off together.

Each token (a column, ``rows`` coordinates) is cut into groups of ``group`` consecutive
coordinates, ``z_{j,1}, z_{j,2}, ...``:

.. math::  g(Z) = \lambda \sum_j \sum_g \|z_{j,g}\|_2

.. math::  \operatorname{prox}_{t g}(V)_{j,g} = v_{j,g} \max\Bigl(1 - \frac{t\lambda}{\|v_{j,g}\|_2}, 0\Bigr)

the block soft-threshold: a group whose norm is at most ``tλ`` becomes 0, a larger one shrinks
towards 0 by ``tλ`` in norm. Convex, not separable (a group is coupled). ``group = 1`` is the
l1 norm. The norm is floored (:data:`~unroll.expr.vocabulary.NORM_FLOOR`), so a zero group
gives 0 with a finite gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import Field

import sympy as sp
import torch

from unroll.errors import UnrollError
from unroll.expr.vocabulary import divide, group_norms, multiply, ones_like, relu
from unroll.objective.base import Term

#: named apart from the l1 term's ``lambda``: constants of one step are merged by name
lam_g = sp.Symbol("lambda_g", positive=True)


@dataclass(frozen=True, eq=False)
class GroupSparsity(Term):
    """``λ Σ_j Σ_g ‖z_{j,g}‖₂`` over groups of ``group`` consecutive coordinates of each token."""

    lam: Annotated[float, Field(ge=0, le=1e6)] = 0.1
    group: Annotated[int, Field(ge=1, le=16_384)] = 4
    label: ClassVar[str] = "group_sparsity"
    smooth: ClassVar[bool] = False

    def check(self, sizes: dict[str, int]) -> None:
        """The groups must tile every token: ``group`` divides the width d (and so the m = e d
        coordinates of a dictionary code)."""
        for name in ("d", "m"):
            if name in sizes and sizes[name] % self.group:
                raise UnrollError(
                    f"group_sparsity: groups of {self.group} coordinates do not divide the "
                    f"{'width' if name == 'd' else 'code size'} {name} = {sizes[name]}; "
                    f"choose a group size that divides {sizes[name]}"
                )

    def latex(self) -> str:
        return r"\lambda_g \sum_{j}\sum_{g} \|z_{j,g}\|_2"

    def constants(self) -> dict[str, float]:
        return {"lambda_g": self.lam}

    def prox(self, V: sp.MatrixExpr, step: sp.Expr) -> sp.MatrixExpr:
        shrink = relu(ones_like(V) - divide(step * lam_g, group_norms(V, self.group)))
        return multiply(V, shrink)

    def value(self, Z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per sample, ``Z`` of shape (B, rows, N); λ as the step uses it (learned, in ``params``)
        or as given."""
        lam = float(params.get(lam_g.name, self.lam))
        blocks = Z.unflatten(1, (Z.shape[1] // self.group, self.group))
        return lam * torch.linalg.vector_norm(blocks, dim=2).flatten(1).sum(-1)
