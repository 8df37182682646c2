"""Checkpoints: weights files carry a digest and are refused when damaged or non-finite; a training
checkpoint is a folder published by one rename, so a crash after any file-system operation of a
save (simulated for every one of them) resumes to the same weights as an uninterrupted run; Ctrl-C
exits 130 with a resumable checkpoint; a NaN loss stops the run; a folder holds one run; a damaged
or unreadable training state is skipped or named; convert refuses non-checkpoints first."""

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import traceback
from io import StringIO
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import unroll.api
import unroll.checkpoint as checkpoint
import unroll.train.loop as loop
import unroll.train.tasks as tasks
from unroll.checkpoint import DIGEST_KEY, FORMAT_KEY, load_weights, read_tensors, save_weights
from unroll.cli import main
from unroll.convert import convert
from unroll.errors import UnrollError
from unroll.train import data as datasets
from unroll.train import state
from unroll.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "recipes/crate_digits.yaml"
SMALL = ["architecture.width=32", "architecture.depth=2"]
QUIET = Console(file=open(os.devnull, "w"))


@pytest.fixture(autouse=True)
def one_thread():
    """Many short runs: one thread each is faster than two fighting other processes for two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_of(names: list[str]) -> torch.nn.Module:
    return torch.nn.ParameterDict({n: torch.nn.Parameter(torch.randn(3, 2)) for n in names})


def sets(overrides: list[str]) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


def error_of(call) -> str:
    with pytest.raises(UnrollError) as e:
        call()
    return str(e.value)


def snapshot(folder: Path) -> dict:
    """Every path under ``folder`` and its bytes: to see that nothing changed."""
    return {p.relative_to(folder): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


# --- weights files --------------------------------------------------------------------------------


def test_weights_carry_a_digest_and_flipped_bytes_are_refused(tmp_path):
    model = model_of(["a", "b"])
    path = save_weights(model.state_dict(), tmp_path / "w.safetensors")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata[FORMAT_KEY] == "1" and len(metadata[DIGEST_KEY]) == 64
    load_weights(model_of(["a", "b"]), path)  # intact: loads
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # a bit of the last tensor's data
    path.write_bytes(bytes(data))
    message = error_of(lambda: load_weights(model_of(["a", "b"]), path))
    assert str(path) in message and "do not match the digest stored with them (corrupted file)" in message


def test_a_file_without_a_digest_loads_with_a_note(tmp_path, capsys):
    model = model_of(["a"])
    save_file({"a": torch.ones(3, 2)}, str(tmp_path / "plain.safetensors"))
    load_weights(model, tmp_path / "plain.safetensors")
    assert torch.equal(model["a"].detach(), torch.ones(3, 2))
    assert "no digest" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", b"not a checkpoint at all"])
def test_truncated_or_foreign_files_are_not_safetensors(tmp_path, content):
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    message = error_of(lambda: load_weights(model_of(["a"]), path))
    assert "not a safetensors checkpoint" in message and len(message) < len(str(path)) + 140


def test_a_cut_off_data_section_is_not_safetensors(tmp_path):
    path = save_weights(model_of(["a"]).state_dict(), tmp_path / "w.safetensors")
    path.write_bytes(path.read_bytes()[:-4])
    assert "not a safetensors checkpoint" in error_of(lambda: load_weights(model_of(["a"]), path))


def test_nan_and_inf_are_refused_naming_at_most_five_tensors(tmp_path):
    names = [f"p{i}" for i in range(8)]
    state = {n: torch.zeros(3, 2) for n in names}
    for i, n in enumerate(names[:7]):
        state[n][0, 0] = float("nan") if i % 2 else float("inf")
    save_weights(state, tmp_path / "w.safetensors")
    message = error_of(lambda: load_weights(model_of(names), tmp_path / "w.safetensors"))
    assert "NaN or inf values in 7 tensor(s): p0, p1, p2, p3, p4 and 2 more" in message and "p7" not in message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_another_floating_dtype_is_converted_with_a_note(tmp_path, capsys, dtype):
    values = torch.tensor([[0.5, -1.0], [2.0, 0.25], [1.5, 3.0]])
    save_weights({"a": values.to(dtype)}, tmp_path / "w.safetensors")
    model = model_of(["a"])
    load_weights(model, tmp_path / "w.safetensors")
    assert model["a"].dtype == torch.float32 and torch.equal(model["a"].detach(), values)
    assert f"{str(dtype).removeprefix('torch.')} to float32" in capsys.readouterr().err


def test_float64_values_that_overflow_float32_are_refused_by_name(tmp_path):
    save_weights({"a": torch.full((3, 2), 1e300, dtype=torch.float64)}, tmp_path / "w.safetensors")
    model = model_of(["a"])
    before = model["a"].detach().clone()
    message = error_of(lambda: load_weights(model, tmp_path / "w.safetensors"))
    assert str(tmp_path / "w.safetensors") in message
    assert "values too large for the model's dtype (they become inf) in 1 tensor(s): a" in message
    assert torch.equal(model["a"].detach(), before)


def test_a_huge_format_value_and_a_foreign_file_give_short_errors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(3, 2)}, str(path), metadata={FORMAT_KEY: "9" * 1_000_000})
    message = error_of(lambda: load_weights(model_of(["a"]), path))
    assert "expected checkpoint format 1, found format '999" in message and len(message) < len(str(path)) + 200
    # 1,000 keys the model lacks (one of them 100,000 characters long), 1,000 it has of the wrong shape
    foreign = {f"u{i:04d}" + "x" * 100_000 * (i == 0): torch.ones(1) for i in range(1000)}
    save_file({**foreign, **{f"s{i:04d}": torch.ones(1) for i in range(1000)}}, str(path))
    model = model_of([f"m{i:04d}" for i in range(1000)] + [f"s{i:04d}" for i in range(1000)])
    message = error_of(lambda: load_weights(model, path))
    assert "missing keys: m0000, m0001, m0002, m0003, m0004 and 995 more" in message
    assert "unexpected keys: u0000xxxx" in message and "u0004 and 995 more" in message
    assert "shape mismatches: s0000: expected (3, 2), found (1,); s0001: expected (3, 2), found (1,);" in message
    assert "s0004: expected (3, 2), found (1,) and 995 more" in message
    assert len(message) < len(str(path)) + 600


def test_an_unreadable_weights_file_says_so(tmp_path, monkeypatch):
    path = save_weights(model_of(["a"]).state_dict(), tmp_path / "w.safetensors")

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint, "safe_open", denied)  # tests run as root, where chmod does not deny
    assert error_of(lambda: load_weights(model_of(["a"]), path)) == f"{path}: cannot read this file: permission denied"


def test_an_integer_tensor_for_a_float_parameter_is_refused(tmp_path):
    save_weights({"a": torch.ones(3, 2, dtype=torch.int64)}, tmp_path / "w.safetensors")
    message = error_of(lambda: load_weights(model_of(["a"]), tmp_path / "w.safetensors"))
    assert "wrong kind" in message and "a (torch.int64, expected torch.float32)" in message


# --- training checkpoints: a crash after every file-system operation of a save ---------------------

#: the os functions a save changes the file system through (instrumented one by one)
OPERATIONS = ("mkdir", "rmdir", "open", "write", "fsync", "rename", "replace", "unlink")
CRASHED = 201


def save_in_child(save, crash_after: int, out: Path, args: tuple) -> int:
    """Run ``save(out, *args)`` in a forked child that counts its file-system operations and
    dies by ``os._exit`` right after the ``crash_after``-th (0: never): no ``finally``, no cleanup,
    as in a real crash. Returns the child's exit code: the operations counted, or ``CRASHED``."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            count = 0

            def counted(real):
                def operation(*a, **k):
                    nonlocal count
                    result = real(*a, **k)  # a failed call (e.g. mkdir of an existing folder) changes nothing
                    count += 1
                    if count == crash_after:
                        os._exit(CRASHED)
                    return result
                return operation

            for name in OPERATIONS:
                setattr(os, name, counted(getattr(os, name)))
            save(out, *args)
            os._exit(min(count, CRASHED - 1))
        except BaseException:
            traceback.print_exc()  # shown with the failing test
            os._exit(255)
    deadline = time.monotonic() + 120
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the saving child hung")
        time.sleep(0.01)
    return os.waitstatus_to_exitcode(done[1])


