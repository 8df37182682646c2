"""Every proximal operator against its definition, ``prox_{t g}(v) = argmin_x t g(x) + ½‖x - v‖²``,
found here independently by numerical minimisation (scipy), then compared with the derived
expression evaluated from its sympy tree and with the lowered step (plain and optimised); zero
tokens and groups stay finite with finite gradients; the errors name what is wrong (float64)."""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import scipy.optimize as scipy_optimize
import sympy as sp
import torch
import yaml

import unroll
from unroll.derive.steps import prox_of
from unroll.errors import UnrollError
from unroll.expr.nodes import ReLU
from unroll.expr.numeric import evaluate
from unroll.expr.vocabulary import (
    absolute,
    clamp,
    column_norms,
    divide,
    group_norms,
    maximum,
    minimum,
    multiply,
    ones_like,
    relu,
    row_norms,
    sign,
)
from unroll.objective import L1, Box, Custom, ElasticNet, GroupSparsity, Lasso, NonNegative, Term, UnitNorm
from unroll.objective.base import Weighted

T = 0.4  # the step size η
ROWS, TOKENS = 6, 5
V = sp.MatrixSymbol("V", ROWS, TOKENS)
ETA = sp.Symbol("eta", positive=True)
BUILDS = [pytest.param(False, id="plain"), pytest.param(True, id="optimised")]

# ------------------------------------------------------------------ independent minimisers ---


def scalar_prox(g, lo: float, hi: float, v: float, t: float) -> float:
    """argmin over [lo, hi] of ``t g(x) + ½(x - v)²``, by bounded Brent: the minimiser is within
    ``t |g'|`` of v, so a window of ±5 around v holds it."""
    a, b = max(lo, v - 5.0), min(hi, v + 5.0)
    res = scipy_optimize.minimize_scalar(lambda x: t * g(x) + 0.5 * (x - v) ** 2, bounds=(a, b),
                                         method="bounded", options={"xatol": 1e-12})
    return float(res.x)


def separable_prox(g, lo, hi, v: np.ndarray, t: float) -> np.ndarray:
    return np.vectorize(lambda x: scalar_prox(g, lo, hi, x, t))(v)


def group_prox(lam: float, group: int, v: np.ndarray, t: float) -> np.ndarray:
    """argmin of ``t lam Σ ‖x_g‖ + ½‖x - v‖²``, group by group: the better of 0 (the kink) and
    BFGS from v (the objective is smooth away from 0)."""
    out = np.zeros_like(v)
    for j in range(v.shape[1]):
        for s in range(0, v.shape[0], group):
            w = v[s:s + group, j]
            F = lambda x: t * lam * np.linalg.norm(x) + 0.5 * np.sum((x - w) ** 2)  # noqa: E731
            res = scipy_optimize.minimize(F, w, method="BFGS", options={"gtol": 1e-12})
            out[s:s + group, j] = res.x if F(res.x) < F(np.zeros_like(w)) else 0.0
    return out


