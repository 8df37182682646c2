"""The compile stage: a network's plan, the one description that every command reads.

    network ──plan──▶ Plan: for each group of layers, each step's exact update, its update after
                      each relaxation, the validated block graph; the sizes; which unrolled layer
                      runs which group and which set of parameters

``build`` lowers a plan into modules; ``explain`` prints it; ``measure``, ``attention``,
``convert`` and the memory estimate read it from the built model. So they cannot disagree: a
network that one of them refuses, all of them refuse, with the same message.

Planning is pure (sympy and networkx, no weights) and its result immutable, so it is cached:
the memory estimate, the build and ``explain`` of one network plan it once. Like einops'
parse -> plan -> execute, the plan is the cached, inspectable middle.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType

import sympy as sp

from unroll.derive.init import initialised
from unroll.derive.steps import Step, derive, step_constants, step_name_problem
from unroll.derive.update import Update
from unroll.errors import UnrollError
from unroll.expr.printing import to_text
from unroll.graph.blocks import LayerGraph, build_layer_graph
from unroll.expr.nodes import LeadingColumns, PrefixSum
from unroll.expr.symbols import N, d as dim, m, size_value
from unroll.relax.tidy import matmul_factors
from unroll.network import Group, Network, TokenFrontend
from unroll.objective.base import ParamSpec, Term, Weighted
from unroll.relax.rules import apply_all, prune, terms_of


@dataclass(frozen=True)
class Unused:
    """A constant of the exact update that the relaxations removed from the computed one: giving
    it another value changes nothing."""

    name: str
    value: float
    source: str
    removed_by: str

    def describe(self) -> str:
        symbol = to_text(sp.Symbol(self.name))
        return (f"{symbol} = {self.value:g} ({self.source}) has no effect on the computed update: "
                f"the relaxation {self.removed_by} removed it")


@dataclass(frozen=True)
class DerivedStep:
    """A step's exact update, then its update after each relaxation (the last one is computed)."""

    step: Step
    exact: Update
    relaxed: tuple[tuple[object, Update], ...]

    @property
    def final(self) -> Update:
        return self.relaxed[-1][1] if self.relaxed else self.exact

    @property
    def name(self) -> str:
        return self.exact.name

    @property
    def parts(self) -> tuple[Weighted, ...]:
        """The weighted terms of the objective this step optimises."""
        on = self.step.on
        return (on._as_objective() if isinstance(on, Term) else on).parts

    @property
    def unused(self) -> tuple[Unused, ...]:
        sources = step_constants(self.step)
        out = []
        for name, value in self.exact.constants.items():
            if name in self.final.constants:
                continue
            removed_by = next(r.name for r, u in self.relaxed if name not in u.constants)
            out.append(Unused(name, value, sources.get(name, "a constant of the step"), removed_by))
        return tuple(out)


@dataclass(frozen=True)
class GroupPlan:
    """A group of layers: its steps, derived and relaxed, and their validated block graph."""

    group: Group
    steps: tuple[DerivedStep, ...]
    graph: LayerGraph

    @property
    def modules(self) -> int:
        """Sets of parameters: one per repeat, or one shared by all when tied."""
        return 1 if self.group.tie else self.group.repeat


@dataclass(frozen=True)
class LayerPlan:
    """One unrolled layer: its number (from 1, across groups), its group, and the index of its
    parameters among the stack's modules (``encoder.layers.<module>``)."""

    number: int
    group: int
    module: int
    steps: tuple[DerivedStep, ...]


def span(first: int, repeat: int, what: str = "layer") -> str:
    """``layer 3`` or ``layers 3-4``: the unrolled layers a group covers, numbered from 1."""
    return f"{what} {first}" if repeat == 1 else f"{what}s {first}-{first + repeat - 1}"


