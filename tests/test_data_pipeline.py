"""Real-scale data: on-disk image folders and CIFAR streamed lazily through torchvision transforms
in worker processes, the recipe's pipelines, gradient accumulation, ``unroll eval`` and fine-tuning
with ``--init``."""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors.torch import save_file
from torchvision.transforms import v2

import unroll
import unroll.train.data as datasets
from unroll.cli import main
from unroll.errors import UnrollError
from unroll.recipe import load_recipe
from unroll.train.init import initialise
from unroll.train.loader import Transformed, batches, eval_loader, train_loader
from unroll.train.optim import warmup_cosine_epochs
from unroll.train.loop import train
from unroll.train.transforms import batch_mixing, eval_transform, train_transform

from runs import max_difference, torchrun_and_one, weights
from test_cifar import write_cifar

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "recipes/crate_digits.yaml"
QUIET = Console(file=open(os.devnull, "w"))
#: a small colour classifier of 16 px images
COLOUR = ["architecture.channels=3", "architecture.image_size=16", "architecture.patch_size=4",
          "architecture.width=32", "architecture.depth=2", "architecture.classes=3", "training.batch_size=8"]
AUGMENT = ["training.augment.random_resized_crop={scale: [0.5, 1.0]}", "training.augment.flip=0.5",
           "training.augment.rand_augment={ops: 2, magnitude: 9}", "training.augment.shift=0"]


