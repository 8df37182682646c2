"""Algebraic normal form used between rewrites: expanded products, sums over heads split."""

from __future__ import annotations

import sympy as sp

from unroll.expr.nodes import HeadSum


def _split_head_sum(h: HeadSum) -> sp.MatrixExpr:
    """``Σ_k (c1 X_k + c2 Y_k) = c1 Σ_k X_k + c2 Σ_k Y_k`` for scalars c1, c2."""
    terms = h.arg.args if isinstance(h.arg, sp.MatAdd) else (h.arg,)
    parts = []
    for t in terms:
        if isinstance(t, sp.MatMul):
            c, mm = t.as_coeff_mmul()
            parts.append(c * HeadSum(sp.MatMul(*mm.args).doit()))
        else:
            parts.append(HeadSum(t))
    return sp.MatAdd(*parts).doit() if len(parts) > 1 else parts[0]


def tidy(expr: sp.MatrixExpr) -> sp.MatrixExpr:
    """Expand products over sums and pull scalars out of sums over heads."""
    for _ in range(4):  # splitting a head sum can expose a product to expand, and vice versa
        new = sp.expand(expr).replace(lambda e: isinstance(e, HeadSum), _split_head_sum)
        new = sp.expand(new)
        if new == expr:
            break
        expr = new
    return expr


def matmul_factors(expr: sp.Basic) -> tuple[sp.Expr, list[sp.Basic]]:
    """``c A B ... -> (c, [A, B, ...])`` for any matrix expression (a non-product is one factor)."""
    if isinstance(expr, sp.MatMul):
        c, mm = expr.as_coeff_mmul()
        return c, list(mm.args)
    return sp.Integer(1), [expr]
