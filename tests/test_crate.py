"""CRATE built from its objective: published parameter counts, the reference function given the
reference weights (through `unroll convert`), and torch.compile."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference_crate import CrateConfig, random_reference_state_dict, reference_forward

import unroll
from unroll.cli import main
from unroll.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "architecture.image_size=32", "architecture.patch_size=8", "architecture.width=48",
    "architecture.heads=4", "architecture.depth=2", "architecture.classes=10",
]


@pytest.mark.parametrize(
    "name,count",
    [("tiny", 6_090_856), ("small", 13_116_328), ("base", 22_796_008), ("large", 77_641_192)],
)
def test_published_parameter_counts(name, count):
    model = unroll.build(ROOT / f"recipes/crate_{name}.yaml")
    assert sum(p.numel() for p in model.parameters()) == count


def test_constants_are_buffers_not_parameters():
    model = unroll.build(load_recipe(ROOT / "recipes/crate_tiny.yaml", SMALL))
    sparse = model.layer(0).steps["sparsify"]
    assert {n for n, _ in sparse.named_buffers()} == {"eta", "lambda"}
    assert {n for n, _ in sparse.named_parameters()} == {"norm_weight", "norm_bias", "D"}


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_same_function_as_the_reference_given_its_weights(tmp_path, pool):
    cfg = CrateConfig(pool=pool)
    reference = random_reference_state_dict(cfg, seed=3)
    checkpoint = tmp_path / "crate.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.items()}}, checkpoint)
    converted = tmp_path / "crate.safetensors"
    overrides = SMALL + [f"architecture.pool={pool}"]
    recipe_path = tmp_path / "small.yaml"
    import yaml

    recipe_path.write_text(yaml.safe_dump(load_recipe(ROOT / "recipes/crate_tiny.yaml", overrides).model_dump(mode="json")))
    assert main(["convert", str(recipe_path), str(checkpoint), "--out", str(converted)]) == 0
    model = unroll.build(recipe_path, checkpoint=converted).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = reference_forward(reference, cfg, images)
        got = model(images)
    assert got.shape == (4, 10)
    assert (got - expected).abs().max() < 1e-4


def test_convert_names_missing_and_unexpected_keys(tmp_path, capsys):
    cfg = CrateConfig()
    reference = random_reference_state_dict(cfg)
    reference.pop("transformer.layers.1.1.fn.weight")
    reference["transformer.layers.0.extra"] = torch.zeros(1)
    reference["cls_token"] = torch.zeros(1, 1, 7)
    torch.save(reference, tmp_path / "bad.pth")
    recipe = tmp_path / "small.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(load_recipe(ROOT / "recipes/crate_tiny.yaml", SMALL).model_dump(mode="json")))
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(recipe), str(tmp_path / "bad.pth"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "transformer.layers.0.extra" in err
    assert not out.exists()
    del reference["transformer.layers.0.extra"]
    torch.save(reference, tmp_path / "bad.pth")
    assert main(["convert", str(recipe), str(tmp_path / "bad.pth"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "missing keys: encoder.layers.1.steps.sparsify.D" in err
    assert "frontend.cls_token: expected (1, 1, 48), found (1, 1, 7)" in err
    assert not out.exists()


def test_torch_compile_agrees_with_eager():
    model = unroll.build(load_recipe(ROOT / "recipes/crate_tiny.yaml", SMALL)).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(compiled(images), model(images), atol=1e-5)


def test_build_command_writes_weights_and_resolved_recipe(tmp_path):
    out = tmp_path / "built"
    args = [str(ROOT / "recipes/crate_tiny.yaml"), "--out", str(out)] + [a for s in SMALL for a in ("--set", s)]
    result = subprocess.run([sys.executable, "-m", "unroll", "build", *args], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "parameters: 25,498" in result.stdout
    assert "GFLOP" in result.stdout
    resolved = load_recipe(out / "recipe.yaml")
    assert resolved.architecture.width == 48
    model = unroll.build(resolved, checkpoint=out / "model.safetensors")
    assert sum(p.numel() for p in model.parameters()) == 25_498


def test_explain_latex():
    result = subprocess.run(
        [sys.executable, "-m", "unroll", "explain", str(ROOT / "recipes/crate_base.yaml"), "--latex"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert r"\operatorname{softmax}" in result.stdout and r"\sum_{k=1}^{K}" in result.stdout
