r"""A box constraint: every coordinate between two bounds.

.. math::  g(Z) = \iota_{[lo, hi]}(Z) = \begin{cases} 0 & lo \le Z_{ij} \le hi \text{ for all } i, j \\ +\infty & \text{otherwise} \end{cases}

.. math::  \operatorname{prox}_{t g}(V) = \min(\max(V, lo), hi)

the projection onto the box, whatever the step t. A bound of None is absent (``lo = None`` is
``-∞``). Separable and convex: a proximal step with a box and another separable convex term h
takes ``clamp(prox_{t h}(V), lo, hi)``, which is the prox of the sum because each coordinate's
problem is a convex function of one variable minimised over an interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import Field

import sympy as sp
import torch

from unroll.errors import UnrollError
from unroll.expr.vocabulary import clamp
from unroll.objective.base import Term

Bound = Annotated[float | None, Field(ge=-1e6, le=1e6)]


@dataclass(frozen=True, eq=False)
class Box(Term):
    """The indicator of ``lo <= Z_ij <= hi``; a None bound is absent."""

    lo: Bound = 0.0
    hi: Bound = 1.0
    label: ClassVar[str] = "box"
    smooth: ClassVar[bool] = False
    separable: ClassVar[bool] = True
    #: 0 on every output of its prox: nothing to measure after a step on it
    measured: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        if self.lo is not None and self.hi is not None and not self.lo < self.hi:
            raise UnrollError(f"box: lo must be below hi, found lo = {self.lo}, hi = {self.hi}")

    def bounds(self) -> tuple[sp.Expr, sp.Expr]:
        lo = -sp.oo if self.lo is None else sp.Symbol("lo")
        hi = sp.oo if self.hi is None else sp.Symbol("hi")
        return lo, hi

    def constants(self) -> dict[str, float]:
        return {name: value for name, value in (("lo", self.lo), ("hi", self.hi)) if value is not None}

    def latex(self) -> str:
        lo = r"-\infty" if self.lo is None else "lo"
        hi = r"\infty" if self.hi is None else "hi"
        return r"\iota_{[%s, %s]}(Z)" % (lo, hi)

    def prox(self, V: sp.MatrixExpr, step: sp.Expr) -> sp.MatrixExpr:
        return clamp(V, *self.bounds())

    def value(self, Z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        outside = torch.zeros_like(Z, dtype=torch.bool)
        if self.lo is not None:
            outside |= Z < self.lo
        if self.hi is not None:
            outside |= Z > self.hi
        inf = torch.tensor(float("inf"), dtype=Z.dtype, device=Z.device)
        return torch.where(outside.flatten(1).any(-1), inf, torch.zeros_like(inf))
