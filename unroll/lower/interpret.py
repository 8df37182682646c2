"""Turn a sympy update expression into a torch function, once, at lowering time.

Every matrix value is held as a 4-D tensor ``(batch|1, heads|1, rows, cols)`` with tokens as
columns, so that per-head symbols (``U_k`` stored as (K, rows, cols)) broadcast against
per-sample ones and a sum over heads is a sum over dim 1. The result is a tree of closures with
no sympy left in it, which ``torch.compile`` traces without graph breaks.
"""

from __future__ import annotations

from collections.abc import Callable

import sympy as sp
import torch
import torch.nn.functional as F

from unroll.errors import UnrollError
from unroll.expr.symbols import Z, size_value  # noqa: F401  (size_value: re-exported for the lowerings)
from unroll.expr.nodes import HeadSoftmax, HeadSum, LayerNorm, ReLU, SmoothGrad, Softmax, SoftThreshold, is_per_head
from unroll.expr.nodes import NORM_FLOOR, AbsValue, Clamp, Divide, LeadingColumns, Norm, PrefixSum, Sign

Env = dict  # symbol name -> value, plus the entries below
#: the keys of an env that are not symbols (dunder names, which no symbol can take)
SIZES = "__sizes__"  # size symbol name (d, N, ...) -> int
RAW = "__raw__"  # parameter symbol name -> the tensor as stored, not reshaped to 4-D
CACHE = "__cache__"  # the step's cache of weight-only factors (see unroll.lower.optimize)
Fn = Callable[[Env], torch.Tensor]


