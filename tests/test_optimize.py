"""The compiler's optimisations: the same function as the plain lowering (every update computed as
printed), a cache that never serves stale weights, gradients through hoisted factors, a cost model
that hoists only where it pays, and models that compile whole with a dynamic batch."""

from pathlib import Path

import pytest
import torch

import unroll
from unroll.lower.optimize import hoisting_pays
from unroll.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["architecture.image_size=32", "architecture.patch_size=8", "architecture.width=48",
         "architecture.heads=4", "architecture.depth=2"]
FAMILIES = {
    "crate": ("crate_tiny", ["architecture.classes=10"]),
    "crate_alpha": ("crate_alpha_b16", ["architecture.classes=10"]),
    "crate_mae": ("crate_mae_base", ["decoder.depth=2"]),
    "causal_crate": ("crate_tiny", ["architecture.classes=10", "layer.0.relax.2.softmax.causal=true"]),
}


def pair(family: str):
    """(plain, optimised) builds of a small model of ``family`` with the same weights."""
    name, extra = FAMILIES[family]
    recipe = load_recipe(ROOT / f"recipes/{name}.yaml", SMALL + extra)
    plain = unroll.build(recipe, optimize=False)
    fast = unroll.build(recipe)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def outputs(model, images, noise):
    out = model(images, 0.75, noise) if _is_autoencoder(model) else model(images)
    return out[:2] if isinstance(out, tuple) else (out,)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return (a - b).abs().max() <= rel * b.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_optimised_and_plain_lowering_agree(family):
    plain, fast = pair(family)
    images, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    with torch.no_grad():
        for a, b in zip(outputs(fast, images, noise), outputs(plain, images, noise)):
            assert close(a, b)


@pytest.mark.parametrize("family", ["crate", "crate_alpha"])
def test_gradients_flow_through_hoisted_factors(family):
    plain, fast = pair(family)
    images = torch.randn(8, 3, 32, 32)
    for model in (plain, fast):
        model(images).square().mean().backward()
    grads = dict(plain.named_parameters())
    for name, p in fast.named_parameters():
        assert close(p.grad, grads[name].grad, 1e-4), name


def test_cached_factor_follows_every_change_of_the_weights():
    plain, fast = pair("crate")
    fast.eval(), plain.eval()
    images = torch.randn(2, 3, 32, 32)

    def agree() -> bool:
        with torch.inference_mode():
            return close(fast(images), plain(images))

    assert agree() and agree()  # the second call is served from the cache
    # an optimiser step
    for model in (plain, fast):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        torch.manual_seed(1)
        model(images).sum().backward()
        opt.step()
    assert agree()
    # load_state_dict
    state = {k: v + 0.1 * torch.randn_like(v) for k, v in plain.state_dict().items()}
    plain.load_state_dict(state)
    fast.load_state_dict(state)
    assert agree()
    # an in-place edit of one dictionary
    with torch.no_grad():
        for model in (plain, fast):
            model.layer(1).steps["sparsify"].D.mul_(-2.0)
    assert agree()
    # a learnable-free constant buffer edited in place (the step size)
    with torch.no_grad():
        for model in (plain, fast):
            model.layer(0).steps["sparsify"].eta.fill_(0.3)
    assert agree()
    # a fused optimiser, which does not bump tensor versions
    for model in (plain, fast):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        model(images).sum().backward()
        opt.step()
    assert agree()
    # edits through .data, which do not bump versions either
    for model in (plain, fast):
        for p in model.parameters():
            p.data.mul_(0.9).add_(0.01)
    assert agree()
    # new weights loaded by assignment, possibly at a freed tensor's address
    for _ in range(3):
        state = {k: torch.randn_like(v) for k, v in plain.state_dict().items()}
        plain.load_state_dict(state)
        fast.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
        assert agree()