def sphere_projection(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The nearest unit vector to each column, by minimising ``‖y/‖y‖ - v‖²`` over y from many
    random starts (no formula)."""
    out = np.zeros_like(v)
    for j in range(v.shape[1]):
        w = v[:, j]
        F = lambda y: np.sum((y / np.linalg.norm(y) - w) ** 2)  # noqa: E731
        best = min((scipy_optimize.minimize(F, rng.standard_normal(len(w)), method="BFGS", options={"gtol": 1e-12})
                    for _ in range(8)), key=lambda r: r.fun)
        out[:, j] = best.x / np.linalg.norm(best.x)
    return out


# --------------------------------------------------------------------------------- cases ----

INF = np.inf
#: name -> (weighted terms, g of one coordinate as the test writes it, the feasible interval)
SEPARABLE = {
    "l1": ([(2, L1(lam=0.15))], lambda x: 0.3 * abs(x), -INF, INF),
    "nonneg": ([(1, NonNegative())], lambda x: 0.0, 0.0, INF),
    "l1+nonneg": ([(1, L1(lam=0.3)), (1, NonNegative())], lambda x: 0.3 * abs(x), 0.0, INF),
    "elastic_net": ([(1, ElasticNet(l1=0.3, l2=0.8))], lambda x: 0.3 * abs(x) + 0.4 * x * x, -INF, INF),
    "box": ([(1, Box(lo=-0.4, hi=0.7))], lambda x: 0.0, -0.4, 0.7),
    "box_upper": ([(1, Box(lo=None, hi=0.2))], lambda x: 0.0, -INF, 0.2),
    "l1+box": ([(1, L1(lam=0.3)), (3, Box(lo=-0.5, hi=0.25))], lambda x: 0.3 * abs(x), -0.5, 0.25),
    "elastic_net+box": ([(0.5, ElasticNet(l1=0.4, l2=1.0)), (1, Box(lo=-0.3, hi=0.5))],
                        lambda x: 0.5 * (0.4 * abs(x) + 0.5 * x * x), -0.3, 0.5),
    "box+elastic_net_nonneg": ([(1, NonNegative()), (1, ElasticNet(l1=0.2, l2=0.5))],
                               lambda x: 0.2 * abs(x) + 0.25 * x * x, 0.0, INF),
}


def weighted(pairs) -> list[Weighted]:
    return [Weighted(sp.nsimplify(w), term) for w, term in pairs]


def objective(pairs):
    return sum(w * term for w, term in pairs)


def constants(pairs) -> dict[str, float]:
    return {name: value for _, term in pairs for name, value in term.constants().items()}


def derived(pairs, v: np.ndarray) -> np.ndarray:
    """The derived prox expression, evaluated from its sympy tree."""
    return evaluate(prox_of(weighted(pairs), V, ETA), {"V": v, "eta": T, **constants(pairs)})


def network(on, *, width=ROWS, heads=2, step_size=T, iterations=1) -> unroll.Network:
    step = unroll.ProximalStep(on, step_size=step_size, iterations=iterations, name="prox")
    return unroll.Network((step,), width=width, heads=heads, depth=1,
                          frontend=unroll.PatchFrontend(image_size=8, patch_size=4, channels=1),
                          head=unroll.ClassifierHead(classes=3))


def layers(net: unroll.Network):
    """Layer 0 of the plain and the optimised build, with the same weights."""
    plain = unroll.build(net, optimize=False).double()
    fast = unroll.build(net, optimize=True).double()
    fast.load_state_dict(plain.state_dict())
    return plain.layer(0), fast.layer(0)


def lowered(pairs, v: np.ndarray) -> list[np.ndarray]:
    """``prox_{T g}(v)`` as the built step computes it: with no smooth term the step is the prox
    of its input."""
    return [layer(torch.from_numpy(v)[None]).detach()[0].numpy() for layer in layers(network(objective(pairs)))]


def sample(scale: float = 0.6) -> np.ndarray:
    return np.random.randn(ROWS, TOKENS) * scale


# ------------------------------------------------------------------------ against argmin ----


@pytest.mark.parametrize("name", SEPARABLE)
def test_separable_prox_is_the_minimiser(name):
    pairs, g, lo, hi = SEPARABLE[name]
    v = sample()
    expected = separable_prox(g, lo, hi, v, T)
    for x in [derived(pairs, v), *lowered(pairs, v)]:
        assert np.abs(x - expected).max() < 1e-6
        assert np.all((x >= lo - 1e-12) & (x <= hi + 1e-12))
        # as good as the numerical minimiser, coordinate by coordinate
        F = lambda y: T * np.vectorize(g)(y) + 0.5 * (y - v) ** 2  # noqa: E731
        assert np.all(F(x) <= F(expected) + 1e-12)


def test_group_sparsity_prox_is_the_minimiser():
    pairs = [(1, GroupSparsity(lam=1.5, group=2))]
    v = sample(0.5)
    v[2:4, 1] = 0.0  # an exactly zero group
    v[:, 3] = 0.0  # an exactly zero token
    expected = group_prox(1.5, 2, v, T)
    zeroed = np.linalg.norm(expected.reshape(3, 2, TOKENS), axis=1) == 0
    assert zeroed.any() and not zeroed.all()  # the threshold bites somewhere, not everywhere
    for x in [derived(pairs, v), *lowered(pairs, v)]:
        assert np.abs(x - expected).max() < 1e-6


def test_group_of_one_is_the_l1_prox():
    v = sample()
    expected = separable_prox(lambda x: 0.7 * abs(x), -INF, INF, v, T)
    assert np.abs(derived([(1, GroupSparsity(lam=0.7, group=1))], v) - expected).max() < 1e-6


def test_unit_norm_prox_is_the_nearest_point_on_the_sphere():
    pairs = [(1, UnitNorm())]
    v = sample()
    v[:, 2] = 0.0
    expected = sphere_projection(v, np.random.default_rng(0))
    for x in [derived(pairs, v), *lowered(pairs, v)]:
        live = [0, 1, 3, 4]
        assert np.abs(x[:, live] - expected[:, live]).max() < 1e-6
        assert np.all(x[:, 2] == 0)  # a zero token has no nearest point; it stays 0, finite
        # nothing among many random unit vectors is nearer
        u = np.random.randn(ROWS, 2000)
        u /= np.linalg.norm(u, axis=0)
        for j in live:
            assert np.linalg.norm(x[:, j] - v[:, j]) <= np.linalg.norm(u - v[:, [j]], axis=0).min() + 1e-12


# ------------------------------------------------------------------------ user-written term --


@dataclass(frozen=True, eq=False)
class TokenShrink(Term):
    """A user's term: ``mu Σ_j ‖z_j‖₂``, whose prox shrinks each token towards 0 by ``t mu``."""

    mu: float = 0.5
    label: ClassVar[str] = "token_shrink"
    smooth: ClassVar[bool] = False

    def latex(self) -> str:
        return r"\mu \sum_j \|z_j\|_2"

    def constants(self) -> dict[str, float]:
        return {"mu": self.mu}

    def prox(self, V, step):
        mu = sp.Symbol("mu", positive=True)
        return multiply(V, relu(ones_like(V) - divide(step * mu, column_norms(V))))


def test_a_user_term_builds_runs_and_explains_its_prox():
    quad = Custom("q", lambda x: 0.5 * ((x - 0.2) ** 2).sum())
    net = network(quad + TokenShrink(mu=0.5), iterations=2)
    text = unroll.explain(net)
    assert "token_shrink" in text
    assert "ReLU(" in text and "‖" in text and "μ" in text and "⊘" in text
    for layer in layers(net):
        out = layer(torch.randn(3, ROWS, TOKENS, dtype=torch.float64))
        assert out.shape == (3, ROWS, TOKENS) and torch.isfinite(out).all()
    # and its prox is the minimiser: the group lasso with one group per token
    v = sample(0.3)
    expected = group_prox(1.5, ROWS, v, T)
    kept = np.linalg.norm(expected, axis=0) > 0
    assert kept.any() and not kept.all()  # the threshold bites somewhere, not everywhere
    for x in lowered([(1, TokenShrink(mu=1.5))], v):
        assert np.abs(x - expected).max() < 1e-6


def test_a_user_term_in_a_sparse_coding_layer_matches_hand_written_torch():
    """ISTA on ½‖Z - D A‖² + μ Σ_j ‖a_j‖ from the input, two iterations, written out in torch."""
    net = network(Lasso() + TokenShrink(mu=0.3), iterations=2)
    text = unroll.explain(net)
    assert "(V_2 ∘ ReLU(1 - η μ (1 ⊘ ‖V_2‖_col)))" in text  # the prox as the term wrote it
    Z = torch.randn(4, ROWS, TOKENS, dtype=torch.float64)
    Z[0, :, 1] = 0.0
    for layer in layers(net):
        D = layer.steps["prox"].D.detach()
        A = Z
        for _ in range(2):
            V = A - T * D.T @ (D @ A - Z)
            norms = torch.linalg.vector_norm(V, dim=1, keepdim=True).clamp_min(1e-12)
            A = V * torch.relu(1 - T * 0.3 / norms)
        with torch.no_grad():
            assert (layer(Z) - A).abs().max() < 1e-10


@dataclass(frozen=True, eq=False)
class Expression(Term):
    """A user term whose prox is any vocabulary expression of V (for testing the vocabulary)."""

    fn: object = None
    label: ClassVar[str] = "expression"
    smooth: ClassVar[bool] = False

    def latex(self) -> str:
        return "h(Z)"

    def constants(self) -> dict[str, float]:
        return {"c": 0.3}

    def prox(self, V, step):
        return self.fn(V, sp.Symbol("c"))


def _norms(v, axis):
    return np.maximum(np.linalg.norm(v, axis=axis, keepdims=True), 1e-12)


#: name -> (the vocabulary expression of V and the scalar c = 0.3, its meaning in numpy)
VOCABULARY = {
    "sign": (lambda V, c: sign(V), np.sign),
    "abs": (lambda V, c: absolute(V), np.abs),
    "maximum": (lambda V, c: maximum(V, c), lambda v: np.maximum(v, 0.3)),
    "minimum": (lambda V, c: minimum(V, -c), lambda v: np.minimum(v, -0.3)),
    "clamp": (lambda V, c: clamp(V, -c, 2 * c), lambda v: np.clip(v, -0.3, 0.6)),
    "column_norms": (lambda V, c: column_norms(V), lambda v: np.broadcast_to(_norms(v, 0), v.shape)),
    "row_norms": (lambda V, c: row_norms(V), lambda v: np.broadcast_to(_norms(v, 1), v.shape)),
    "group_norms": (lambda V, c: group_norms(V, 3),
                    lambda v: np.concatenate([np.broadcast_to(_norms(v[:3], 0), (3, TOKENS)),
                                              np.broadcast_to(_norms(v[3:], 0), (3, TOKENS))])),
    "divide_by_rows": (lambda V, c: divide(V, row_norms(V)), lambda v: v / _norms(v, 1)),
    "divide_scalar": (lambda V, c: divide(c, absolute(V) + ones_like(V)), lambda v: 0.3 / (np.abs(v) + 1)),
}


@pytest.mark.parametrize("name", VOCABULARY)
def test_vocabulary_means_the_same_everywhere(name):
    fn, meaning = VOCABULARY[name]
    v = sample()
    v[:, 1] = 0.0  # norms of zero columns and groups are floored, not 0
    pairs = [(1, Expression(fn))]
    expected = meaning(v)
    for x in [derived(pairs, v), *lowered(pairs, v)]:
        assert np.abs(x - expected).max() < 1e-12


# ------------------------------------------------------------------ finiteness, gradients ---

QUAD = Custom("q", lambda x: 0.5 * (x**2).sum())  # the gradient step keeps zero tokens zero
TERMS = {
    "l1": L1(lam=0.2),
    "nonneg": NonNegative(),
    "elastic_net": ElasticNet(l1=0.2, l2=0.5),
    "group_sparsity": GroupSparsity(lam=0.8, group=2),
    "box": Box(lo=-0.5, hi=0.6),
    "unit_norm": UnitNorm(),
    "token_shrink": TokenShrink(mu=0.8),
}


@pytest.mark.parametrize("optimize", BUILDS)
@pytest.mark.parametrize("name", ["group_sparsity", "unit_norm", "token_shrink"])
def test_zero_tokens_and_groups_stay_finite_with_finite_gradients(name, optimize):
    net = network(QUAD + TERMS[name], iterations=2)
    layer = unroll.build(net, optimize=optimize).double().layer(0)
    Z = torch.randn(2, ROWS, TOKENS, dtype=torch.float64)
    Z[0, :, 1] = 0.0  # a zero token
    Z[1, 2:4, 3] = 0.0  # a zero group
    Z.requires_grad_(True)
    out = layer(Z)
    (grad,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), Z)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert torch.all(out[0, :, 1] == 0)
    if name == "group_sparsity":  # the block soft-threshold keeps a zero group zero, flat there
        assert torch.all(out[1, 2:4, 3] == 0) and torch.all(grad[1, 2:4, 3] == 0)