@dataclass(frozen=True)
class StackPlan:
    """The layers of an encoder or a decoder, group after group."""

    groups: tuple[GroupPlan, ...]

    def __deepcopy__(self, memo: dict) -> StackPlan:  # immutable: a copied model shares it
        return self

    @property
    def depth(self) -> int:
        return sum(g.group.repeat for g in self.groups)

    @property
    def layers(self) -> tuple[LayerPlan, ...]:
        out, module = [], 0
        for g, planned in enumerate(self.groups):
            for r in range(planned.group.repeat):
                out.append(LayerPlan(len(out) + 1, g, module + (0 if planned.group.tie else r), planned.steps))
            module += planned.modules
        return tuple(out)

    def steps(self) -> Iterator[DerivedStep]:
        """Every derived step, group after group (each group's steps once)."""
        for g in self.groups:
            yield from g.steps

    def spans(self, what: str = "layer") -> list[str]:
        """Each group's layers in words (``layers 1-2``)."""
        out, first = [], 1
        for g in self.groups:
            out.append(span(first, g.group.repeat, what))
            first += g.group.repeat
        return out


@dataclass(frozen=True)
class Plan:
    network: Network
    #: ``d``, ``K``, ``p`` (``m`` depends on the step: ``expansion * d``)
    sizes: Mapping[str, int]
    encoder: StackPlan
    decoder: StackPlan | None

    def __deepcopy__(self, memo: dict) -> Plan:  # immutable: a copied model shares it
        return self

    def stacks(self) -> Iterator[tuple[str, StackPlan]]:
        yield "encoder", self.encoder
        if self.decoder is not None:
            yield "decoder", self.decoder

    def unused(self) -> list[tuple[str, Unused]]:
        """(step name, constant) for every constant the relaxations made inert."""
        found = [(d.name, u) for _, stack in self.stacks() for d in stack.steps() for u in d.unused]
        return list(dict.fromkeys(found))  # a step reused by several groups is reported once


def plan(network: Network) -> Plan:
    """Derive, relax and validate every layer of ``network``; raises :class:`UnrollError` for
    anything that cannot be built."""
    if not isinstance(network, Network):
        raise UnrollError(f"expected a unroll.Network, found {type(network).__name__}")
    try:
        hash(network)
    except TypeError:  # something unhashable inside (a custom term's settings): plan afresh
        return _plan(network)
    return _plan_cached(network)


def _plan(network: Network) -> Plan:
    _check_network(network)
    sizes = MappingProxyType(network.sizes())
    tokens = network.frontend.tokens
    encoder = _stack(network.groups, sizes, "layer" if network.layer is not None else "layers", tokens)
    decoder = None
    if network.decoder is not None:
        groups = network.decoder_groups
        decoder = _stack(groups, sizes, "decoder.layer" if network.decoder.layer is not None else "decoder.layers", tokens)
    return Plan(network, sizes, encoder, decoder)


#: a few networks: a command plans one, a test suite many (each holding its custom functions)
_plan_cached = functools.lru_cache(maxsize=8)(_plan)


def _check_network(network: Network) -> None:
    front = network.frontend
    if isinstance(front, TokenFrontend):
        return  # nothing of the image kind to agree: any sequence up to the context is read
    if front.image_size % front.patch_size:
        raise UnrollError(f"patch_size ({front.patch_size}) must divide image_size ({front.image_size})",
                          field="architecture.patch_size")
    if front.positions == "sincos" and network.width % 4:
        raise UnrollError(f"positions: sincos needs a width divisible by 4, found {network.width}",
                          field="architecture.positions")
    if front.embedding == "pixels":
        size = front.channels * front.patch_size**2
        if network.width != size:
            raise UnrollError(f"embedding: pixels makes each patch's {size} values (channels × patch_size²) a token, "
                              f"so the width must be {size}, found {network.width}", field="architecture.width")
        if front.patch_norm or front.cls_token or front.positions != "none":
            raise UnrollError("embedding: pixels has no parameters: set patch_norm: false, cls_token: false and "
                              "positions: none", field="architecture.embedding")
    if network.decoder is None and network.head.pool == "cls" and not front.cls_token:
        raise UnrollError("pool: cls needs cls_token: true", field="architecture.pool")
    if network.decoder is not None and not front.cls_token:
        raise UnrollError("the masked autoencoder needs a cls token", field="architecture.cls_token")


def _stack(groups: tuple[Group, ...], sizes: Mapping[str, int], field: str, tokens: int) -> StackPlan:
    planned = []
    for i, group in enumerate(groups):
        where = field if field.endswith("layer") else f"{field}.{i}.steps"
        steps = derive_steps(group.layer, where)
        for d in steps:
            with _in_step(d.name):
                _check_step(d, sizes, tokens)
        planned.append(GroupPlan(group, steps, build_layer_graph([d.final for d in steps])))
    return StackPlan(tuple(planned))


