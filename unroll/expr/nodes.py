"""Matrix-valued operations that sympy lacks, as first-class nodes of update expressions.

Each node knows its shape (so sympy checks products) and how to print itself; the numerical
meaning of each node lives in two independent places, :mod:`unroll.expr.numeric` (numpy,
one sample, for checking) and :mod:`unroll.lower.interpret` (torch, batched, for running).
"""

from __future__ import annotations

import sympy as sp
from sympy import Basic, MatrixExpr
from sympy.core.symbol import Str
from sympy.printing.precedence import PRECEDENCE


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


class _Function(_Unary):
    """An entrywise (or per-token) function of one matrix, printed ``name(X)``."""

    text_name: str
    latex_name: str

    def _sympystr(self, printer) -> str:
        return f"{self.text_name}({printer._print(self.arg)})"

    def _latex(self, printer) -> str:
        return r"%s\left(%s\right)" % (self.latex_name, printer._print(self.arg))


class HeadSoftmax(_Function):
    r"""``softmax_k(E_k)``: for each token, a softmax over the K heads of the per-head row
    ``E_k`` (1 x N); the result is head k's share. It is only meaningful per head."""

    text_name = "softmax_k"
    latex_name = r"\operatorname{softmax}_{k}"


class ReLU(_Function):
    r"""``max(X, 0)`` entrywise: the projection onto the non-negative orthant."""

    text_name = "ReLU"
    latex_name = r"\operatorname{ReLU}"


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


class Sign(_Function):
    r"""``sign(X)`` entrywise: -1, 0 or 1 (its derivative is 0 almost everywhere)."""

    text_name = "sign"
    latex_name = r"\operatorname{sign}"


class AbsValue(_Unary):
    r"""``|X|`` entrywise."""

    def _sympystr(self, printer) -> str:
        return f"|{printer._print(self.arg)}|"

    def _latex(self, printer) -> str:
        return r"\left|%s\right|" % printer._print(self.arg)


class Clamp(_Unary):
    r"""``min(max(X, lo), hi)`` entrywise, for scalars ``lo <= hi``; ``lo = -oo`` or ``hi = oo``
    leaves that side unbounded. The projection onto the box ``[lo, hi]`` of every entry."""

    def __new__(cls, arg: MatrixExpr, lo: sp.Expr = -sp.oo, hi: sp.Expr = sp.oo):
        return Basic.__new__(cls, sp.sympify(arg), sp.sympify(lo), sp.sympify(hi))

    @property
    def lo(self) -> sp.Expr:
        return self.args[1]

    @property
    def hi(self) -> sp.Expr:
        return self.args[2]

    def _sympystr(self, printer) -> str:
        x, lo, hi = (printer._print(a) for a in self.args)
        if self.hi == sp.oo:
            return f"max({x}, {lo})"
        if self.lo == -sp.oo:
            return f"min({x}, {hi})"
        return f"clamp({x}, {lo}, {hi})"

    def _latex(self, printer) -> str:
        x, lo, hi = (printer._print(a) for a in self.args)
        if self.hi == sp.oo:
            return r"\max\left(%s, %s\right)" % (x, lo)
        if self.lo == -sp.oo:
            return r"\min\left(%s, %s\right)" % (x, hi)
        return r"\operatorname{clamp}_{[%s, %s]}\left(%s\right)" % (lo, hi, x)


#: the floor of every :class:`Norm`: a norm below it reads as this, so that dividing by a norm
#: stays finite where a token or group is exactly zero (raised, in a precision that cannot hold
#: it, to the smallest normal number of that precision)
NORM_FLOOR = 1e-12

#: what a :class:`Norm` takes the l2 norm over
NORM_KINDS = ("rows", "columns", "groups")