@pytest.mark.parametrize("optimize", BUILDS)
@pytest.mark.parametrize("name", TERMS)
def test_lowered_proximal_step_passes_gradcheck(name, optimize):
    quad = Custom("q", lambda x: 0.5 * ((x - 0.3) ** 2).sum())
    layer = unroll.build(network(quad + TERMS[name], iterations=2), optimize=optimize).double().layer(0)
    Z = torch.randn(2, ROWS, TOKENS, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (Z,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("optimize", BUILDS)
@pytest.mark.parametrize("extra", [pytest.param(GroupSparsity(lam=0.3, group=2), id="group"),
                                   pytest.param(L1(lam=0.1), id="l1+box")])
def test_sparse_coding_step_passes_gradcheck(extra, optimize):
    parts = Lasso() + extra
    if isinstance(extra, L1):
        parts = parts + Box(lo=-1.0, hi=1.0)
    layer = unroll.build(network(parts, iterations=2), optimize=optimize).double().layer(0)
    Z = torch.randn(2, ROWS, TOKENS, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (Z,), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- errors -----


def test_l1_and_nonnegativity_keep_their_closed_form():
    parts = weighted([(1, L1(lam=0.3)), (1, NonNegative())])
    lam = sp.Symbol("lambda", positive=True)
    assert prox_of(parts, V, ETA) == ReLU(V - ETA * lam * sp.OneMatrix(ROWS, TOKENS))


@pytest.mark.parametrize("pair", [
    pytest.param((GroupSparsity(lam=0.1, group=2), L1(lam=0.1)), id="group+l1"),
    pytest.param((UnitNorm(), Box(lo=-1.0, hi=1.0)), id="sphere+box"),  # not convex
    pytest.param((L1(lam=0.1), ElasticNet()), id="l1+elastic_net"),  # no box among them
])
def test_sum_without_a_combined_prox_names_both_terms(pair):
    with pytest.raises(UnrollError) as e:
        unroll.explain(network(Lasso() + pair[0] + pair[1]))
    message = str(e.value)
    assert pair[0].label in message and pair[1].label in message
    assert "write one term" in message


def test_non_positive_weight_on_a_non_smooth_term_is_refused():
    with pytest.raises(UnrollError, match="positive weight"):
        unroll.explain(network(Lasso() - ElasticNet()))


@dataclass(frozen=True, eq=False)
class Broken(Term):
    """A user term with a prox that goes wrong in one of several ways."""

    how: str = "transposed"
    label: ClassVar[str] = "broken"
    smooth: ClassVar[bool] = False

    def latex(self) -> str:
        return "b(Z)"

    def prox(self, V, step):
        if self.how == "transposed":
            return V.T
        if self.how == "power":
            return V * V  # V² of a non-square V
        if self.how == "product":
            return V * sp.OneMatrix(*V.shape)  # d x N times d x N, which sympy lets through
        if self.how == "entrywise":
            return multiply(V, V.T)
        if self.how == "scalar":
            return step
        return V * sp.Symbol("undeclared")


@pytest.mark.parametrize("how,words", [
    ("transposed", ["d x N", "N x d"]),
    ("power", ["ShapeError", "non-square d x N"]),
    ("product", ["ShapeError", "d x N by d x N"]),
    ("entrywise", ["ShapeError", "N x d and d x N"]),
    ("scalar", ["matrix expression"]),
    ("unknown", ["undeclared", "constants()"]),
])
def test_a_broken_user_prox_is_an_unroll_error_naming_the_term(how, words):
    with pytest.raises(UnrollError) as e:
        unroll.build(network(QUAD + Broken(how)))
    assert "broken" in str(e.value) and all(w in str(e.value) for w in words)


def test_group_size_must_divide_the_width():
    with pytest.raises(UnrollError, match="group_sparsity.*4.*6"):
        unroll.build(network(GroupSparsity(group=4), width=6))
    with pytest.raises(UnrollError, match="4.*6"):
        GroupSparsity(group=4).check({"d": 6, "K": 2, "p": 3})
    with pytest.raises(UnrollError):
        GroupSparsity(group=4).check({"d": 8, "K": 2, "p": 4, "m": 18})
    GroupSparsity(group=4).check({"d": 8, "K": 2, "p": 4, "m": 32})


def test_box_bounds_in_the_wrong_order_are_refused():
    with pytest.raises(UnrollError, match="lo"):
        Box(lo=1.0, hi=0.5)


# ------------------------------------------------------------------------------- recipes ----

TINY = Path(__file__).resolve().parents[1] / "recipes" / "crate_tiny.yaml"


def small_recipe(tmp_path: Path, objective: dict, proximal: list[str]) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data["architecture"].update(width=16, heads=2, depth=1, image_size=8, patch_size=4, channels=1, classes=3)
    data["objective"] = {"Rc": data["objective"]["Rc"], "fit": {"term": "lasso"}, **objective}
    data["layer"][1]["proximal"] = ["fit", *proximal]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_recipes_name_the_new_terms(tmp_path):
    path = small_recipe(tmp_path, {
        "groups": {"term": "group_sparsity", "lam": 0.1, "group": 4},
        "net": {"term": "elastic_net", "l1": 0.1, "l2": 0.2},
        "box": {"term": "box", "lo": 0.0, "hi": 2.0},
        "cap": {"term": "box", "lo": None, "hi": 2.0},
        "sphere": {"term": "unit_norm"},
    }, ["net", "box"])  # groups, cap and sphere are only validated: no step uses them
    model = unroll.build(path)
    assert torch.isfinite(model(torch.randn(2, 1, 8, 8))).all()
    text = unroll.explain(unroll.as_network(path))
    assert "λ_1" in text and "λ_2" in text and "clamp(" in text


@pytest.mark.parametrize("entry,words", [
    ({"term": "box", "lo": 1.0, "hi": 0.0}, ["box", "lo must be below hi"]),
    ({"term": "group_sparsity", "group": 0}, ["group_sparsity", "group"]),
    ({"term": "elastic_net", "l1": -1.0}, ["elastic_net", "l1"]),
])
def test_recipes_refuse_bad_term_arguments(tmp_path, entry, words):
    path = small_recipe(tmp_path, {"bad": entry}, ["bad"])
    with pytest.raises(UnrollError) as e:
        unroll.load_recipe(path)
    assert all(w in str(e.value) for w in words)
