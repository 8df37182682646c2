r"""The compiler's optimisations of a derived update: algebra it knows and eager code leaves alone.

The printed update (what ``unroll explain`` shows and the plain lowering computes) is rewritten
into an equal expression with two new nodes, then lowered:

* :class:`Attention` — ``Σ_k P_k W_k softmax(s W_kᵀ W_k)`` with ``W_k = U_kᵀ X`` is attention
  with query = key = value; it runs through ``scaled_dot_product_attention`` (flash and
  memory-efficient kernels), so the N x N matrix is never materialised.
* :class:`LinearMap` — the terms of a sum that are weight-only products applied to one token
  matrix, ``(c_1 F_1 + c_2 F_2 G_2 + ...) X``. Each call chooses, on its actual shapes, between
  forming the weight-only factor first (one product with the tokens) and applying the factors to
  the tokens term by term. E.g. CRATE's sparse step ``Y + η Dᵀ Y - η Dᵀ D Y`` costs ``3 T d²``
  term by term (``Dᵀ Y`` and ``Dᵀ (D Y)``) and ``d³ + T d²`` hoisted, for T = batch x tokens;
  with an overcomplete D (m = 4d) forming ``Dᵀ D`` costs ``m² d`` and is rarely worth it. In inference (no autograd), a formed
  factor is cached until any value it depends on changes (compared by content: an optimiser
  step, fused or not, ``load_state_dict``, edits through ``.data`` all count).

Sums with ``c 1`` or ``b 1ᵀ`` add a broadcast scalar or column instead of a matrix of ones.

A product's adjacent pair ``X (I_N + c XᵀX)⁻¹`` (the exact coding-rate gradients, X r x N) is
solved on its smaller side: by the push-through identity ``X (I_N + c XᵀX)⁻¹ = (I_r + c X Xᵀ)⁻¹ X``
the N x N system becomes an r x r one when there are more tokens than rows (see
:func:`gram_solve`), so an exact step costs O(N r²) instead of O(N³).
"""

from __future__ import annotations

from contextlib import nullcontext

import sympy as sp
import torch
import torch.nn.functional as F
from sympy import Basic, MatrixExpr

from unroll.expr.nodes import HeadSum, Softmax, is_per_head
from unroll.expr.symbols import Z
from unroll.lower.interpret import CACHE, RAW, SIZES, Env, Fn, Lowering, _sum, matmul4, size_value
from unroll.relax.tidy import matmul_factors


class Attention(MatrixExpr):
    """``Σ_k P_k W_k softmax(s W_kᵀ W_k)``, ``W_k = U_kᵀ X``: args (P_k, U_k, X, s)."""

    def __new__(cls, out: sp.MatrixSymbol, proj: sp.MatrixSymbol, tokens: MatrixExpr, scale: sp.Expr, causal: bool = False):
        return Basic.__new__(cls, out, proj, tokens, sp.sympify(scale), sp.true if causal else sp.false)

    @property
    def shape(self):
        return (self.args[0].shape[0], self.args[2].shape[1])

    def _sympystr(self, printer) -> str:
        P, U, X, s = (printer._print(a) for a in self.args[:4])
        return f"{'causal ' if self.args[4] else ''}attention[{P}; {U}ᵀ {X}; scale {s}]"


class LinearMap(MatrixExpr):
    """``M X`` for a weight-only M (a sum of products of parameters and constants)."""

    def __new__(cls, weights: MatrixExpr, tokens: MatrixExpr):
        return Basic.__new__(cls, weights, tokens)

    @property
    def shape(self):
        return (self.args[0].shape[0], self.args[1].shape[1])

    def _sympystr(self, printer) -> str:
        return f"[{printer._print(self.args[0])}] {printer._print(self.args[1])}"


# --------------------------------------------------------------------------- rewriting -------


def optimize_expr(expr: Basic, where: dict[str, Basic], weights: set[str]) -> Basic:
    """``expr`` with attention and weight-only linear maps made explicit (an equal expression).

    ``where``: the update's bindings by name; ``weights``: names of parameters and constants.
    """
    expr = expr.replace(lambda e: isinstance(e, HeadSum), lambda h: _attention(h, where) or h)
    if not expr.is_Matrix:
        return expr
    return _collect_all(sp.expand(expr), weights)


