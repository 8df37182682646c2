"""Built models as Python objects: deep copies are independent, pickles rebuild from the recipe,
``repr`` shows the derived updates, and ``measure`` refuses non-finite weights by name."""

import copy
import io
import pickle
from pathlib import Path

import pytest
import torch

import unroll
from unroll.expr.printing import to_text
from unroll.finite import name_list, nonfinite_names
from unroll.measure import measure
from unroll.objective import Compression, Custom

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["architecture.width=32", "architecture.depth=2", "architecture.image_size=32", "architecture.patch_size=8",
         "architecture.heads=2"]
KINDS = ["classifier", "plain", "autoencoder"]  # plain: optimize=False


def built(kind: str) -> torch.nn.Module:
    if kind == "autoencoder":
        recipe = unroll.load_recipe(ROOT / "recipes/crate_mae_tiny.yaml", SMALL + ["decoder.depth=1"])
    else:
        recipe = unroll.load_recipe(ROOT / "recipes/crate_tiny.yaml", SMALL + ["architecture.classes=5"])
    return unroll.build(recipe, optimize=kind != "plain").eval()


def run(model: torch.nn.Module) -> torch.Tensor:
    """The model's output on fixed images (for the autoencoder: its prediction, with a fixed mask)."""
    images = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    with torch.no_grad():
        if hasattr(model, "decoder"):
            return model(images, noise=torch.linspace(0, 1, 16).repeat(2, 1))[1]
        return model(images)


def energy(X: torch.Tensor) -> torch.Tensor:
    """A custom term pickle can store: a module-level function."""
    return 0.5 * (X**2).sum() / X.shape[0]


def custom_model(fn) -> torch.nn.Module:
    step = unroll.GradientStep(Compression(eps=0.5) + 0.1 * Custom("energy", fn), step_size=0.1, name="reduce")
    net = unroll.Network((step,), width=16, heads=2, depth=2, frontend=unroll.PatchFrontend(image_size=32, patch_size=8),
                         head=unroll.ClassifierHead(classes=3))
    return unroll.build(net).eval()


# --- copy.deepcopy --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_deep_copy_computes_the_same_and_is_independent(kind):
    model = built(kind)
    before = run(model)
    clone = copy.deepcopy(model)
    assert type(clone) is type(model) and torch.equal(run(clone), before)
    original_tensors = {t.data_ptr() for t in model.state_dict().values()}
    assert not original_tensors & {t.data_ptr() for t in clone.state_dict().values()}
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(1.5)
    assert not torch.allclose(run(clone), before)
    assert torch.equal(run(model), before)


def test_a_copy_has_its_own_cache_of_formed_factors():
    model = built("classifier")
    run(model)  # in inference the optimised sparse step caches its weight-only factor
    step = model.layer(0).steps["sparsify"]
    cached = {key: entry[1] for key, entry in step.factor_cache.items()}
    assert cached, "the sparse step formed no factor: nothing to check"
    clone = copy.deepcopy(model)
    clone_step = clone.layer(0).steps["sparsify"]
    assert clone_step.factor_cache is not step.factor_cache
    with torch.no_grad():
        clone_step.D.mul_(2.0)
    run(clone)  # forms the copy's factor from the copy's D
    assert all(step.factor_cache[key][1] is factor for key, factor in cached.items())  # not evicted
    assert all(not torch.equal(clone_step.factor_cache[key][1], factor) for key, factor in cached.items())


def test_a_model_with_a_lambda_term_still_deep_copies():
    model = custom_model(lambda X: 0.5 * (X**2).sum() / X.shape[0])
    assert torch.equal(run(copy.deepcopy(model)), run(model))


# --- pickle -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_torch_save_and_load_rebuild_the_model(kind):
    model = built(kind)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(model) and loaded.optimize == (kind != "plain") and not loaded.training
    assert torch.equal(run(loaded), run(model))


def test_a_pickle_keeps_the_dtype_and_training_mode():
    model = built("classifier").double().train()
    loaded = pickle.loads(pickle.dumps(model))
    assert loaded.training and all(p.dtype == torch.float64 for p in loaded.parameters())
    assert all(p.requires_grad for p in loaded.parameters())


def test_a_custom_term_with_a_module_level_function_pickles():
    model = custom_model(energy)
    assert torch.equal(run(pickle.loads(pickle.dumps(model))), run(model))


