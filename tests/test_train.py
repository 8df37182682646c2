"""unroll train: it learns, it resumes exactly, it runs under torchrun, and bad input gets a clear
error that never costs a good checkpoint (more in test_checkpoints.py)."""

import csv
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

import unroll.train.loop as loop
import unroll.train.tasks as tasks
from unroll.cli import main
from unroll.errors import UnrollError
from unroll.train import state
from unroll.train.loop import train
from unroll.train.optim import Lion, warmup_cosine

from runs import max_difference, torchrun_and_one, weights

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "recipes/crate_digits.yaml"
SMALL = ["architecture.width=32", "architecture.depth=2"]
QUIET = Console(file=open(os.devnull, "w"))


def record(folder: Path) -> dict:
    """The training state of the newest complete checkpoint."""
    return state.latest(folder)[1]


def test_digits_training_learns_far_above_chance(tmp_path):
    fast = ["training.epochs=6", "training.warmup_epochs=1", "training.lr=1e-2", "training.augment.shift=0"]
    rows = train(DIGITS, tmp_path, seed=0, overrides=SMALL + fast, console=QUIET)
    assert rows[-1]["val_acc"] > 0.6  # chance is 0.1
    with (tmp_path / "metrics.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:5] == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
    assert [int(r["epoch"]) for r in table] == list(range(1, 7))
    assert float(table[-1]["val_acc"]) == pytest.approx(rows[-1]["val_acc"], abs=1e-5)


def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, monkeypatch):
    over = SMALL + ["training.epochs=4"]
    train(DIGITS, tmp_path / "full", seed=3, overrides=over, console=QUIET)
    train(DIGITS, tmp_path / "part", seed=3, overrides=over, console=QUIET, stop_after=2)
    assert record(tmp_path / "part")["epoch"] == 2
    evaluated = []
    real = tasks.evaluate
    monkeypatch.setattr(tasks, "evaluate", lambda *a, **k: evaluated.append(1) or real(*a, **k))
    rows = train(DIGITS, tmp_path / "part", seed=3, overrides=over, console=QUIET, resume=True)
    assert len(evaluated) == 2  # only the remaining epochs were trained
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert max_difference(weights(tmp_path / "full"), weights(tmp_path / "part")) < 1e-6


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    args = ["-m", "unroll", "train", str(DIGITS), "--device", "cpu", "--set", "training.epochs=1",
            *[a for s in SMALL for a in ("--set", s)]]
    ddp, one = torchrun_and_one(args, tmp_path)
    assert record(ddp)["world_size"] == 2
    assert record(one)["world_size"] == 1
    assert max_difference(weights(ddp), weights(one)) < 1e-5


#: ``unroll`` with a NaN loss at the third training step of process 1 only
POISONED = """
import os, sys
import torch
import torch.nn.functional as F
from unroll.cli import main

real, calls = F.cross_entropy, []

def poisoned(logits, *a, **k):
    if torch.is_grad_enabled() and os.environ["RANK"] == "1":
        calls.append(1)
        if len(calls) == 3:
            logits = logits * float("nan")
    return real(logits, *a, **k)

F.cross_entropy = poisoned
sys.exit(main(sys.argv[1:]))
"""


