"""The attention-only transformer (AoT): CRATE's compression step, relaxed without untying the
output and without a sparse step, is the unrolled subspace-denoising layer of Wang et al."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import unroll
from unroll.measure import measure

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["architecture.image_size=32", "architecture.patch_size=8", "architecture.width=48",
         "architecture.heads=4", "architecture.depth=2", "architecture.classes=5"]


def test_the_layer_is_its_formula():
    """Z⁺ = Z + η Σ_k U_k U_kᵀ Y softmax(τ (U_kᵀ Y)ᵀ (U_kᵀ Y)), Y = LN(Z), η = κ β², β = p/(N ε²)."""
    model = unroll.build(ROOT / "recipes/aot_digits.yaml", optimize=False).double()
    step = model.layer(0).steps["denoise"]
    with torch.no_grad():
        step.norm_weight.copy_(1 + 0.1 * torch.randn(96))
        step.norm_bias.copy_(0.1 * torch.randn(96))
    Z = torch.randn(3, 96, 17, dtype=torch.float64)
    U = step.U.detach()  # (K, d, p)
    Y = F.layer_norm(Z.mT, (96,), step.norm_weight, step.norm_bias, 1e-5).mT
    W = U.mT.unsqueeze(0) @ Y.unsqueeze(1)  # (B, K, p, N)
    similarity = torch.softmax(W.mT @ W / 24**0.5, dim=-2)  # each column (token) sums to one
    eta = float(step.kappa.detach()) * (24 / (17 * 0.5**2)) ** 2
    expected = Z + eta * (U.unsqueeze(0) @ W @ similarity).sum(1)
    for optimize in (False, True):
        built = unroll.build(ROOT / "recipes/aot_digits.yaml", optimize=optimize).double()
        built.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (built.layer(0)(Z) - expected).abs().max() < 1e-10


def test_no_output_operator_no_sparse_step_and_the_objective_is_measured():
    model = unroll.build(unroll.load_recipe(ROOT / "recipes/aot_small.yaml", SMALL)).eval()
    names = {name.rsplit(".", 1)[-1] for name, _ in model.encoder.named_parameters()}
    assert names == {"norm_weight", "norm_bias", "U", "kappa"}  # the output is U itself
    rows = measure(model, torch.rand(4, 3, 32, 32))
    assert [r["layer"] for r in rows] == [1, 2] and all("denoise: R^c" in r for r in rows)


@pytest.mark.parametrize("name", ["aot_digits", "aot_small"])
def test_recipes_build_explain_and_compile(name):
    overrides = [] if name == "aot_digits" else SMALL
    network = unroll.as_network(unroll.load_recipe(ROOT / f"recipes/{name}.yaml", overrides))
    text = unroll.explain(network)
    assert "Z⁺ = Z + κ β^2 Σ_k[U_k W_k softmax(τ W_kᵀ W_k)]" in text
    fast, plain = unroll.build(network), unroll.build(network, optimize=False)
    plain.load_state_dict(fast.state_dict())
    spec = network.frontend
    images = torch.rand(2, spec.channels, spec.image_size, spec.image_size)
    with torch.no_grad():
        expected = plain.eval()(images)
        assert torch.allclose(fast.eval()(images), expected, atol=1e-5, rtol=1e-4)
        compiled = torch.compile(fast, fullgraph=True, backend="eager")
        assert torch.allclose(compiled(images), expected, atol=1e-5, rtol=1e-4)