@pytest.mark.slow
@pytest.mark.parametrize("replacing", [False, True], ids=["new", "replacing"])
def test_a_crash_after_any_operation_of_a_save_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch, replacing):
    over = SMALL + ["training.epochs=4", "training.batch_size=256"]  # 5 steps an epoch
    train(DIGITS, tmp_path / "full", seed=1, overrides=over, console=QUIET)
    reference = load_file(str(tmp_path / "full" / state.WEIGHTS))
    run, root = tmp_path / "run", tmp_path / "run" / state.CHECKPOINTS
    train(DIGITS, run, seed=1, overrides=over, console=QUIET, stop_after=2)
    if replacing:  # epochs 1, 2 and damaged 3 and 4: the save of epoch 3 then sets aside the damaged
        # epoch-0003 (its second branch: two renames) and prunes an older and a newer checkpoint
        kept = shutil.copytree(root, tmp_path / "kept")
        train(DIGITS, run, seed=1, overrides=over, console=QUIET, resume=True)
        for epoch in (3, 4):
            (root / state.checkpoint_name(epoch) / state.STATE_TENSORS).write_bytes(b"damaged")
        for folder in kept.iterdir():
            shutil.copytree(folder, root / folder.name)
    expected = ({(4, 3, 2, 1), (4, 2, 1), (3, 2, 1), (3, 2)} if replacing  # set aside 3, commit 3, prune 4, prune 1
                else {(2, 1), (3, 2, 1), (3, 2)})  # commit 3, prune 1

    # during the epoch-3 save (which also prunes and refreshes model.safetensors), fork a child per
    # operation that crashes right after it, each on its own copy of the run folder
    crashed: list[Path] = []
    real_save = state.save

    def crash_everywhere(out, *args):
        total = save_in_child(real_save, 0, shutil.copytree(out, tmp_path / "count"), args)
        assert 20 <= total < CRASHED  # mkdir, then create/write/fsync three files, rename, prune, copy
        for n in range(1, total + 1):
            copy = shutil.copytree(out, tmp_path / f"crash-{n:02d}")
            assert save_in_child(real_save, n, copy, args) == CRASHED
            crashed.append(copy)
        return real_save(out, *args)

    monkeypatch.setattr(state, "save", crash_everywhere)
    train(DIGITS, run, seed=1, overrides=over, console=QUIET, resume=True, stop_after=1)
    monkeypatch.undo()

    resumed_from, seen = set(), set()
    for folder in crashed:
        published = state.checkpoints(folder)
        for epoch, published_folder in published:  # never a half-written epoch-NNNN: each validates or was damaged here
            if (published_folder / state.STATE_TENSORS).read_bytes() != b"damaged":
                state.read_record(published_folder, epoch)
        seen.add(tuple(e for e, _ in published))
        newest, record = state.latest(folder)
        resumed_from.add(record["epoch"])
        read_tensors(newest / state.WEIGHTS)  # digest verified
        read_tensors(folder / state.WEIGHTS)  # the user's copy is whole too (old or new)
        rows = train(DIGITS, folder, seed=1, overrides=over, console=QUIET, resume=True)
        assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
        weights = load_file(str(folder / state.WEIGHTS))
        assert max((weights[k] - reference[k]).abs().max().item() for k in reference) < 1e-6, folder
        assert sorted(p.name for p in (folder / state.CHECKPOINTS).iterdir()) == ["epoch-0003", "epoch-0004"]
        assert not list(folder.glob(".*.tmp"))
        assert (folder / "metrics.csv").read_text().count("\n") == 5  # header and epochs 1-4
    assert resumed_from == {2, 3}  # crashes before and after the commit were both simulated
    assert seen == expected  # ... and between every two renames of the save


