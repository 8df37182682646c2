r"""Incremental evaluation of a causal step: the new tokens in, their outputs out, the earlier
tokens read from a cache.

A causal step's output at token j depends on tokens 1..j only, so a language model that appends
one token need not recompute the others. :func:`stream_update` rewrites a step's update into
that form, by the structure of the expression, so that any causal step the language can state
streams, not only the ones written here:

* a token-wise value (column j depends on column j alone: weights applied from the left,
  entrywise maps, LayerNorm, softmax over heads, per-token norms) is computed for the new
  columns only;
* ``V causal_softmax(s Aᵀ B)`` — softmax attention — needs keys ``A`` and values ``V`` at every
  earlier position: they become :class:`Past` nodes, whose earlier columns are cached (for
  CRATE, the projected tokens ``W_k = U_kᵀ LN(Z)``: query = key = value, one cache per head);
  the softmax is then over the rows of an (earlier + new) x new block whose mask lets new token
  j read rows up to its own position;
* ``cumsum(X)`` over the tokens (causal ToST's statistics) adds the running total of the
  earlier columns (cached: one column) to the prefix sums of the new ones;
* ``P[:N]``, a per-position table read for N tokens, reads the new tokens' own columns.

Each new token then costs O(T) (its row of attention over T cached positions) instead of the
full forward's O(T²)... per layer. Anything else reads tokens that come later or all tokens at
once — a sum over tokens outside a causal softmax (``W Wᵀ``, ``X 1``), a softmax over every
token, the count ``N`` itself (``β = p/(ε² N)``), a custom term's gradient, which may mix tokens
— and the step is not streamable: :class:`NotStreamable` says where, and a caller computes the
whole window instead. Streamable therefore also proves the step causal, by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp
import torch
from sympy import Basic, MatrixExpr

from unroll.derive.update import used_names
from unroll.expr.nodes import (AbsValue, Clamp, Divide, HeadSoftmax, HeadSum, LayerNorm, LeadingColumns, Norm,
                               PrefixSum, ReLU, Sign, Softmax, SoftThreshold)
from unroll.errors import UnrollError
from unroll.expr.printing import to_text
from unroll.expr.symbols import N
from unroll.lower.interpret import Env, Fn, Lowering

#: the env's entries for streaming (dunder names, which no symbol can take): the step's cache,
#: persistent across calls; what this call already computed of it; the first new token's position
STATE = "__state__"
FRESH = "__fresh__"
OFFSET = "__offset__"

#: the tokens a :class:`Past` value spans: every position so far, earlier and new
T = sp.Symbol("T", positive=True, integer=True)

#: nodes whose column j is a function of column j of their arguments
_TOKEN_WISE = (sp.MatAdd, sp.HadamardProduct, sp.HadamardPower, ReLU, SoftThreshold, Sign, AbsValue, Clamp, Divide,
               LayerNorm, HeadSum, HeadSoftmax, PrefixSum, sp.Inverse, sp.MatPow)


class NotStreamable(Exception):
    """Why a step's update cannot be evaluated token by token (it reads later tokens, or all)."""


class Past(MatrixExpr):
    """``X`` at every position so far (r x T): the cached earlier columns, then the new ones."""

    def __new__(cls, arg: MatrixExpr):
        return Basic.__new__(cls, arg)

    @property
    def arg(self) -> MatrixExpr:
        return self.args[0]

    @property
    def shape(self):
        return (self.args[0].shape[0], T)

    def _eval_transpose(self):
        return None

    def _sympystr(self, printer) -> str:
        return f"past({printer._print(self.arg)})"


@dataclass(frozen=True)
class StreamProgram:
    """A step lowered for streaming: its bindings in order, then its output (closures)."""

    program: tuple[tuple[str, Fn], ...]
    result: Fn
    #: the values kept between calls, as printed (``past(W_k)``, ``cumsum(...)``)
    cached: tuple[str, ...]

    def __call__(self, env: Env) -> torch.Tensor:
        for name, fn in self.program:
            env[name] = fn(env)
        return self.result(env)


