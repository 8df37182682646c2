"""Networks of different layers: groups from YAML and from Python, one plan for every command."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import unroll
from unroll.cli import main
from unroll.measure import measure
from unroll.objective import Compression, L1, Lasso, NonNegative
from unroll.plan import plan
from unroll.relax import CompleteSubspaces, Neumann, PreNorm, Residual, SoftmaxSimilarity, UntieOutput

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "recipes/crate_digits.yaml"

# crate_digits' sizes: d = 96, K = 4, p = 24, 16 patches of 2x2 pixels, 10 classes
D, K, P = 96, 4, 24
COMPRESS = 2 * D + K * D * P + K * D * P + D  # LayerNorm, U, O, b
SPARSIFY = 2 * D + D * D  # LayerNorm, D
FRONT_AND_HEAD = (4 * D + D) + D + 17 * D + (2 * D + D * 10 + 10)  # patch Linear, cls, positions; LN, fc


def groups_recipe(tmp_path: Path, tie_second: bool = True) -> Path:
    """crate_digits with 2 CRATE layers, then 2 attention-only layers (its compression step)."""
    recipe = yaml.safe_load(DIGITS.read_text())
    crate, compress = recipe.pop("layer"), None
    compress = [s for s in crate if s["name"] == "compress"]
    del recipe["architecture"]["depth"]
    recipe["name"] = "crate_then_attention"
    recipe["layers"] = [{"steps": crate, "repeat": 2}, {"steps": compress, "repeat": 2, "tie": tie_second}]
    path = tmp_path / "groups.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def crate_steps():
    compress = unroll.GradientStep(Compression(eps=0.5), 1.0, "compress", relax=(
        Neumann(1), CompleteSubspaces(), SoftmaxSimilarity("1/sqrt(p)"), UntieOutput(True), Residual(True), PreNorm()))
    sparsify = unroll.ProximalStep(Lasso() + L1(0.1) + NonNegative(), 0.1, name="sparsify", relax=(PreNorm(),))
    return compress, sparsify


def python_network(tie_second: bool = True) -> unroll.Network:
    compress, sparsify = crate_steps()
    return unroll.Network(
        layers=[unroll.Group((compress, sparsify), 2), unroll.Group((compress,), 2, tie=tie_second)],
        width=D, heads=K, name="crate_then_attention",
        frontend=unroll.PatchFrontend(image_size=8, patch_size=2, channels=1, patch_norm=False),
        head=unroll.ClassifierHead(classes=10, pool="mean"))


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_one_group_is_the_old_layer_and_depth():
    assert count(unroll.build(DIGITS)) == FRONT_AND_HEAD + 4 * (COMPRESS + SPARSIFY)


@pytest.mark.parametrize("tie", [True, False])
def test_groups_from_yaml_and_from_python_have_the_right_parameters(tmp_path, tie):
    expected = FRONT_AND_HEAD + 2 * (COMPRESS + SPARSIFY) + (1 if tie else 2) * COMPRESS
    from_yaml, from_python = unroll.build(groups_recipe(tmp_path, tie)), unroll.build(python_network(tie))
    assert count(from_yaml) == count(from_python) == expected
    assert from_yaml.state_dict().keys() == from_python.state_dict().keys()
    assert from_yaml.network.total_depth == 4 and len(from_yaml.encoder.layers) == (3 if tie else 4)
    # the same weights compute the same function
    from_python.load_state_dict(from_yaml.state_dict())
    images = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(from_yaml(images), from_python(images), atol=1e-6)


def test_layers_run_in_order_with_their_own_or_shared_parameters():
    model = unroll.build(python_network(tie_second=True)).double()
    assert [list(model.layer(i).steps) for i in range(4)] == [["compress", "sparsify"]] * 2 + [["compress"]] * 2
    assert model.layer(2) is model.layer(3) and model.layer(0) is not model.layer(1)
    tokens = torch.randn(2, 17, D, dtype=torch.float64)
    by_hand = tokens
    for i in range(4):  # tokens as rows between layers
        by_hand = model.layer(i)(by_hand.mT).mT
    with torch.no_grad():
        assert torch.allclose(model.encoder(tokens), by_hand, atol=1e-12)


def test_explain_measure_and_attention_cover_every_layer(tmp_path, capsys):
    recipe = groups_recipe(tmp_path)
    text = unroll.explain(unroll.as_network(recipe))
    assert "layers 1-2 (group 1 of 2: this layer 2 times, parameters untied)" in text
    assert "layers 3-4 (group 2 of 2: this layer 2 times, one set of parameters)" in text
    assert text.count("step 1 · compress") == 2 and text.count("step 2 · sparsify") == 1
    model = unroll.build(recipe).eval()
    rows = measure(model, torch.rand(8, 1, 8, 8))
    assert [r["layer"] for r in rows] == [1, 2, 3, 4]
    assert all("compress: R^c" in r for r in rows)
    assert ["sparsify: l1" in r for r in rows] == [True, True, False, False]
    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)).save(tmp_path / "d.png")
    unroll.checkpoint.save_weights(model.state_dict(), tmp_path / "w.safetensors")
    for layer in ("3", "4"):
        assert main(["attention", str(recipe), "--checkpoint", str(tmp_path / "w.safetensors"), "--image",
                     str(tmp_path / "d.png"), "--out", str(tmp_path / f"a{layer}"), "--layer", layer]) == 0
    assert main(["measure", str(recipe), "--samples", "16", "--out", str(tmp_path / "m")]) == 0
    header = (tmp_path / "m/measure.csv").read_text().splitlines()[0]
    assert header.startswith("layer,compress: R^c,sparsify: lasso,sparsify: l1,zeros")
    assert main(["build", str(recipe), "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr()
    assert "4 layers in 2 groups" in out.out and "layers 3-4: compress" in out.out


def test_the_attention_of_each_group_layer_is_its_own():
    from unroll.attention import cls_attention

    model = unroll.build(python_network(tie_second=False)).eval()
    images = torch.rand(2, 1, 8, 8)
    maps = [cls_attention(model, images, layer) for layer in (1, 2, 3, 4)]
    assert all(m.shape == (2, K, 16) for m in maps)
    assert all(not torch.allclose(maps[i], maps[j]) for i in range(4) for j in range(i))


def test_a_decoder_inverting_several_groups_undoes_them_in_reverse_order(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes/crate_mae_tiny.yaml").read_text())
    layer = recipe.pop("layer")
    depth = recipe["architecture"].pop("depth")
    recipe["architecture"].update(width=32, heads=2, image_size=32, patch_size=8)
    recipe["layers"] = [{"steps": layer, "repeat": 2}, {"steps": [layer[0]], "repeat": 1}]
    recipe["decoder"].pop("depth")
    path = tmp_path / "mae.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    network = unroll.as_network(path)
    assert depth > 0 and network.total_depth == 3 and network.decoder.total_depth == 3
    decoder = [(g.repeat, [s.name for s in g.layer]) for g in network.decoder_groups]
    encoder_names = [s["name"] for s in layer]
    assert decoder == [(1, [f"inverse_{encoder_names[0]}"]),
                       (2, [f"inverse_{n}" for n in reversed(encoder_names)])]
    text = unroll.explain(network)
    decoder_text = text[text.index("decoder: 3 layers"):]
    first = decoder_text[:decoder_text.index("decoder layers 2-3")]
    assert "decoder layer 1 (group 1 of 2" in first
    assert f"undoes encoder group 2, step 1 · {encoder_names[0]}" in first  # the mirrored group, not group 1
    model = unroll.build(path)
    loss, prediction, mask = model(torch.rand(2, 3, 32, 32))
    assert torch.isfinite(loss) and prediction.shape == (2, 16, 8 * 8 * 3)
    recipe["decoder"]["depth"] = 5
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(unroll.UnrollError, match="decoder.depth: inverting 2 groups of layers gives 3 layers"):
        unroll.as_network(path)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.__setitem__("layer", r["layers"][0]["steps"]), "give either layer .* or layers .*not both"),
    (lambda r: r["architecture"].__setitem__("depth", 4), "with layers the depth is the sum of the repeats \\(4\\)"),
    (lambda r: r["architecture"].__setitem__("tie_layers", True), "with layers, give each group its own tie"),
    (lambda r: r["layers"][0].__setitem__("repeat", 0), "repeat"),
    (lambda r: r["layers"][1]["steps"].append(dict(r["layers"][1]["steps"][0])), "step names must be unique"),
    (lambda r: r.pop("layers"), "found neither"),
])
def test_yaml_mistakes_in_groups_are_named(tmp_path, change, message):
    recipe = yaml.safe_load(groups_recipe(tmp_path).read_text())
    change(recipe)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(unroll.UnrollError, match=message) as e:
        unroll.as_network(path)
    assert str(path) in str(e.value)


def test_python_mistakes_in_groups_are_named():
    compress, sparsify = crate_steps()
    with pytest.raises(unroll.UnrollError, match="item 0 is a tuple, not a step"):
        unroll.Group(((compress, sparsify),), 2)
    with pytest.raises(unroll.UnrollError, match="item 1 is a tuple, not a Group"):
        unroll.Network(layers=[unroll.Group((compress,), 1), (compress,)], width=D, heads=K)
    with pytest.raises(unroll.UnrollError, match="give either layer \\(with depth\\) or layers, not both"):
        unroll.Network((compress,), layers=[unroll.Group((sparsify,), 2)], width=D, heads=K, depth=2)
    with pytest.raises(unroll.UnrollError, match="depth is the sum of the repeats \\(3\\), found depth 5"):
        unroll.Network(layers=[unroll.Group((compress,), 3)], width=D, heads=K, depth=5)
    with pytest.raises(unroll.UnrollError, match="item 0 is a tuple, not a step"):
        unroll.Network(((compress,),), width=D, heads=K, depth=2)
    assert isinstance(unroll.UnrollError("x"), ValueError)


def test_build_and_explain_refuse_with_the_same_message():
    """Everything build checks, explain checks: both read one plan."""
    from unroll.objective import Custom, GroupSparsity

    bad_heads = unroll.Network((crate_steps()[0],), width=30, heads=4, depth=1)
    bad_group = unroll.Network((unroll.ProximalStep(Lasso() + GroupSparsity(group=4), name="code"),),
                               width=30, heads=3, depth=1)
    not_scalar = unroll.Network((unroll.GradientStep(Custom("f", lambda X: X.sum(0)), name="g"),),
                                width=32, heads=4, depth=1)
    for network, message in ((bad_heads, "heads \\(4\\) must divide the width \\(30\\)"),
                             (bad_group, "groups of 4 coordinates do not divide the width d = 30"),
                             (not_scalar, "fn must return one scalar per sample")):
        with pytest.raises(unroll.UnrollError, match=message) as built:
            unroll.build(network)
        with pytest.raises(unroll.UnrollError) as explained:
            unroll.explain(network)
        assert str(built.value) == str(explained.value)
    with pytest.raises(unroll.UnrollError, match="step c: step_size: Input should be greater than 0 \\(found -1.0\\)"):
        unroll.GradientStep(Compression(), step_size=-1.0, name="c")


def test_one_plan_is_shared_and_immutable():
    network = python_network()
    assert plan(network) is plan(network)
    model = unroll.build(network)
    assert model.plan is plan(network)
    with pytest.raises(Exception):
        model.plan.encoder = None
    assert [layer.module for layer in model.plan.encoder.layers] == [0, 1, 2, 2]