def _collect_all(e: Basic, weights: set[str]) -> Basic:
    """Collect linear maps in every sum, outermost first; nested sums are flattened."""
    if isinstance(e, sp.MatAdd):
        return _collect_linear([_collect_all(t, weights) for t in _flat_terms(e)], weights)
    if not e.args or isinstance(e, (sp.MatrixSymbol, Attention)):
        return e
    return e.func(*[_collect_all(a, weights) if getattr(a, "is_Matrix", False) else a for a in e.args])


def _flat_terms(e: Basic) -> list[Basic]:
    if isinstance(e, sp.MatAdd):
        return [t for a in e.args for t in _flat_terms(a)]
    c, factors = matmul_factors(e)
    if len(factors) == 1 and isinstance(factors[0], sp.MatAdd):  # c (A + B) -> c A + c B
        return [c * t for t in _flat_terms(factors[0])]
    return [e]


def _attention(h: HeadSum, where: dict[str, Basic]) -> Basic | None:
    c, factors = matmul_factors(h.arg)
    if len(factors) != 3 or not isinstance(factors[2], Softmax) or c != 1:
        return None
    P, W, S = factors
    s, inner = matmul_factors(S.arg)
    if not (is_per_head(P) and is_per_head(W) and inner == [sp.Transpose(W), W]):
        return None
    c_w, proj = matmul_factors(where.get(W.name, W))
    if c_w != 1 or len(proj) != 2 or not isinstance(proj[0], sp.Transpose) or not is_per_head(proj[0].arg):
        return None
    return Attention(P, proj[0].arg, proj[1], s, S.causal)


def _weight_only(e: Basic, weights: set[str]) -> bool:
    names = {a.name for a in e.atoms(sp.MatrixSymbol)}
    return e.is_Matrix and names <= weights and not any(is_per_head(a) for a in e.atoms(sp.MatrixSymbol))


def _collect_linear(terms: list[Basic], weights: set[str]) -> Basic:
    groups: dict[Basic, list[tuple[sp.Expr, list[Basic]]]] = {}
    rest = []
    for term in terms:
        c, factors = matmul_factors(term)
        tokens = factors[-1]
        if not _weight_only(tokens, weights) and all(_weight_only(f, weights) for f in factors[:-1]):
            groups.setdefault(tokens, []).append((c, factors[:-1]))
        else:
            rest.append(term)
    for tokens, items in groups.items():
        if len(items) < 2:  # one term: nothing to gain from forming its factor
            rest += [c * sp.MatMul(*f, tokens) if f else c * tokens for c, f in items]
            continue
        n = tokens.shape[0]
        M = sp.MatAdd(*[c * (sp.MatMul(*f) if f else sp.Identity(n)) for c, f in items])
        rest.append(LinearMap(M, tokens))
    return sp.MatAdd(*rest) if len(rest) > 1 else rest[0]


# ---------------------------------------------------------------------------- lowering -------