def stream_update(out: Basic, bindings: tuple, smooth_grads: dict | None = None) -> StreamProgram:
    """The streaming form of the update ``out`` with ``bindings`` ((symbol, expr) in order), or
    :class:`NotStreamable`."""
    bound = {s.name: e for s, e in bindings}
    used = used_names(out, bound)
    rewritten = []
    for symbol, e in bindings:
        if symbol.name in used:
            rewritten.append((symbol.name, _new(e, f"{to_text(symbol)} = {to_text(e)}")))
    result = _new(out, to_text(out))
    lowering = StreamLowering(smooth_grads)
    program = tuple((name, lowering.matrix(e)) for name, e in rewritten)
    kept = [e for _, e in rewritten] + [result]
    cached = {to_text(node): None for e in kept if getattr(e, "is_Matrix", False)
              for node in sp.preorder_traversal(e) if isinstance(node, (Past, PrefixSum))}
    return StreamProgram(program, lowering.matrix(result), tuple(cached))


# --------------------------------------------------------------------------- rewriting -------

def _has_tokens(dim) -> bool:
    return sp.sympify(dim).has(N)


def _scalar(e: Basic, where: str) -> Basic:
    if sp.sympify(e).has(N):
        raise NotStreamable(f"{where}: it uses the token count N ({to_text(e)}), so a token's update "
                            "depends on how many tokens follow it")
    return e


def _new(e: Basic, where: str) -> Basic:
    """``e`` for the new tokens only (its columns), reading earlier ones through :class:`Past`."""
    if not getattr(e, "is_Matrix", False):
        return _scalar(e, where)
    rows, _ = e.shape
    if _has_tokens(rows):
        raise NotStreamable(f"{where}: {to_text(e)} has a row per token, which only a causal softmax's "
                            "scores may have")
    if isinstance(e, LeadingColumns):
        if e.count != N or e.arg.has(N):  # only a per-position table read for the N tokens streams
            raise NotStreamable(f"{where}: {to_text(e)} is not a per-position table read for the N tokens")
        return e
    if isinstance(e, (sp.MatrixSymbol, sp.OneMatrix, sp.ZeroMatrix, sp.Identity)):
        return e
    if isinstance(e, sp.MatMul):
        return _product(e, where)
    if isinstance(e, sp.Transpose):
        if not e.arg.has(N):  # a weight's transpose
            return e
        pushed = e.doit()  # (A B)ᵀ = Bᵀ Aᵀ: a transpose sympy can move inward
        if pushed != e:
            return _new(pushed, where)
        raise NotStreamable(f"{where}: {to_text(e)} is the transpose of a value with a row per token")
    if isinstance(e, Norm) and e.kind == "rows":
        raise NotStreamable(f"{where}: {to_text(e)} is a norm over all tokens")
    if isinstance(e, Softmax):
        raise NotStreamable(f"{where}: {to_text(e)} is a softmax over all tokens (it is not causal)")
    if isinstance(e, _TOKEN_WISE + (Norm,)):
        return e.func(*[_new(a, where) if getattr(a, "is_Matrix", False) else _keep(a, where) for a in e.args])
    raise NotStreamable(f"{where}: {type(e).__name__} ({to_text(e)}) may read other tokens")


def _keep(a: Basic, where: str) -> Basic:
    """A node's non-matrix argument (a threshold, an eps, a norm's kind) as it is."""
    return _scalar(a, where) if isinstance(a, sp.Expr) else a