class Norm(_Unary):
    r"""The l2 norm of each row, column (token) or group of X, broadcast back to X's shape.

    ``Norm(X, "columns")_{ij} = max(‖X_{:,j}‖₂, ε)``, ``Norm(X, "rows")_{ij} = max(‖X_{i,:}‖₂, ε)``,
    ``Norm(X, "groups", g)_{ij} = max(‖X_{G(i),j}‖₂, ε)`` where ``G(i)`` is the group of g
    consecutive rows holding row i (coordinates ``g⌊i/g⌋ ... g⌊i/g⌋ + g - 1`` of token j); g must
    divide the rows. ε is :data:`NORM_FLOOR`, so ``X ⊘ Norm(X)`` is 0, not 0/0, at a zero token.
    Having X's shape, the result composes with Hadamard products and :class:`Divide`.
    """

    def __new__(cls, arg: MatrixExpr, kind: str | Str = "columns", group: int | sp.Integer = 1):
        kind = kind if isinstance(kind, Str) else Str(kind)
        if kind.name not in NORM_KINDS:
            raise ValueError(f"a norm is over one of {', '.join(NORM_KINDS)}, not {kind.name!r}")
        group = sp.Integer(group if kind.name == "groups" else 1)
        if group < 1:
            raise ValueError(f"a group has at least one coordinate, found {group}")
        rows = sp.sympify(sp.sympify(arg).shape[0])
        if rows.is_Integer and rows % group:
            raise ValueError(f"groups of {group} do not divide {rows} rows")
        return Basic.__new__(cls, sp.sympify(arg), kind, group)

    @property
    def kind(self) -> str:
        return self.args[1].name

    @property
    def group(self) -> int:
        return int(self.args[2])

    def _subscript(self) -> str:
        return {"rows": "row", "columns": "col"}.get(self.kind, f"g{self.group}")

    def _sympystr(self, printer) -> str:
        return f"‖{printer._print(self.arg)}‖_{self._subscript()}"

    def _latex(self, printer) -> str:
        return r"\left\|%s\right\|_{\mathrm{%s}}" % (printer._print(self.arg), self._subscript())


class Divide(MatrixExpr):
    r"""``X ⊘ Y``: the entrywise quotient ``X_ij / Y_ij`` of two matrices of one shape."""

    def __new__(cls, numerator: MatrixExpr, denominator: MatrixExpr):
        # shapes are checked by `unroll.expr.vocabulary.divide`, not here: rebuilding a tree
        # (xreplace) may put d where m was in a square-dictionary step, where both are one size
        return Basic.__new__(cls, sp.sympify(numerator), sp.sympify(denominator))

    @property
    def shape(self):
        return self.args[0].shape

    def _eval_transpose(self):
        return None

    def _sympystr(self, printer) -> str:
        # bracketed whole, and a sum or product in it too: ⊘ binds tighter than juxtaposition
        return "(%s ⊘ %s)" % tuple(printer.parenthesize(a, PRECEDENCE["Pow"]) for a in self.args)

    def _latex(self, printer) -> str:
        return r"\left(%s \oslash %s\right)" % tuple(printer.parenthesize(a, PRECEDENCE["Pow"]) for a in self.args)


class PrefixSum(_Function):
    r"""Prefix sums over the tokens: ``cumsum(X)_{ij} = \sum_{j' \le j} X_{ij'}`` (tokens are
    columns), so that column j depends on tokens 1..j only: the causal form of a statistic."""

    text_name = "cumsum"
    latex_name = r"\operatorname{cumsum}"


class LeadingColumns(_Unary):
    r"""``X[:, :n]``: the first ``n`` columns of X, for a parameter stored for the longest
    sequence (``block_size`` columns) and read for the ``n = N`` tokens of the input."""

    def __new__(cls, arg: MatrixExpr, count: sp.Expr):
        return Basic.__new__(cls, sp.sympify(arg), sp.sympify(count))

    @property
    def count(self) -> sp.Expr:
        return self.args[1]

    @property
    def shape(self):
        return (self.args[0].shape[0], self.count)

    def _sympystr(self, printer) -> str:
        return f"{printer._print(self.arg)}[:{printer._print(self.count)}]"

    def _latex(self, printer) -> str:
        return r"%s_{[:%s]}" % (printer._print(self.arg), printer._print(self.count))


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
    r"""``\nabla f(X)`` for a user term ``f`` known only as a torch function (derived by autograd);
    ``params``: the matrix symbols of the learned tensors ``f`` reads, so the block graph and the
    lowering see them."""

    def __new__(cls, arg: MatrixExpr, term: str | Str, *params: sp.MatrixSymbol):
        return Basic.__new__(cls, sp.sympify(arg), term if isinstance(term, Str) else Str(term), *params)

    @property
    def term(self) -> str:
        return self.args[1].name

    @property
    def params(self) -> tuple[sp.MatrixSymbol, ...]:
        return self.args[2:]

    def _sympystr(self, printer) -> str:
        given = "; " + ", ".join(printer._print(q) for q in self.params) if self.params else ""
        return f"∇{self.term}({printer._print(self.arg)}{given})"

    def _latex(self, printer) -> str:
        given = "; " + ", ".join(printer._print(q) for q in self.params) if self.params else ""
        return r"\nabla %s\left(%s%s\right)" % (_latex_name(self.term), printer._print(self.arg), given)


def _latex_name(name: str) -> str:
    return name if len(name) == 1 else r"\operatorname{%s}" % name.replace("_", r"\_")