def two_processes(script: str, folder: Path) -> list[tuple[int, str]]:
    """(exit code, stderr) of ``script`` (a CLI wrapper) training on two gloo processes, started as
    torchrun starts them (its environment variables), not by torchrun: it stops the others as
    soon as one exits, so whether they said why would be a race."""
    (folder / "wrapper.py").write_text(script)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    args = [sys.executable, str(folder / "wrapper.py"), "train", str(DIGITS), "--device", "cpu", "--out",
            str(folder / "run"), *[a for s in SMALL for a in ("--set", s)]]
    procs = [subprocess.Popen(args, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    try:  # a process that went on alone into the next all-reduce: a gloo traceback, or a hang
        errs = [proc.communicate(timeout=120)[1] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    return [(proc.returncode, err) for proc, err in zip(procs, errs)]


@pytest.mark.slow
def test_a_nan_loss_in_one_process_stops_every_process_with_the_same_error(tmp_path):
    for code, err in two_processes(POISONED, tmp_path):
        assert code == 2, err[-3000:]
        assert "the loss became NaN at epoch 1 step 3; lower training.lr" in err and "Traceback" not in err
    assert not (tmp_path / "run" / state.CHECKPOINTS).exists()


#: ``unroll`` whose process 0 finds the disk full when it writes a checkpoint
FULL_DISK = """
import errno, os, sys
import unroll.train.state as state
from unroll.cli import main

real = state.write_durably

def full(path, data):
    if os.environ["RANK"] == "0":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return real(path, data)

state.write_durably = full
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_write_failing_in_process_0_stops_every_process(tmp_path):
    (main_code, main_err), (other_code, other_err) = two_processes(FULL_DISK, tmp_path)
    assert main_code == 2 and "no space left" in main_err and "Traceback" not in main_err, main_err[-3000:]
    assert other_code == 2 and "another process failed" in other_err and "Traceback" not in other_err, other_err[-3000:]


def test_lion_step_is_its_definition():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    m = torch.tensor([0.2, -0.3, 0.0])
    opt.state[p]["exp_avg"] = m.clone()
    p.grad = torch.tensor([0.5, 1.0, -4.0])
    expected = torch.tensor([1.0, -2.0, 0.5]) * (1 - 0.1 * 0.5) - 0.1 * torch.sign(0.9 * m + 0.1 * p.grad)
    opt.step()
    assert torch.allclose(p.detach(), expected)
    assert torch.allclose(opt.state[p]["exp_avg"], 0.99 * m + 0.01 * p.grad)


def test_warmup_then_cosine():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0)


# --- bad input ------------------------------------------------------------------------------------


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    rc = main(args)
    return rc, " ".join(capsys.readouterr().err.split())


def test_missing_data_directory(tmp_path, capsys):
    rc, err = run_cli(["train", str(DIGITS), "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "no such data directory" in err and "nowhere" in err


def test_empty_image_folder(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    rc, err = run_cli(["train", str(DIGITS), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "one sub-folder per class" in err


def test_colour_images_are_converted_for_a_grey_recipe(tmp_path):
    # a large data set mixes modes (ImageNet holds grey and CMYK JPEGs): each image is converted
    for c in range(10):
        folder = tmp_path / "data" / str(c)
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 20 * c + i, dtype=np.uint8)).save(folder / f"{i}.png")
    rows = train(DIGITS, tmp_path / "o", data=str(tmp_path / "data"), console=QUIET,
                 overrides=SMALL + ["training.epochs=1", "training.batch_size=10"])
    assert len(rows) == 1 and 0 <= rows[0]["val_acc"] <= 1


def test_image_folder_trains(tmp_path):
    for c in range(10):
        folder = tmp_path / "data" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(8):
            pixels = np.full((8, 8), 25 * c + i, dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    rows = train(DIGITS, tmp_path / "run", data=str(tmp_path / "data"), overrides=SMALL + ["training.epochs=1", "training.batch_size=16"], console=QUIET)
    assert len(rows) == 1 and 0 <= rows[0]["val_acc"] <= 1


def test_resume_with_another_recipe_is_refused(tmp_path, capsys):
    train(DIGITS, tmp_path, overrides=SMALL + ["training.epochs=1"], console=QUIET)
    args = ["train", str(DIGITS), "--out", str(tmp_path), "--resume", "--set", "architecture.width=48", "--set", "architecture.depth=2"]
    rc, err = run_cli(args, capsys)
    assert rc == 2 and "another recipe" in err


def test_measure_with_a_checkpoint_of_another_recipe(tmp_path, capsys):
    train(DIGITS, tmp_path, overrides=SMALL + ["training.epochs=1"], console=QUIET)
    rc, err = run_cli(["measure", str(DIGITS), "--checkpoint", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "m")], capsys)
    assert rc == 2 and "does not fit the model" in err and "shape mismatches" in err


def test_a_failure_while_saving_never_replaces_a_good_checkpoint(tmp_path, monkeypatch):
    over = SMALL + ["training.epochs=2"]
    train(DIGITS, tmp_path, overrides=over, console=QUIET, stop_after=1)
    good = weights(tmp_path)
    real = state.write_durably
    for failing in (1, 2, 3):  # the weights, the optimiser state, then the JSON fail to be written
        calls = []

        def broken(path, data):
            calls.append(path)
            if len(calls) == failing:
                Path(path).write_bytes(data[: len(data) // 2])
                raise OSError(28, "No space left on device")
            return real(path, data)

        monkeypatch.setattr(state, "write_durably", broken)
        with pytest.raises(UnrollError, match="no space left on the device"):
            train(DIGITS, tmp_path, overrides=over, console=QUIET, resume=True)
        monkeypatch.undo()
        assert max_difference(weights(tmp_path), good) == 0  # the epoch-1 checkpoint is intact ...
        assert [p.name for p in (tmp_path / state.CHECKPOINTS).iterdir()] == ["epoch-0001"]  # ... and alone
        assert record(tmp_path)["epoch"] == 1
    rows = train(DIGITS, tmp_path, overrides=over, console=QUIET, resume=True)  # ... and resumes
    assert [r["epoch"] for r in rows] == [1, 2]


def test_one_pixel_patches_of_one_channel_are_refused(tmp_path, capsys):
    rc, err = run_cli(["build", str(DIGITS), "--set", "architecture.patch_size=1", "--set", "architecture.patch_norm=true",
                       "--out", str(tmp_path)], capsys)
    assert rc == 2 and "single value" in err and "patch LayerNorm" in err
