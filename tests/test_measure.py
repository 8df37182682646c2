"""unroll measure and unroll attention: the per-layer objective on a briefly trained model, finite
log-determinants in hard cases, user-defined terms measured, no trace left on the model."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

import unroll
from unroll.cli import main
from unroll.measure import measure
from unroll.objective import CodingRate, Compression, Custom
from unroll.recipe import load_recipe
from unroll.train import data as datasets
from unroll.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "recipes/crate_digits.yaml"
MIXTURES = ["architecture.classes=4", "architecture.width=48", "training.data=mixtures", "training.augment.shift=0",
            "training.lr=5e-3", "training.warmup_epochs=1", "training.epochs=6"]
QUIET = Console(file=open(os.devnull, "w"))


def test_compression_falls_and_sparsity_rises_with_depth_on_mixtures(tmp_path):
    train(DIGITS, tmp_path, seed=0, overrides=MIXTURES, console=QUIET)
    model = unroll.build(load_recipe(DIGITS, MIXTURES), checkpoint=tmp_path / "model.safetensors").eval()
    held_out, _ = datasets.stack(datasets.open_data("mixtures", 8, 1).val, 200)
    rows = measure(model, held_out)
    rc = [r["compress: R^c"] for r in rows]
    zeros = [r["zeros"] for r in rows]
    assert len(rows) == 4
    assert rc[-1] < rc[0] and zeros[-1] > zeros[0], (rc, zeros)
    assert all(np.isfinite(v) for r in rows for v in r.values())


def test_log_determinants_stay_finite_for_tiny_eps_and_rank_deficient_tokens():
    Z = torch.randn(2, 16, 1, dtype=torch.float64) * torch.ones(2, 1, 40, dtype=torch.float64)  # rank 1, 40 tokens
    U = torch.randn(4, 16, 4, dtype=torch.float64)
    for eps in (1.0, 1e-3):
        assert torch.isfinite(CodingRate(eps=eps).value(Z, {})).all()
        assert torch.isfinite(Compression(eps=eps).value(Z, {"U": U})).all()
    # and equal to slogdet where both apply
    a = 16 / (40 * 1e-3**2)
    eye = torch.eye(40, dtype=torch.float64)
    expected = 0.5 * torch.linalg.slogdet(eye + a * Z.mT @ Z)[1]
    assert torch.allclose(CodingRate(eps=1e-3).value(Z, {}), expected)


def test_measures_the_terms_of_a_user_defined_objective_and_leaves_no_hooks():
    energy = Custom("energy", lambda X: 0.5 * (X**2).sum() / X.shape[0])
    step = unroll.GradientStep(Compression(eps=0.5) + 0.1 * energy, step_size=0.1, name="reduce")
    net = unroll.Network((step,), width=32, heads=4, depth=3,
                         frontend=unroll.PatchFrontend(image_size=16, patch_size=4), head=unroll.ClassifierHead(classes=5))
    model = unroll.build(net).eval()
    rows = measure(model, torch.randn(4, 3, 16, 16))
    assert [r["layer"] for r in rows] == [1, 2, 3]
    assert all("reduce: energy" in r and "reduce: R^c" in r for r in rows)
    assert all(not step._forward_hooks for layer in model.encoder.layers for step in layer.steps.values())


def test_measure_and_attention_commands_write_their_files(tmp_path, capsys):
    train(DIGITS, tmp_path, overrides=["architecture.width=32", "architecture.depth=2", "training.epochs=1"], console=QUIET)
    over = ["--set", "architecture.width=32", "--set", "architecture.depth=2"]
    assert main(["measure", str(DIGITS), "--checkpoint", str(tmp_path / "model.safetensors"), "--samples", "64",
                 "--out", str(tmp_path / "m"), *over]) == 0
    assert (tmp_path / "m/measure.csv").read_text().startswith("layer,compress: R^c,")
    assert (tmp_path / "m/measure.png").stat().st_size > 1000
    Image.fromarray((datasets.digits().images[0, 0].numpy() * 255).astype(np.uint8)).save(tmp_path / "digit.png")
    assert main(["attention", str(DIGITS), "--checkpoint", str(tmp_path / "model.safetensors"), "--image",
                 str(tmp_path / "digit.png"), "--out", str(tmp_path / "a"), "--layer", "1", *over]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["head_1.png", "head_2.png", "head_3.png", "head_4.png", "heads.png"]
    capsys.readouterr()


def test_cls_attention_is_a_distribution_over_the_tokens():
    from unroll.attention import cls_attention

    model = unroll.build(load_recipe(ROOT / "recipes/crate_tiny.yaml", [
        "architecture.image_size=32", "architecture.patch_size=8", "architecture.depth=2"])).eval()
    weights = cls_attention(model, torch.randn(2, 3, 32, 32), layer=2)
    assert weights.shape == (2, 6, 16)
    assert (weights >= 0).all() and (weights.sum(-1) < 1).all()  # the rest is the cls token's own weight


@pytest.mark.parametrize("tied", [False, True])
def test_cls_attention_counts_layers_from_one(tied):
    from unroll.attention import cls_attention

    def crate(depth: int):
        return unroll.build(load_recipe(ROOT / "recipes/crate_tiny.yaml", [
            "architecture.image_size=32", "architecture.patch_size=8", "architecture.width=32", "architecture.heads=2",
            f"architecture.depth={depth}", f"architecture.tie_layers={str(tied).lower()}"])).eval()

    model, first_only = crate(2), crate(1)
    first_only.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("encoder.layers.1.")})
    images = torch.randn(2, 3, 32, 32)
    layer_1 = cls_attention(model, images, 1)
    assert torch.equal(layer_1, cls_attention(first_only, images, 1))  # layer 1 is the first layer
    assert not torch.allclose(layer_1, cls_attention(model, images, 2))
    for wrong in (0, 3):
        with pytest.raises(unroll.UnrollError, match=f"--layer must be between 1 and 2, found {wrong}"):
            cls_attention(model, images, wrong)


def test_measure_uses_a_learned_threshold():
    over = ["architecture.width=32", "architecture.depth=2",
            "layer.1.relax=[{learnable: {constants: [lambda]}}, {pre_norm: {eps: 1.0e-5}}]"]
    model = unroll.build(load_recipe(DIGITS, over)).eval()
    images = torch.rand(8, 1, 8, 8)
    before = measure(model, images)[0]["sparsify: l1"]
    with torch.no_grad():
        for layer in model.encoder.layers:  # only the threshold moves: the l1 term must follow it
            getattr(layer.steps["sparsify"], "lambda").mul_(3.0)
    after = measure(model, images)[0]
    # λ ‖z‖₁ per sample, with the learned λ = 0.3 (not the recipe's 0.1): d = 32, N = 17 tokens
    assert after["sparsify: l1"] == pytest.approx(0.3 * after["l1"] * 32 * 17, rel=1e-6)
    assert after["sparsify: l1"] != before


def test_measure_reads_held_out_text_through_a_language_model(tmp_path, monkeypatch, capsys):
    """Windows of held-out text, tokenized by the run's tokenizer; the sparse step of CRATE's
    language model decodes its code (D X), so its zeros and l1 are the code's, recomputed by hand."""
    import csv

    from test_features import held_out, ista_codes, plain_model
    from test_language_model import FAST, TINY, corpus

    monkeypatch.setenv("UNROLL_CACHE", str(tmp_path / "cache"))
    data = corpus(tmp_path / "text")
    train(TINY, tmp_path / "run", data=str(data), overrides=FAST, console=QUIET)
    sets = [a for s in FAST for a in ("--set", s)]
    # more windows than the held-out text has: all of them are read
    assert main(["measure", str(TINY), "--checkpoint", str(tmp_path / "run"), "--data", str(data), "--samples", "1000",
                 "--out", str(tmp_path / "m"), *sets]) == 0
    ids = held_out(tmp_path)
    title = " ".join(capsys.readouterr().out.split())
    assert f"({len(ids)} held-out windows of 16 tokens of text, {ids.numel():,} tokens)" in title
    rows = list(csv.DictReader((tmp_path / "m/measure.csv").open()))
    assert [r["layer"] for r in rows] == ["1", "2"]
    model = plain_model(tmp_path)
    for layer, row in enumerate(rows, 1):
        code = ista_codes(model, ids, layer)  # (windows, T, m)
        assert 0.05 < (code == 0).double().mean().item() < 0.99
        assert float(row["sparsify: code zeros"]) == pytest.approx((code == 0).double().mean().item(), abs=1e-3)
        # λ ‖x‖₁ per window, λ = 0.1
        assert float(row["sparsify: l1"]) == pytest.approx(0.1 * code.abs().sum((1, 2)).mean().item(), rel=1e-4)
        assert float(row["zeros"]) == 0  # the decoded tokens are dense
    assert (tmp_path / "m/measure.png").stat().st_size > 1000


def test_measure_of_a_language_model_without_weights_tokenizes_as_training_would(tmp_path, monkeypatch, capsys):
    from test_language_model import FAST, TINY, corpus

    monkeypatch.setenv("UNROLL_CACHE", str(tmp_path / "cache"))
    data = corpus(tmp_path / "text")
    sets = [a for s in FAST for a in ("--set", s)]
    assert main(["measure", str(TINY), "--data", str(data), "--samples", "3", "--out", str(tmp_path / "m"), *sets]) == 0
    assert "(3 held-out windows of 16 tokens" in " ".join(capsys.readouterr().out.split())
    assert main(["measure", str(TINY), "--data", str(data), "--checkpoint", str(tmp_path / "none"), *sets]) == 2
    assert "no such weights file" in capsys.readouterr().err
    assert main(["measure", str(DIGITS), "--tokenizer", str(tmp_path / "t.json"), "--out", str(tmp_path / "d")]) == 2
    assert "--tokenizer is for language models" in capsys.readouterr().err