def derive_steps(steps: tuple[Step, ...], field: str = "layer") -> tuple[DerivedStep, ...]:
    """Derive each step's exact update and relax it, in order."""
    names = [s.name for s in steps]
    for name in names:
        if (problem := step_name_problem(name)) is not None:
            raise UnrollError(problem, field=field)
    if len(set(names)) != len(names):
        raise UnrollError(f"step names must be unique within a layer, found {', '.join(names)}", field=field)
    out = []
    for step in steps:
        with _in_step(step.name):
            exact = prune(derive(step))
            relaxed = tuple(apply_all(exact, step.relax))
            if relaxed:  # the initialisations the step asks for apply to the parameters it ends with
                relaxed = (*relaxed[:-1], (relaxed[-1][0], initialised(relaxed[-1][1], step.init)))
            else:
                exact = initialised(exact, step.init)
            out.append(DerivedStep(step, exact, relaxed))
    return tuple(out)


@contextmanager
def _in_step(name: str) -> Iterator[None]:
    """Errors that name no field name the step."""
    try:
        yield
    except UnrollError as e:
        if e.field is not None:
            raise
        raise UnrollError(e.message, where=e.where, field=f"step {name}") from None


def _check_step(d: DerivedStep, sizes: Mapping[str, int], tokens: int) -> None:
    """What only the sizes reveal, and names that would collide once lowered."""
    from unroll.lower.step import attribute_problem  # the names a lowered step keeps for itself

    _check_causal(d.final, sizes, tokens)
    step_sizes = {**sizes, m.name: d.final.expansion * sizes[dim.name]}
    for w in d.parts:
        w.term.check(step_sizes)
    for u in (d.exact, d.final):
        for spec in u.params:
            _param_shape(spec, step_sizes)
        attrs: dict[str, str] = {}
        for name in [*(spec.attr for spec in u.params), *u.constants]:
            if (problem := attribute_problem(name)) is not None:
                raise UnrollError(f"{problem}; rename it")
        for spec in u.params:
            if attrs.setdefault(spec.attr, spec.name) != spec.name:
                raise UnrollError(f"parameters {attrs[spec.attr]} and {spec.name} would both be stored as "
                                  f"{spec.attr!r} (a name ending in _k is per head); rename one")
        taken = set(u.constants) | {s.name for s, _ in u.where if isinstance(s, (sp.Symbol, sp.MatrixSymbol))}
        clash = sorted(taken & {p.name for p in u.params} | taken & set(attrs))
        if clash:
            raise UnrollError(f"{clash[0]} names both a parameter and a constant or intermediate result of the "
                              "step; rename the parameter")


def _check_causal(u: Update, sizes: Mapping[str, int], tokens: int) -> None:
    """A step whose statistics are prefix sums over the tokens must not depend on how many tokens
    follow one, and its per-position parameters must cover the network's tokens."""
    exprs = [u.out, *(e for _, e in u.where)]
    if not any(e.has(PrefixSum) for e in exprs):
        return
    for e in exprs:
        for node in e.atoms(LeadingColumns):
            held = size_value(node.arg.shape[1], dict(sizes))
            if held < tokens:
                raise UnrollError(f"{node.arg} holds {held} positions (its block_size) but the network has "
                                  f"{tokens} tokens; raise block_size to at least {tokens}")
    scales = [matmul_factors(t)[0] for t in terms_of(u.out)] + [e for s, e in u.where if not getattr(s, "is_Matrix", False)]
    if any(N in sp.sympify(c).free_symbols for c in scales):
        raise UnrollError("this causal step scales by a function of N, the number of tokens, so a token's output "
                          "would depend on how many tokens follow it; untie the output (untie_output) so that a "
                          "learned operator absorbs the scale")


def _param_shape(spec: ParamSpec, sizes: Mapping[str, int]) -> None:
    for dim in (spec.rows, spec.cols):
        try:
            value = size_value(dim, dict(sizes))
        except ValueError:
            raise UnrollError(f"the shape of parameter {spec.name} uses {dim}, which is not one of the sizes "
                              f"{', '.join(sorted(sizes))}") from None
        if value < 1:
            raise UnrollError(f"parameter {spec.name} would have a dimension of {value} ({dim})")
