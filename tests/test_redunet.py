"""ReduNet by forward construction: the class rate reduction ΔR and its gradient (against autograd,
float64), its data constants E, C_j, γ_j, the soft memberships, and ``unroll construct`` on the
digits (no backward pass, ΔR rising at every layer, nearest-subspace accuracy of the constructed
features next to the raw inputs', the stored buffers reload) and its clean refusals."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from unroll.cli import main
from unroll.construct import construct, load, subspace_residuals
from unroll.derive.steps import GradientStep, ProximalStep
from unroll.network import ClassifierHead, Network, PatchFrontend
from unroll.objective import ClassRate, Term, UnitNorm
from unroll.objective.class_rate import (compression_operators, expansion_operator, one_hot_memberships,
                                         rate_reduction, rate_reduction_gradient, soft_memberships)
from unroll.recipe import load_recipe, to_network
from unroll.train import data as datasets

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/redunet_digits.yaml"


def _memberships(m: int, J: int, soft: bool) -> torch.Tensor:
    if not soft:
        return one_hot_memberships(torch.arange(m) % J, J, torch.float64)
    return torch.softmax(torch.randn(J, m, dtype=torch.float64), dim=0)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("d, m, J", [(5, 12, 3), (8, 4, 2)])  # more samples than width, and fewer
def test_gradient_matches_autograd(d, m, J, soft):
    Z = torch.randn(d, m, dtype=torch.float64, requires_grad=True)
    Pi = _memberships(m, J, soft)
    (auto,) = torch.autograd.grad(rate_reduction(Z, Pi, 0.5), Z)
    assert torch.allclose(rate_reduction_gradient(Z.detach(), Pi, 0.5), auto, rtol=1e-10, atol=1e-12)
    # the term's value is the same ΔR, per batch element
    term = ClassRate(eps=0.5)
    value = term.value(Z.detach()[None].expand(2, d, m), {"Pi": Pi})
    assert value.shape == (2,) and torch.allclose(value, rate_reduction(Z.detach(), Pi, 0.5).expand(2))


def test_fitted_constants_give_the_gradient():
    """E, C_j, γ_j that ``fit`` stores reproduce ∇ΔR = E Z - Σ_j γ_j C_j Z Π_j on the data they came from."""
    d, m, J = 6, 30, 3
    Z = torch.randn(d, m, dtype=torch.float64)
    labels = torch.arange(m) % J
    c = ClassRate(eps=0.3).fit(Z, labels, J)
    Pi = one_hot_memberships(labels, J, Z.dtype)
    expected = rate_reduction_gradient(Z, Pi, 0.3)
    got = c["E"] @ Z - sum(c["gamma"][j] * c["C"][j] @ Z * Pi[j] for j in range(J))
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.allclose(c["gamma"], torch.full((J,), 1 / J, dtype=torch.float64))
    assert torch.allclose(c["E"], expansion_operator(Z, 0.3))


def test_data_gradient_uses_soft_memberships():
    """One sample's ascent direction: E z - Σ_j γ_j C_j z π̂_j(z), π̂ = softmax_j(-λ‖C_j z‖)."""
    d, m, J = 6, 40, 4
    Z = torch.randn(d, m, dtype=torch.float64)
    labels = torch.arange(m) % J
    term = ClassRate(eps=0.5, lam=3.0)
    c = term.fit(Z, labels, J)
    batch = torch.randn(5, d, 1, dtype=torch.float64)
    pi = soft_memberships(batch, c["C"], 3.0)  # (5, J, 1)
    assert torch.allclose(pi.sum(1), torch.ones(5, 1, dtype=torch.float64))
    expected = c["E"] @ batch - sum(c["gamma"][j] * (c["C"][j] @ batch) * pi[:, j:j + 1] for j in range(J))
    assert torch.allclose(term.data_gradient(batch, c), expected, atol=1e-12)
    # column by column: a batch of samples is the same as each sample alone
    alone = torch.cat([term.data_gradient(batch[i], c) for i in range(5)], dim=-1)
    assert torch.allclose(term.data_gradient(batch[:, :, 0].T, c), alone, atol=1e-12)


def test_empty_class_contributes_nothing():
    Z = torch.randn(4, 10, dtype=torch.float64)
    labels = torch.arange(10) % 2
    Pi = one_hot_memberships(labels, 3, Z.dtype)  # class 2 has no sample
    C, gamma = compression_operators(Z, Pi, 0.5)
    assert torch.isfinite(C).all() and gamma.tolist() == [0.5, 0.5, 0.0]
    assert torch.isfinite(rate_reduction(Z, Pi, 0.5))
    # its C_j = 0 explains every sample perfectly, so it must not take the memberships
    c = ClassRate(eps=0.5).fit(Z, labels, 3)
    assert soft_memberships(Z, c["C"], 500.0, c["gamma"])[2].abs().max() == 0
    two = ClassRate(eps=0.5).fit(Z, labels, 2)
    assert torch.allclose(ClassRate(eps=0.5).data_gradient(Z, c), ClassRate(eps=0.5).data_gradient(Z, two))


def _csv(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def constructed(tmp_path_factory):
    """``unroll construct`` on the bundled recipe (the full digits, 20 layers), with every
    backward pass made to fail: forward construction must not need one."""
    out = tmp_path_factory.mktemp("redunet") / "out"
    patch = pytest.MonkeyPatch()

    def refuse(*args, **kwargs):
        raise AssertionError("forward construction ran a backward pass")

    patch.setattr(torch.Tensor, "backward", refuse)
    patch.setattr(torch.autograd, "backward", refuse)
    patch.setattr(torch.autograd, "grad", refuse)
    try:
        code = main(["construct", str(RECIPE), "--out", str(out)])
    finally:
        patch.undo()
    return code, out


def test_construct_writes_the_model_without_backpropagation(constructed):
    code, out = constructed
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "model.safetensors", "recipe.yaml"]