class OptimizedLowering(Lowering):
    """Lowers the nodes above, in the row layout: every matrix value ``X`` is held as ``Xᵀ``
    (tokens as rows, (batch|1, heads|1, cols, rows)), the layout attention and LayerNorm kernels
    want, so that no activation is ever transposed. ``(A B)ᵀ = Bᵀ Aᵀ`` reverses products."""

    transposed = True

    def __init__(self, smooth_grads, sizes: dict[str, int]):
        super().__init__(smooth_grads)
        self.sizes = sizes

    def _factors(self, args) -> list[Fn]:
        factors = [self._gram(g) if isinstance(g, _Gram) else self._push_through(g) if isinstance(g, _PushThrough)
                   else self.matrix(g) for g in _grams(_push_throughs(args))]
        return factors[::-1]

    def _gram(self, g: "_Gram") -> Fn:
        inner = self.matrix(g.arg)  # holds Aᵀ, so AᵀA = inner innerᵀ
        return lambda env: Gram.apply(inner(env))

    def _push_through(self, g: "_PushThrough") -> Fn:
        inner, scale = self.matrix(g.arg), self.scalar(g.scale)  # inner holds Xᵀ
        return lambda env: gram_solve(inner(env), scale(env))

    # the optimised nodes ---------------------------------------------------------------------
    def _Attention(self, e: Attention) -> Fn:
        P, U, X, scale, causal = e.args
        causal = bool(causal)
        out, proj, tokens = self.matrix(P), self.matrix(U), self.matrix(X)
        s = self.scalar(scale)

        def attention(env: Env, bias: torch.Tensor | None = None) -> torch.Tensor:
            x = tokens(env)[:, 0]  # (B, N, d)
            U_t, P_t = proj(env)[0], out(env)[0]  # U_kᵀ, P_kᵀ: (K, p, d)
            heads, dim_head, _ = U_t.shape
            # one product for all heads, heads as a view: the kernels need only the last
            # dimension contiguous (the flash kernel falls back to a slow path otherwise)
            w = (x @ U_t.flatten(0, 1).mT).unflatten(-1, (heads, dim_head)).transpose(1, 2)
            factor = s(env)
            if isinstance(factor, torch.Tensor):  # a learned temperature: scale the queries
                y = F.scaled_dot_product_attention(w * factor, w, w, scale=1.0, is_causal=causal)
            else:
                y = F.scaled_dot_product_attention(w, w, w, scale=float(factor), is_causal=causal)
            y = y.transpose(1, 2).flatten(2).unsqueeze(1)  # (B, 1, N, K p)
            return matmul4(y, P_t.flatten(0, 1)[None, None]) if bias is None else _addmm(bias, y, P_t.flatten(0, 1))

        return attention

    def _LinearMap(self, e: LinearMap) -> Fn:
        M, X = e.args
        tokens, factor_of = self.matrix(X), self.matrix(M)  # the factor, transposed like any value
        terms = [matmul_factors(t) for t in (M.args if isinstance(M, sp.MatAdd) else (M,))]
        coeffs = [self.scalar(c) for c, _ in terms]
        chains = [[self.matrix(f) for f in fs if not isinstance(f, sp.Identity)] for _, fs in terms]
        shapes = [[tuple(size_value(s, self.sizes) for s in f.shape) for f in fs if not isinstance(f, sp.Identity)] for _, fs in terms]
        rows, cols = (size_value(s, self.sizes) for s in M.shape)
        # products as written: each factor meets the T tokens; hoisted: the weight chains, then one
        form_cost = sum(_chain_cost(s) for s in shapes)
        written_per_token = sum(sum(r * c for r, c in s) for s in shapes)
        names = sorted(a.name for a in M.free_symbols if hasattr(a, "name"))
        key = id(e)

        def cached(env: Env) -> torch.Tensor | None:
            if torch.is_grad_enabled() or torch.compiler.is_compiling():
                return None
            inputs = [_dependency(env, n) for n in names]
            precision = _precision(env[Z.name])
            # the module's own cache (env[CACHE]): node key -> (inputs it was formed from,
            # factor, precision); in the closure it would be shared by every copy of the module
            cache = env[CACHE]
            hit = cache.get(key)
            if hit is not None and hit[2] == precision and _unchanged(hit[0], inputs):
                return hit[1]
            factor = factor_of(env)
            cache[key] = ([_snapshot(v) for v in inputs], factor, precision)
            return factor

        def linear(env: Env, bias: torch.Tensor | None = None) -> torch.Tensor:
            x = tokens(env)
            count = x.shape[0] * x.shape[-2]  # T: tokens of the whole batch
            factor = cached(env)
            if factor is not None or hoisting_pays(form_cost, rows * cols, written_per_token, count):
                factor = factor if factor is not None else factor_of(env)
                if bias is not None and x.shape[1] == 1 and factor.shape[:2] == (1, 1):
                    return _addmm(bias, x, factor[0, 0])
                out = matmul4(x, factor)
                return out if bias is None else out + bias
            out = [] if bias is None else [bias]
            for c, chain in zip(coeffs, chains):
                y = x
                for f in reversed(chain):  # F_1 ... F_k X: F_k meets the tokens first
                    y = matmul4(y, f(env))
                out.append(y * c(env))
            return _sum(out)

        return linear

    def _MatAdd(self, e: sp.MatAdd) -> Fn:
        full, broadcast = [], []
        for t in e.args:
            column = _broadcast_column(t)
            (broadcast if column is not None else full).append(column if column is not None else t)
        if not full or not broadcast:
            return super()._MatAdd(e)
        fused = next((t for t in full if isinstance(t, (LinearMap, Attention))), None)
        if fused is None:
            parts = [self.matrix(t) for t in full] + [self.matrix(t) for t in broadcast]
            return lambda env: _sum(f(env) for f in parts)
        # the broadcast terms ride along in the product's own addition (addmm)
        product = self.matrix(fused)
        rest = [self.matrix(t) for t in full if t is not fused]
        shifts = [self.matrix(t) for t in broadcast]

        def fused_sum(env: Env) -> torch.Tensor:
            bias = _sum(f(env) for f in shifts)
            out = product(env, bias)
            return _sum([out, *(f(env) for f in rest)])

        return fused_sum

