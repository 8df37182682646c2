"""Matrix-valued operations that sympy lacks, as first-class nodes of update expressions.

Each node knows its shape (so sympy checks products) and how to print itself; the numerical
meaning of each node lives in two independent places, :mod:`unroll.expr.numeric` (numpy,
one sample, for checking) and :mod:`unroll.lower.interpret` (torch, batched, for running).
"""

from __future__ import annotations

import sympy as sp
from sympy import Basic, MatrixExpr
from sympy.core.symbol import Str


def is_per_head(symbol: Basic) -> bool:
    """Symbols of head k are spelled ``X_k`` (``U_k``, ``W_k``, ``O_k``)."""
    return isinstance(symbol, sp.MatrixSymbol) and symbol.name.endswith("_k")


class _Unary(MatrixExpr):
    """A node with one matrix argument whose shape it keeps."""

    def __new__(cls, arg: MatrixExpr, *rest: Basic):
        return Basic.__new__(cls, sp.sympify(arg), *rest)

    @property
    def arg(self) -> MatrixExpr:
        return self.args[0]

    @property
    def shape(self):
        return self.args[0].shape

    def _eval_transpose(self):  # keep sympy from trying to push transposes through us
        return None


class HeadSum(_Unary):
    r"""``\sum_{k=1}^{K} body_k``: the sum over heads of an expression in per-head symbols."""

    def _sympystr(self, printer) -> str:
        return f"Σ_k[{printer._print(self.arg)}]"

    def _latex(self, printer) -> str:
        return r"\sum_{k=1}^{K} %s" % printer._print(self.arg)


class Softmax(_Unary):
    r"""Column-wise softmax: every column of the result sums to one (tokens are columns).

    With tokens as rows this is the usual row-wise softmax of ``X U_k (X U_k)^T``. ``causal``:
    column j is normalised over rows i <= j only (token j sees no later token), the others are 0.
    """

    def __new__(cls, arg: MatrixExpr, causal: bool = False):
        return Basic.__new__(cls, sp.sympify(arg), sp.true if causal else sp.false)

    @property
    def causal(self) -> bool:
        return bool(self.args[1])

    def _sympystr(self, printer) -> str:
        return f"{'causal_' if self.causal else ''}softmax({printer._print(self.arg)})"

    def _latex(self, printer) -> str:
        name = r"\operatorname{softmax}" + (r"_{\mathrm{causal}}" if self.causal else "")
        return r"%s\left(%s\right)" % (name, printer._print(self.arg))


class HeadSoftmax(_Unary):
    r"""``softmax_k(E_k)``: for each token, a softmax over the K heads of the per-head row
    ``E_k`` (1 x N); the result is head k's share. It is only meaningful per head."""

    def _sympystr(self, printer) -> str:
        return f"softmax_k({printer._print(self.arg)})"

    def _latex(self, printer) -> str:
        return r"\operatorname{softmax}_{k}\left(%s\right)" % printer._print(self.arg)


class ReLU(_Unary):
    r"""``max(X, 0)`` entrywise: the projection onto the non-negative orthant."""

    def _sympystr(self, printer) -> str:
        return f"ReLU({printer._print(self.arg)})"

    def _latex(self, printer) -> str:
        return r"\operatorname{ReLU}\left(%s\right)" % printer._print(self.arg)


class SoftThreshold(_Unary):
    r"""``S_t(X) = sign(X) max(|X| - t, 0)`` entrywise: the proximal operator of ``t ||.||_1``."""

    def __new__(cls, arg: MatrixExpr, threshold: sp.Expr):
        return Basic.__new__(cls, sp.sympify(arg), sp.sympify(threshold))

    @property
    def threshold(self) -> sp.Expr:
        return self.args[1]

    def _sympystr(self, printer) -> str:
        return f"S[{printer._print(self.threshold)}]({printer._print(self.arg)})"

    def _latex(self, printer) -> str:
        return r"\mathcal{S}_{%s}\left(%s\right)" % (
            printer._print(self.threshold),
            printer._print(self.arg),
        )


class LayerNorm(_Unary):
    r"""Normalise each column (token) to zero mean and unit variance, then scale and shift:
    ``LN(X)_{:,j} = gamma * (x_j - mean(x_j)) / sqrt(var(x_j) + eps) + b``.

    ``gamma`` and ``b`` are d x 1 matrix symbols; ``eps`` a scalar symbol.
    """

    def __new__(cls, arg: MatrixExpr, weight: sp.MatrixSymbol, bias: sp.MatrixSymbol, eps: sp.Symbol):
        return Basic.__new__(cls, sp.sympify(arg), weight, bias, eps)

    @property
    def weight(self) -> sp.MatrixSymbol:
        return self.args[1]

    @property
    def bias(self) -> sp.MatrixSymbol:
        return self.args[2]

    @property
    def eps(self) -> sp.Symbol:
        return self.args[3]

    def _sympystr(self, printer) -> str:
        return f"LN({printer._print(self.arg)})"

    def _latex(self, printer) -> str:
        return r"\operatorname{LN}\left(%s\right)" % printer._print(self.arg)


class SmoothGrad(_Unary):
    r"""``\nabla f(X)`` for a user term ``f`` known only as a torch function (derived by autograd)."""

    def __new__(cls, arg: MatrixExpr, term: str | Str):
        return Basic.__new__(cls, sp.sympify(arg), term if isinstance(term, Str) else Str(term))

    @property
    def term(self) -> str:
        return self.args[1].name

    def _sympystr(self, printer) -> str:
        return f"∇{self.term}({printer._print(self.arg)})"

    def _latex(self, printer) -> str:
        return r"\nabla %s\left(%s\right)" % (_latex_name(self.term), printer._print(self.arg))


def _latex_name(name: str) -> str:
    return name if len(name) == 1 else r"\operatorname{%s}" % name.replace("_", r"\_")
