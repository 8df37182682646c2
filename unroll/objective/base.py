"""What every term provides, and how terms add up to an objective.

A term is plain data (its hyper-parameters) plus four pieces of meaning kept side by side:
``value`` (torch, for measuring and for checking derivatives), ``gradient`` (a sympy expression,
for smooth terms) or ``prox`` (a sympy expression, for non-smooth ones), and ``latex`` (its math).
Objectives are *minimised*; write ``-R`` to maximise the coding rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp
import torch

Binding = tuple[sp.Basic, sp.Basic]


def logdet_spd(A: torch.Tensor) -> torch.Tensor:
    """``log det A`` of symmetric positive-definite matrices (batched), through Cholesky
    (``2 Σ log diag L``), with slogdet where Cholesky fails numerically. ``I + a XᵀX`` is SPD
    for any X, rank-deficient included, so this stays finite for tiny coding-rate eps."""
    L, info = torch.linalg.cholesky_ex(A)
    chol = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    if bool((info == 0).all()):
        return chol
    return torch.where(info == 0, chol, torch.linalg.slogdet(A)[1])


@dataclass(frozen=True)
class ParamSpec:
    """A learnable matrix a term (or a relaxation) needs; ``name`` is its symbol's name.

    Per-head parameters (``U_k``) are stored as (K, rows, cols) tensors; column vectors as (rows,).
    ``init`` is ``("uniform", fan_in)`` for U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as in
    ``torch.nn.Linear``, ``("kaiming", fan_in)`` for U(-sqrt(6/fan_in), sqrt(6/fan_in)),
    ``("ones",)`` or ``("zeros",)``.
    """

    name: str
    rows: sp.Expr
    cols: sp.Expr
    init: tuple = ("uniform", None)
    note: str = ""

    @property
    def symbol(self) -> sp.MatrixSymbol:
        return sp.MatrixSymbol(self.name, self.rows, self.cols)

    @property
    def is_vector(self) -> bool:
        """Declared as a column (``cols`` is the literal 1), as opposed to a matrix whose
        column count happens to evaluate to 1 (a head dimension p = 1)."""
        return self.cols == 1

    @property
    def per_head(self) -> bool:
        return self.name.endswith("_k")

    @property
    def attr(self) -> str:
        """Attribute name in the lowered module (``U_k`` -> ``U``)."""
        return self.name[:-2] if self.per_head else self.name


@dataclass(frozen=True)
class Gradient:
    """``expr`` with its intermediate ``where`` bindings, plus what it needs to be computed."""

    expr: sp.MatrixExpr
    where: tuple[Binding, ...] = ()
    params: tuple[ParamSpec, ...] = ()
    constants: dict = field(default_factory=dict)


class Term:
    """Base of all terms: arithmetic into :class:`Objective`, and the shared defaults."""

    label: str = "f"
    smooth: bool = True
    #: terms like the LASSO data fit act on a latent code A rather than on Z itself
    codes: bool = False

    def latex(self) -> str:  # pragma: no cover - every term overrides it
        raise NotImplementedError

    def constants(self) -> dict[str, float]:
        return {}

    def gradient(self, X: sp.MatrixExpr) -> Gradient:
        raise TypeError(f"{self.label} is not smooth: it has a proximal operator, not a gradient")

    def prox(self, V: sp.MatrixExpr, step: sp.Expr) -> sp.MatrixExpr:
        raise TypeError(f"{self.label} is smooth: take a gradient step on it")

    def _as_objective(self) -> Objective:
        return Objective((Weighted(sp.Integer(1), self),))

    def __add__(self, other):
        return self._as_objective() + other

    def __radd__(self, other):
        return self._as_objective().__radd__(other)

    def __sub__(self, other):
        return self._as_objective() - other

    def __neg__(self):
        return -self._as_objective()

    def __mul__(self, scalar):
        return self._as_objective() * scalar

    __rmul__ = __mul__


@dataclass(frozen=True)
class Weighted:
    weight: sp.Expr
    term: Term


@dataclass(frozen=True)
class Objective:
    r"""``f = \sum_i w_i f_i``, to be minimised."""

    parts: tuple[Weighted, ...]

    def __add__(self, other) -> Objective:
        if isinstance(other, Term):
            other = other._as_objective()
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective(self.parts + other.parts)

    def __radd__(self, other) -> Objective:
        if other == 0:  # so that sum([...]) works
            return self
        return self + other

    def __sub__(self, other) -> Objective:
        return self + (-other)

    def __neg__(self) -> Objective:
        return self * -1

    def __mul__(self, scalar) -> Objective:
        if not isinstance(scalar, (int, float, sp.Expr)):
            return NotImplemented
        s = sp.nsimplify(scalar) if isinstance(scalar, float) else sp.sympify(scalar)
        return Objective(tuple(Weighted(s * w.weight, w.term) for w in self.parts))

    __rmul__ = __mul__

    @property
    def terms(self) -> tuple[Term, ...]:
        return tuple(w.term for w in self.parts)

    def latex(self) -> str:
        out = ""
        for i, w in enumerate(self.parts):
            coeff = "" if w.weight == 1 else ("-" if w.weight == -1 else sp.latex(w.weight) + r"\,")
            sign = "" if i == 0 or coeff.startswith("-") else " + "
            out += sign + coeff + w.term.latex()
        return out

    def value(self, Z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample value, ``Z`` of shape (B, d, N)."""
        return sum(float(w.weight) * w.term.value(Z, params) for w in self.parts)