class Lowering:
    """Compiles expressions to closures over an env of tensors by symbol name.

    ``smooth_grads``: user term name -> per-sample gradient on rows (B, N, d).
    """

    #: hold every matrix value X as Xᵀ (tokens as rows): the optimised lowering's layout
    transposed: bool = False

    def __init__(self, smooth_grads: dict[str, Callable] | None = None):
        self.smooth_grads = smooth_grads or {}

    # scalars -----------------------------------------------------------------------------
    def scalar(self, e: sp.Expr) -> Callable[[Env], torch.Tensor | float]:
        if e.is_Number:
            value = float(e)
            return lambda env: value
        if isinstance(e, sp.Symbol):
            name = e.name
            return lambda env: env[name] if name in env else env[SIZES][name]
        if isinstance(e, sp.Add):
            parts = [self.scalar(a) for a in e.args]
            return lambda env: _sum(f(env) for f in parts)
        if isinstance(e, sp.Mul):
            parts = [self.scalar(a) for a in e.args]
            return lambda env: _prod(f(env) for f in parts)
        if isinstance(e, sp.Pow):
            base, exp = self.scalar(e.base), self.scalar(e.exp)
            return lambda env: base(env) ** exp(env)
        raise NotImplementedError(f"cannot lower the scalar {e}")

    # matrices ----------------------------------------------------------------------------
    def matrix(self, e: sp.Basic) -> Fn:
        if not getattr(e, "is_Matrix", False):
            return self.scalar(e)
        method = getattr(self, "_" + type(e).__name__, None)
        if method is None:
            raise NotImplementedError(f"cannot lower {type(e).__name__}: {e}")
        return method(e)

    def _MatrixSymbol(self, e):
        name = e.name
        return lambda env: env[name]

    def _MatMul(self, e):
        coeff, mm = e.as_coeff_mmul()
        factors = self._factors(mm.args)
        scale = self.scalar(coeff) if coeff != 1 else None

        def matmul(env):
            out = factors[0](env)
            for f in factors[1:]:
                out = matmul4(out, f(env))
            return out * scale(env) if scale is not None else out

        return matmul

    def _factors(self, args) -> list[Fn]:
        """The lowered factors of the product ``args``, in evaluation order: transposed,
        ``(A B)ᵀ = Bᵀ Aᵀ`` is the same product with the factors reversed."""
        factors = [self.matrix(f) for f in args]
        return factors[::-1] if self.transposed else factors

    def _MatAdd(self, e):
        parts = [self.matrix(a) for a in e.args]
        return lambda env: _sum(f(env) for f in parts)

    def _Transpose(self, e):
        inner = self.matrix(e.arg)
        return lambda env: inner(env).mT

    def _Inverse(self, e):
        inner = self.matrix(e.arg)
        return lambda env: torch.linalg.inv(inner(env))

    def _MatPow(self, e):
        inner, power = self.matrix(e.base), int(e.exp)
        return lambda env: torch.linalg.matrix_power(inner(env), power)

    def _constant_matrix(self, e, fill: Callable):
        shape = e.shape[::-1] if self.transposed else e.shape
        rows, cols = (self.scalar(sp.sympify(s)) for s in shape)

        def make(env):
            ref = env[Z.name]
            return fill((1, 1, int(rows(env)), int(cols(env))), dtype=ref.dtype, device=ref.device)

        return make

    def _Identity(self, e):
        n = self.scalar(sp.sympify(e.shape[0]))
        return lambda env: torch.eye(int(n(env)), dtype=env[Z.name].dtype, device=env[Z.name].device)[None, None]

    def _OneMatrix(self, e):
        return self._constant_matrix(e, torch.ones)

    def _ZeroMatrix(self, e):
        return self._constant_matrix(e, torch.zeros)

    def _HeadSum(self, e: HeadSum):
        coeff, mm = e.arg.as_coeff_mmul() if isinstance(e.arg, sp.MatMul) else (sp.Integer(1), None)
        first = mm.args[0] if mm is not None else None
        if coeff == 1 and isinstance(first, sp.MatrixSymbol) and is_per_head(first) and len(mm.args) > 1:
            # Σ_k P_k X_k in one contraction, without materialising the K per-head products
            head, rest = self.matrix(first), self.matrix(sp.MatMul(*mm.args[1:]))
            if self.transposed:  # (Σ_k P_k X_k)ᵀ = Σ_k X_kᵀ P_kᵀ
                return lambda env: torch.einsum("bknp,xkpd->bnd", rest(env), head(env)).unsqueeze(1)
            return lambda env: torch.einsum("xkdp,bkpn->bdn", head(env), rest(env)).unsqueeze(1)
        body = self.matrix(e.arg)
        return lambda env: body(env).sum(1, keepdim=True)

    def _Softmax(self, e: Softmax):
        inner = self.matrix(e.arg)
        dim = -1 if self.transposed else -2  # over each column j, or each row j when transposed
        if not e.causal:
            return lambda env: torch.softmax(inner(env), dim=dim)

        def causal(env):
            x = inner(env)
            ones = torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device)
            later = ones.triu(1) if self.transposed else ones.tril(-1)  # entries with i > j
            return torch.softmax(x.masked_fill(later, float("-inf")), dim=dim)

        return causal

    def _HeadSoftmax(self, e: HeadSoftmax):
        inner = self.matrix(e.arg)
        return lambda env: torch.softmax(inner(env), dim=1)

    def _HadamardProduct(self, e):
        parts = [self.matrix(a) for a in e.args]
        return lambda env: _prod(f(env) for f in parts)

    def _HadamardPower(self, e):
        base, exp = self.matrix(e.base), self.scalar(e.exp)
        return lambda env: base(env) ** exp(env)

    def _ReLU(self, e: ReLU):
        inner = self.matrix(e.arg)
        return lambda env: torch.relu(inner(env))

    def _SoftThreshold(self, e: SoftThreshold):
        inner, t = self.matrix(e.arg), self.scalar(e.threshold)

        def soft(env):
            x = inner(env)
            return torch.sign(x) * torch.relu(x.abs() - t(env))

        return soft

    # the prox vocabulary (unroll.expr.vocabulary): entrywise maps are layout-free; a norm's
    # axis swaps with the layout (a token is a column, or a row when transposed)
    def _Sign(self, e: Sign):
        inner = self.matrix(e.arg)
        return lambda env: torch.sign(inner(env))

    def _AbsValue(self, e: AbsValue):
        inner = self.matrix(e.arg)
        return lambda env: inner(env).abs()

    def _Clamp(self, e: Clamp):
        inner = self.matrix(e.arg)
        lo = None if e.lo == -sp.oo else self.scalar(e.lo)
        hi = None if e.hi == sp.oo else self.scalar(e.hi)

        def clamp(env):
            x = inner(env)
            if lo is not None:
                x = _bound(x, lo(env), torch.clamp_min, torch.maximum)
            if hi is not None:
                x = _bound(x, hi(env), torch.clamp_max, torch.minimum)
            return x

        return clamp

    def _Norm(self, e: Norm):
        inner, kind, group = self.matrix(e.arg), e.kind, e.group
        # the axis of the coordinates of a token (its rows) and of the tokens (its columns)
        coords, tokens = (-1, -2) if self.transposed else (-2, -1)

        def norms(env):
            x = inner(env)
            if kind == "groups":
                if x.shape[coords] % group:
                    raise ValueError(f"groups of {group} do not divide {x.shape[coords]} coordinates")
                # (.., d/g, g, N) or (.., N, d/g, g): the axis within a group is still `coords`
                blocks = x.unflatten(coords, (x.shape[coords] // group, group))
                n = torch.linalg.vector_norm(blocks, dim=coords, keepdim=True)
                n = n.expand_as(blocks).flatten(coords - 1, coords)
            else:
                n = torch.linalg.vector_norm(x, dim=coords if kind == "columns" else tokens, keepdim=True)
            # vector_norm's gradient at 0 is 0 and the floor's is 0 below it: X ⊘ ‖X‖ stays finite
            return n.clamp_min(norm_floor(x.dtype)).expand_as(x)

        return norms

    def _Divide(self, e: Divide):
        num, den = self.matrix(e.args[0]), self.matrix(e.args[1])
        return lambda env: num(env) / den(env)

    def _PrefixSum(self, e: PrefixSum):
        inner = self.matrix(e.arg)
        tokens = -2 if self.transposed else -1  # the axis of the tokens in this layout
        return lambda env: torch.cumsum(inner(env), dim=tokens)

    def _LeadingColumns(self, e: LeadingColumns):
        inner, count = self.matrix(e.arg), self.scalar(e.count)
        axis = -2 if self.transposed else -1  # columns are held as rows when transposed

        def leading(env):
            x, n = inner(env), int(count(env))
            if n > x.shape[axis]:  # slicing would silently return fewer columns
                raise UnrollError(f"{n} tokens, but {e.arg} holds {x.shape[axis]} positions (its block_size)")
            return x.narrow(axis, 0, n)

        return leading

    def _LayerNorm(self, e: LayerNorm):
        inner, eps = self.matrix(e.arg), float(e.eps)
        w, b = e.weight.name, e.bias.name

        def norm(env):
            x = inner(env)
            raw = env[RAW]
            if self.transposed:  # tokens are rows already
                return F.layer_norm(x, (x.shape[-1],), raw[w], raw[b], eps)
            return F.layer_norm(x.mT, (x.shape[-2],), raw[w], raw[b], eps).mT

        return norm

    def _SmoothGrad(self, e: SmoothGrad):
        inner, grad = self.matrix(e.arg), self.smooth_grads[e.term]
        params = [q.name for q in e.params]

        def smooth_grad(env):
            x = inner(env)
            rows = x if self.transposed else x.mT  # the user's function takes tokens as rows
            raw = env[RAW]  # the term's parameters as stored: (K, rows, cols) per head
            g = grad(rows.flatten(0, 1), *(raw[name] for name in params)).unflatten(0, rows.shape[:2])
            return g if self.transposed else g.mT

        return smooth_grad


def matmul4(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 4-D values (batch|1, heads|1, rows, cols) without copying a weight once per
    sample (which broadcasting ``@`` does): a weight meets the tokens as one folded product."""
    (a0, a1), (b0, b1) = a.shape[:2], b.shape[:2]
    if a0 == 1 and b0 > 1:
        if a1 == 1:
            return torch.einsum("rc,bhcn->bhrn", a[0, 0], b)
        if b1 == 1:
            return torch.einsum("krc,bcn->bkrn", a[0], b[:, 0])
    if b0 == 1 and a0 > 1:
        if b1 == 1:
            return torch.einsum("bhrc,cn->bhrn", a, b[0, 0])
        if a1 == 1:
            return torch.einsum("brc,kcn->bkrn", a[:, 0], b[0])
    return a @ b


def norm_floor(dtype: torch.dtype) -> float:
    """``NORM_FLOOR``, or the smallest normal number of a precision too low to hold it (half)."""
    return max(NORM_FLOOR, torch.finfo(dtype).tiny)


def _bound(x: torch.Tensor, c, by_number, by_tensor) -> torch.Tensor:
    """``max(x, c)`` or ``min(x, c)`` for a number or a 0-dim tensor c (a constant's buffer, or
    a learned parameter, whose gradient the tensor form keeps)."""
    if isinstance(c, torch.Tensor):
        return by_tensor(x, c.to(x.dtype))
    return by_number(x, c)


def _sum(items):
    it = iter(items)
    out = next(it)
    for x in it:
        out = out + x
    return out


def _prod(items):
    it = iter(items)
    out = next(it)
    for x in it:
        out = out * x
    return out
