"""The relaxations of the white-box derivations (reference section 2), each a named rewrite.

Their order matters and is the recipe's: e.g. ``softmax`` rewrites the Gram similarity that
``neumann`` exposes, and ``untie_output`` absorbs the scalar that ``complete_subspaces`` leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Union

from pydantic import ConfigDict, Field

import sympy as sp

from unroll.derive.update import Update, merge_params, used_names
from unroll.errors import UnrollError, excerpt
from unroll.fields import check_fields
from unroll.expr.nodes import HeadSum, LayerNorm, Softmax, is_per_head
from unroll.expr.printing import to_text
from unroll.expr.symbols import K, N, Z, d, p
from unroll.objective.base import ParamSpec
from unroll.objective.compression import SUBSPACES
from unroll.relax.tidy import matmul_factors, tidy

tau = sp.Symbol("tau", positive=True)
_STRICT = ConfigDict(extra="forbid")  # recipes may not pass unknown arguments


class _Rule:
    """A relaxation made in Python is held to the bounds its fields declare, as in a recipe."""

    def __post_init__(self):
        check_fields(self, f"relaxation {self.name}")


def _fail(update: Update, relaxation: str, message: str) -> UnrollError:
    return UnrollError(message, field=f"step {update.name}, relaxation {relaxation}")


def _note(update: Update, text: str) -> tuple[str, ...]:
    return (*update.notes, text)


@dataclass(frozen=True)
class Neumann(_Rule):
    """``(I + A)^{-1} ≈ Σ_{j=0}^{order} (-A)^j``: drops the inverse of the Gram matrix."""

    __pydantic_config__: ClassVar = _STRICT

    #: each order adds a product of Gram matrices to the update; beyond a few the series is
    #: no cheaper than the inverse it replaces
    order: Annotated[int, Field(ge=1, le=16)] = 1
    name: ClassVar[str] = "neumann"

    @property
    def rule(self) -> str:
        series = " + ".join(["I", "-A", *[f"(-A)^{j}" for j in range(2, self.order + 1)]][: self.order + 1])
        return f"(I + A)⁻¹ ≈ {series}".replace("+ -", "- ")

    def apply(self, u: Update) -> Update:
        if self.order < 1:
            raise _fail(u, self.name, f"order must be at least 1, found {self.order}")
        found = []

        def series(inv: sp.Inverse) -> sp.MatrixExpr:
            n = inv.arg.shape[0]
            A = (inv.arg - sp.Identity(n)).doit()
            if A == inv.arg:
                raise _fail(u, self.name, f"the inverse {to_text(inv)} is not of the form (I + A)⁻¹")
            found.append(inv)
            terms = [sp.Identity(n), -A] + [(-1) ** j * sp.MatPow(A, j) for j in range(2, self.order + 1)]
            return sp.MatAdd(*terms)

        def rewrite(e):
            return e.replace(lambda x: isinstance(x, sp.Inverse), series)

        out = tidy(rewrite(u.out))
        where = tuple((s, tidy(rewrite(e)) if e.is_Matrix else e) for s, e in u.where)
        if not found:
            raise _fail(u, self.name, "the step has no matrix inverse to approximate")
        return u.evolve(out=out, where=where, notes=_note(u, self.name))


def _projection(u: Update, W: sp.MatrixSymbol) -> sp.Basic | None:
    """``X`` when ``W`` is bound to ``U_k^T X``."""
    e = u.binding(W.name)
    if isinstance(e, sp.MatMul) and len(e.args) == 2 and isinstance(e.args[0], sp.Transpose):
        return e.args[1]
    return None


def terms_of(expr: sp.MatrixExpr) -> tuple[sp.Basic, ...]:
    """The terms of a sum (an expression that is not a sum is its one term)."""
    return expr.args if isinstance(expr, sp.MatAdd) else (expr,)


def _head_sum_of_subspaces(term: sp.Basic) -> tuple[sp.Expr, list[sp.Basic]] | None:
    """``c Σ_k U_k F_1 F_2 ... -> (c, [F_1, F_2, ...])``, or None for any other term."""
    c, factors = matmul_factors(term)
    if len(factors) != 1 or not isinstance(factors[0], HeadSum):
        return None
    c_in, inner = matmul_factors(factors[0].arg)
    if len(inner) < 2 or inner[0] != SUBSPACES.symbol:
        return None
    return c * c_in, inner[1:]


@dataclass(frozen=True)
class CompleteSubspaces(_Rule):
    """Assume the subspaces cover the space, ``Σ_k U_k U_k^T = I``."""

    __pydantic_config__: ClassVar = _STRICT

    name: ClassVar[str] = "complete_subspaces"
    rule: ClassVar[str] = "Σ_k U_k U_kᵀ = I"

    def apply(self, u: Update) -> Update:
        terms, hits = [], 0
        for t in terms_of(u.out):
            match = _head_sum_of_subspaces(t)
            X = _projection(u, match[1][0]) if match and len(match[1]) == 1 else None
            if X is not None:
                terms.append(match[0] * X)
                hits += 1
            else:
                terms.append(t)
        if not hits:
            raise _fail(u, self.name, "found no Σ_k U_k U_kᵀ X to replace (apply neumann first)")
        return u.evolve(out=tidy(sp.MatAdd(*terms).doit()), notes=_note(u, self.name))


@dataclass(frozen=True)
class SoftmaxSimilarity(_Rule):
    """Replace each Gram similarity ``W_k^T W_k`` of projected tokens by ``softmax(tau W_k^T W_k)``,
    normalised over each column. ``temperature`` is a number or ``"1/sqrt(p)"``; ``causal``
    lets each token attend only to itself and earlier tokens (autoregressive models)."""

    __pydantic_config__: ClassVar = _STRICT

    temperature: Annotated[float, Field(gt=0, le=1e6)] | Annotated[str, Field(max_length=40)] = 1.0
    causal: bool = False
    name: ClassVar[str] = "softmax"

    @property
    def rule(self) -> str:
        t = "" if self.temperature == 1 else "τ "
        kind = "causal_softmax" if self.causal else "softmax"
        return f"W_kᵀ W_k → {kind}({t}W_kᵀ W_k)" + (
            f", τ = {'p^(-1/2)' if isinstance(self.temperature, str) else self.temperature}" if t else ""
        )

    def apply(self, u: Update) -> Update:
        if u.out.atoms(sp.Inverse):
            raise _fail(u, self.name, "the Gram matrix is still inside an inverse (apply neumann first)")
        scale, where, constants = sp.Integer(1), u.where, dict(u.constants)
        if isinstance(self.temperature, str):
            if self.temperature.replace(" ", "") not in ("1/sqrt(p)", "p^-1/2", "1/sqrt(head_dim)"):
                raise _fail(u, self.name, f"temperature must be a number or '1/sqrt(p)', found {excerpt(self.temperature)}")
            scale, where = tau, (*u.where, (tau, p ** sp.Rational(-1, 2)))
        elif self.temperature != 1:
            scale, constants["tau"] = tau, float(self.temperature)
        hits = []

        def soften(mm: sp.MatMul):
            c, factors = matmul_factors(mm)
            out, i = [], 0
            while i < len(factors):
                a = factors[i]
                b = factors[i + 1] if i + 1 < len(factors) else None
                if isinstance(a, sp.Transpose) and b is not None and a.arg == b and is_per_head(b):
                    out.append(Softmax(scale * a * b, self.causal))
                    hits.append(b)
                    i += 2
                else:
                    out.append(a)
                    i += 1
            return c * sp.MatMul(*out) if hits else mm

        out = u.out.replace(lambda e: isinstance(e, sp.MatMul), soften)
        if not hits:
            raise _fail(u, self.name, "found no Gram similarity W_kᵀ W_k of projected tokens")
        return u.evolve(out=out, where=where, constants=constants, notes=_note(u, self.name))


#: what ``untie_output`` introduces: the learned output operator and its bias
OUTPUT = ParamSpec("O_k", d, p, ("uniform", K * p), "output operator, untied from U")
OUTPUT_BIAS = ParamSpec("b", d, 1, ("uniform", K * p), "output bias")


@dataclass(frozen=True)
class UntieOutput(_Rule):
    """Replace the output operator ``c [U_1 ... U_K]`` by learned blocks ``[O_1 ... O_K]``
    (one ``Linear(K p -> d)``), optionally with a bias ``b``. O absorbs the size of c but not its
    sign, so that descent adds the learned output and ascent (a decoder) subtracts it."""

    __pydantic_config__: ClassVar = _STRICT

    bias: bool = True
    name: ClassVar[str] = "untie_output"

    @property
    def rule(self) -> str:
        return "c Σ_k U_k X_k → sign(c) (Σ_k O_k X_k" + (" + b 1ᵀ)" if self.bias else ")")

    def apply(self, u: Update) -> Update:
        O = OUTPUT
        terms, signs = [], []
        for t in terms_of(u.out):
            match = _head_sum_of_subspaces(t)
            if match:  # the size of the scalar in front is absorbed by O, its sign is kept
                sign = sp.sign(match[0])
                if sign not in (1, -1):
                    raise _fail(u, self.name, f"cannot tell the sign of the coefficient {to_text(match[0])}")
                terms.append(sign * HeadSum(sp.MatMul(O.symbol, *match[1])))
                signs.append(sign)
            else:
                terms.append(t)
        if len(signs) != 1:
            raise _fail(u, self.name, f"expected one output operator Σ_k U_k (...), found {len(signs)}")
        params = (O,)
        if self.bias:
            b = OUTPUT_BIAS
            terms.append(signs[0] * b.symbol * sp.OneMatrix(1, N))
            params += (b,)
        out = sp.MatAdd(*terms)
        return u.evolve(out=out, params=merge_params(u.params, params), notes=_note(u, self.name))


@dataclass(frozen=True)
class Residual(_Rule):
    """``c Z + Δ → Z + Δ`` (enabled: the skip's coefficient is absorbed, or a skip is added)
    or ``→ Δ`` (disabled)."""

    __pydantic_config__: ClassVar = _STRICT

    enabled: bool = True
    name: ClassVar[str] = "residual"

    @property
    def rule(self) -> str:
        return "c Z + Δ → Z + Δ" if self.enabled else "c Z + Δ → Δ"

    def apply(self, u: Update) -> Update:
        coeff, increment = u.skip_and_increment()
        if coeff == 0 and not self.enabled:
            raise _fail(u, self.name, "the step has no skip connection to remove")
        out = Z + increment if self.enabled else increment
        return u.evolve(out=out, notes=_note(u, self.name))


#: what ``pre_norm`` introduces: the normalised tokens ``Y = LN(Z)`` and the LayerNorm's parameters
NORMALISED = sp.MatrixSymbol("Y", d, N)
NORM_WEIGHT = ParamSpec("norm_weight", d, 1, ("ones",), "LayerNorm scale")
NORM_BIAS = ParamSpec("norm_bias", d, 1, ("zeros",), "LayerNorm shift")


@dataclass(frozen=True)
class PreNorm(_Rule):
    """Apply the step's operator to ``Y = LN(Z)`` (LayerNorm over each token); a skip connection,
    if any, still carries ``Z``."""

    __pydantic_config__: ClassVar = _STRICT

    eps: Annotated[float, Field(gt=0, le=1)] = 1e-5
    name: ClassVar[str] = "pre_norm"

    @property
    def rule(self) -> str:
        return f"Δ(Z) → Δ(LN(Z)), LN eps = {self.eps:g}"

    def apply(self, u: Update) -> Update:
        if u.binding(NORMALISED.name) is not None:
            raise _fail(u, self.name, "the step already has a pre-norm")
        gamma, shift, Y = NORM_WEIGHT, NORM_BIAS, NORMALISED
        coeff, increment = u.skip_and_increment()
        swap = {Z: Y}
        out = coeff * Z + increment.xreplace(swap) if coeff != 0 else u.out.xreplace(swap)
        where = ((Y, LayerNorm(Z, gamma.symbol, shift.symbol, sp.Float(self.eps))),) + tuple(
            (s, e.xreplace(swap)) for s, e in u.where
        )
        return u.evolve(out=out, where=where, params=merge_params((gamma, shift), u.params), notes=_note(u, self.name))


@dataclass(frozen=True)
class Learnable(_Rule):
    """Turn fixed constants (step sizes, thresholds, temperatures) into learned parameters."""

    __pydantic_config__: ClassVar = _STRICT

    constants: Annotated[tuple[Annotated[str, Field(max_length=64)], ...], Field(max_length=16)] = ()
    name: ClassVar[str] = "learnable"

    @property
    def rule(self) -> str:
        return "learned: " + ", ".join(self.constants)

    def apply(self, u: Update) -> Update:
        unknown = [c for c in self.constants if c not in u.constants]
        if unknown:
            known = ", ".join(sorted(u.constants)) or "none"
            raise _fail(u, self.name, f"no constant named {', '.join(unknown)} in this step (constants: {known})")
        return u.evolve(learnable=u.learnable | frozenset(self.constants), notes=_note(u, self.name))


Relaxation = Union[Neumann, CompleteSubspaces, SoftmaxSimilarity, UntieOutput, Residual, PreNorm, Learnable]

RELAXATIONS: dict[str, type] = {
    cls.name: cls  # type: ignore[attr-defined]
    for cls in (Neumann, CompleteSubspaces, SoftmaxSimilarity, UntieOutput, Residual, PreNorm, Learnable)
}


def apply_all(update: Update, relaxations) -> list[tuple[object, Update]]:
    """The update after each relaxation in turn, as ``(relaxation, update)`` pairs."""
    history = []
    for r in relaxations:
        update = prune(r.apply(update))
        history.append((r, update))
    return history


def prune(update: Update) -> Update:
    """Drop bindings and constants the output no longer uses (e.g. ``beta`` once absorbed)."""
    needed = used_names(update.out, {s.name: e for s, e in update.where})
    return update.evolve(
        where=tuple((s, e) for s, e in update.where if s.name in needed),
        constants={k: v for k, v in update.constants.items() if k in needed},
        params=tuple(p for p in update.params if p.name in needed),
        learnable=frozenset(c for c in update.learnable if c in needed),
    )

