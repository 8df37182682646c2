"""unroll.train.init.initialise: fine-tuning starts from another run's weights.

Expected values come from the checkpoint's own tensors, from the model's weights copied before
loading, or from torch.nn.functional.interpolate called here; never from the code under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import unroll
from unroll.checkpoint import save_weights
from unroll.errors import UnrollError
from unroll.recipe import load_recipe
from unroll.train.init import initialise

RECIPE = "recipes/crate_tiny.yaml"
ROOT = Path(__file__).resolve().parents[1]
# CRATE-T's layer, narrowed so that a build takes a fraction of a second
SMALL = {"width": 32, "heads": 2, "depth": 2, "image_size": 32, "patch_size": 4, "classes": 1000}
HEAD = ("head.fc.weight", "head.fc.bias")
POS = "frontend.pos_embedding"


def build(seed: int, recipe: str = RECIPE, **changes) -> torch.nn.Module:
    torch.manual_seed(seed)
    sizes = {**SMALL, **changes}
    return unroll.build(load_recipe(ROOT / recipe, [f"architecture.{k}={v}" for k, v in sizes.items()]))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save(model: torch.nn.Module, folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    return save_weights(model.state_dict(), folder / "model.safetensors"), snapshot(model)


def assert_same(model: torch.nn.Module, expected: dict[str, torch.Tensor], names) -> None:
    state = model.state_dict()
    for name in names:
        assert torch.equal(state[name], expected[name]), name


def assert_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == before.keys()
    assert_same(model, before, before)


def test_new_classifier_keeps_its_fresh_initialisation_and_everything_else_is_copied(tmp_path):
    file, source = save(build(0, classes=1000), tmp_path)
    model = build(1, classes=10)
    fresh = snapshot(model)
    assert not torch.equal(fresh["frontend.cls_token"], source["frontend.cls_token"])  # the seeds differ

    notes = initialise(model, file)

    body = [k for k in fresh if k not in HEAD]
    assert len(body) > 20
    assert_same(model, source, body)
    assert_same(model, fresh, HEAD)
    assert model.state_dict()["head.fc.weight"].shape == (10, 32)
    assert len(notes) == 1
    assert "classifier" in notes[0] and "1000" in notes[0] and "10 here" in notes[0]
    assert "head.fc.weight" in notes[0] and "head.fc.bias" in notes[0]


def test_a_run_folder_loads_its_model_safetensors(tmp_path):
    _, source = save(build(0), tmp_path)
    model = build(1)
    assert initialise(model, tmp_path) == []  # same architecture: plain copies, nothing to note
    assert_same(model, source, source)


def test_same_size_positions_are_copied_exactly_and_other_grids_are_resampled_bicubic(tmp_path):
    file, source = save(build(0, image_size=32), tmp_path)  # 8x8 grid + cls
    model = build(1, image_size=16)  # 4x4 grid + cls
    notes = initialise(model, file)

    pos = model.state_dict()[POS]
    old = source[POS]
    assert pos.shape == (1, 17, 32)
    assert torch.equal(pos[:, :1], old[:, :1])  # the cls row
    grid = old[:, 1:].reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1, 16, 32)
    torch.testing.assert_close(pos[:, 1:], expected, rtol=0, atol=1e-6)
    assert_same(model, source, [k for k in source if k != POS])
    assert notes == ["positional embedding interpolated from 8x8 to 4x4 patches"]


@pytest.mark.parametrize("sizes", [(32, 16), (16, 32)], ids=["8x8 to 4x4", "4x4 to 8x8"])
def test_a_constant_grid_stays_constant(tmp_path, sizes):
    source_model = build(0, image_size=sizes[0])
    row = torch.randn(32)
    with torch.no_grad():
        source_model.frontend.pos_embedding[:, 1:] = row
    file, source = save(source_model, tmp_path)
    model = build(1, image_size=sizes[1])
    initialise(model, file)
    pos = model.state_dict()[POS]
    assert torch.equal(pos[0, 0], source[POS][0, 0])
    torch.testing.assert_close(pos[0, 1:], row.expand(pos.shape[1] - 1, -1), rtol=0, atol=1e-5)


def test_a_fixed_sincos_table_is_copied_as_a_buffer_or_kept_when_its_grid_differs(tmp_path):
    source_model = build(0, positions="sincos")
    assert POS not in dict(source_model.named_parameters())  # a buffer
    state = source_model.state_dict()
    state[POS] = state[POS] + 0.5  # same shape, other values: rule 1 holds for buffers too
    file = save_weights(state, tmp_path / "same.safetensors")
    model = build(1, positions="sincos")
    assert initialise(model, file) == []
    assert torch.equal(model.state_dict()[POS], state[POS])

    file, _ = save(build(0, positions="sincos", image_size=16), tmp_path)
    model = build(1, positions="sincos")
    own = snapshot(model)[POS]
    notes = initialise(model, file)
    assert torch.equal(model.state_dict()[POS], own)
    assert len(notes) == 1 and "8x8" in notes[0] and "4x4" in notes[0]


@pytest.mark.parametrize("embedding", [{}, {"embedding": "conv", "patch_norm": "false"}], ids=["linear", "conv"])
def test_a_new_patch_size_leaves_the_patch_embedding_fresh(tmp_path, embedding):
    file, source = save(build(0, patch_size=4, **embedding), tmp_path)  # 8x8 grid
    model = build(1, patch_size=8, **embedding)  # 4x4 grid
    fresh = snapshot(model)
    changed = ["frontend.proj.weight"] + (["frontend.patch_norm.weight", "frontend.patch_norm.bias"]
                                          if not embedding else [])
    notes = initialise(model, file)

    assert_same(model, fresh, changed)
    assert_same(model, source, [k for k in source if k not in changed and k != POS])
    assert "frontend.proj.bias" in source  # over the width: copied like any tensor of the same shape
    patch_notes = [n for n in notes if "patch embedding" in n]
    assert len(patch_notes) == 1 and all(k in patch_notes[0] for k in changed)
    assert "positional embedding interpolated from 8x8 to 4x4 patches" in notes
    assert len(notes) == 2


def test_floating_dtypes_are_converted_with_a_note(tmp_path):
    source = {k: v.double() for k, v in build(0).state_dict().items()}
    file = save_weights(source, tmp_path / "model.safetensors")
    model = build(1)
    notes = initialise(model, file)
    assert_same(model, {k: v.float() for k, v in source.items()}, source)
    assert notes == ["converted tensors from float64 to float32 to fit the model"]


def test_a_foreign_safetensors_file_without_digest_loads(tmp_path):
    source = snapshot(build(0))
    save_file({k: v.contiguous() for k, v in source.items()}, tmp_path / "w.safetensors")
    model = build(1)
    assert initialise(model, tmp_path / "w.safetensors") == []
    assert_same(model, source, source)


def error(model: torch.nn.Module, path: Path) -> str:
    before = snapshot(model)
    with pytest.raises(UnrollError) as info:
        initialise(model, path)
    assert_untouched(model, before)
    return str(info.value)


def test_another_width_lists_the_shapes(tmp_path):
    file, _ = save(build(0, width=32), tmp_path)
    message = error(build(1, width=64, classes=10), file)
    assert str(file) in message
    assert "frontend.cls_token: (1, 1, 32) in the checkpoint, (1, 1, 64) in the model" in message
    assert "more" in message  # dozens of tensors differ: the list is cut short


def test_missing_tensors_are_listed(tmp_path):
    file, _ = save(build(0, depth=2), tmp_path)
    message = error(build(1, depth=3), file)
    assert "missing from the checkpoint: encoder.layers.2." in message
    assert "not in the model" not in message


def test_extra_tensors_are_listed(tmp_path):
    file, _ = save(build(0, depth=3), tmp_path)
    message = error(build(1, depth=2), file)
    assert "not in the model: encoder.layers.2." in message
    assert "missing" not in message


def test_a_row_count_that_is_not_cls_plus_a_square_grid_is_refused(tmp_path):
    state = build(0).state_dict()
    state[POS] = state[POS][:, :51]  # cls + 50 rows: no square grid
    file = save_weights(state, tmp_path / "model.safetensors")
    message = error(build(1, image_size=16, classes=10), file)
    assert POS in message and "51 rows" in message


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"not a checkpoint at all, just some bytes")
    message = error(build(1), file)
    assert str(file) in message and "safetensors" in message


def test_a_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "recipe.yaml").write_text("name: x\n")
    message = error(build(1), tmp_path)
    assert str(tmp_path) in message and "model.safetensors" in message


def test_nan_in_the_checkpoint_is_refused(tmp_path):
    state = build(0).state_dict()
    state["head.fc.bias"][3] = float("nan")  # even in a tensor that a new classifier would not use
    file = save_weights(state, tmp_path / "model.safetensors")
    message = error(build(1, classes=10), file)
    assert "NaN" in message and "head.fc.bias" in message
