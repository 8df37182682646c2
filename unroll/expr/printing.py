"""Text and LaTeX renderings of update expressions (what ``unroll explain`` prints)."""

from __future__ import annotations

import sympy as sp
from sympy.printing.latex import LatexPrinter
from sympy.printing.str import StrPrinter

_GREEK = {
    "alpha": "α", "beta": "β", "gamma": "γ", "eta": "η", "kappa": "κ", "lambda": "λ",
    "tau": "τ", "epsilon": "ε", "mu": "μ", "sigma": "σ", "pi": "π",
}


class _TextPrinter(StrPrinter):
    """Reads like the papers: juxtaposed products, ᵀ for transposes, Greek letters."""

    def _print_Symbol(self, expr) -> str:
        base, _, sub = expr.name.partition("_")
        base = _GREEK.get(base, base)
        return f"{base}_{sub}" if sub else base

    def _print_MatrixSymbol(self, expr) -> str:
        return self._print_Symbol(expr)

    def _print_Transpose(self, expr) -> str:
        return f"{self.parenthesize(expr.arg, 1000, strict=True)}ᵀ"

    def _print_Inverse(self, expr) -> str:
        return f"{self.parenthesize(expr.arg, 1000, strict=True)}⁻¹"

    def _print_Identity(self, expr) -> str:
        return "I"

    def _print_OneMatrix(self, expr) -> str:
        return "1ᵀ" if expr.shape[0] == 1 else "1"

    def _print_ZeroMatrix(self, expr) -> str:
        return "0"

    def _print_MatMul(self, expr) -> str:
        coeff, factors = expr.as_coeff_mmul()
        parts = [self.parenthesize(f, 45) for f in factors.args]
        sign = ""
        if coeff.could_extract_minus_sign() and not coeff.is_Add:
            sign, coeff = "-", -coeff
        if coeff.is_Add:  # (1 - β κ), constant first, as the papers write it
            constant, rest = coeff.as_coeff_Add()
            text = self._print(rest) if constant == 0 else _join_terms([self._print(constant), self._print(rest)])
            parts.insert(0, f"({text})")
        elif coeff != 1:
            parts.insert(0, self.parenthesize(coeff, 45))
        return sign + " ".join(parts)

    def _print_HadamardProduct(self, expr) -> str:
        # always bracketed: juxtaposition (the matrix product) must not bind across the ∘
        return "(" + " ∘ ".join(self.parenthesize(a, 45, strict=True) for a in expr.args) + ")"

    def _print_HadamardPower(self, expr) -> str:
        return f"{self.parenthesize(expr.base, 1000, strict=True)}^∘{self._print(expr.exp)}"

    def _print_Mul(self, expr) -> str:
        return super()._print_Mul(expr).replace("*", " ")

    def _print_Pow(self, expr) -> str:
        base, exp = expr.as_base_exp()
        if exp == sp.Rational(-1, 2):
            return f"{self.parenthesize(base, 1000, strict=True)}^(-1/2)"
        return f"{self.parenthesize(base, 1000, strict=True)}^{self.parenthesize(exp, 1000, strict=True)}"

    def _print_MatAdd(self, expr) -> str:
        return _join_terms([self._print(t) for t in _reading_order(expr)])


def _join_terms(texts: list[str]) -> str:
    """``a + b - c``: a leading minus of a term becomes the operator before it."""
    out = ""
    for i, text in enumerate(texts):
        if text.startswith("-"):
            out += (" - " if i else "-") + text[1:].lstrip()
        else:
            out += (" + " if i else "") + text
    return out


def _reading_order(expr: sp.MatAdd) -> list[sp.Basic]:
    """Added terms before subtracted ones (``1 - c``, ``D Y - Y``), and skip connections first
    among each (``Z + ...``), the way the papers write an update."""
    def is_skip(term: sp.Basic) -> bool:
        return isinstance(term, sp.MatrixSymbol) or (
            isinstance(term, sp.MatMul) and len(term.as_coeff_mmul()[1].args) == 1
            and isinstance(term.as_coeff_mmul()[1].args[0], sp.MatrixSymbol)
        )
    def subtracted(term: sp.Basic) -> bool:  # printed with a leading minus (see _print_MatMul)
        coeff = term.as_coeff_mmul()[0] if isinstance(term, sp.MatMul) else sp.Integer(1)
        return bool(coeff.could_extract_minus_sign()) and not coeff.is_Add

    return sorted(expr.args, key=lambda t: (subtracted(t), not is_skip(t)))


class _LatexPrinter(LatexPrinter):
    def _print_MatAdd(self, expr) -> str:
        return _join_terms([self._print(t) for t in _reading_order(expr)])

    def _print_OneMatrix(self, expr) -> str:
        return r"\mathbf{1}^{T}" if expr.shape[0] == 1 else r"\mathbf{1}"


def to_text(expr: sp.Basic) -> str:
    """One-line unicode rendering, e.g. ``Z - κ β Σ_k[U_k W_k (I + β W_kᵀ W_k)⁻¹]``."""
    return _TextPrinter({"order": "none"}).doprint(expr)


def to_latex(expr: sp.Basic) -> str:
    """LaTeX rendering (sympy's printer with our nodes' ``_latex``)."""
    return _LatexPrinter({"mat_symbol_style": "plain"}).doprint(expr)
