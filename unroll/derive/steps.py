r"""How to optimise (parts of) an objective, and the exact update each choice derives.

* :class:`GradientStep` on a smooth part f:  ``Z+ = Z - kappa grad f(Z)``.
* :class:`ProximalStep` (ISTA) on ``f + g`` with f smooth and g non-smooth:
  ``A_{t+1} = prox_{eta g}(A_t - eta grad f(A_t))``, ``iterations`` times from a warm start.
  When f contains a dictionary term the iterate is a code A (m x N) that explains Z; otherwise
  it is Z itself.

Relaxations (:mod:`unroll.relax`) are stored with the step and applied after derivation.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass
from typing import Literal, Union

import sympy as sp

from unroll.derive.update import Update, merge_params
from unroll.errors import UnrollError
from unroll.expr.nodes import ReLU
from unroll.expr.symbols import N, Z, d, m
from unroll.objective.base import Objective, ParamSpec, Term, Weighted
from unroll.objective.lasso import DICTIONARY, Lasso
from unroll.objective.sparsity import L1, NonNegative, lam

kappa, eta = sp.symbols("kappa eta", positive=True)


@dataclass(frozen=True)
class GradientStep:
    on: Objective | Term
    step_size: float = 1.0
    name: str = "gradient"
    relax: tuple = ()
    #: for a decoder step, the name of the encoder step it undoes
    inverts: str | None = None


@dataclass(frozen=True)
class ProximalStep:
    on: Objective | Term
    step_size: float = 0.1
    iterations: int = 1
    warm_start: Literal["input", "zero"] = "input"
    #: what the step outputs: the code itself, ``D A`` or ``D1 A`` with a separate dictionary D1
    decode: Literal["none", "tied", "decoupled"] = "none"
    name: str = "proximal"
    relax: tuple = ()


@dataclass(frozen=True)
class SynthesisStep:
    r"""``Z⁺ = D Z``: read the input as a sparse code of ``on``'s dictionary term and return the
    signal it codes, with a learned dictionary D (d x m) of its own. It undoes a proximal step
    whose output is the code (see :mod:`unroll.derive.inverse`)."""

    on: Objective | Term
    name: str = "synthesis"
    relax: tuple = ()
    inverts: str | None = None


Step = Union[GradientStep, ProximalStep, SynthesisStep]

#: a step's name becomes a submodule name (``layers.0.steps.<name>``) and a column of ``measure``
MAX_NAME_LENGTH = 64


def step_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a step, or None: it must be a Python identifier (no dots, no
    spaces), not a keyword, not private, and not an attribute every module has (``forward``,
    ``training``...), which ``nn.ModuleDict`` would refuse or shadow."""
    import torch.nn as nn  # late: the derivation itself needs no torch

    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        return f"a step name must be an identifier (letters, digits, _), found {name!r}"[:120]
    if len(name) > MAX_NAME_LENGTH:
        return f"a step name has at most {MAX_NAME_LENGTH} characters, found {len(name)}"
    if name.startswith("_") or hasattr(nn.ModuleDict, name):
        return f"{name!r} is reserved (an attribute of torch modules); choose another step name"
    return None


def derive(step: Step) -> Update:
    """The exact (unrelaxed) update of ``step``."""
    if isinstance(step, GradientStep):
        return _derive_gradient(step)
    if isinstance(step, ProximalStep):
        return _derive_proximal(step)
    if isinstance(step, SynthesisStep):
        return _derive_synthesis(step)
    raise TypeError(f"not a step: {step!r}")


def _parts(objective: Objective | Term) -> tuple[Weighted, ...]:
    return (objective._as_objective() if isinstance(objective, Term) else objective).parts


def _constants(step_name: str, terms: list[Term], extra: dict[str, float]) -> dict[str, float]:
    merged = dict(extra)
    for term in terms:
        for name, value in term.constants().items():
            if name in merged and merged[name] != value:
                raise UnrollError(
                    f"terms disagree on {name}: {merged[name]} vs {value}; give them the same value",
                    field=f"step {step_name}",
                )
            merged[name] = value
    return merged


def _smooth_terms(parts) -> tuple[Term, ...]:
    from unroll.objective.custom import Custom

    return tuple(w.term for w in parts if isinstance(w.term, Custom))


def _title(kind: str, parts) -> str:
    labels = " + ".join(w.term.label for w in parts)
    return f"{kind} on {labels}"


def _derive_gradient(step: GradientStep) -> Update:
    parts = _parts(step.on)
    increment, where, params = [], [], ()
    for w in parts:
        if not w.term.smooth:
            raise UnrollError(
                f"{w.term.label} is not smooth; take a proximal step on it",
                field=f"step {step.name}",
            )
        if w.term.codes:
            raise UnrollError(
                f"{w.term.label} acts on a sparse code; take a proximal step on it",
                field=f"step {step.name}",
            )
        g = w.term.gradient(Z)
        increment.append(w.weight * g.expr)
        where.extend(b for b in g.where if b not in where)
        params = merge_params(params, g.params)
    out = Z - kappa * sp.MatAdd(*increment)
    constants = _constants(step.name, [w.term for w in parts], {"kappa": step.step_size})
    return Update(
        name=step.name,
        title=_title("gradient ascent" if all(w.weight.is_negative for w in parts) else "gradient descent", parts),
        out=out,
        where=tuple(where),
        params=params,
        constants=constants,
        smooth_terms=_smooth_terms(parts),
    )


