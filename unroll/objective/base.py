"""What every term provides, and how terms add up to an objective.

A term is plain data (its hyper-parameters) plus four pieces of meaning kept side by side:
``value`` (torch, for measuring and for checking derivatives), ``gradient`` (a sympy expression,
for smooth terms) or ``prox`` (a sympy expression, for non-smooth ones), and ``latex`` (its math).
Objectives are *minimised*; write ``-R`` to maximise the coding rate.
"""

from __future__ import annotations

import math
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


def logdet_gram(X: torch.Tensor, a: float) -> torch.Tensor:
    r"""``log det(I_N + a XᵀX)`` for ``X`` of shape (..., r, N), on the smaller side.

    Sylvester's determinant identity, ``det(I_N + a XᵀX) = det(I_r + a X Xᵀ)`` (the two products
    have the same nonzero eigenvalues), lets the determinant be taken of an r x r matrix when
    there are more tokens than rows: O(N r²) instead of O(N³) for long sequences."""
    r, n = X.shape[-2], X.shape[-1]
    gram = X @ X.mT if r < n else X.mT @ X
    eye = torch.eye(gram.shape[-1], dtype=X.dtype, device=X.device)
    return logdet_spd(eye + a * gram)


@dataclass(frozen=True)
class ParamSpec:
    """A learnable matrix a term (or a relaxation) needs; ``name`` is its symbol's name.

    Per-head parameters (``U_k``) are stored as (K, rows, cols) tensors; column vectors as (rows,).
    ``init`` is ``("uniform", fan_in)`` for U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as in
    ``torch.nn.Linear``, ``("kaiming", fan_in)`` for U(-sqrt(6/fan_in), sqrt(6/fan_in)),
    ``("ones",)`` or ``("zeros",)``; ``("data",)`` for a constant computed from data, not
    learned (a term's ``fit``, as ReduNet's E and C_k): the lowered step keeps it as a persistent
    buffer, zeros until filled, saved with the model and never trained.
    """

    name: str
    rows: sp.Expr
    cols: sp.Expr
    init: tuple = ("uniform", None)
    note: str = ""
    #: stored as (rows,); by default, when ``cols`` is the literal 1
    vector: bool | None = None

    @property
    def symbol(self) -> sp.MatrixSymbol:
        return sp.MatrixSymbol(self.name, self.rows, self.cols)

    @property
    def is_vector(self) -> bool:
        """Declared as a column (``cols`` is the literal 1), as opposed to a matrix whose
        column count happens to evaluate to 1 (a head dimension p = 1)."""
        return self.cols == 1 if self.vector is None else self.vector

    @property
    def per_head(self) -> bool:
        return self.name.endswith("_k")

    @property
    def from_data(self) -> bool:
        """Computed from data (``init`` ``("data",)``), not learned: a buffer, not a parameter."""
        return self.init[0] == "data"

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
    #: a sum of coordinate-wise functions, ``g(Z) = Σ_ij g_ij(Z_ij)`` (the l1 norm, a box)
    separable: bool = False
    #: convex in Z; with ``separable`` this lets a proximal step combine it with a box constraint
    convex: bool = True
    #: ``unroll measure`` reports the term's value after each step on it (an indicator, 0 on
    #: every output of its own prox, says nothing there)
    measured: bool = True

    def __post_init__(self) -> None:
        """A term made in Python is held to the bounds its fields declare, as a recipe is."""
        from unroll.fields import check_fields  # late: pydantic is not needed to define a term

        check_fields(self, f"term {self.label}")

    def check(self, sizes: dict[str, int]) -> None:
        """Refuse the network's sizes (``d``, ``K``, ``p``, ``m``) if this term cannot work with
        them, with an :class:`~unroll.errors.UnrollError` that says why (a group size that does
        not divide the width). Called once per network, before anything is lowered."""

    def bounds(self) -> tuple[sp.Expr, sp.Expr] | None:
        """``(lo, hi)`` if this term is the indicator of the box ``lo <= Z_ij <= hi`` (``∓oo``:
        unbounded), else None. A proximal step clamps a separable convex term's prox to it."""
        return None

    def latex(self) -> str:  # pragma: no cover - every term overrides it
        raise NotImplementedError

    def constants(self) -> dict[str, float]:
        return {}

    def gradient(self, X: sp.MatrixExpr) -> Gradient:
        raise TypeError(f"{self.label} is not smooth: it has a proximal operator, not a gradient")

    def prox(self, V: sp.MatrixExpr, step: sp.Expr) -> sp.MatrixExpr:
        r"""``prox_{step g}(V) = argmin_X step g(X) + ½‖X - V‖²_F`` for a non-smooth term g: a
        sympy matrix expression of V's shape, written in :mod:`unroll.expr.vocabulary`."""
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
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float, sp.Expr)):
            from unroll.errors import UnrollError

            raise UnrollError(f"a term's weight must be a number, found {type(scalar).__name__}")
        if isinstance(scalar, float) and not math.isfinite(scalar):
            from unroll.errors import UnrollError

            raise UnrollError(f"a term's weight must be a finite number, found {scalar}")
        s = sp.nsimplify(scalar) if isinstance(scalar, float) else sp.sympify(scalar)
        return Objective(tuple(Weighted(s * w.weight, w.term) for w in self.parts))

    __rmul__ = __mul__

    @property
    def terms(self) -> tuple[Term, ...]:
        return tuple(w.term for w in self.parts)

    def text(self) -> str:
        """``R^c - R + 1/10 f``: each term's label with its weight and sign."""
        return objective_text(self.parts)

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


def objective_text(parts: tuple[Weighted, ...] | list[Weighted]) -> str:
    """``R^c - R + 1/10 f``: the weighted labels, a negative weight as a minus sign."""
    out = ""
    for i, w in enumerate(parts):
        weight = sp.sympify(w.weight)
        sign, size = ("-", -weight) if weight.could_extract_minus_sign() else ("+", weight)
        factor = "" if size == 1 else f"{size} "
        if i == 0:
            out = ("-" if sign == "-" else "") + factor + w.term.label
        else:
            out += f" {sign} {factor}{w.term.label}"
    return out
