"""An update step as data: ``Z+ = out`` with named intermediate results, and what it needs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import sympy as sp

from unroll.errors import UnrollError
from unroll.expr.symbols import Z
from unroll.objective.base import ParamSpec, Term

Binding = tuple[sp.Basic, sp.Basic]


@dataclass(frozen=True)
class Update:
    """``out`` is the new value of the step's input ``Z``.

    ``where`` binds symbols used in ``out`` (matrix symbols like ``W_k = U_k^T Z`` and scalar
    ones like ``beta = p / (N eps^2)``), in an order where each binding uses only earlier ones.
    ``constants`` are fixed scalars by symbol name (buffers once lowered), except those listed in
    ``learnable`` (parameters). ``smooth_terms`` are the user terms whose gradients autograd
    provides. ``notes`` record the named relaxations applied so far.
    """

    name: str
    title: str
    out: sp.MatrixExpr
    where: tuple[Binding, ...] = ()
    params: tuple[ParamSpec, ...] = ()
    constants: dict[str, float] = field(default_factory=dict)
    learnable: frozenset[str] = frozenset()
    layernorm_eps: dict[str, float] = field(default_factory=dict)
    smooth_terms: tuple[Term, ...] = ()
    #: dictionary atoms as a multiple of the width (m = expansion * d)
    expansion: int = 1
    notes: tuple[str, ...] = ()

    def evolve(self, **changes) -> Update:
        return replace(self, **changes)

    @property
    def input(self) -> sp.MatrixSymbol:
        return Z

    def binding(self, name: str) -> sp.Basic | None:
        return next((e for s, e in self.where if s.name == name), None)

    def substitute(self, mapping: dict) -> Update:
        """Replace symbols in ``out`` and every binding."""
        return self.evolve(
            out=self.out.xreplace(mapping),
            where=tuple((s, e.xreplace(mapping)) for s, e in self.where),
        )

    def skip_and_increment(self) -> tuple[sp.Expr, sp.MatrixExpr]:
        """Split ``out = c Z + increment``; ``c`` is 0 when the step has no skip connection."""
        terms = self.out.args if isinstance(self.out, sp.MatAdd) else (self.out,)
        coeff, rest = sp.Integer(0), []
        for t in terms:
            c, mat = _coeff_of(t)
            if mat == Z:
                coeff += c
            else:
                rest.append(t)
        increment = sp.MatAdd(*rest).doit() if rest else sp.ZeroMatrix(*Z.shape)
        return coeff, increment

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


def _coeff_of(term: sp.Basic) -> tuple[sp.Expr, sp.Basic]:
    if isinstance(term, sp.MatMul):
        c, mm = term.as_coeff_mmul()
        factors = mm.args
        if len(factors) == 1:
            return c, factors[0]
        return sp.Integer(1), term
    return sp.Integer(1), term


def used_names(expr: sp.Basic, bound: dict[str, sp.Basic]) -> set[str]:
    """Names of the symbols ``expr`` uses, directly or through the bindings ``bound`` (by name)."""
    used: set[str] = set()
    stack = [expr]
    while stack:
        for atom in stack.pop().atoms(sp.Symbol, sp.MatrixSymbol):
            if atom.name in bound and atom.name not in used:
                stack.append(bound[atom.name])
            used.add(atom.name)
    return used


def merge_params(*groups: tuple[ParamSpec, ...]) -> tuple[ParamSpec, ...]:
    """Union of parameter lists, by name, keeping first-seen order. One name is one tensor: two
    terms may share a parameter only by declaring the same one (the compression and denoising
    terms' ``U_k``); two different ones under one name are an error."""
    seen: dict[str, ParamSpec] = {}
    for group in groups:
        for spec in group:
            first = seen.setdefault(spec.name, spec)
            if first != spec:
                raise UnrollError(
                    f"two different parameters are named {spec.name}: {first.note or 'one'} "
                    f"({first.rows} x {first.cols}) and {spec.note or 'another'} ({spec.rows} x {spec.cols}); "
                    "rename the one you declared")
    return tuple(seen.values())