# --- training checkpoints: layout, resume, damage --------------------------------------------------


def test_layout_keeps_the_last_two_checkpoints_and_a_user_copy(tmp_path):
    train(DIGITS, tmp_path, overrides=SMALL + ["training.epochs=3"], console=QUIET)
    root = tmp_path / state.CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0002", "epoch-0003"]
    for folder in root.iterdir():
        assert sorted(p.name for p in folder.iterdir()) == sorted([state.WEIGHTS, state.STATE_TENSORS, state.STATE_JSON])
    newest = load_file(str(root / "epoch-0003" / state.WEIGHTS))
    copy = load_file(str(tmp_path / state.WEIGHTS))
    assert all(torch.equal(newest[k], copy[k]) for k in newest)


def test_a_save_encodes_the_weights_once_for_both_copies(tmp_path, monkeypatch):
    calls, real = [], checkpoint.encode_safetensors
    monkeypatch.setattr(checkpoint, "encode_safetensors", lambda *a, **k: calls.append(1) or real(*a, **k))
    train(DIGITS, tmp_path, overrides=SMALL + ["training.epochs=1"], console=QUIET)
    assert len(calls) == 2  # the weights and the optimiser state; OUT/model.safetensors reuses the weights' bytes
    newest = tmp_path / state.CHECKPOINTS / "epoch-0001" / state.WEIGHTS
    assert (tmp_path / state.WEIGHTS).read_bytes() == newest.read_bytes()


