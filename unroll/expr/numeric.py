"""Evaluate an update expression numerically, straight from its sympy tree (numpy, one sample).

This is deliberately *not* the lowering: it walks the printed expression node by node with
plain numpy, heads one at a time, so that tests can check that what ``unroll explain`` prints
is what the lowered torch module computes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import sympy as sp

from unroll.expr.nodes import HeadSoftmax, HeadSum, LayerNorm, ReLU, SmoothGrad, Softmax, SoftThreshold, is_per_head

from unroll.expr.nodes import NORM_FLOOR, AbsValue, Clamp, Divide, LeadingColumns, Norm, PrefixSum, Sign

Array = np.ndarray
Binding = tuple[sp.MatrixSymbol, sp.MatrixExpr]


def evaluate(
    expr: sp.Basic,
    values: Mapping[str, Array | float],
    where: Sequence[Binding] = (),
    smooth_grads: Mapping[str, Callable[[Array], Array]] | None = None,
) -> Array:
    """Value of ``expr`` given ``values`` by symbol name.

    Per-head symbols (``U_k``) take arrays of shape (K, rows, cols); ``where`` binds
    intermediate symbols (``W_k = U_k^T Y``) to expressions; ``smooth_grads`` gives the
    gradient of each user-defined term by name.
    """
    return _Evaluator(values, where, smooth_grads or {}).run(expr)


class _Evaluator:
    def __init__(self, values, where, smooth_grads):
        self.values = dict(values)
        self.where = {sym.name: e for sym, e in where}
        self.smooth_grads = smooth_grads
        self.sizes: dict[sp.Symbol, int] = {}
        self.memo: dict[tuple[str, int | None], Array] = {}
        self.heads = next(
            (np.shape(v)[0] for k, v in self.values.items() if k.endswith("_k")), None
        )

    def run(self, expr: sp.Basic) -> Array:
        exprs = [expr, *self.where.values()]
        for sym in set().union(*(e.atoms(sp.MatrixSymbol) for e in exprs)):
            if sym.name in self.values:
                shape = np.shape(self.values[sym.name])[1 if is_per_head(sym) else 0:]
                for dim, n in zip(sym.shape, shape):
                    if not sp.sympify(dim).is_Integer:
                        self.sizes.setdefault(sp.sympify(dim), n)
        return self.ev(expr, None)

    def size(self, dim: sp.Expr) -> int:
        dim = sp.sympify(dim)
        if dim.is_Integer:
            return int(dim)
        if dim not in self.sizes:
            raise KeyError(f"size {dim} unknown: give a value for a matrix of that size")
        return self.sizes[dim]

    def symbol(self, sym: sp.MatrixSymbol, k: int | None) -> Array:
        key = (sym.name, k if is_per_head(sym) else None)
        if key in self.memo:
            return self.memo[key]
        if sym.name in self.where:
            value = self.ev(self.where[sym.name], k)
        else:
            value = np.asarray(self.values[sym.name], dtype=np.float64)
            if is_per_head(sym):
                if k is None:
                    raise ValueError(f"per-head symbol {sym.name} outside of a sum over heads")
                value = value[k]
        for dim, n in zip(sym.shape, value.shape):
            if not sp.sympify(dim).is_Integer:
                self.sizes.setdefault(sp.sympify(dim), n)
        self.memo[key] = value
        return value

    def scalar(self, expr: sp.Expr, k: int | None) -> float:
        subs = {}
        for s in expr.free_symbols:
            if s.name in self.values:
                subs[s] = float(np.asarray(self.values[s.name]))
            elif s.name in self.where:
                subs[s] = self.scalar(self.where[s.name], k)
            else:
                subs[s] = self.size(s)
        return float(expr.xreplace(subs))

    def ev(self, e: sp.Basic, k: int | None):
        if not getattr(e, "is_Matrix", False):
            return self.scalar(e, k)
        if isinstance(e, sp.MatrixSymbol):
            return self.symbol(e, k)
        if isinstance(e, sp.MatMul):
            out = None
            for f in e.args:
                v = self.ev(f, k)
                out = v if out is None else (out * v if np.ndim(v) == 0 or np.ndim(out) == 0 else out @ v)
            return out
        if isinstance(e, sp.MatAdd):
            return sum(self.ev(a, k) for a in e.args)
        if isinstance(e, sp.Transpose):
            return self.ev(e.arg, k).T
        if isinstance(e, sp.Inverse):
            return np.linalg.inv(self.ev(e.arg, k))
        if isinstance(e, sp.MatPow):
            return np.linalg.matrix_power(self.ev(e.base, k), int(e.exp))
        if isinstance(e, sp.Identity):
            return np.eye(self.size(e.shape[0]))
        if isinstance(e, sp.ZeroMatrix):
            return np.zeros((self.size(e.shape[0]), self.size(e.shape[1])))
        if isinstance(e, sp.OneMatrix):
            return np.ones((self.size(e.shape[0]), self.size(e.shape[1])))
        if isinstance(e, HeadSum):
            if self.heads is None:
                raise ValueError("a sum over heads needs at least one per-head value")
            return sum(self.ev(e.arg, h) for h in range(self.heads))
        if isinstance(e, HeadSoftmax):
            if k is None:
                raise ValueError("a softmax over heads is per head: use it inside a sum over heads")
            x = np.stack([self.ev(e.arg, h) for h in range(self.heads)])
            x = np.exp(x - x.max(axis=0, keepdims=True))
            return (x / x.sum(axis=0, keepdims=True))[k]
        if isinstance(e, sp.HadamardProduct):
            out = self.ev(e.args[0], k)
            for a in e.args[1:]:
                out = out * self.ev(a, k)
            return out
        if isinstance(e, sp.HadamardPower):
            return self.ev(e.base, k) ** self.scalar(e.exp, k)
        if isinstance(e, Softmax):
            x = self.ev(e.arg, k)
            if e.causal:  # row i of column j only for i <= j
                x = np.where(np.tril(np.ones_like(x), -1) > 0, -np.inf, x)
            x = np.exp(x - x.max(axis=0, keepdims=True))
            return x / x.sum(axis=0, keepdims=True)
        if isinstance(e, ReLU):
            return np.maximum(self.ev(e.arg, k), 0.0)
        if isinstance(e, SoftThreshold):
            x, t = self.ev(e.arg, k), self.scalar(e.threshold, k)
            return np.sign(x) * np.maximum(np.abs(x) - t, 0.0)
        if isinstance(e, Sign):
            return np.sign(self.ev(e.arg, k))
        if isinstance(e, AbsValue):
            return np.abs(self.ev(e.arg, k))
        if isinstance(e, Clamp):
            return np.clip(self.ev(e.arg, k), self.scalar(e.lo, k), self.scalar(e.hi, k))
        if isinstance(e, Norm):
            return _norms(self.ev(e.arg, k), e.kind, e.group)
        if isinstance(e, Divide):
            return self.ev(e.args[0], k) / self.ev(e.args[1], k)
        if isinstance(e, PrefixSum):
            return np.cumsum(self.ev(e.arg, k), axis=1)
        if isinstance(e, LeadingColumns):
            return self.ev(e.arg, k)[:, : self.size(e.count)]
        if isinstance(e, LayerNorm):
            x = self.ev(e.arg, k)
            mean = x.mean(axis=0, keepdims=True)
            var = x.var(axis=0, keepdims=True)
            eps = self.scalar(e.eps, k)
            return self.ev(e.weight, k) * (x - mean) / np.sqrt(var + eps) + self.ev(e.bias, k)
        if isinstance(e, SmoothGrad):  # the term's parameters whole, per-head ones with their K
            params = [np.asarray(self.values[q.name], dtype=np.float64) for q in e.params]
            return self.smooth_grads[e.term](self.ev(e.arg, k), *params)
        raise NotImplementedError(f"no numerical meaning for {type(e).__name__}")


def _norms(x: Array, kind: str, group: int) -> Array:
    """:class:`~unroll.expr.nodes.Norm` of one matrix (rows x tokens): each entry the l2 norm of
    its row, column or group of ``group`` consecutive rows, floored at ``NORM_FLOOR``."""
    if kind == "columns":
        norms = np.linalg.norm(x, axis=0, keepdims=True)
    elif kind == "rows":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
    else:
        blocks = x.reshape(x.shape[0] // group, group, x.shape[1])
        norms = np.repeat(np.linalg.norm(blocks, axis=1), group, axis=0)
    return np.broadcast_to(np.maximum(norms, NORM_FLOOR), x.shape).copy()
