"""CRATE-alpha and CRATE-MAE built from their recipes: published parameter counts, and the same
function as independent eager references given reference-layout weights through `unroll convert`."""

from pathlib import Path

import pytest
import torch
import yaml
from reference_variants import Config, alpha_forward, mae_forward, random_alpha_state_dict, random_mae_state_dict

import unroll
from unroll.cli import main
from unroll.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["architecture.image_size=32", "architecture.patch_size=8", "architecture.width=48",
         "architecture.heads=4", "architecture.depth=2"]


def small_recipe(tmp_path: Path, name: str, extra: list[str]) -> Path:
    path = tmp_path / f"{name}.yaml"
    recipe = load_recipe(ROOT / f"recipes/{name}.yaml", SMALL + extra)
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    return path


def convert(tmp_path: Path, recipe: Path, state: dict, capsys) -> tuple[Path, str]:
    checkpoint = tmp_path / "reference.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, checkpoint)
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(recipe), str(checkpoint), "--out", str(out)]) == 0
    return out, capsys.readouterr().out


@pytest.mark.parametrize("name,count", [("b16", 72_328_936), ("l14", 253_650_920)])
def test_crate_alpha_parameter_counts(name, count):
    model = unroll.build(ROOT / f"recipes/crate_alpha_{name}.yaml")
    assert sum(p.numel() for p in model.parameters()) == count


def test_crate_mae_parameter_count_is_the_reference_minus_its_unused_tensors():
    model = unroll.build(ROOT / "recipes/crate_mae_base.yaml")
    d, tokens = 768, 197
    unused = 2 * tokens * d + d * d + d  # pos_embed, decoder_pos_embed (a buffer here), decoder_embed
    assert sum(p.numel() for p in model.parameters()) + unused == 44_638_464


def test_crate_alpha_same_function_as_the_reference(tmp_path, capsys):
    cfg = Config()
    reference = random_alpha_state_dict(cfg, seed=5)
    recipe = small_recipe(tmp_path, "crate_alpha_b16", ["architecture.classes=10"])
    weights, _ = convert(tmp_path, recipe, reference, capsys)
    model = unroll.build(recipe, checkpoint=weights).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = alpha_forward(reference, cfg, images)
        got = model(images)
    assert got.shape == (3, 10)
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_crate_mae_same_function_as_the_reference(tmp_path, capsys, norm_pix_loss):
    cfg = Config()
    reference = random_mae_state_dict(cfg, seed=7)
    recipe = small_recipe(tmp_path, "crate_mae_base", ["decoder.depth=2", f"decoder.norm_pix_loss={str(norm_pix_loss).lower()}"])
    weights, said = convert(tmp_path, recipe, reference, capsys)
    assert "pos_embed, decoder_embed.weight, decoder_embed.bias" in said
    model = unroll.build(recipe, checkpoint=weights).eval()
    images = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 16)
    with torch.no_grad():
        loss, pred, mask = model(images, mask_ratio=0.75, noise=noise)
        ref_loss, ref_pred, ref_mask = mae_forward(reference, cfg, images, 0.75, noise, norm_pix_loss)
        assert torch.equal(mask, ref_mask) and mask.sum() == 3 * 12
        assert (pred - ref_pred).abs().max() < 1e-4
        assert abs(loss - ref_loss) < 1e-4
        # nothing masked: same predictions and mask; the reference's loss is 0/0, ours is 0
        loss0, pred0, mask0 = model(images, mask_ratio=0.0, noise=noise)
        _, ref_pred0, ref_mask0 = mae_forward(reference, cfg, images, 0.0, noise, norm_pix_loss)
    assert torch.equal(mask0, ref_mask0) and mask0.sum() == 0
    assert (pred0 - ref_pred0).abs().max() < 1e-4
    assert loss0 == 0


def test_sincos_positions_match_the_reference_table():
    from reference_variants import sincos_table

    model = unroll.build(load_recipe(ROOT / "recipes/crate_mae_base.yaml", SMALL + ["decoder.depth=1"]))
    expected = torch.from_numpy(sincos_table(48, 4))
    assert torch.allclose(model.frontend.pos_embedding[0], expected, atol=1e-6)


def test_mae_draws_noise_when_none_is_given():
    model = unroll.build(load_recipe(ROOT / "recipes/crate_mae_base.yaml", SMALL + ["decoder.depth=1"]))
    loss, pred, mask = model(torch.randn(2, 3, 32, 32))
    assert pred.shape == (2, 16, 192) and mask.shape == (2, 16)
    assert (mask.sum(1) == 12).all() and torch.isfinite(loss)
    latent, mask = model.encode(torch.randn(2, 3, 32, 32), mask_ratio=0.5)
    assert latent.shape == (2, 17, 48) and (mask.sum(1) == 8).all()
    assert model.decode(latent).shape == (2, 16, 192)


def test_convert_rejects_a_mae_checkpoint_with_a_stray_key(tmp_path, capsys):
    cfg = Config()
    reference = random_mae_state_dict(cfg)
    reference["decoder_blocks.0.layers.0.2.fn.weight"] = torch.zeros(2)
    reference["blocks.1.layers.0.1.fn.weight"] = torch.zeros(48, 7)
    torch.save(reference, tmp_path / "bad.pth")
    recipe = small_recipe(tmp_path, "crate_mae_base", ["decoder.depth=2"])
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(recipe), str(tmp_path / "bad.pth"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unexpected keys for a CRATE-MAE checkpoint: decoder_blocks.0.layers.0.2.fn.weight" in err
    assert not out.exists()
    del reference["decoder_blocks.0.layers.0.2.fn.weight"]
    torch.save(reference, tmp_path / "bad.pth")
    assert main(["convert", str(recipe), str(tmp_path / "bad.pth"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "encoder.layers.1.steps.sparsify.D: expected (48, 48), found (48, 7)" in err
    assert not out.exists()


def test_convert_refuses_to_merge_layers_a_tied_recipe_shares(tmp_path, capsys):
    """The reference trains every layer apart; a recipe that ties them would keep one silently."""
    reference = random_alpha_state_dict(Config(), seed=5)
    recipe = small_recipe(tmp_path, "crate_alpha_b16", ["architecture.classes=10", "architecture.tie_layers=true"])
    out = tmp_path / "out.safetensors"
    torch.save({"model": {f"module.{k}": v for k, v in reference.items()}}, tmp_path / "reference.pth")
    assert main(["convert", str(recipe), str(tmp_path / "reference.pth"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "both map to encoder.layers.0.steps." in err and "shares one set of parameters" in err
    assert not out.exists()


@pytest.mark.parametrize("name", ["crate_alpha_b16", "crate_mae_base"])
def test_torch_compile_fullgraph_agrees_with_eager(name):
    extra = ["decoder.depth=1"] if "mae" in name else ["architecture.classes=10"]
    model = unroll.build(load_recipe(ROOT / f"recipes/{name}.yaml", SMALL + extra)).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    images = torch.randn(2, 3, 32, 32)
    args = (images,) if "alpha" in name else (images, 0.75, torch.rand(2, 16))
    with torch.no_grad():
        got, expected = compiled(*args), model(*args)
    for a, b in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        assert torch.allclose(a, b, atol=1e-5)
