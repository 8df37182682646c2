"""unroll features: each coordinate of a language model's sparse code, with the held-out contexts
that activate it most, checked against the code recomputed by hand (ISTA written out here)."""

import html
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

import unroll
from unroll.cli import main
from unroll.features import code_expression, collect, sparse_layer, visible
from unroll.recipe import load_recipe
from unroll.train import text
from unroll.train.loop import train

from test_language_model import FAST, TINY, corpus

QUIET = Console(file=open(os.devnull, "w"))
SETS = [a for s in FAST for a in ("--set", s)]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A briefly trained crate_gpt_tiny (2 layers, width 32, 300 tokens, context 16) on a small corpus:
    ``run/`` (weights and tokenizer.json), ``text/``, ``cache/``."""
    root = tmp_path_factory.mktemp("features")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNROLL_CACHE", str(root / "cache"))
        train(TINY, root / "run", data=str(corpus(root / "text")), overrides=FAST, console=QUIET)
    return root


@pytest.fixture
def cached(run, monkeypatch):
    monkeypatch.setenv("UNROLL_CACHE", str(run / "cache"))
    return run


def ista_codes(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """(B, T, m): the code of crate_gpt_tiny's sparsify step in ``layer`` (from 1), by hand:
    two ISTA iterations from zero on the LayerNorm of the step's input,
    A_1 = ReLU(η Dᵀ Y - ηλ), A_2 = ReLU(A_1 - ηλ - η Dᵀ (D A_1 - Y)), with η = λ = 0.1."""
    eta = lam = 0.1
    with torch.no_grad():
        tokens = model.frontend(ids)  # (B, T, d), tokens as rows
        for module in model.encoder.layers[: layer - 1]:
            tokens = module.run(tokens)
        steps = model.encoder.layers[layer - 1].steps
        tokens = steps["compress"].run(tokens)
        sparsify = steps["sparsify"]
        Y = F.layer_norm(tokens, tokens.shape[-1:], sparsify.norm_weight, sparsify.norm_bias, 1e-5)
        D = sparsify.D  # (d, m)
        A = torch.relu(eta * Y @ D - eta * lam)
        A = torch.relu(A - eta * lam - eta * (A @ D.T - Y) @ D)
        # the hand-written code decodes to what the step outputs: the recomputation is the step's
        assert torch.allclose(A @ D.T, sparsify.run(tokens), atol=1e-10)
    return A


def held_out(root: Path) -> torch.Tensor:
    """Every held-out window of the corpus (more tokens than the tests ask for: all are read)."""
    windows = text.open_tokens(str(root / "text"), 300, 16, tokenizer=root / "run" / "tokenizer.json").val
    return torch.stack([windows[i][0] for i in range(len(windows))])


def plain_model(root: Path):
    return unroll.build(load_recipe(TINY, FAST), checkpoint=root / "run" / "model.safetensors",
                        optimize=False).double().eval()


def sections(page: str) -> dict[int, list[tuple[float, str]]]:
    """coordinate -> [(activation, context HTML)] as features.html lists them."""
    found: dict[int, list[tuple[float, str]]] = {}
    for block in page.split('<h2 id="c')[1:]:
        number = int(block.split('"', 1)[0])
        found[number] = [(float(v), c) for v, c in re.findall(
            r'<td class="value">([^<]+)</td><td class="context">(.*?)</td>', block)]
    return found


def test_each_live_coordinate_is_listed_with_its_strongest_contexts(cached, capsys):
    root = cached
    for layer in (1, 2):
        out = root / f"f{layer}"
        assert main(["features", str(TINY), "--checkpoint", str(root / "run"), "--data", str(root / "text"),
                     "--layer", str(layer), "--top", "3", "--out", str(out), *SETS]) == 0
        assert f"layer {layer} (sparsify)" in capsys.readouterr().out
        ids = held_out(root)
        code = ista_codes(plain_model(root), ids, layer).permute(2, 0, 1).flatten(1)  # (m, windows x T)
        peak = code.abs().max(1).values
        listed = sections((out / "features.html").read_text())
        fires = {i for i in range(len(peak)) if peak[i] > 1e-5}
        unsure = {i for i in range(len(peak)) if 0 < peak[i] <= 1e-5}  # float32 may round these to 0 or not
        assert fires <= set(listed) <= fires | unsure
        assert len(fires) > 10 and len(fires) < len(peak)  # trained briefly: many fire, not all
        tokenizer = text.load_tokenizer(root / "run")
        for i, contexts in listed.items():
            values = [v for v, _ in contexts]
            assert values == sorted(values, reverse=True) and 1 <= len(values) <= 3
            assert values[0] == pytest.approx(peak[i].item(), rel=1e-3, abs=1e-5)  # shown to 4 digits
            # the marked token is one where the coordinate takes that value
            marked = html.unescape(re.search(r"<mark>(.*?)</mark>", contexts[0][1]).group(1))
            at = torch.nonzero((code[i].abs() - peak[i]).abs() <= 1e-4 * peak[i] + 1e-6).flatten()
            assert marked in {visible(tokenizer.decode([int(ids.flatten()[a])]), token=True) for a in at}
        page = (out / "features.md").read_text()
        assert f"{len(code) - len(listed)} never fire" in page
        assert page.count("\n## coordinate ") == len(listed)


def test_the_running_top_keeps_what_one_batch_would(cached):
    """Batches of one window each (the running top merges 14 times) keep exactly the top of one pass."""
    root = cached
    model = unroll.build(load_recipe(TINY, FAST), checkpoint=root / "run" / "model.safetensors").eval()
    ids = held_out(root)
    whole, batched = collect(model, ids, 2, top=4), collect(model, ids, 2, top=4, batch_tokens=16)
    assert torch.equal(whole.fired, batched.fired)
    assert torch.allclose(whole.values, batched.values, atol=1e-6)
    code = ista_codes(plain_model(root), ids, 2).permute(2, 0, 1).flatten(1)
    assert (whole.fired - (code != 0).sum(1)).abs().max() <= 2  # float32 and float64 may differ at a ReLU's edge
    for i in whole.live[:20]:
        for c in whole.contexts(i):  # each kept context's value is the code at its window and position
            assert c.value == pytest.approx(code[i, c.window * 16 + c.position].item(), abs=1e-5)


def test_the_code_is_the_factor_a_step_decodes_else_its_output():
    lm = unroll.build(load_recipe(TINY, FAST))
    _, derived = sparse_layer(lm.plan, None)
    assert str(code_expression(derived.final)).startswith("ReLU(") and derived.final.out.args[0].name == "D"
    vision = unroll.build(Path(__file__).resolve().parents[1] / "recipes/crate_tiny.yaml")
    planned, derived = sparse_layer(vision.plan, None)
    assert planned.number == vision.plan.encoder.depth and code_expression(derived.final) is derived.final.out


def test_mistakes_are_one_line_errors(cached, capsys, tmp_path):
    root = cached
    base = ["features", str(TINY), "--data", str(root / "text"), "--out", str(tmp_path / "f"), *SETS]

    def error(args: list[str]) -> str:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    assert "no such weights file" in error([*base, "--checkpoint", str(tmp_path / "missing")])
    run = ["--checkpoint", str(root / "run")]
    assert "--layer must be between 1 and 2, found 3" in error([*base, *run, "--layer", "3"])
    (tmp_path / "empty").mkdir()
    assert "no files here" in error([*base, *run, "--data", str(tmp_path / "empty")])
    (tmp_path / "short.py").write_text("x = 1\n" * 3)
    assert "less than one window" in error([*base, *run, "--data", str(tmp_path / "short.py")])
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes((root / "run" / "model.safetensors").read_bytes())
    assert "no tokenizer.json beside these weights" in error([*base, "--checkpoint", str(tmp_path / "weights")])
    digits = Path(__file__).resolve().parents[1] / "recipes/crate_digits.yaml"
    err = error(["features", str(digits), *run, "--out", str(tmp_path / "f")])
    assert "reads text through a language model; this recipe's task is classification" in err
    # a model whose layer has no sparse-coding step: attention only
    recipe = TINY.read_text()
    recipe = recipe[: recipe.index("  - name: sparsify")] + recipe[recipe.index("training:"):]
    recipe = recipe.replace("  fit:    {term: lasso, expansion: 4}\n", "").replace("  sparse: {term: l1, lam: 0.1}\n", "")
    recipe = recipe.replace("  nonneg: {term: nonnegative}\n", "")
    (tmp_path / "attention.yaml").write_text(recipe)
    assert main(["build", str(tmp_path / "attention.yaml"), "--out", str(tmp_path / "attn"), *SETS]) == 0
    capsys.readouterr()
    attention = ["features", str(tmp_path / "attention.yaml"), "--checkpoint", str(tmp_path / "attn"), "--tokenizer",
                 str(root / "run" / "tokenizer.json"), "--data", str(root / "text"), "--out", str(tmp_path / "f"), *SETS]
    assert "no layer of this recipe has a sparse-coding step" in error(attention)
    assert "layer 1 has no sparse-coding step (one that descends a lasso term); its steps: compress" in error(
        [*attention, "--layer", "1"])
    assert not (tmp_path / "f").exists() or not any((tmp_path / "f").iterdir())
