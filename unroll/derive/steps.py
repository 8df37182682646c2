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
from typing import Annotated, Literal, Union

from pydantic import Field

import sympy as sp

from unroll.derive.init import Init
from unroll.derive.update import Update, merge_params
from unroll.errors import UnrollError
from unroll.fields import check_fields
from unroll.expr.nodes import ReLU
from unroll.expr.vocabulary import clamp
from unroll.expr.symbols import SIZES, N, Z, d, m
from unroll.objective.base import Objective, ParamSpec, Term, Weighted, objective_text
from unroll.objective.lasso import DICTIONARY, Lasso
from unroll.objective.sparsity import L1, NonNegative, lam

kappa, eta = sp.symbols("kappa eta", positive=True)
#: the dictionary that decodes a code back to the width (``decode: decoupled``)
DECODING = ParamSpec("D1", d, m, ("kaiming", m), "decoding dictionary")
#: the synthesis step's own dictionary (it reads a code of width d)
SYNTHESIS = ParamSpec("D", d, d, ("kaiming", d), "synthesis dictionary, untied from the encoder's")


class _Step:
    """What every step checks when it is made: what it optimises and its relaxations."""

    def __post_init__(self):
        if not isinstance(self.on, (Term, Objective)):
            raise UnrollError(f"a step optimises a term or a sum of terms, found {type(self.on).__name__}",
                              field=f"step {self.name}")
        relax = self.relax
        if not isinstance(relax, (tuple, list)):
            raise UnrollError(f"relax must be a tuple of relaxations, found a {type(relax).__name__}",
                              field=f"step {self.name}")
        for i, r in enumerate(relax):
            if not callable(getattr(r, "apply", None)) or not isinstance(getattr(r, "name", None), str):
                raise UnrollError(f"relax item {i} is a {type(r).__name__}, not a relaxation (from unroll.relax)",
                                  field=f"step {self.name}")
        object.__setattr__(self, "relax", tuple(relax))
        init = self.init
        if isinstance(init, dict):  # a mapping is the natural spelling; stored as pairs to stay hashable
            init = tuple(init.items())
        if not isinstance(init, tuple) or not all(
                isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], Init) for p in init):
            raise UnrollError("init maps parameter names to unroll.Init(...) values", field=f"step {self.name}")
        names = [name for name, _ in init]
        if len(set(names)) != len(names):
            raise UnrollError(f"init names a parameter twice: {', '.join(names)}", field=f"step {self.name}")
        object.__setattr__(self, "init", tuple(sorted(init)))  # one order: equal steps are equal
        check_fields(self, f"step {self.name}")


#: a step size: a positive, finite number
#: the bounds recipes and the Python API share (the schema imports them)
MAX_ITERATIONS = 64  # proximal iterations per step
MAX_STEP_SIZE = 1e6
StepSize = Annotated[float, Field(gt=0, le=MAX_STEP_SIZE, allow_inf_nan=False)]


@dataclass(frozen=True)
class GradientStep(_Step):
    on: Objective | Term
    step_size: StepSize = 1.0
    name: str = "gradient"
    relax: tuple = ()
    #: for a decoder step, the name of the encoder step it undoes
    inverts: str | None = None
    #: initialisations by stored parameter name (``{"U": Init("normal", 0.02)}``), see :mod:`unroll.derive.init`
    init: tuple = ()


@dataclass(frozen=True)
class ProximalStep(_Step):
    on: Objective | Term
    step_size: StepSize = 0.1
    iterations: Annotated[int, Field(ge=1, le=MAX_ITERATIONS)] = 1
    warm_start: Literal["input", "zero"] = "input"
    #: what the step outputs: the code itself, ``D A`` or ``D1 A`` with a separate dictionary D1
    decode: Literal["none", "tied", "decoupled"] = "none"
    name: str = "proximal"
    relax: tuple = ()
    #: initialisations by stored parameter name (``{"U": Init("normal", 0.02)}``), see :mod:`unroll.derive.init`
    init: tuple = ()


@dataclass(frozen=True)
class SynthesisStep(_Step):
    r"""``Z⁺ = D Z``: read the input as a sparse code of ``on``'s dictionary term and return the
    signal it codes, with a learned dictionary D (d x m) of its own. It undoes a proximal step
    whose output is the code (see :mod:`unroll.derive.inverse`)."""

    on: Objective | Term
    name: str = "synthesis"
    relax: tuple = ()
    inverts: str | None = None
    #: initialisations by stored parameter name (``{"U": Init("normal", 0.02)}``), see :mod:`unroll.derive.init`
    init: tuple = ()