def test_resume_skips_damaged_checkpoints_and_cleans_leftovers(tmp_path, capsys):
    over = SMALL + ["training.epochs=3"]
    train(DIGITS, tmp_path, overrides=over, console=QUIET, stop_after=2)
    root = tmp_path / state.CHECKPOINTS
    (root / ".tmp-epoch-0003.dead").mkdir()  # left by a crash
    (root / ".tmp-epoch-0003.dead" / state.WEIGHTS).write_bytes(b"half")
    (root / "epoch-0002" / state.STATE_TENSORS).write_bytes(b"truncated")
    rows = train(DIGITS, tmp_path, overrides=over, console=QUIET, resume=True, stop_after=1)
    err = " ".join(capsys.readouterr().err.split())
    assert "skipped a damaged checkpoint" in err and "epoch-0002/train_state.safetensors" in err
    assert [r["epoch"] for r in rows] == [1, 2]  # resumed from epoch 1
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001", "epoch-0002"]  # the damaged one replaced
    state.latest(tmp_path)
    for folder in root.iterdir():  # every checkpoint left is complete
        state.read_record(folder, int(folder.name[-4:]))


def test_every_checkpoint_damaged_is_an_error(tmp_path, capsys):
    over = SMALL + ["training.epochs=2"]
    train(DIGITS, tmp_path, overrides=over, console=QUIET)
    for folder in (tmp_path / state.CHECKPOINTS).iterdir():
        (folder / state.STATE_JSON).write_text('{"epoch": "two"}')
    assert main(["train", str(DIGITS), "--out", str(tmp_path), "--resume", *sets(over)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "every checkpoint is damaged" in err and "malformed fields: epoch (expected int)" in err


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "missing"):
        assert main(["train", str(DIGITS), "--out", str(out), "--resume", *sets(SMALL)]) == 2
        assert "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


def test_a_new_run_into_a_folder_with_a_run_is_refused_and_changes_nothing(tmp_path, monkeypatch, capsys):
    run, over = tmp_path / "run", SMALL + ["training.epochs=3"]
    train(DIGITS, run, seed=0, overrides=over, console=QUIET)
    before, loaded = snapshot(run), []
    monkeypatch.setattr(datasets, "open_data", lambda *a: loaded.append(a))  # refused before any work
    assert main(["train", str(DIGITS), "--out", str(run), "--seed", "1", *sets(over)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (f"{run}: already holds a training run (checkpoints up to epoch 3); continue it with --resume, "
            "or choose another --out") in err
    assert not loaded and snapshot(run) == before
    monkeypatch.undo()
    assert main(["train", str(DIGITS), "--out", str(run), "--seed", "1", "--resume", *sets(over)]) == 2
    assert "the run was started with --seed 0, not 1" in capsys.readouterr().err
    other = tmp_path / "other"  # a folder of unrelated files is fine, and they stay
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    train(DIGITS, other, overrides=SMALL + ["training.epochs=1"], console=QUIET)
    assert (other / "notes.txt").read_text() == "mine" and state.latest(other)[1]["epoch"] == 1


def test_a_run_of_the_older_layout_says_it_cannot_be_resumed(tmp_path, capsys):
    for name in (state.STATE_JSON, state.STATE_TENSORS, state.WEIGHTS):  # what the previous version wrote
        (tmp_path / name).write_bytes(b"{}")
    before = snapshot(tmp_path)
    assert main(["train", str(DIGITS), "--out", str(tmp_path), "--resume", *sets(SMALL)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "nothing to resume: this run was written by an older unroll" in err and "cannot be resumed" in err
    assert main(["train", str(DIGITS), "--out", str(tmp_path), *sets(SMALL)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "already holds a training run, written by an older unroll" in err
    assert snapshot(tmp_path) == before


def test_a_refused_resume_changes_nothing(tmp_path, capsys):
    over = SMALL + ["training.epochs=2"]
    train(DIGITS, tmp_path, overrides=over, console=QUIET, stop_after=1)
    (tmp_path / state.CHECKPOINTS / ".tmp-epoch-0002.dead").mkdir()  # left by a crash, like a stale user copy:
    (tmp_path / state.WEIGHTS).write_bytes(b"stale")  # a resume that goes ahead replaces both, a refused one neither
    before = snapshot(tmp_path)
    for args, expected in ((["--seed", "1"], "the run was started with --seed 0, not 1"),
                           (["--set", "training.lr=0.5"], "trained from another recipe")):
        assert main(["train", str(DIGITS), "--out", str(tmp_path), "--resume", *args, *sets(over)]) == 2
        assert expected in capsys.readouterr().err
        assert snapshot(tmp_path) == before


def test_a_checkpoint_file_that_cannot_be_read_is_skipped_or_named(tmp_path, monkeypatch, capsys):
    over = SMALL + ["training.epochs=2"]
    train(DIGITS, tmp_path, overrides=over, console=QUIET)
    real, locked = Path.read_bytes, {tmp_path / state.CHECKPOINTS / "epoch-0002" / state.STATE_TENSORS}

    def read_bytes(path):  # as if unreadable (tests run as root, where chmod does not deny)
        if path in locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    rows = train(DIGITS, tmp_path, overrides=over, console=QUIET, resume=True)
    err = " ".join(capsys.readouterr().err.split())
    assert "skipped a damaged checkpoint" in err and "epoch-0002/train_state.safetensors: cannot read this file: Permission denied" in err
    assert [r["epoch"] for r in rows] == [1, 2]  # resumed from epoch 1
    locked.add(tmp_path / state.CHECKPOINTS / "epoch-0001" / state.WEIGHTS)
    assert main(["train", str(DIGITS), "--out", str(tmp_path), "--resume", *sets(over)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "every checkpoint is damaged" in err and "epoch-0001/model.safetensors: cannot read this file" in err
    assert "Traceback" not in err


def _edit(edit):
    def apply(record):
        edit(record)
        return record
    return apply


#: hand edits of train_state.json that keep every field's type, and what the error says
EDITS = {
    "optimizer state a list": (_edit(lambda r: r["optimizer"].update(state=[])), "damaged: AttributeError"),
    "no optimizer state": (_edit(lambda r: r["optimizer"].pop("state")), "damaged: KeyError: 'state'"),
    "optimizer state a string": (_edit(lambda r: r["optimizer"]["state"].update({"0": {"step": "abc"}})),
                                 "damaged: ValueError: its optimizer state holds values that are not tensors"),
    "a moment made a number": (_edit(lambda r: r["optimizer"]["state"].update({"0": {"exp_avg": 1}})),
                               "damaged: ValueError: its optimizer state holds values that are not tensors"),
    "optimizer index not a number": (_edit(lambda r: r["optimizer"]["state"].update({"x": {}})), "damaged: ValueError"),
    "no lr": (_edit(lambda r: r["optimizer"]["param_groups"][0].pop("lr")),
              "damaged: ValueError: its optimizer settings do not have this recipe's optimizer's entries"),
    "no param groups": (_edit(lambda r: r["optimizer"].update(param_groups=[])), "its optimizer settings"),
    "scheduler step a string": (_edit(lambda r: r["scheduler"].update(last_epoch="x")), "its scheduler settings"),
    "scheduler emptied": (_edit(lambda r: r["scheduler"].clear()), "its scheduler settings"),
    "scheduler method": (_edit(lambda r: r["scheduler"].update(step=1)), "its scheduler settings"),
    "metrics row cut": (_edit(lambda r: r["metrics"].__setitem__(0, {"epoch": 1})),
                        "damaged: metrics rows 1 are not rows of numbers with the columns epoch, train_loss"),
    "metrics row a number": (_edit(lambda r: r["metrics"].__setitem__(-1, 7)), "damaged: metrics rows"),
    "metrics value a string": (_edit(lambda r: r["metrics"][0].update(lr="high")), "damaged: metrics rows"),
}


@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_a_hand_edited_training_state_is_skipped_or_named(tmp_path, capsys, edit):
    change, expected = EDITS[edit]
    over = SMALL + ["training.epochs=2"]
    train(DIGITS, tmp_path, overrides=over, console=QUIET)

    def damage(epoch: int) -> Path:
        path = tmp_path / state.CHECKPOINTS / state.checkpoint_name(epoch) / state.STATE_JSON
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
        return path

    damaged = damage(2)
    rows = train(DIGITS, tmp_path, overrides=over, console=QUIET, resume=True)
    err = " ".join(capsys.readouterr().err.split())
    assert f"skipped a damaged checkpoint: {damaged}: " in err and expected in err
    assert [r["epoch"] for r in rows] == [1, 2]  # resumed from epoch 1
    damage(1), damage(2)
    assert main(["train", str(DIGITS), "--out", str(tmp_path), "--resume", *sets(over)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "every checkpoint is damaged" in err and f"{damaged}: the training state is damaged" in err and expected in err
    assert "Traceback" not in err and len(err) < 1000


def test_out_that_is_a_file_fails_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["train", str(DIGITS), "--out", str(tmp_path / "file"), *sets(SMALL)]) == 2
    assert "must be a folder, and this is an existing file" in capsys.readouterr().err


# --- training output, NaN, Ctrl-C -----------------------------------------------------------------


def test_off_a_terminal_one_plain_line_per_epoch_and_no_bar(tmp_path):
    text = StringIO()
    train(DIGITS, tmp_path, overrides=SMALL + ["training.epochs=3"], console=Console(file=text, width=60))
    setup, *lines = text.getvalue().splitlines()
    assert setup.startswith("digits: 1,347 training and 450 validation images, 10 classes; batch 64 = 1 process")
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("train loss" in line and "val loss" in line and " lr " in line and line.endswith(" s") for line in lines)


def test_on_a_terminal_one_bar_for_all_epochs(tmp_path, monkeypatch):
    added, real = [], loop.Progress.add_task
    monkeypatch.setattr(loop.Progress, "add_task", lambda self, *a, **k: added.append(1) or real(self, *a, **k))
    text = StringIO()
    train(DIGITS, tmp_path, overrides=SMALL + ["training.epochs=3"], console=Console(file=text, force_terminal=True, width=120))
    assert len(added) == 1  # a bar per epoch would push the current one off a short terminal
    assert "━" in text.getvalue() and text.getvalue().count("epoch 3/3  train loss") == 1


def test_a_nan_loss_stops_the_run_and_keeps_the_finite_checkpoints(tmp_path, monkeypatch):
    steps = len(datasets.open_data("digits", 8, 1).train) // 64
    real, calls = torch.nn.functional.cross_entropy, []

    def poisoned(logits, *a, **k):
        if torch.is_grad_enabled():  # training, not evaluation
            calls.append(1)
            if len(calls) == steps + 3:
                logits = logits * float("nan")
        return real(logits, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    message = error_of(lambda: train(DIGITS, tmp_path, overrides=SMALL + ["training.epochs=3"], console=QUIET))
    assert "the loss became NaN at epoch 2 step 3; lower training.lr" in message
    assert [e for e, _ in state.checkpoints(tmp_path)] == [1]


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    real = tasks.evaluate

    def evaluate(model, *a, **k):
        if len(state.checkpoints(tmp_path)) == 1:
            with torch.no_grad():
                next(model.parameters())[0] = float("inf")
        return real(model, *a, **k)

    monkeypatch.setattr(tasks, "evaluate", evaluate)
    message = error_of(lambda: train(DIGITS, tmp_path, overrides=SMALL + ["training.epochs=3"], console=QUIET))
    assert "the weights became NaN or inf at epoch 2" in message
    assert [e for e, _ in state.checkpoints(tmp_path)] == [1]


@pytest.mark.slow
def test_ctrl_c_exits_130_and_leaves_a_resumable_checkpoint(tmp_path):
    over = SMALL + ["training.epochs=500"]
    out = tmp_path / "run"
    unroll = Path(sysconfig.get_path("scripts")) / "unroll"  # the installed console script, as users run it
    proc = subprocess.Popen([str(unroll), "train", str(DIGITS), "--out", str(out), "--device", "cpu", *sets(over)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first, deadline = "", time.monotonic() + 120
        while not first.startswith("epoch 1/500") and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stderr], [], [], 1)[0]:
                first = proc.stderr.readline()
        assert first.startswith("epoch 1/500"), "no epoch line while the run was going (not flushed?)"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    _, record = state.latest(out)
    rows = train(DIGITS, out, overrides=over, console=QUIET, resume=True, stop_after=1)
    assert [r["epoch"] for r in rows] == list(range(1, record["epoch"] + 2))
    assert not list((out / state.CHECKPOINTS).glob(".tmp-*"))


# --- convert --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["empty", "text", "namespace"])
def test_convert_refuses_what_is_not_a_plain_pytorch_checkpoint(tmp_path, capsys, kind):
    path = tmp_path / "reference.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello, not a checkpoint\n")
    else:
        torch.save({"args": argparse.Namespace(lr=1), "model": {"w": torch.zeros(2)}}, path)
    assert main(["convert", str(DIGITS), str(path), "--out", str(tmp_path / "w.safetensors")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert str(path) in err and "weights_only" not in err and "Traceback" not in err
    expected = {"empty": "not a PyTorch checkpoint: the file is empty", "text": "not a PyTorch checkpoint",
                "namespace": "holds a Python object (argparse.Namespace), not only tensors"}[kind]
    assert expected in err
    assert not (tmp_path / "w.safetensors").exists()


def test_convert_reads_the_checkpoint_before_building_the_model(tmp_path, monkeypatch):
    built, real = [], unroll.api.build
    monkeypatch.setattr(unroll.api, "build", lambda *a, **k: built.append(1) or real(*a, **k))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    torch.save({"w": torch.zeros(2)}, tmp_path / "foreign.pth")  # tensors, of no known layout
    for name, expected in (("missing.pth", "no such checkpoint file"), ("text.pth", "not a PyTorch checkpoint"),
                           ("foreign.pth", "cannot tell which reference layout")):
        assert expected in error_of(lambda: convert(DIGITS, tmp_path / name, tmp_path / "w.safetensors"))
    assert not built  # a bad file fails in a second, not after building a large model


def test_convert_lists_a_few_unexpected_keys(tmp_path, capsys):
    reference = {"to_patch_embedding.2.weight": torch.zeros(1), **{f"junk.{i:04d}" + "x" * 1000: torch.zeros(1) for i in range(1000)}}
    torch.save(reference, tmp_path / "reference.pth")
    assert main(["convert", str(DIGITS), str(tmp_path / "reference.pth"), "--out", str(tmp_path / "w.safetensors")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "unexpected keys for a CRATE checkpoint: junk.0000xxx" in err and "and 995 more" in err and len(err) < 800


def test_convert_out_that_is_a_folder_or_under_a_file(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    for out, expected in ((tmp_path / "folder", "--out must name a file"),
                          (tmp_path / "file" / "w.safetensors", "the folder of --out must be a folder")):
        assert main(["convert", str(DIGITS), str(tmp_path / "whatever.pth"), "--out", str(out)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert expected in err and "Traceback" not in err