class _Gram:
    """``Aᵀ A`` found in a product (a marker, not an expression node)."""

    def __init__(self, arg: Basic):
        self.arg = arg


class _PushThrough:
    """``X (I + c XᵀX)⁻¹`` found in a product, c > 0 (a marker, not an expression node)."""

    def __init__(self, arg: Basic, scale: sp.Expr):
        self.arg, self.scale = arg, scale


def _inverse_gram(f: Basic) -> tuple[sp.Expr, list[Basic]] | None:
    """``(c, [A_1, ..., A_m])`` if ``f`` is ``(I + c AᵀA)⁻¹`` with ``A = A_1 ... A_m`` and c known
    positive (so that ``I + c AᵀA`` is positive definite and Cholesky applies)."""
    if not isinstance(f, sp.Inverse) or not isinstance(f.arg, sp.MatAdd) or len(f.arg.args) != 2:
        return None
    eyes = [t for t in f.arg.args if isinstance(t, sp.Identity)]
    if len(eyes) != 1:
        return None
    c, factors = matmul_factors(next(t for t in f.arg.args if t is not eyes[0]))
    m = len(factors) // 2
    # AᵀA = A_mᵀ ... A_1ᵀ A_1 ... A_m, which sympy keeps as one flat product
    if m == 0 or 2 * m != len(factors) or not c.is_positive:
        return None
    half = factors[m:]
    if factors[:m] != [a.T for a in reversed(half)]:
        return None
    return c, half


def _push_throughs(factors) -> list:
    """Factors with each adjacent ``A (I + c AᵀA)⁻¹`` (A one factor or several) replaced by a
    :class:`_PushThrough`."""
    out: list = []
    for f in factors:
        found = _inverse_gram(f)
        if found is not None:
            c, A = found
            if len(out) >= len(A) and all(isinstance(a, Basic) for a in out[-len(A):]) and out[-len(A):] == A:
                del out[-len(A):]
                out.append(_PushThrough(A[0] if len(A) == 1 else sp.MatMul(*A), c))
                continue
        out.append(f)
    return out


def gram_solve(H: torch.Tensor, c) -> torch.Tensor:
    r"""``(X (I_N + c XᵀX)⁻¹)ᵀ`` from ``H = Xᵀ`` (..., N, r), c > 0, batched over leading dims.

    Push-through identity: ``X (I_N + c XᵀX) = (I_r + c X Xᵀ) X``, and both brackets are
    positive definite, so

    .. math::  X (I_N + c X^T X)^{-1} = (I_r + c X X^T)^{-1} X.

    In the row layout the held results are, by symmetry of both brackets,
    ``(I_N + c H Hᵀ)⁻¹ H`` (N x N form) and ``H (I_r + c HᵀH)⁻¹ = ((I_r + c HᵀH)⁻¹ Hᵀ)ᵀ`` (r x r
    form). Each call picks the smaller system from the actual shapes: the N x N form costs
    about ``N³/3 + 3 N² r`` multiply-adds, the r x r form ``r³/3 + 3 N r²``, linear in N.
    Both solve through Cholesky and triangular solves (no explicit inverse), in at least
    float32 (half precision loses the bracket's small eigenvalues) and outside autocast, and
    return ``H``'s dtype.
    """
    n, r = H.shape[-2], H.shape[-1]
    dtype = H.dtype
    work = H if dtype in (torch.float32, torch.float64) else H.float()
    kind = H.device.type
    # under autocast the products would drop back to bf16 / fp16
    guard = torch.autocast(kind, enabled=False) if kind in ("cuda", "cpu") else nullcontext()
    with guard:
        if r < n:
            rhs, gram = work.mT, Gram.apply(work.mT)  # Hᵀ (r x N), HᵀH (r x r)
        else:
            rhs, gram = work, Gram.apply(work)  # H (N x r), H Hᵀ (N x N)
        eye = torch.eye(gram.shape[-1], dtype=work.dtype, device=work.device)
        # I + c G has eigenvalues >= 1: Cholesky cannot fail, so skip its error check (a sync)
        L = torch.linalg.cholesky_ex(eye + c * gram).L
        out = torch.cholesky_solve(rhs, L)
    out = out.mT if r < n else out
    return out if out.dtype == dtype else out.to(dtype)


