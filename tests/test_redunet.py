"""ReduNet by forward construction: the class rate reduction ΔR and its gradient (against autograd,
float64), its data constants E, C_j, γ_j, the layer derived through the language (``unroll build``
and ``unroll explain`` print it; the lowered layer, plain, optimised and compiled, against the
hand-written formula below, the independent reference), and ``unroll construct`` on the digits
(no backward pass, ΔR rising at every layer, nearest-subspace accuracy of the constructed features
next to the raw inputs', the stored buffers reload) and its clean refusals."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import sympy as sp
import torch

import unroll
from unroll.cli import main
from unroll.construct import construct, load, subspace_residuals
from unroll.derive.steps import GradientStep, ProximalStep
from unroll.expr.symbols import d as D_SYMBOL
from unroll.network import ClassifierHead, Network, PatchFrontend
from unroll.objective import ClassRate, Term, UnitNorm
from unroll.objective.base import Gradient, ParamSpec
from unroll.objective.class_rate import (compression_operators, expansion_operator, one_hot_memberships,
                                         rate_reduction, rate_reduction_gradient, soft_memberships)
from unroll.recipe import load_recipe, to_network
from unroll.train import data as datasets

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/redunet_digits.yaml"


def reference_gradient(Z: torch.Tensor, c: dict, lam: float) -> torch.Tensor:
    r"""The hand-written ReduNet ascent direction, every column of Z (..., d, N) on its own:
    ``E z - Σ_j γ_j C_j z π̂_j(z)``, π̂ = softmax_j(-λ‖C_j z‖), a class without training samples
    taking no membership: the independent reference for the lowered layer."""
    E, C, gamma = c["E"], c["C"], c["gamma"].reshape(-1)
    CZ = C @ Z.unsqueeze(-3)  # (..., J, d, N)
    pi = soft_memberships(Z, C, lam, gamma)  # (..., J, N)
    return E @ Z - (gamma[:, None, None] * CZ * pi.unsqueeze(-2)).sum(-3)


def redunet_network(d: int, J: int, depth: int = 1, eps: float = 0.5, lam: float = 3.0, eta: float = 0.5,
                    project: bool = False) -> Network:
    """ReduNet on images of 1 channel, d = side², each one token; the classes are the heads."""
    side = int(d**0.5)
    layer = (GradientStep(-ClassRate(eps=eps, lam=lam), eta, "expand_compress"),)
    if project:
        layer += (ProximalStep(UnitNorm(), 1.0, name="project"),)
    frontend = PatchFrontend(side, side, 1, patch_norm=False, cls_token=False, positions="none", embedding="pixels")
    return Network(layer=layer, depth=depth, width=d, heads=J, head_dim=d, frontend=frontend,
                   head=ClassifierHead(classes=J, pool="mean"))


def fitted_step(d: int, J: int, Z: torch.Tensor, labels: torch.Tensor, lam: float = 3.0, optimize: bool = False,
                eps: float = 0.5):
    """The lowered (float64) ReduNet step of a built network, its buffers filled by ``fit`` on Z."""
    model = unroll.build(redunet_network(d, J, eps=eps, lam=lam), optimize=optimize).double()
    step = model.layer(0).steps["expand_compress"]
    for key, value in ClassRate(eps=eps, lam=lam).fit(Z, labels, J).items():
        getattr(step, key).copy_(value.reshape(getattr(step, key).shape))
    return model, step


def columns(step, Z: torch.Tensor) -> torch.Tensor:
    """A lowered step on Z (B, d, N), tokens as columns, in either layout."""
    return step(Z.mT).mT if step.rows else step(Z)


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
    assert torch.allclose(c["gamma"], torch.full((J, 1, 1), 1 / J, dtype=torch.float64))
    assert torch.allclose(c["E"], expansion_operator(Z, 0.3))


def test_explain_prints_the_layer_and_build_counts_parameters(tmp_path, capsys):
    """The recipe goes through the compiler: explain prints the derived update and its data
    constants; build writes a model whose E, C_k, γ_k are buffers (zeros), not parameters."""
    assert main(["explain", str(RECIPE)]) == 0
    out = capsys.readouterr().out
    for text in ("Z⁺ = Z - κ (Σ_k[(1 γ_k π_k ∘ V_k)] - E Z)", "where V_k = C_k Z", "π_k = softmax_k(-λ/d 1ᵀ ‖V_k‖_col)",
                 "E: 64 x 64", "C_k (stored as C): 10 x 64 x 64", "computed from data", "Z⁺ = (Z ⊘ ‖Z‖_col)"):
        assert text in out, out
    assert main(["build", str(RECIPE), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "parameters: 778" in out and "data constants: 901,320" in out, out  # the classifier head only
    model = unroll.build(RECIPE)
    step = model.layer(19).steps["expand_compress"]
    assert {name for name, _ in step.named_parameters()} == set()
    assert {"E", "C", "gamma"} <= set(dict(step.named_buffers())) and step.C.shape == (10, 64, 64)
    assert step.gamma.shape == (10, 1, 1) and not step.E.any()
    assert "encoder.layers.19.steps.expand_compress.C" in model.state_dict()
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_pixels_frontend_is_flattened_pixels_on_the_sphere():
    model = unroll.build(RECIPE)
    images = torch.rand(4, 1, 8, 8)
    images[1] = 0  # a blank image stays 0
    tokens = model.frontend(images)
    assert tokens.shape == (4, 1, 64) and not list(model.frontend.parameters())
    expected = images.reshape(4, 64) / images.reshape(4, 64).norm(dim=1, keepdim=True).clamp_min(1e-12)
    assert torch.allclose(tokens[:, 0], expected)


@pytest.mark.parametrize("setting, says", [
    ("architecture.width=32", "width must be channels × patch_size² = 64"),
    ("architecture.cls_token=true", "embedding: pixels has no parameters"),
])
def test_pixels_frontend_refuses_bad_sizes(setting, says, tmp_path, capsys):
    assert main(["build", str(RECIPE), "--out", str(tmp_path / "out"), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err


@pytest.mark.parametrize("optimize", [False, True])
def test_lowered_layer_is_the_handwritten_formula(optimize):
    """The layer `unroll build` lowers from the symbolic gradient, its buffers fitted, is
    ``z + η (E z - Σ_j γ_j C_j z π̂_j(z))`` (float64), sample by sample."""
    d, m, J, lam, eta = 9, 40, 4, 3.0, 0.5
    Z = torch.nn.functional.normalize(torch.randn(d, m, dtype=torch.float64), dim=0)
    labels = torch.arange(m) % J
    _, step = fitted_step(d, J, Z, labels, lam, optimize)
    c = ClassRate(eps=0.5, lam=lam).fit(Z, labels, J)
    batch = torch.nn.functional.normalize(torch.randn(5, d, 3, dtype=torch.float64), dim=1)
    expected = batch + eta * reference_gradient(batch, c, lam)
    with torch.no_grad():
        assert torch.allclose(columns(step, batch), expected, rtol=1e-10, atol=1e-12)
        # column by column: a batch of samples is the same as each sample alone
        alone = torch.cat([columns(step, batch[:, :, i:i + 1]) for i in range(3)], dim=-1)
        assert torch.allclose(columns(step, batch), alone, atol=1e-12)


def test_plain_and_optimised_lowerings_agree_and_compile():
    """On a fitted layer: the plain lowering (as printed), the optimised one and
    ``torch.compile(fullgraph=True)`` of the optimised one compute the same features."""
    d, m, J = 16, 60, 3
    Z = torch.nn.functional.normalize(torch.randn(d, m, dtype=torch.float64), dim=0)
    labels = torch.arange(m) % J
    network = redunet_network(d, J, depth=2, project=True)
    plain = unroll.build(network, optimize=False).double()
    for layer in range(2):
        for key, value in ClassRate(eps=0.5, lam=3.0).fit(Z, labels, J).items():
            buffer = getattr(plain.layer(layer).steps["expand_compress"], key)
            buffer.copy_(value.reshape(buffer.shape))
    optimised = unroll.build(network).double()
    optimised.load_state_dict(plain.state_dict())
    images = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        a, b = plain.encode(images), optimised.encode(images)
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
        assert torch.allclose(a.norm(dim=-1), torch.ones(6, 1, dtype=torch.float64))  # on the sphere
        compiled = torch.compile(optimised.encode, fullgraph=True, backend="eager")
        assert torch.allclose(compiled(images), b, rtol=1e-10, atol=1e-12)


def test_empty_class_contributes_nothing():
    Z = torch.randn(4, 10, dtype=torch.float64)
    labels = torch.arange(10) % 2
    Pi = one_hot_memberships(labels, 3, Z.dtype)  # class 2 has no sample
    C, gamma = compression_operators(Z, Pi, 0.5)
    assert torch.isfinite(C).all() and gamma.tolist() == [0.5, 0.5, 0.0]
    assert torch.isfinite(rate_reduction(Z, Pi, 0.5))
    # its C_j = 0 explains every sample perfectly, so it must not take the memberships
    c = ClassRate(eps=0.5).fit(Z, labels, 3)
    assert soft_memberships(Z, c["C"], 500.0, c["gamma"].reshape(-1))[2].abs().max() == 0
    # the lowered layer: fit gives the empty class C_j = α I, α huge, so it takes no membership
    Z = torch.nn.functional.normalize(Z, dim=0)
    _, three = fitted_step(4, 3, Z, labels)
    _, two = fitted_step(4, 2, Z, labels)
    with torch.no_grad():
        assert torch.allclose(columns(three, Z[None]), columns(two, Z[None]), atol=1e-12)


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
    keys = {"encoder.layers.0.steps.expand_compress.E", "encoder.layers.19.steps.expand_compress.C",
            "encoder.layers.0.steps.expand_compress.gamma", "head.U"}
    assert keys <= set(model.state_dict())
    images, labels = datasets.stack(datasets.open_data("digits", 8, 1).val)
    with torch.no_grad():
        accuracy = float((model(images).argmax(1) == labels).double().mean())
    assert accuracy == pytest.approx(_csv(out / "metrics.csv")[-1]["val_acc"], abs=1e-6)


MEAN = ParamSpec("mu", D_SYMBOL, 1, ("data",), "the training features' mean")


@dataclass(frozen=True, eq=False)
class PullToMean(Term):
    """A term of one's own with a data constant: ``½‖z - μ‖²``, μ the training features' mean."""

    label: ClassVar[str] = "pull"

    def latex(self) -> str:
        return r"\tfrac12\|z - \mu\|^2"

    def gradient(self, X):
        return Gradient(X - MEAN.symbol * sp.OneMatrix(1, X.shape[1]), params=(MEAN,))

    def value(self, Z, params):
        return 0.5 * ((Z - params["mu"][:, None]) ** 2).sum((-2, -1))

    def fit(self, Z, labels, classes):
        return {"mu": Z.mean(1)}


def test_own_term_with_data_constants():
    """The data-constant protocol is public: a ParamSpec with init ("data",) and fit."""
    layer = (GradientStep(PullToMean(), 0.5, "pull"), ProximalStep(UnitNorm(), 1.0, name="project"))
    frontend = PatchFrontend(4, 4, 1, patch_norm=False, cls_token=False, positions="none", embedding="pixels")
    network = Network(layer=layer, depth=2, width=16, heads=1, frontend=frontend,
                      head=ClassifierHead(classes=2, pool="mean"))
    images = torch.rand(20, 1, 4, 4)
    labels = torch.arange(20) % 2
    model, rows = construct(network, images, labels, components=2)
    step = model.encoder.layer(0).steps["pull"]
    assert len(rows) == 3 and step.mu.shape == (16,) and step.mu.any()
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
    (["--set", "architecture.width=32"], "width must be channels × patch_size² = 64"),
    (["--set", "architecture.patch_size=4", "--set", "architecture.width=16"], "one token of its flattened pixels"),
    (["NO_DATA_TERM"], "nothing to construct"),
    (["CRATE", *[f"--set=architecture.{s}" for s in ("width=64", "patch_size=8", "embedding=pixels", "cls_token=false",
                                                      "positions=none")]], "has no constants computed from data"),
    (["--set", "architecture.tie_layers=true"], "remove tie"),
    (["--max-memory", "0.001"], "more than the limit"),
    (["--data", "ONE_CLASS"], "needs labelled data of 2 to 10 classes"),
    (["--set", "architecture.heads=5"], "each class is a head, so architecture.heads must equal the number of classes"),
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


def test_train_refuses_a_recipe_of_data_constants(tmp_path, capsys):
    """Its layers are the identity until constructed: training would only fit the head."""
    assert main(["train", str(RECIPE), "--out", str(tmp_path / "run")]) == 2
    assert "build it with unroll construct" in capsys.readouterr().err


def test_pixels_front_end_from_python_is_checked_when_planned():
    net = unroll.Network((unroll.ProximalStep(unroll.objective.UnitNorm(), name="p"),), width=24, heads=1, depth=1,
                         frontend=unroll.PatchFrontend(image_size=8, patch_size=2, channels=3, embedding="pixels",
                                                       patch_norm=False, cls_token=False, positions="none"),
                         head=unroll.ClassifierHead(classes=3, pool="mean"))
    with pytest.raises(unroll.UnrollError, match="the width must be 12, found 24"):
        unroll.build(net)