def test_rate_reduction_rises_at_every_layer(constructed):
    _, out = constructed
    rows = _csv(out / "metrics.csv")
    assert [int(r["layer"]) for r in rows] == list(range(21))
    rates = [r["delta_R"] for r in rows]
    assert all(b > a for a, b in zip(rates, rates[1:])), rates
    assert all(abs(r["R"] - r["Rc"] - r["delta_R"]) < 1e-3 for r in rows)


def test_nearest_subspace_accuracy_constructed_and_raw(constructed):
    """Row 0 is the classifier on the raw inputs (flattened pixels on the sphere), the last row on
    the constructed features: both are recorded, and the constructed ones are no worse."""
    _, out = constructed
    rows = _csv(out / "metrics.csv")
    raw, built = rows[0]["val_acc"], rows[-1]["val_acc"]
    print(f"nearest-subspace held-out accuracy: raw {raw:.4f}, constructed {built:.4f}")
    assert 0.9 < raw <= 1 and 0.9 < built <= 1
    assert built >= raw


def test_stored_buffers_reload_and_classify(constructed):
    """model.safetensors holds every layer's E, C_j, γ_j and the class subspaces: a network rebuilt
    from the recipe and loaded classifies the held-out digits as the construction measured."""
    _, out = constructed
    recipe = load_recipe(out / "recipe.yaml")
    model = load(to_network(recipe), recipe.construction.components, out / "model.safetensors")
    assert {"layers.0.0.terms.0.E", "layers.19.0.terms.0.C", "layers.0.0.terms.0.gamma", "head.U"} <= set(model.state_dict())
    _, held = datasets.split(datasets.load("digits", 8, 1))
    with torch.no_grad():
        accuracy = float((model(held.images).argmax(1) == held.labels).double().mean())
    assert accuracy == pytest.approx(_csv(out / "metrics.csv")[-1]["val_acc"], abs=1e-6)


@dataclass(frozen=True, eq=False)
class PullToMean(Term):
    """A term of one's own with a data constant: ``½‖z - μ‖²``, μ the training features' mean."""

    label: ClassVar[str] = "pull"

    def latex(self) -> str:
        return r"\tfrac12\|z - \mu\|^2"

    def constant_shapes(self, d, classes):
        return {"mu": (d, 1)}

    def fit(self, Z, labels, classes):
        return {"mu": Z.mean(1, keepdim=True)}

    def data_gradient(self, Z, constants):
        return Z - constants["mu"]


def test_own_term_with_data_constants():
    """The data-constant protocol is public: any term with fit / constant_shapes / data_gradient."""
    layer = (GradientStep(PullToMean(), 0.5, "pull"), ProximalStep(UnitNorm(), 1.0, name="project"))
    network = Network(layer=layer, depth=2, width=16, heads=1, frontend=PatchFrontend(4, 4, 1),
                      head=ClassifierHead(classes=2))
    images = torch.rand(20, 1, 4, 4)
    labels = torch.arange(20) % 2
    model, rows = construct(network, images, labels, components=2)
    assert len(rows) == 3 and model.layers[0][0].terms[0].mu.shape == (16, 1)
    features = model.features(images)
    assert torch.allclose(torch.linalg.vector_norm(features, dim=1), torch.ones(20, 1, dtype=torch.float64))
    assert subspace_residuals(features, model.head.U).shape == (20, 2, 1)


def _one_class_folder(root: Path) -> Path:
    from PIL import Image

    (root / "only").mkdir(parents=True)
    for i in range(4):
        Image.new("L", (8, 8), color=40 * i).save(root / "only" / f"{i}.png")
    return root


@pytest.mark.parametrize("args, says", [
    (["--data", "no-such-data"], "no such data directory"),
    (["--set", "architecture.width=32"], "architecture.width must be channels × image_size² = 64"),
    (["NO_DATA_TERM"], "nothing to construct"),
    (["CRATE", "--set", "architecture.width=64"], "has no constants computed from data"),
    (["--set", "architecture.tie_layers=true"], "remove tie"),
    (["--max-memory", "0.001"], "more than the limit"),
    (["--data", "ONE_CLASS"], "needs labelled data of 2 to 10 classes"),
])
def test_bad_input_is_a_clear_error(args, says, tmp_path, capsys):
    recipe = RECIPE
    if args == ["NO_DATA_TERM"]:  # only the projection: no layer constants to compute
        text = RECIPE.read_text().split("layer:\n")
        rest = text[1].split("  - name: project")[1]
        recipe = tmp_path / "no_data_term.yaml"
        recipe.write_text(text[0] + "layer:\n  - name: project" + rest)
        args = []
    if args[:1] == ["CRATE"]:  # a CRATE layer: learned, not computed from data
        recipe, args = ROOT / "recipes/crate_digits.yaml", args[1:]
    args = [str(_one_class_folder(tmp_path / "images")) if a == "ONE_CLASS" else a for a in args]
    out = tmp_path / "out"
    code = main(["construct", str(recipe), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and says in err and "Traceback" not in err, err
    assert not out.exists()


def test_build_refuses_a_constructed_recipe(tmp_path, capsys):
    code = main(["build", str(RECIPE), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "unroll construct" in err, err
