r"""The public vocabulary for writing proximal operators: what a term's ``prox(V, step)`` may return.

A non-smooth term (a :class:`~unroll.objective.Term` with ``smooth = False``) gives its proximal
operator as a sympy matrix expression in ``V`` (the point, rows x N, tokens as columns) and the
scalar ``step`` (the step size times the term's weight):

.. math::  \operatorname{prox}_{t g}(V) = \arg\min_X \; t\, g(X) + \tfrac12 \|X - V\|_F^2

Anything built from ``V``, scalars, sympy's matrix algebra (sums, scalar multiples, ``*`` for
matrix products) and the functions below is printed by ``unroll explain``, evaluated by
:mod:`unroll.expr.numeric` and lowered to torch, in both the column and the row layout.

Entrywise (``X`` any matrix expression, ``c``, ``t``, ``lo``, ``hi`` scalars: numbers, sympy
symbols of the term's constants, ``step``; ``±sympy.oo`` means unbounded):

* ``soft_threshold(X, t)``  :math:`\mathcal{S}_t(X) = \operatorname{sign}(X)\max(|X| - t, 0)`
* ``relu(X)``               :math:`\max(X, 0)`
* ``sign(X)``               :math:`\operatorname{sign}(X) \in \{-1, 0, 1\}`
* ``absolute(X)``           :math:`|X|`
* ``maximum(X, c)``         :math:`\max(X, c)`
* ``minimum(X, c)``         :math:`\min(X, c)`
* ``clamp(X, lo, hi)``      :math:`\min(\max(X, lo), hi)`, the projection onto the box [lo, hi]
* ``multiply(X, Y)``        :math:`X \circ Y`, the Hadamard product of two matrices of one shape
* ``divide(X, Y)``          :math:`X \oslash Y`, ``X_ij / Y_ij`` (X may be a scalar c: ``c / Y_ij``)
* ``ones_like(X)``          :math:`\mathbf{1}`, the all-ones matrix of X's shape

Norms, each a matrix of X's shape whose entry (i, j) holds the l2 norm of the row, column or
group that (i, j) belongs to, floored at :data:`NORM_FLOOR` (ε = 1e-12) so that dividing by it
stays finite, with a finite gradient, where a token or group is exactly zero:

* ``column_norms(X)``       :math:`\max(\|X_{:,j}\|_2, ε)`: the norm of each token
* ``row_norms(X)``          :math:`\max(\|X_{i,:}\|_2, ε)`: the norm of each feature over the tokens
* ``group_norms(X, g)``     :math:`\max(\|X_{G(i),j}\|_2, ε)` over the group G(i) of g consecutive
  coordinates of token j holding coordinate i (g must divide the rows)

For example the block soft-threshold, the prox of ``λ Σ_j Σ_g ‖z_{g,j}‖₂``, is

.. math::  V \circ \max(1 - t\lambda \oslash \|V\|_g, 0)

    ``multiply(V, relu(ones_like(V) - divide(step * lam, group_norms(V, g))))``

and the projection of each token onto the unit sphere is ``divide(V, column_norms(V))``
(0 at a zero token).
"""

from __future__ import annotations

import sympy as sp

from unroll.expr.nodes import NORM_FLOOR, AbsValue, Clamp, Divide, Norm, ReLU, Sign, SoftThreshold

__all__ = [
    "NORM_FLOOR",
    "absolute",
    "clamp",
    "column_norms",
    "divide",
    "group_norms",
    "maximum",
    "minimum",
    "multiply",
    "ones_like",
    "relu",
    "row_norms",
    "sign",
    "soft_threshold",
]


def soft_threshold(X: sp.MatrixExpr, t: sp.Expr) -> sp.MatrixExpr:
    r"""``S_t(X) = sign(X) max(|X| - t, 0)``: the prox of ``t ‖·‖₁``."""
    return SoftThreshold(X, t)


def relu(X: sp.MatrixExpr) -> sp.MatrixExpr:
    """``max(X, 0)`` entrywise: the projection onto the non-negative orthant."""
    return ReLU(X)


def sign(X: sp.MatrixExpr) -> sp.MatrixExpr:
    """``sign(X)`` entrywise, in {-1, 0, 1}."""
    return Sign(X)


def absolute(X: sp.MatrixExpr) -> sp.MatrixExpr:
    """``|X|`` entrywise."""
    return AbsValue(X)


def clamp(X: sp.MatrixExpr, lo: sp.Expr | float | None = None, hi: sp.Expr | float | None = None) -> sp.MatrixExpr:
    """``min(max(X, lo), hi)`` entrywise; None (or ``∓sympy.oo``) leaves a side unbounded.

    ``[0, oo)`` is written ``ReLU(X)`` and ``(-oo, oo)`` is X itself: one spelling per map."""
    lo = -sp.oo if lo is None else sp.sympify(lo)
    hi = sp.oo if hi is None else sp.sympify(hi)
    if lo == -sp.oo and hi == sp.oo:
        return X
    if lo == 0 and hi == sp.oo:
        return ReLU(X)
    return Clamp(X, lo, hi)


def maximum(X: sp.MatrixExpr, c: sp.Expr | float) -> sp.MatrixExpr:
    """``max(X, c)`` entrywise, for a scalar c."""
    return clamp(X, c, None)


def minimum(X: sp.MatrixExpr, c: sp.Expr | float) -> sp.MatrixExpr:
    """``min(X, c)`` entrywise, for a scalar c."""
    return clamp(X, None, c)


def multiply(X: sp.MatrixExpr, Y: sp.MatrixExpr) -> sp.MatrixExpr:
    """``X ∘ Y``: the entrywise (Hadamard) product."""
    return sp.HadamardProduct(X, Y)


def ones_like(X: sp.MatrixExpr) -> sp.MatrixExpr:
    """The all-ones matrix of X's shape."""
    return sp.OneMatrix(*X.shape)


def divide(X: sp.MatrixExpr | sp.Expr | float, Y: sp.MatrixExpr) -> sp.MatrixExpr:
    """``X ⊘ Y``: ``X_ij / Y_ij``; a scalar X divides by every entry of Y (``c 1 ⊘ Y``)."""
    X = sp.sympify(X)
    if not getattr(X, "is_Matrix", False):
        return X * Divide(ones_like(Y), Y)
    if X.shape != Y.shape:
        raise sp.ShapeError(f"X ⊘ Y needs one shape, found {X.shape} and {Y.shape}")
    return Divide(X, Y)


def column_norms(X: sp.MatrixExpr) -> sp.MatrixExpr:
    """Entry (i, j): ``max(‖X_{:,j}‖₂, ε)``, the norm of token j."""
    return Norm(X, "columns")


def row_norms(X: sp.MatrixExpr) -> sp.MatrixExpr:
    """Entry (i, j): ``max(‖X_{i,:}‖₂, ε)``, the norm of row i over the tokens."""
    return Norm(X, "rows")


def group_norms(X: sp.MatrixExpr, group: int) -> sp.MatrixExpr:
    """Entry (i, j): ``max(‖X_{G(i),j}‖₂, ε)`` over the ``group`` consecutive coordinates of
    token j that hold coordinate i."""
    return Norm(X, "groups", group)