def _product(e: sp.MatMul, where: str) -> Basic:
    """A product may sum over the tokens only into a causal softmax: ``V causal_softmax(S)``
    sums V's columns weighted by the softmax's rows, up to each new token's position."""
    coeff, mm = e.as_coeff_mmul()
    factors = list(mm.args)
    out, i = [], 0
    while i < len(factors):
        f = factors[i]
        if not (_has_tokens(f.shape[1]) and i + 1 < len(factors)):
            out.append(_new(f, where))
            i += 1
            continue
        after = factors[i + 1]
        if isinstance(after, Softmax) and after.shape != (N, N):
            raise NotStreamable(f"{where}: {to_text(after)} is not token-by-token attention (its scores are "
                                f"{to_text(after.shape[0])} x {to_text(after.shape[1])}, not N x N)")
        if isinstance(after, Softmax) and not after.causal:
            raise NotStreamable(f"{where}: {to_text(after)} is a softmax over all tokens (it is not causal)")
        if not isinstance(after, Softmax):
            raise NotStreamable(f"{where}: {to_text(f)} {to_text(after)} sums over all tokens")
        out += [Past(_new(f, where)), Softmax(_scores(after.arg, where), causal=True)]
        i += 2
    return sp.MatMul(_scalar(coeff, where), *out)


def _scores(e: Basic, where: str) -> Basic:
    """A causal softmax's argument (N x N) for the new tokens' columns: rows over all positions."""
    if not getattr(e, "is_Matrix", False):
        return _scalar(e, where)
    if isinstance(e, (sp.MatAdd, sp.HadamardProduct)):
        return e.func(*[_scores(a, where) for a in e.args])
    if isinstance(e, sp.MatMul):
        coeff, mm = e.as_coeff_mmul()
        first, *rest = mm.args
        if isinstance(first, sp.Transpose) and rest and not any(_has_tokens(f.shape[0]) for f in rest):
            keys = sp.Transpose(Past(_new(first.arg, where)))
            return sp.MatMul(_scalar(coeff, where), keys, *(_new(f, where) for f in rest))
    raise NotStreamable(f"{where}: the scores {to_text(e)} are not keys Aᵀ times queries")


# ---------------------------------------------------------------------------- lowering -------

class StreamLowering(Lowering):
    """The plain lowering (tokens as columns) of a streaming update: ``Z`` and every token-wise
    value hold the new columns; :class:`Past` and prefix sums keep their earlier columns in the
    env's :data:`STATE` (a dict the caller keeps per step and per layer)."""

    def _Past(self, e: Past) -> Fn:
        inner, key = self.matrix(e.arg), e  # keyed by the expression itself: printing may lose detail

        def past(env: Env) -> torch.Tensor:
            fresh = env[FRESH]
            if key not in fresh:  # each value is appended once per call, however often it is read
                new = inner(env)  # (B|1, K|1, r, n)
                earlier = env[STATE].get(key)
                fresh[key] = env[STATE][key] = new if earlier is None else torch.cat([earlier, new], dim=-1)
            return fresh[key]

        return past

    def _PrefixSum(self, e: PrefixSum) -> Fn:
        inner, key = self.matrix(e.arg), e

        def prefix(env: Env) -> torch.Tensor:
            fresh = env[FRESH]
            if key not in fresh:
                sums = torch.cumsum(inner(env), dim=-1)
                total = env[STATE].get(key)  # the sum over every earlier token: one column
                if total is not None:
                    sums = sums + total
                env[STATE][key] = sums[..., -1:]
                fresh[key] = sums
            return fresh[key]

        return prefix

    def _Softmax(self, e: Softmax) -> Fn:
        inner = self.matrix(e.arg)
        if not e.causal:  # the rewrite lets no other softmax through
            raise NotStreamable(f"{to_text(e)} is not causal")

        def causal(env: Env) -> torch.Tensor:
            x = inner(env)  # (.., T, n): rows every position so far, columns the last n of them
            earlier = x.shape[-2] - x.shape[-1]
            later = torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device).tril(-1 - earlier)
            return torch.softmax(x.masked_fill(later, float("-inf")), dim=-2)

        return causal

    def _LeadingColumns(self, e: LeadingColumns) -> Fn:
        inner, count = self.matrix(e.arg), self.scalar(e.count)

        def columns(env: Env) -> torch.Tensor:
            x, start, n = inner(env), env[OFFSET], int(count(env))
            if start + n > x.shape[-1]:
                raise UnrollError(f"position {start + n} is past the {x.shape[-1]} positions {e.arg} holds (its "
                                  "block_size)")
            return x.narrow(-1, start, n)

        return columns