def prox_of(nonsmooth: list[Weighted], V: sp.MatrixExpr, t: sp.Expr) -> sp.MatrixExpr:
    r"""``prox_{t g}(V)`` for a sum g of non-smooth terms with a known closed form.

    The l1 norm and non-negativity are separable and their sum has the closed form
    ``prox(V) = max(V - t lambda, 0)`` (soft threshold, then projection).
    """
    kinds = {type(w.term) for w in nonsmooth}
    for w in nonsmooth:
        if not (w.weight.is_positive):
            raise UnrollError(f"the non-smooth term {w.term.label} needs a positive weight, found {w.weight}")
    if len(nonsmooth) != len(kinds) or not kinds <= {L1, NonNegative}:
        names = ", ".join(w.term.label for w in nonsmooth)
        raise UnrollError(f"no proximal operator known for the sum of {names}")
    l1 = next((w for w in nonsmooth if isinstance(w.term, L1)), None)
    if kinds == {L1, NonNegative}:
        return ReLU(V - t * l1.weight * lam * sp.OneMatrix(*V.shape))
    if kinds == {L1}:
        return l1.term.prox(V, t * l1.weight)
    if kinds == {NonNegative}:
        return ReLU(V)
    return V


def _derive_proximal(step: ProximalStep) -> Update:
    parts = _parts(step.on)
    smooth = [w for w in parts if w.term.smooth]
    nonsmooth = [w for w in parts if not w.term.smooth]
    coding = [w for w in smooth if isinstance(w.term, Lasso)]
    if len(coding) > 1:
        raise UnrollError("a proximal step can fit one dictionary, found several", field=f"step {step.name}")
    if step.iterations < 1:
        raise UnrollError(f"iterations must be at least 1, found {step.iterations}", field=f"step {step.name}")
    expansion = coding[0].term.expansion if coding else 1
    rows = m if coding else d
    if step.warm_start == "input" and coding and expansion != 1:
        raise UnrollError(
            f"a warm start from the input needs a square dictionary, this one has {expansion}x atoms; "
            "use warm_start: zero",
            field=f"step {step.name}",
        )
    params = ()
    iterate = Z if step.warm_start == "input" else sp.ZeroMatrix(rows, N)
    bindings = []
    for t in range(1, step.iterations + 1):
        grads = []
        for w in smooth:
            g = w.term.gradient(iterate, Z) if w.term.codes else w.term.gradient(iterate)
            grads.append(w.weight * g.expr)
            bindings.extend(b for b in g.where if b not in bindings)
            params = merge_params(params, g.params)
        V = (iterate - eta * sp.MatAdd(*grads)).doit() if grads else iterate
        new = prox_of(nonsmooth, V, eta)
        if t < step.iterations:
            sym = sp.MatrixSymbol(f"A_{t}", rows, N)
            bindings.append((sym, new))
            iterate = sym
        else:
            iterate = new
    out = iterate
    if step.decode == "tied":
        out = DICTIONARY.symbol * out
    elif step.decode == "decoupled":
        decoder = ParamSpec("D1", d, m, ("kaiming", m), "decoding dictionary")
        out = decoder.symbol * out
        params = merge_params(params, (decoder,))
    constants = _constants(step.name, [w.term for w in parts], {"eta": step.step_size})
    return Update(
        name=step.name,
        title=_title(f"proximal gradient (ISTA, {step.iterations} iteration{'s' if step.iterations > 1 else ''}, from {'the input' if step.warm_start == 'input' else 'zero'})", parts),
        out=out,
        where=tuple(bindings),
        params=params,
        constants=constants,
        smooth_terms=_smooth_terms(parts),
        expansion=expansion,
    )


def _derive_synthesis(step: SynthesisStep) -> Update:
    coding = [w.term for w in _parts(step.on) if isinstance(w.term, Lasso)]
    if len(coding) != 1:
        raise UnrollError("a synthesis step needs exactly one dictionary (lasso) term", field=f"step {step.name}")
    if coding[0].expansion != 1:
        raise UnrollError(
            f"a synthesis step reads a code of width d, this dictionary has {coding[0].expansion}x atoms",
            field=f"step {step.name}",
        )
    synthesis = ParamSpec("D", d, d, ("kaiming", d), "synthesis dictionary, untied from the encoder's")
    return Update(
        name=step.name,
        title="synthesis of the signal from its sparse code",
        out=synthesis.symbol * Z,
        params=(synthesis,),
    )