Step = Union[GradientStep, ProximalStep, SynthesisStep]
STEP_TYPES = (GradientStep, ProximalStep, SynthesisStep)

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
    return f"{kind} on {objective_text(parts)}"


def step_constants(step: Step) -> dict[str, str]:
    """Where each constant of ``step``'s update comes from, in words (for messages)."""
    sources = {kappa.name: "the step size, step_size", eta.name: "the step size, step_size"}
    for w in _parts(step.on):
        for name in w.term.constants():
            sources.setdefault(name, f"a setting of the term {w.term.label}")
    return sources



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
        title=_gradient_title(parts),
        out=out,
        where=tuple(where),
        params=params,
        constants=constants,
        smooth_terms=_smooth_terms(parts),
    )


def _gradient_title(parts) -> str:
    """Descent on the objective as written; a step on ``-f`` alone is ascent on f."""
    if all(w.weight.is_negative for w in parts):
        return _title("gradient ascent", [Weighted(-w.weight, w.term) for w in parts])
    return _title("gradient descent", parts)


def prox_of(nonsmooth: list[Weighted], V: sp.MatrixExpr, t: sp.Expr, step_name: str | None = None) -> sp.MatrixExpr:
    r"""``prox_{t g}(V) = argmin_X t g(X) + ½‖X - V‖²_F`` for the sum ``g = Σ w_i h_i`` of a
    step's non-smooth terms (every weight positive):

    * no term: ``V``;
    * one term ``w h``: ``prox_{t w h}(V)``, the term's own ``h.prox(V, t w)``;
    * ``λ‖·‖₁ + ι_{≥0}``: ``ReLU(V - t λ 1)``, soft threshold then projection in one node;
    * a separable convex term h with a box ``ι_{[lo, hi]}``: ``clamp(prox_{t w h}(V), lo, hi)``.
      Coordinate by coordinate this minimises a convex function of one variable over an
      interval, whose minimiser is the clamp of the unconstrained one;
    * any other sum has no closed form here: the user writes one term whose prox is the sum's.
    """
    where = f"step {step_name}" if step_name else None
    for w in nonsmooth:
        if not sp.sympify(w.weight).is_positive:
            raise UnrollError(f"the non-smooth term {w.term.label} needs a positive weight, found {w.weight}", field=where)
    if not nonsmooth:
        return V
    if len(nonsmooth) == 1:
        (w,) = nonsmooth
        return term_prox(w.term, V, t * w.weight, where)
    if len(nonsmooth) == 2 and {type(w.term) for w in nonsmooth} == {L1, NonNegative}:
        # kept exactly as derived before: the bundled CRATE recipes print and check this form
        l1 = next(w for w in nonsmooth if isinstance(w.term, L1))
        return ReLU(V - t * l1.weight * lam * sp.OneMatrix(*V.shape))
    pair = _box_with_separable(nonsmooth)
    if pair is not None:
        box, other = pair
        return clamp(term_prox(other.term, V, t * other.weight, where), *box.term.bounds())
    names = " + ".join(w.term.label for w in nonsmooth)
    raise UnrollError(
        f"no proximal operator known for the sum {names}: a proximal step combines non-smooth terms "
        "only as l1 + nonnegative, or as one separable convex term with a box constraint; "
        "write one term (smooth = False) whose prox(V, step) is the prox of the whole sum",
        field=where,
    )


def _box_with_separable(nonsmooth: list[Weighted]) -> tuple[Weighted, Weighted] | None:
    """``(box, other)`` if the two terms are a box constraint and a separable convex term."""
    if len(nonsmooth) != 2:
        return None
    for box, other in (nonsmooth, nonsmooth[::-1]):
        if box.term.bounds() is not None and other.term.separable and other.term.convex:
            return box, other
    return None


