"""White-box language models: the token front end and tied head, the task in the recipe, and the
CRATE language model of crate-lm, converted and computing the reference's logits."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import unroll
from unroll.convert import convert_reference
from unroll.errors import UnrollError
from unroll.recipe import load_recipe
from unroll.summary import parameter_count

from reference_crate_gpt import CrateGPT

ROOT = Path(__file__).resolve().parents[1]
GPT = ROOT / "recipes/crate_gpt_base.yaml"
SMALL = ["architecture.width=64", "architecture.heads=4", "architecture.depth=2", "architecture.vocab_size=97",
         "architecture.context=16"]


def test_crate_gpt_base_has_the_reference_parameter_count():
    with torch.device("meta"):
        model = unroll.build(GPT)
    assert parameter_count(model) == 81_934_848  # wte 38,633,472 + wpe 786,432 + 12 x 3,542,784 + ln_f 1,536


def reference_and_ours(seed: int = 0):
    torch.manual_seed(seed)
    reference = CrateGPT(vocab=97, context=16, width=64, heads=4, depth=2).double()
    with torch.no_grad():  # LayerNorms away from their identity initialisation, so a swap would show
        for name, p in reference.named_parameters():
            if "prenorm" in name or "ln_f" in name or "c_proj.bias" in name:
                p.add_(0.1 * torch.randn_like(p))
            p.copy_(p.float().double())  # the values float32 weights hold, on both sides
    state = {k: v.float() for k, v in reference.state_dict().items()}
    model = unroll.build(load_recipe(GPT, SMALL))
    converted, layout, dropped = convert_reference(state, model, "reference")
    model.load_state_dict(converted)
    return reference, model.double().eval(), layout, dropped


def test_converted_weights_compute_the_reference_logits():
    reference, model, layout, dropped = reference_and_ours()
    assert layout.name.startswith("CRATE-GPT") and dropped == []
    ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, found = reference(ids), model(ids)
    assert found.shape == (3, 16, 97)
    assert (found - expected).abs().max().item() < 1e-10
    with torch.no_grad():  # shorter than the context too
        assert (model(ids[:, :5]) - reference(ids[:, :5])).abs().max().item() < 1e-10


def test_float32_logits_match_within_1e_4():
    reference, model, _, _ = reference_and_ours(seed=2)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model.float()(ids) - reference.float()(ids)).abs().max().item() < 1e-4


def test_the_causal_model_never_looks_ahead():
    _, model, _, _ = reference_and_ours()
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(ids)
        for t in range(15):
            changed = ids.clone()
            changed[0, t + 1] = (changed[0, t + 1] + 1) % 97
            after = model(changed)
            assert torch.equal(after[0, : t + 1], before[0, : t + 1]), t
            assert not torch.equal(after[0, t + 1], before[0, t + 1])


def test_a_head_that_is_not_tied_to_the_embedding_is_refused():
    reference, model, _, _ = reference_and_ours()
    state = {k: v.float().clone() for k, v in reference.state_dict().items()}
    state["lm_head.weight"] += 1
    with pytest.raises(UnrollError, match="lm_head.weight must equal transformer.wte.weight"):
        convert_reference(state, unroll.build(load_recipe(GPT, SMALL)), "reference")


def test_compiled_keys_are_read(tmp_path):
    reference, _, _, _ = reference_and_ours()
    torch.save({"model": {f"_orig_mod.{k}": v.float() for k, v in reference.state_dict().items()}}, tmp_path / "ckpt.pt")
    from unroll.cli import main
    out = tmp_path / "gpt.safetensors"
    assert main(["convert", str(GPT), str(tmp_path / "ckpt.pt"), "--out", str(out), *[a for s in SMALL for a in ("--set", s)]]) == 0
    model = unroll.build(load_recipe(GPT, SMALL), checkpoint=out).double().eval()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (model(ids) - reference(ids)).abs().max().item() < 1e-5  # through float32 weights


@pytest.mark.parametrize("override, words", [
    (["architecture.image_size=32"], ["architecture.image_size", "image fields", "task causal_lm"]),
    (["architecture.context=null"], ["architecture.context", "required by task causal_lm"]),
    (["task=classification"], ["architecture.context, architecture.vocab_size", "token fields"]),
    (["task={kind: causal_lm, rate: 0.2}"], ["rate", "masking rates belong to task masked_lm"]),
])
def test_a_task_and_its_fields_must_agree(override, words):
    with pytest.raises(UnrollError) as error:
        load_recipe(GPT, override)
    for word in words:
        assert word in error.value.message, error.value.message


def test_a_masked_lm_states_its_rates():
    recipe = load_recipe(GPT, ["task={kind: masked_lm, rate: 0.2, mask: 0.7, random: 0.2}"])
    assert (recipe.task.kind, recipe.task.rate, recipe.task.mask, recipe.task.random) == ("masked_lm", 0.2, 0.7, 0.2)
    with pytest.raises(UnrollError, match="together at most 1"):
        load_recipe(GPT, ["task={kind: masked_lm, mask: 0.8, random: 0.3}"])


@pytest.mark.parametrize("recipe", ["crate_gpt_base", "crate_base"])
def test_a_resolved_recipe_reads_back_as_itself(tmp_path, recipe):
    from unroll.recipe import recipe_yaml

    first = load_recipe(ROOT / f"recipes/{recipe}.yaml")
    (tmp_path / "again.yaml").write_text(recipe_yaml(first))
    again = load_recipe(tmp_path / "again.yaml")
    assert again == first
    masked = load_recipe(GPT, ["task={kind: masked_lm, rate: 0.2}"])
    (tmp_path / "masked.yaml").write_text(recipe_yaml(masked))
    assert load_recipe(tmp_path / "masked.yaml").task == masked.task


# --- training ------------------------------------------------------------------------------------------


TINY = ROOT / "recipes/crate_gpt_tiny.yaml"
FAST = ["architecture.width=32", "architecture.heads=2", "architecture.vocab_size=300", "architecture.context=16",
        "training.batch_size=8", "training.epochs=2", "training.epoch_steps=4", "training.warmup_epochs=0"]


def corpus(folder: Path) -> Path:
    """Twenty small Python-like files (a corpus of a few thousand tokens)."""
    folder.mkdir(parents=True)
    for n in range(20):
        lines = [f"def function_{n}_{i}(value):\n    return value * {i} + {n}\n" for i in range(12)]
        (folder / f"module_{n:02d}.py").write_text("".join(lines))
    return folder


@pytest.fixture
def quiet():
    import os

    from rich.console import Console
    return Console(file=open(os.devnull, "w"))


def test_a_language_model_trains_and_resumes_exactly(tmp_path, monkeypatch, quiet):
    from safetensors.torch import load_file

    from unroll.train.loop import train
    from unroll.train.state import LANGUAGE_METRICS

    monkeypatch.setenv("UNROLL_CACHE", str(tmp_path / "cache"))
    data = str(corpus(tmp_path / "text"))
    over = FAST + ["training.epochs=3"]
    full = train(TINY, tmp_path / "full", data=data, overrides=over, console=quiet)
    assert list(full[0]) == LANGUAGE_METRICS and full[-1]["val_loss"] < full[0]["val_loss"]
    assert full[-1]["tokens"] == 3 * 4 * 8 * 16  # epochs x steps x windows x context
    assert (tmp_path / "full" / "tokenizer.json").is_file()
    train(TINY, tmp_path / "part", data=data, overrides=over, console=quiet, stop_after=1)
    part = train(TINY, tmp_path / "part", data=data, overrides=over, console=quiet, resume=True)
    assert [r["epoch"] for r in part] == [1, 2, 3]
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "part" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_a_masked_language_model_trains(tmp_path, monkeypatch, quiet):
    from unroll.train.loop import train

    monkeypatch.setenv("UNROLL_CACHE", str(tmp_path / "cache"))
    rows = train(TINY, tmp_path / "run", data=str(corpus(tmp_path / "text")), console=quiet,
                 overrides=FAST + ["task=masked_lm", "layer.0.relax.2.softmax.causal=false"])
    assert all(math.isfinite(r["val_loss"]) for r in rows) and rows[-1]["val_ppl"] > 1


def test_commands_that_read_images_refuse_a_language_model(tmp_path, capsys):
    from unroll.cli import main

    for args in (["eval", str(TINY), "--checkpoint", str(tmp_path / "x")], ["construct", str(TINY)]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "language model" in err or "task is causal_lm" in err, err
        assert "Traceback" not in err


@pytest.mark.parametrize("name, causal", [("crate_gpt_tiny", True), ("tost_gpt_tiny", True), ("crate_bert_tiny", False)])
def test_the_bundled_language_models_look_ahead_only_when_bidirectional(name, causal):
    torch.manual_seed(0)
    model = unroll.build(ROOT / f"recipes/{name}.yaml").double().eval()
    with torch.no_grad():  # the ToST step's learned biases away from zero, so a leak would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, 20] = (changed[0, 20] + 7) % 512
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert torch.equal(before[0, :20], after[0, :20]) == causal
    assert not torch.equal(before[0, 20:], after[0, 20:])


def test_a_gpt_baseline_trains_on_the_recipes_data_and_is_not_resumed_as_the_recipe(tmp_path, monkeypatch, capsys):
    from unroll.cli import main

    monkeypatch.setenv("UNROLL_CACHE", str(tmp_path / "cache"))
    data = str(corpus(tmp_path / "text"))
    args = ["train", str(TINY), "--data", data, *[a for s in FAST for a in ("--set", s)]]
    assert main([*args, "--baseline", "gpt", "--out", str(tmp_path / "gpt")]) == 0
    err = capsys.readouterr().err
    # 9,600 (300 x 32) + 512 (16 x 32) + 25,408 (2 x (12 x 32² + 13 x 32)) + 64 (ln_f), and the white-box count
    assert "--baseline gpt: 35,584 parameters (the recipe's white-box model: " in err
    assert main([*args, "--out", str(tmp_path / "gpt"), "--resume"]) == 2
    assert "this run trained --baseline gpt, not the recipe's own model" in capsys.readouterr().err


# --- generation ----------------------------------------------------------------------------------------


def test_generation_continues_the_prompt_and_is_reproducible(tmp_path, monkeypatch, capsys, quiet):
    from unroll.cli import main
    from unroll.generate import sample
    from unroll.train.loop import train

    monkeypatch.setenv("UNROLL_CACHE", str(tmp_path / "cache"))
    train(TINY, tmp_path / "run", data=str(corpus(tmp_path / "text")), overrides=FAST, console=quiet)
    sets = [a for s in FAST for a in ("--set", s)]
    args = ["generate", str(TINY), "--checkpoint", str(tmp_path / "run"), "--prompt", "def function_3",
            "--tokens", "10", "--seed", "4", *sets]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("def function_3")

    # greedy: each new token is the argmax of a full forward over what came before, by hand
    model = unroll.build(load_recipe(TINY, FAST), checkpoint=tmp_path / "run" / "model.safetensors").eval()
    ids = [5, 9, 11]
    new = sample(model, ids, 6, temperature=0)
    by_hand = list(ids)
    with torch.no_grad():
        for _ in range(6):
            by_hand.append(int(model(torch.tensor([by_hand[-16:]]))[0, -1].argmax()))
    assert new == by_hand[3:]
    assert main([*args[:-2 * len(FAST)], "--tokens", "20", *sets]) == 0  # past the context of 16: a sliding window
    assert "each new token is predicted from the last 16 tokens" in capsys.readouterr().err


def test_a_prompt_longer_than_the_context_is_refused(tmp_path, monkeypatch, capsys, quiet):
    from unroll.cli import main
    from unroll.train.loop import train

    monkeypatch.setenv("UNROLL_CACHE", str(tmp_path / "cache"))
    train(TINY, tmp_path / "run", data=str(corpus(tmp_path / "text")), overrides=FAST, console=quiet)
    rc = main(["generate", str(TINY), "--checkpoint", str(tmp_path / "run"), "--prompt", "x = 1\n" * 40,
               *[a for s in FAST for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert rc == 2 and "longer than the model's context of 16" in err and "Traceback" not in err


def test_an_image_models_checkpoint_is_refused_by_a_language_recipe(tmp_path, capsys):
    from unroll.checkpoint import save_weights
    from unroll.cli import main
    from unroll.train import text

    small = ["architecture.depth=1", "architecture.width=32", "architecture.heads=2"]
    save_weights(unroll.build(load_recipe(ROOT / "recipes/crate_tiny.yaml", small)).state_dict(),
                 tmp_path / "model.safetensors")
    (tmp_path / "t.txt").write_text("x = 1\n" * 200)
    text.save_tokenizer(text.train_tokenizer(text.open_text(tmp_path / "t.txt").train, 300), tmp_path)
    rc = main(["generate", str(TINY), "--checkpoint", str(tmp_path / "model.safetensors"), "--prompt", "x",
               *[a for s in FAST for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "these are the weights of an image model, the recipe builds a language model" in err


@pytest.mark.slow
def test_crate_gpt_tiny_on_the_standard_library_beats_the_unigram_entropy(tmp_path, monkeypatch, quiet):
    """A short run on the default corpus: validation loss at most 0.8 x the unigram entropy of the
    held-out text under the same tokenizer (a model that ignores context scores 1.0 x)."""
    from unroll.train import text
    from unroll.train.loop import train

    monkeypatch.setenv("UNROLL_CACHE", str(tmp_path / "cache"))
    rows = train(TINY, tmp_path / "run", overrides=["training.epochs=6"], console=quiet)
    tokenizer = text.load_tokenizer(tmp_path / "run")
    held_out = text.cached_ids(text.open_text(None).val, tokenizer)
    entropy = text.unigram_entropy(np.asarray(held_out), 512)
    assert 4.0 < entropy < 7.0  # nats per token of a 512-token BPE on Python source
    assert rows[-1]["val_loss"] <= 0.8 * entropy, (rows[-1]["val_loss"], entropy)


@pytest.mark.slow
def test_torchrun_two_processes_train_the_language_model_one_does(tmp_path):
    from runs import max_difference, torchrun_and_one, weights

    data = str(corpus(tmp_path / "text"))
    args = ["-m", "unroll", "train", str(TINY), "--device", "cpu", "--data", data,
            *[a for s in FAST for a in ("--set", s)]]
    ddp, one = torchrun_and_one(args, tmp_path, {"UNROLL_CACHE": str(tmp_path / "cache")})
    assert max_difference(weights(ddp), weights(one)) < 1e-5


def test_a_causal_lm_that_looks_ahead_is_refused_before_training(tmp_path, monkeypatch, quiet):
    from unroll.train.loop import train

    monkeypatch.setenv("UNROLL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UnrollError, match="task causal_lm needs a causal model, and this one looks ahead"):
        train(TINY, tmp_path / "run", data=str(corpus(tmp_path / "text")), console=quiet,
              overrides=FAST + ["layer.0.relax.2.softmax.causal=false"])


def test_masked_windows_hide_their_targets_the_same_way_wherever_they_are_read():
    from unroll.recipe.schema import Task
    from unroll.train import text
    from unroll.train.tasks import MaskedWindows

    ids = np.arange(10, 10 + 64 * 50 + 1) % 250 + 2  # no special ids among the originals
    windows = text.TokenWindows(ids.astype(np.uint16), 64)
    masked = MaskedWindows(windows, 300, 1, Task(kind="masked_lm"), seed=3)
    inputs, targets = masked[(2, 7)]
    original = torch.as_tensor(ids[7 * 64: 8 * 64].astype(np.int64))
    chosen = targets != text.IGNORE_INDEX
    assert torch.equal(targets[chosen], original[chosen])  # the loss sees the originals, and only there
    assert torch.equal(inputs[~chosen], original[~chosen])
    assert (inputs[chosen] == 1).sum() > 0  # [MASK] (id 1 here) where chosen, mostly
    again, _ = masked[(2, 7)]
    assert torch.equal(again, inputs) and not torch.equal(masked[(3, 7)][0], inputs)  # by epoch and window
    assert torch.equal(masked[7][0], masked[7][0])  # validation: by window alone


def test_a_micro_batch_without_masked_positions_adds_nothing(tmp_path, monkeypatch):
    from unroll.train.tasks import LanguageModelling

    monkeypatch.setenv("UNROLL_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(TINY, FAST + ["task=masked_lm", "layer.0.relax.2.softmax.causal=false"])
    task = LanguageModelling(recipe, str(corpus(tmp_path / "text")), 0, tmp_path / "out", False)
    logits = torch.randn(2, 16, 300, requires_grad=True)
    loss, summed, counted = task.loss(logits, torch.full((2, 16), -100))
    loss.backward()
    assert loss.item() == 0 and summed == 0 and counted == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_a_tokenizer_with_resume_is_refused(tmp_path, capsys):
    from unroll.cli import main

    rc = main(["train", str(TINY), "--tokenizer", str(tmp_path / "t.json"), "--resume", "--out", str(tmp_path)])
    assert rc == 2 and "--tokenizer starts a run with that tokenizer" in capsys.readouterr().err


def test_a_bad_baseline_is_refused_before_any_data_is_read(tmp_path, capsys):
    from unroll.cli import main

    missing = str(tmp_path / "no-such-corpus")
    assert main(["train", str(TINY), "--baseline", "bert", "--data", missing, "--out", str(tmp_path / "a")]) == 2
    assert "--baseline must be one of gpt, found 'bert'" in capsys.readouterr().err
    digits = ROOT / "recipes/crate_digits.yaml"
    assert main(["train", str(digits), "--baseline", "gpt", "--data", missing, "--out", str(tmp_path / "b")]) == 2
    assert "--baseline gpt is a language model; this recipe's task is classification" in capsys.readouterr().err