def _grams(factors) -> list:
    """Factors with each adjacent pair ``Aᵀ A`` of a weight replaced by a :class:`_Gram`."""
    out, i = [], 0
    while i < len(factors):
        a = factors[i]
        if i + 1 < len(factors) and isinstance(a, sp.Transpose) and a.arg == factors[i + 1] and isinstance(a.arg, sp.MatrixSymbol):
            out.append(_Gram(a.arg))
            i += 2
        else:
            out.append(a)
            i += 1
    return out


class Gram(torch.autograd.Function):
    """``V Vᵀ`` whose backward is one product, ``(G + Gᵀ) V``, where autograd would take two."""

    @staticmethod
    def forward(V: torch.Tensor) -> torch.Tensor:
        return V @ V.mT

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (V,) = ctx.saved_tensors
        grad = grad.to(V.dtype)  # under autocast the forward ran in lower precision than V
        return (grad + grad.mT) @ V


def _addmm(bias, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``bias + x @ weight`` for x (B, 1, N, c) in one GEMM; bias broadcasts over the rows."""
    if isinstance(bias, torch.Tensor):
        bias = bias.to(x.dtype).reshape(-1)
    else:
        bias = torch.tensor(bias, dtype=x.dtype, device=x.device)
    out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight.to(x.dtype))
    return out.view(*x.shape[:-1], out.shape[-1])


def hoisting_pays(form_cost: int, hoisted_per_token: int, written_per_token: int, tokens) -> bool:
    """Forming the weight-only factor (``form_cost`` multiply-adds, then ``hoisted_per_token``
    per token) is cheaper than applying the factors as written (``written_per_token``)."""
    return form_cost + hoisted_per_token * tokens < written_per_token * tokens


def _broadcast_column(term: Basic) -> Basic | None:
    """``c 1`` -> ``c`` and ``v 1ᵀ`` -> ``v`` (a d x 1 column), to broadcast over the tokens."""
    c, factors = matmul_factors(term)
    if not factors or not isinstance(factors[-1], sp.OneMatrix):
        return None
    ones = factors[-1]
    if len(factors) == 1 and ones.shape[0] != 1:
        return c * sp.OneMatrix(1, 1)  # a scalar: every entry gets c
    if len(factors) == 2 and ones.shape[0] == 1 and factors[0].shape[1] == 1:
        return c * factors[0]
    return None


def _chain_cost(shapes: list[tuple[int, int]]) -> int:
    """Multiply-adds to form the product of a chain of matrices, left to right."""
    if len(shapes) < 2:
        return 0
    cost, (rows, inner) = 0, shapes[0]
    for r, c in shapes[1:]:
        cost += rows * inner * c
        inner = c
    return cost


def _precision(x: torch.Tensor) -> tuple:
    """What the factor's dtype depends on: the tokens' dtype and device, and autocast."""
    kind = x.device.type
    autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    return (x.dtype, x.device, autocast)


def _dependency(env: Env, name: str):
    """The current value of a symbol a factor is formed from: a weight, a constant, a scalar
    binding computed this call (which may depend on the token count), or a size."""
    if name in env[RAW]:
        return env[RAW][name]
    if name in env:
        return env[name]
    return env[SIZES].get(name)


def _snapshot(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _unchanged(saved: list, current: list) -> bool:
    """Whether every input of a cached factor still has the value it was formed from.

    Compared by content: versions and storage addresses miss fused optimisers, edits through
    ``.data`` and new tensors that reuse a freed address. Reading the weights costs O(d m), far
    less than forming the factor again; on GPU it synchronises, so compiled models skip the cache.
    """
    for old, new in zip(saved, current):
        if isinstance(old, torch.Tensor) != isinstance(new, torch.Tensor):
            return False
        if isinstance(old, torch.Tensor):
            if old.shape != new.shape or old.dtype != new.dtype or old.device != new.device or not torch.equal(old, new):
                return False
        elif old != new:
            return False
    return True


def weights_of(update) -> set[str]:
    """Names a weight-only factor may use: parameters and constants of the step."""
    return {p.name for p in update.params} | set(update.constants)