def term_prox(term: Term, V: sp.MatrixExpr, step: sp.Expr, where: str | None = None) -> sp.MatrixExpr:
    """``term.prox(V, step)``, refused with an :class:`UnrollError` naming the term unless it is a
    well-shaped matrix expression of V's shape in symbols the step knows (V, the step's, the
    term's constants, sizes). Errors inside a user's prox (sympy's ShapeError...) are reported
    the same. The prox is taken at a point symbol of V's shape, then V is put in its place: the
    checks see the prox's own algebra, not the gradient step's inside V."""
    point = sp.MatrixSymbol("V" if "V" not in {s.name for s in V.free_symbols} else "V_point", *V.shape)
    try:
        out = term.prox(point, step)
    except UnrollError:
        raise
    except Exception as e:  # a user's prox is the user's code: say whose it is
        raise UnrollError(f"the prox of {term.label} failed: {type(e).__name__}: {e}", field=where) from e
    if not isinstance(out, sp.MatrixExpr):
        raise UnrollError(
            f"the prox of {term.label} must return a sympy matrix expression of shape {_shape(V)}, "
            f"found {type(out).__name__}", field=where)
    if _shape(out) != _shape(V):
        raise UnrollError(
            f"the prox of {term.label} must return a matrix of V's shape {_shape(V)}, found {_shape(out)}",
            field=where)
    if (problem := _shape_problem(out)) is not None:
        raise UnrollError(f"the prox of {term.label} {problem}", field=where)
    known = {point.name, *(s.name for s in sp.sympify(step).free_symbols), *term.constants(), *SIZES}
    unknown = sorted({s.name for s in out.free_symbols} - known)
    if unknown:
        raise UnrollError(
            f"the prox of {term.label} uses {', '.join(unknown)}, which is not V, the step size or "
            "one of the term's constants(); return each scalar it needs from constants()", field=where)
    return out.xreplace({point: V})


def _shape(X: sp.MatrixExpr) -> str:
    return " x ".join(str(sp.sympify(s)) for s in X.shape)


def _same(a: sp.Expr, b: sp.Expr) -> bool:
    return sp.expand(sp.sympify(a) - sp.sympify(b)) == 0


def _shape_problem(expr: sp.Basic) -> str | None:
    """What in ``expr`` is ill-shaped, in words, or None. sympy no longer checks the shapes of
    sums and products it builds (``V * V`` of a d x N matrix is ``V**2``)."""
    for e in sp.preorder_traversal(expr):
        if isinstance(e, sp.MatMul):
            mats = [a for a in e.args if getattr(a, "is_Matrix", False)]
            for a, b in zip(mats, mats[1:]):
                if not _same(a.shape[1], b.shape[0]):
                    return f"multiplies {_shape(a)} by {_shape(b)} (ShapeError)"
        elif isinstance(e, (sp.MatPow, sp.Inverse)) and not _same(*e.args[0].shape):
            return f"raises the non-square {_shape(e.args[0])} to a power (ShapeError)"
        elif isinstance(e, (sp.MatAdd, sp.HadamardProduct)):
            shapes = {_shape(a) for a in e.args if getattr(a, "is_Matrix", False)}
            if len(shapes) > 1:
                return f"combines entrywise the shapes {' and '.join(sorted(shapes))} (ShapeError)"
    return None


def _occurrences(expr: sp.Basic, part: sp.Basic) -> int:
    return sum(1 for e in sp.preorder_traversal(expr) if e == part)


def _derive_proximal(step: ProximalStep) -> Update:
    parts = _parts(step.on)
    smooth = [w for w in parts if w.term.smooth]
    nonsmooth = [w for w in parts if not w.term.smooth]
    coding = [w for w in smooth if isinstance(w.term, Lasso)]
    if len(coding) > 1:
        raise UnrollError("a proximal step can fit one dictionary, found several", field=f"step {step.name}")
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
        new = prox_of(nonsmooth, V, eta, step.name)
        if not isinstance(V, sp.MatrixSymbol) and _occurrences(new, V) > 1:
            # a prox that reads its point several times (V ∘ ReLU(1 - c ⊘ ‖V‖)) gets it named
            # once, so the gradient step inside is computed once
            point = sp.MatrixSymbol("V" if step.iterations == 1 else f"V_{t}", rows, N)
            bindings.append((point, V))
            new = new.xreplace({V: point})
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
        out = DECODING.symbol * out
        params = merge_params(params, (DECODING,))
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
    synthesis = SYNTHESIS
    return Update(
        name=step.name,
        title="synthesis of the signal from its sparse code",
        out=synthesis.symbol * Z,
        params=(synthesis,),
    )