def test_a_custom_term_with_a_lambda_says_how_to_save_instead():
    model = custom_model(lambda X: 0.5 * (X**2).sum() / X.shape[0])
    with pytest.raises(unroll.UnrollError) as error:
        torch.save(model, io.BytesIO())
    message = error.value.message
    assert "the custom term 'energy' holds a function pickle cannot store (a lambda or a local function)" in message
    assert "unroll.checkpoint.save_weights(model.state_dict(), path)" in message
    assert "unroll.build(recipe, checkpoint=path)" in message


def test_a_pickle_whose_weights_no_longer_fit_is_a_clear_error():
    from unroll.lower.model import rebuild

    model = built("classifier")
    state = {k: v for k, v in model.state_dict().items() if k != "head.fc.bias"}
    with pytest.raises(unroll.UnrollError) as error:
        rebuild(model.network, True, state, False)
    assert "the pickled weights do not fit the model" in error.value.message and "head.fc.bias" in error.value.message


def test_a_part_of_a_model_does_not_pickle_on_its_own():
    with pytest.raises(unroll.UnrollError, match=r"a lowered step \(compress\) cannot be pickled on its own"):
        pickle.dumps(built("classifier").encoder)


# --- repr -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["classifier", "autoencoder"])
def test_repr_shows_each_step_its_update_and_its_parameters(kind):
    model = built(kind)
    text = repr(model)
    derived = [d for _, stack in model.plan.stacks() for d in stack.steps()]
    for d in derived:
        update = "Z⁺ = " + to_text(d.final.out)
        assert f"name={d.exact.name}: {d.final.title}" in text
        assert (update if len(update) <= 100 else update[:99] + "…") in text
    assert "U (2, 32, 16)" in text and "rows=True" in text
    assert "LoweredStep()" not in text


def test_repr_cuts_a_long_update():
    step = built("classifier").layer(0).steps["compress"]
    step.REPR_CHARS = 12
    lines = repr(step).splitlines()
    assert lines[2].strip() == step.update_text[:11] + "…"


# --- non-finite weights ------------------------------------------------------------------------------


def test_measure_names_the_non_finite_weights():
    model = built("classifier")
    images = torch.rand(2, 3, 32, 32)
    assert len(measure(model, images)) == 2
    with torch.no_grad():
        model.layer(1).steps["compress"].U[0, 0, 0] = float("nan")
        model.head.fc.bias[0] = float("inf")
    with pytest.raises(unroll.UnrollError) as error:
        measure(model, images)
    assert "not finite" in error.value.message
    assert "encoder.layers.1.steps.compress.U, head.fc.bias;" in error.value.message


def test_nonfinite_names_lists_at_most_five():
    state = {f"w{i}": torch.tensor([float("nan") if i % 2 else 1.0]) for i in range(16)}
    state["count"] = torch.tensor([3])  # integers are always finite
    names = nonfinite_names(state)
    assert names == [f"w{i}" for i in range(1, 16, 2)]
    assert name_list(names) == "w1, w3, w5, w7, w9 and 3 more"
    assert name_list(names[:5]) == "w1, w3, w5, w7, w9"


def test_a_network_pickled_before_groups_existed_still_plans_and_builds():
    """Networks of the previous version had no ``layers`` field: unpickling restores only the
    fields it had, so nothing derived may be kept outside the fields."""
    net = built("classifier").network
    state = dict(net.__dict__)
    del state["layers"]  # as pickled by unroll before networks of several groups
    old = unroll.Network.__new__(unroll.Network)
    old.__dict__.update(state)
    assert old.groups[0].repeat == net.depth and old.total_depth == net.depth
    model = unroll.build(old)
    assert model.state_dict().keys() == built("classifier").state_dict().keys()


def test_replace_changes_the_depth_and_the_decoder_follows_tie_layers():
    import dataclasses

    net = built("autoencoder").network
    deeper = dataclasses.replace(net, depth=net.depth + 1)
    assert deeper.total_depth == net.depth + 1 and len(unroll.build(deeper).encoder.layers) == net.depth + 1
    tied = dataclasses.replace(net, tie_layers=True)
    assert tied.decoder_groups[0].tie and not dataclasses.replace(tied, tie_layers=False).decoder_groups[0].tie