def test_cost_model_hoists_a_square_dictionary_but_not_an_overcomplete_one():
    d, tokens = 768, 8 * 197
    # CRATE: I + η Dᵀ - η Dᵀ D, as written 2 d² per token, hoisted d³ once then d² per token
    assert hoisting_pays(form_cost=d**3, hoisted_per_token=d * d, written_per_token=2 * d * d, tokens=tokens)
    # ... but not for a handful of tokens
    assert not hoisting_pays(form_cost=d**3, hoisted_per_token=d * d, written_per_token=2 * d * d, tokens=100)
    # CRATE-alpha: I - η Dᵀ D with D d x 4d: forming costs (4d)² d, as written 2 (4d) d per token
    m = 4 * d
    assert not hoisting_pays(form_cost=m * d * m, hoisted_per_token=m * m, written_per_token=2 * m * d, tokens=tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_compiles_whole_with_a_dynamic_batch(family):
    _, fast = pair(family)
    fast.eval()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(fast, backend=counting_backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch in (2, 3, 5):
            images, noise = torch.randn(batch, 3, 32, 32), torch.rand(batch, 16)
            for a, b in zip(outputs(compiled, images, noise), outputs(fast, images, noise)):
                assert close(a, b)
    assert len(graphs) == 1, f"{len(graphs)} graphs for three batch sizes"


def test_bf16_autocast_keeps_logits_and_sparsity():
    torch.manual_seed(0)
    model = unroll.build(load_recipe(ROOT / "recipes/crate_tiny.yaml", SMALL + ["architecture.classes=10"])).eval()
    codes: list[torch.Tensor] = []
    hooks = [model.layer(i).steps["sparsify"].register_forward_hook(lambda m, i, o: codes.append(o.float()))
             for i in range(2)]
    images = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        full = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(images).float()
    for h in hooks:
        h.remove()
    assert (half - full).abs().max() <= 5e-2 * full.abs().max()
    zeros = [(c == 0).float().mean().item() for c in codes]
    assert abs(zeros[0] - zeros[2]) <= 0.01 and abs(zeros[1] - zeros[3]) <= 0.01, zeros
    assert min(zeros) > 0.05  # the codes are sparse at all, so the comparison means something


def _is_autoencoder(model) -> bool:
    return hasattr(getattr(model, "_orig_mod", model), "decoder_pred")


def test_bench_command_reports_both_builds_and_their_ratio():
    import subprocess
    import sys

    args = ["bench", str(ROOT / "recipes/crate_tiny.yaml"), "--batch", "2", "--repeats", "1",
            "--set", "architecture.image_size=32", "--set", "architecture.patch_size=16",
            "--set", "architecture.width=48", "--set", "architecture.heads=4", "--set", "architecture.depth=2"]
    result = subprocess.run([sys.executable, "-m", "unroll", *args], capture_output=True, text=True,
                            env={**__import__("os").environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in ("forward, images/s", "train step, images/s", "forward GFLOP/s", "forward peak, MiB",
                   "5 tokens", "17 tokens"):  # the recipe, and its patch-8 long-sequence case
        assert needle in out, needle
    assert out.count("x │") >= 4  # forward, train and memory ratios, and the long case's
    assert "USDT" not in result.stderr


def test_build_without_optimisations_computes_as_printed(tmp_path):
    from unroll.cli import main

    args = ["build", str(ROOT / "recipes/crate_tiny.yaml"), "--no-optimize", "--out", str(tmp_path)]
    assert main(args + [a for s in SMALL + ["architecture.classes=10"] for a in ("--set", s)]) == 0
    plain = unroll.build(tmp_path / "recipe.yaml", checkpoint=tmp_path / "model.safetensors", optimize=False)
    assert not any(step.optimized for layer in plain.encoder.layers for step in layer.steps.values())


def test_training_under_bf16_autocast_backpropagates_through_hoisted_factors():
    plain, fast = pair("crate")
    images = torch.randn(16, 3, 32, 32)
    for model in (plain, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
        out.float().square().mean().backward()
    grads = dict(plain.named_parameters())
    for name, p in fast.named_parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        # bf16 rounding differs between the two evaluation orders: compare directions
        cosine = torch.nn.functional.cosine_similarity(p.grad.flatten(), grads[name].grad.flatten(), dim=0)
        assert cosine > 0.95, (name, float(cosine))


def test_gram_backward_is_the_gradient_of_v_vt():
    from unroll.lower.optimize import Gram

    V = torch.randn(1, 1, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Gram.apply, (V,))


@pytest.mark.parametrize("name", ["crate_tiny", "crate_alpha_b32"])
def test_one_dimension_per_head_builds_in_both_lowerings_and_they_agree(name):
    # p = 1 made the subspace bases (K, d, 1) look like a vector of biases (K, d)
    recipe = load_recipe(ROOT / f"recipes/{name}.yaml", ["architecture.width=8", "architecture.heads=8",
                                                          "architecture.depth=1", "architecture.image_size=16",
                                                          "architecture.patch_size=8"])
    torch.manual_seed(0)
    fast = unroll.build(recipe).eval()
    plain = unroll.build(recipe, optimize=False).eval()
    plain.load_state_dict(fast.state_dict())
    assert fast.layer(0).steps["compress"].U.shape == (8, 8, 1)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(fast(images), plain(images), atol=1e-5)