def colour_folder(root: Path, per_class: int = 8, classes: int = 3, size=(20, 24), fmt: str = "png",
                  seed: int = 0) -> Path:
    """``root/<class>/<n>.<fmt>``: class k is mostly colour channel k, with noise."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            pixels = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8)
            pixels[..., k % 3] += 150
            Image.fromarray(pixels).save(root / f"c{k}" / f"{n}.{fmt}")
    return root


def split_folder(root: Path, **kw) -> Path:
    colour_folder(root / "train", **kw)
    colour_folder(root / "val", per_class=4, seed=1, **{k: v for k, v in kw.items() if k != "per_class"})
    return root


# --- sources ---------------------------------------------------------------------------------------


def test_a_split_folder_of_png_and_jpeg_trains(tmp_path):
    data = split_folder(tmp_path / "data")
    colour_folder(data / "train", per_class=4, fmt="jpg", seed=2)  # JPEGs beside the PNGs
    source = datasets.open_data(str(data), 16, 3)
    assert (len(source.train), len(source.val), source.classes) == (36, 12, ["c0", "c1", "c2"])
    rows = train(DIGITS, tmp_path / "run", data=str(data), overrides=COLOUR + AUGMENT + ["training.epochs=2"],
                 console=QUIET, workers=2)
    assert [r["epoch"] for r in rows] == [1, 2] and all(np.isfinite(r["train_loss"]) for r in rows)


def test_a_cifar_binary_directory_trains(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 10
    images = rng.integers(0, 255, (60, 3, 32, 32), dtype=np.uint8)
    folder = write_cifar(tmp_path, "cifar10", images, labels, 40, [f"class{k}" for k in range(10)])
    over = ["architecture.image_size=32", "architecture.patch_size=8", "architecture.width=32", "architecture.depth=1",
            "architecture.channels=3", "training.batch_size=8", "training.epochs=1"]
    rows = train(DIGITS, tmp_path / "run", data=f"cifar10:{folder}", overrides=over + AUGMENT, console=QUIET)
    assert len(rows) == 1 and np.isfinite(rows[0]["train_loss"]) and 0 <= rows[0]["val_acc"] <= 1
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_a_source_of_another_class_count_says_how_to_fine_tune(tmp_path):
    data = split_folder(tmp_path / "data")
    with pytest.raises(UnrollError, match=r"the data has 3 classes, the recipe's architecture.classes is 10.*"
                                          r"--set architecture.classes=3"):
        train(DIGITS, tmp_path / "run", data=str(data), overrides=COLOUR[:-2], console=QUIET)


def test_train_and_val_must_hold_the_same_classes(tmp_path):
    data = split_folder(tmp_path / "data")
    colour_folder(data / "val", classes=4)
    with pytest.raises(UnrollError, match="must hold the same class folders; only one of them has c3"):
        datasets.open_data(str(data), 16, 3)


def test_images_of_mixed_sizes_are_cropped_or_resized_to_the_model(tmp_path):
    data = tmp_path / "data"
    for n, size in enumerate([(20, 24), (64, 17), (5, 9), (16, 16)]):
        colour_folder(data, per_class=2, size=size, seed=n)
        for k in range(3):
            for i in range(2):
                (data / f"c{k}" / f"{i}.png").rename(data / f"c{k}" / f"{n}-{i}.png")
    rows = train(DIGITS, tmp_path / "run", data=str(data), overrides=COLOUR + AUGMENT + ["training.epochs=1"],
                 console=QUIET)
    assert len(rows) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_is_an_error_naming_it(tmp_path, capsys, workers):
    data = colour_folder(tmp_path / "data", per_class=6)
    bad = data / "c1" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # cut short
    args = ["train", str(DIGITS), "--data", str(data), "--out", str(tmp_path / "run"), "--workers", str(workers),
            *[a for s in COLOUR + ["training.batch_size=12"] for a in ("--set", s)]]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "DataLoader worker" not in err, err
    assert f"{bad}: truncated image" in err or f"{bad}: not a readable image" in err, err


# --- laziness ----------------------------------------------------------------------------------------


def test_opening_decodes_nothing_and_a_step_decodes_its_batch(tmp_path, monkeypatch):
    data = colour_folder(tmp_path / "data", per_class=20)
    opened = []
    real = datasets.open_image
    monkeypatch.setattr(datasets, "open_image", lambda path, channels: opened.append(path) or real(path, channels))
    source = datasets.open_data(str(data), 16, 3)
    recipe = load_recipe(DIGITS, COLOUR)
    loader, order = train_loader(Transformed(source.train, train_transform(recipe.training, 16, 3)), 8, 0, 1, 0, 0, False)
    assert opened == []
    order.set_epoch(0)
    x, y = next(batches(loader))
    assert x.shape == (8, 3, 16, 16) and len(opened) == 8 and len(set(opened)) == 8


# --- the recipe's transforms ------------------------------------------------------------------------------


def by_type(pipeline: v2.Compose) -> dict:
    return {type(t).__name__: t for t in pipeline.transforms}


def test_the_imagenet_pipelines_are_the_recipes():
    t = load_recipe(ROOT / "recipes/crate_base.yaml").training
    train_steps = by_type(train_transform(t, 224, 3))
    assert list(train_steps) == ["ToImage", "RandomResizedCrop", "RandomHorizontalFlip", "ToDtype", "Normalize"]
    crop = train_steps["RandomResizedCrop"]
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert train_steps["RandomHorizontalFlip"].p == 0.5
    for pipeline in (train_steps, by_type(eval_transform(t, 224, 3))):
        assert pipeline["Normalize"].mean == [0.485, 0.456, 0.406] and pipeline["Normalize"].std == [0.229, 0.224, 0.225]
        assert pipeline["ToDtype"].scale is True
    eval_steps = by_type(eval_transform(t, 224, 3))
    assert list(eval_steps) == ["ToImage", "Resize", "CenterCrop", "ToDtype", "Normalize"]
    assert eval_steps["Resize"].size == [256] and eval_steps["CenterCrop"].size == (224, 224)
    assert batch_mixing(t, 1000) is None
    assert (t.optimizer, t.lr, t.weight_decay, t.batch_size, t.epochs, t.warmup_epochs, t.schedule, t.label_smoothing) == \
        ("lion", 2e-4, 0.05, 512, 200, 20, "epoch", 0.1)


def test_the_cifar_fine_tuning_pipelines_are_the_recipes():
    recipe = load_recipe(ROOT / "recipes/finetune_cifar10.yaml")
    t = recipe.training
    train_steps = by_type(train_transform(t, 224, 3))
    assert list(train_steps) == ["ToImage", "RandomResizedCrop", "RandomHorizontalFlip", "RandAugment", "ToDtype", "Normalize"]
    assert (train_steps["RandAugment"].num_ops, train_steps["RandAugment"].magnitude) == (2, 14)
    eval_steps = by_type(eval_transform(t, 224, 3))
    assert list(eval_steps) == ["ToImage", "Resize", "ToDtype", "Normalize"] and eval_steps["Resize"].size == [224, 224]
    assert (recipe.architecture.classes, t.optimizer, t.lr, t.batch_size, t.epochs) == (10, "adamw", 5e-5, 256, 200)
    assert t.data == "cifar10:data/cifar10"


def test_mixup_and_cutmix_are_the_recipes():
    t = load_recipe(DIGITS, ["training.augment.mixup=0.8", "training.augment.cutmix=1.0"]).training
    choice = batch_mixing(t, 10)
    assert isinstance(choice, v2.RandomChoice)
    mixup, cutmix = choice.transforms
    assert (type(mixup).__name__, mixup.alpha, mixup.num_classes) == ("MixUp", 0.8, 10)
    assert (type(cutmix).__name__, cutmix.alpha, cutmix.num_classes) == ("CutMix", 1.0, 10)
    only = batch_mixing(load_recipe(DIGITS, ["training.augment.cutmix=0.5"]).training, 10)
    assert type(only).__name__ == "CutMix" and only.alpha == 0.5


def test_mixing_makes_soft_labels_of_the_batch():
    mixing = batch_mixing(load_recipe(DIGITS, ["training.augment.mixup=0.8"]).training, 10)
    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8)
    mixed, soft = mixing(x, y)
    assert soft.shape == (8, 10) and torch.allclose(soft.sum(-1), torch.ones(8))
    assert (soft.max(-1).values < 1).all()  # each a blend of two classes
    assert not torch.equal(mixed, x)


def test_mixup_trains_with_soft_labels(tmp_path):
    over = ["architecture.width=32", "architecture.depth=1", "training.epochs=1", "training.augment.mixup=0.8",
            "training.augment.cutmix=1.0"]
    rows = train(DIGITS, tmp_path, overrides=over, console=QUIET)
    assert np.isfinite(rows[0]["train_loss"]) and rows[0]["val_acc"] > 0


def test_a_bad_normalisation_is_refused(tmp_path):
    imagenet = ["training.normalize={mean: [0.5, 0.5, 0.5], std: [0.2, 0.2, 0.2]}"]
    unroll.build(load_recipe(DIGITS, imagenet))  # building never normalises: only training and evaluation refuse
    with pytest.raises(UnrollError, match="training.normalize: 3 means and stds for 1-channel images"):
        train(DIGITS, tmp_path, overrides=imagenet, console=QUIET)
    with pytest.raises(UnrollError, match="std must be positive"):
        load_recipe(DIGITS, ["training.normalize={mean: [0.5], std: [0]}"])
    with pytest.raises(UnrollError, match=r"batch_size \(64\) must be divisible by accumulate \(5\)"):
        load_recipe(DIGITS, ["training.accumulate=5"])


# --- order, accumulation, resume ----------------------------------------------------------------------------


def test_each_process_takes_its_share_of_the_single_process_batch():
    numbered = datasets.Tensors(torch.zeros(100, 1, 8, 8), torch.arange(100))  # label = index
    data = Transformed(numbered, lambda x: x)
    one, order = train_loader(data, 32, 0, 1, 7, 0, False)
    order.set_epoch(3)
    _, whole = next(batches(one))
    shares = []
    for rank in range(2):
        loader, order = train_loader(data, 8, rank, 2, 7, 0, False)  # 2 micro-batches of 8 per process
        order.set_epoch(3)
        it = batches(loader)
        shares += [next(it)[1], next(it)[1]]
    assert sorted(torch.cat(shares).tolist()) == sorted(whole.tolist()) and len(set(whole.tolist())) == 32


@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_shares_cover_every_image_once(world):
    numbered = Transformed(datasets.Tensors(torch.zeros(10, 1, 8, 8), torch.arange(10)), lambda x: x)
    seen = [y for rank in range(world) for _, labels in batches(eval_loader(numbered, 3, rank, world, 0, False))
            for y in labels.tolist()]
    assert sorted(seen) == list(range(10))


def test_the_per_epoch_schedule_is_the_reference_scripts():
    # min((e + 1) / 20, (1 + cos(pi e / 200)) / 2), by hand: the warmup rules up to epoch 18, the cosine after
    expected = {0: 0.05, 9: 0.5, 18: 0.95, 19: 0.97790, 20: 0.97553, 100: 0.5, 199: 0.0000617}
    for epoch, value in expected.items():
        assert warmup_cosine_epochs(epoch, 20, 200) == pytest.approx(value, abs=1e-5), epoch
    assert warmup_cosine_epochs(50, 0, 200) == pytest.approx(0.85355, abs=1e-5)  # no warmup: the cosine


def test_a_per_epoch_schedule_resumes_exactly(tmp_path):
    over = ["architecture.width=32", "architecture.depth=1", "training.epochs=3", "training.schedule=epoch",
            "training.warmup_epochs=2", "training.lr=1e-3"]
    full = train(DIGITS, tmp_path / "full", overrides=over, console=QUIET)
    train(DIGITS, tmp_path / "part", overrides=over, console=QUIET, stop_after=1)
    part = train(DIGITS, tmp_path / "part", overrides=over, console=QUIET, resume=True)
    assert [r["lr"] for r in full] == pytest.approx([1e-3 * 0.5, 1e-3 * 0.75, 1e-3 * 0.25])  # min(ramp, cosine) x lr
    assert [r["lr"] for r in part] == [r["lr"] for r in full]
    assert max_difference(weights(tmp_path / "full"), weights(tmp_path / "part")) < 1e-6


def test_the_same_image_gets_the_same_augmentation_wherever_it_is_read(tmp_path):
    source = datasets.open_data(str(colour_folder(tmp_path / "data")), 16, 3)
    t = load_recipe(DIGITS, COLOUR + AUGMENT).training
    data = Transformed(source.train, train_transform(t, 16, 3), seed=5)
    torch.manual_seed(0)
    first = data[(2, 4)][0]
    torch.rand(100)  # whatever else used the global stream in between
    assert torch.equal(data[(2, 4)][0], first)
    assert not torch.equal(data[(3, 4)][0], first)  # another epoch, another crop
    state = torch.get_rng_state()
    data[(2, 5)]
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is left as it was


def test_accumulated_micro_batches_make_the_update_of_the_whole_batch(tmp_path):
    over = ["architecture.width=32", "architecture.depth=1", "training.epochs=1", "training.clip_grad=null"]
    train(DIGITS, tmp_path / "one", overrides=over, console=QUIET)
    train(DIGITS, tmp_path / "four", overrides=over + ["training.accumulate=4"], console=QUIET)
    assert max_difference(weights(tmp_path / "one"), weights(tmp_path / "four")) < 1e-5


def test_resume_is_exact_with_augmentation_in_worker_processes(tmp_path):
    data = str(colour_folder(tmp_path / "data", per_class=8))
    over = COLOUR + AUGMENT + ["training.epochs=3"]
    train(DIGITS, tmp_path / "full", data=data, overrides=over, console=QUIET, workers=2)
    train(DIGITS, tmp_path / "part", data=data, overrides=over, console=QUIET, workers=1, stop_after=1)
    train(DIGITS, tmp_path / "part", data=data, overrides=over, console=QUIET, workers=2, resume=True)
    assert max_difference(weights(tmp_path / "full"), weights(tmp_path / "part")) < 1e-6


@pytest.mark.slow
def test_torchrun_with_streamed_augmented_data_matches_one_process(tmp_path):
    # 2 processes x 2 micro-batches of 2 images against 1 process x 2 micro-batches of 4
    data = str(colour_folder(tmp_path / "data", per_class=8))
    args = ["-m", "unroll", "train", str(DIGITS), "--device", "cpu", "--data", data, "--workers", "1",
            *[a for s in COLOUR + AUGMENT + ["training.epochs=2", "training.accumulate=2"] for a in ("--set", s)]]
    ddp, one = torchrun_and_one(args, tmp_path)
    assert max_difference(weights(ddp), weights(one)) < 1e-5


# --- unroll eval --------------------------------------------------------------------------------------------


def test_eval_reports_the_top1_computed_by_hand(tmp_path, capsys):
    data = split_folder(tmp_path / "data", size=(16, 16))  # at the model's size: no resize to reproduce
    over = COLOUR + ["training.epochs=3"]
    train(DIGITS, tmp_path / "run", data=str(data), overrides=over, console=QUIET)
    out = tmp_path / "scores.json"
    rc = main(["eval", str(DIGITS), "--checkpoint", str(tmp_path / "run"), "--data", str(data), "--out", str(out),
               *[a for s in over for a in ("--set", s)]])
    assert rc == 0, capsys.readouterr().err
    scores = json.loads(out.read_text())

    model = unroll.build(load_recipe(DIGITS, over), checkpoint=tmp_path / "run" / "model.safetensors").eval()
    images, labels = [], []
    for k, folder in enumerate(sorted((data / "val").iterdir())):
        for path in sorted(folder.iterdir()):
            images.append(torch.tensor(np.asarray(Image.open(path).convert("RGB")), dtype=torch.float32).permute(2, 0, 1) / 255)
            labels.append(k)
    with torch.no_grad():
        logits = model(torch.stack(images))
    labels = torch.tensor(labels)
    top1 = (logits.argmax(-1) == labels).double().mean().item()
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert scores["images"] == 12
    assert scores["top1"] == pytest.approx(top1, abs=1e-9)
    assert scores["top5"] == 1.0  # three classes: the top five hold them all
    assert scores["loss"] == pytest.approx(loss, rel=1e-4)
    printed = capsys.readouterr().out
    assert f"top-1 {top1:.4f}" in printed and str(out) in printed


def test_eval_of_missing_weights_is_a_clear_error(tmp_path, capsys):
    rc = main(["eval", str(DIGITS), "--checkpoint", str(tmp_path / "nowhere.safetensors"), "--out", str(tmp_path / "s.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "no such weights file" in err and "Traceback" not in err


# --- fine-tuning ----------------------------------------------------------------------------------------------


def test_fine_tuning_from_1000_classes_loads_the_encoder_and_learns_a_new_head(tmp_path, capsys):
    small = ["architecture.width=32", "architecture.depth=2"]
    pretrained = unroll.build(load_recipe(DIGITS, small + ["architecture.classes=1000"]))
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(tmp_path / "pre.safetensors"))
    args = ["train", str(DIGITS), "--init", str(tmp_path / "pre.safetensors"), "--out", str(tmp_path / "run"),
            *[a for s in small + ["training.epochs=8", "training.lr=5e-3"] for a in ("--set", s)]]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "the classifier is new: 1000 classes in the checkpoint, 10 here" in err

    with (tmp_path / "run" / "metrics.csv").open() as f:
        accuracy = [float(row["val_acc"]) for row in csv.DictReader(f)]
    assert accuracy[-1] > 0.5 and accuracy[-1] > accuracy[0]  # chance: 0.1

    # what the run started from: the checkpoint's encoder exactly, and a fresh head
    fresh = unroll.build(load_recipe(DIGITS, small))
    head = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith("head.fc")}
    initialise(fresh, tmp_path / "pre.safetensors")
    for name, value in fresh.state_dict().items():
        expected = head[name] if name in head else pretrained.state_dict()[name]
        assert torch.equal(value, expected), name


def test_init_with_resume_is_refused(tmp_path, capsys):
    rc = main(["train", str(DIGITS), "--init", str(tmp_path / "x.safetensors"), "--resume", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--init starts a run from weights, --resume continues a run" in err


@pytest.mark.slow
def test_an_unreadable_image_under_torchrun_stops_both_processes_with_the_error(tmp_path):
    data = colour_folder(tmp_path / "data", per_class=6)
    bad = data / "c2" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])
    # started as torchrun starts them (its environment), not by torchrun, whose own report of a
    # failed child is a traceback of its launcher
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    args = [sys.executable, "-m", "unroll", "train", str(DIGITS), "--device", "cpu", "--data", str(data), "--workers", "1",
            "--out", str(tmp_path / "run"), *[a for s in COLOUR + ["training.batch_size=12"] for a in ("--set", s)]]
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:  # a process left alone in the next all-reduce: a gloo traceback, or a hang
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, err in zip(procs, errs):
        assert p.returncode == 2 and "Traceback" not in err, err[-3000:]
    named = [f"{bad}: truncated image" in err or f"{bad}: not a readable image" in err for err in errs]
    assert any(named), errs  # the process that met it names it; the other says it stopped with it
    assert all(n or "another process failed" in err for n, err in zip(named, errs)), errs


def test_bf16_autocast_on_the_cpu_trains(tmp_path):
    over = ["architecture.width=32", "architecture.depth=1", "training.epochs=3", "training.warmup_epochs=1",
            "training.lr=1e-2", "training.augment.shift=0"]
    rows = train(DIGITS, tmp_path, overrides=over, console=QUIET, precision="bfloat16")
    assert np.isfinite(rows[-1]["train_loss"]) and rows[-1]["val_acc"] > 0.3  # chance: 0.1
    with pytest.raises(UnrollError, match="--precision must be one of bfloat16, float32, found 'fp8'"):
        train(DIGITS, tmp_path / "other", overrides=over, console=QUIET, precision="fp8")


@pytest.mark.slow
def test_a_compiled_training_step_trains_what_the_eager_one_does(tmp_path):
    over = ["architecture.width=32", "architecture.depth=1", "training.epochs=1"]
    train(DIGITS, tmp_path / "eager", overrides=over, console=QUIET)
    train(DIGITS, tmp_path / "compiled", overrides=over, console=QUIET, compile=True)
    assert max_difference(weights(tmp_path / "eager"), weights(tmp_path / "compiled")) < 1e-3


def test_an_evaluation_resize_below_the_image_size_is_refused(tmp_path):
    data = split_folder(tmp_path / "data")
    with pytest.raises(UnrollError, match=r"training.evaluation: resize \(8\) must be at least the model's image size \(16\)"):
        train(DIGITS, tmp_path / "run", data=str(data), overrides=COLOUR + ["training.evaluation.resize=8"], console=QUIET)
