"""The command line as a Unix tool: usage mistakes print the usage and exit 2 through the installed
console script (which must not need anything its dependencies do not install), ``--version``,
defaults in ``--help``, hints, and outputs that are written whole or not at all."""

from __future__ import annotations

import errno
import importlib.metadata
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import unroll
from unroll.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes/crate_tiny.yaml"
SMALL = [a for s in ("architecture.width=32", "architecture.heads=2", "architecture.depth=2",
                     "architecture.image_size=16", "architecture.patch_size=8") for a in ("--set", s)]
SCRIPT = Path(sysconfig.get_path("scripts")) / "unroll"


def console(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The installed ``unroll`` script, as a user's shell runs it."""
    assert SCRIPT.is_file(), f"the console script is not installed at {SCRIPT}"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


@pytest.mark.parametrize("args, says", [
    ([], "Usage: unroll"),
    (["build"], "Missing argument 'RECIPE'"),
    (["build", str(TINY), "extra"], "unexpected extra argument"),
    (["build", str(TINY), "--bogus"], "No such option: --bogus"),
    (["biuld", str(TINY)], "No such command 'biuld'"),
    (["build", str(TINY), "--set", "architecture.depth"], "expected key.sub=value"),
    (["build", str(TINY), "--set", "=4"], "expected key.sub=value"),
    (["train", str(TINY), "--seed", "abc"], "Invalid value for '--seed'"),
    (["attention", str(TINY)], "Missing option"),
    (["explain", str(TINY), "--set", "a" + ".a" * 5000 + "=1"], "a key of at most 32 parts"),
], ids=["nothing", "missing-argument", "extra-argument", "unknown-option", "unknown-command", "set-without-value",
        "set-without-key", "option-of-wrong-type", "missing-option", "set-key-too-deep"])
def test_usage_mistakes_print_the_usage_and_exit_2(args, says):
    proc = console(*args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "ModuleNotFoundError" not in proc.stderr, proc.stderr
    assert "Usage: unroll" in proc.stderr
    assert says in " ".join(proc.stderr.split()), proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 15 or not args  # the bare command prints the help


def test_version_from_the_script_and_the_package():
    proc = console("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"unroll {importlib.metadata.version('unroll')}"
    assert unroll.__version__ == importlib.metadata.version("unroll")


def test_help_shows_each_default():
    text = " ".join(console("build", "--help").stdout.split())
    assert "[default: (build/<recipe name>)]" in text  # rich markup used to swallow these brackets
    assert "[default: 16.0; x>=0.001]" in text  # --max-memory
    bench = " ".join(console("bench", "--help").stdout.split())
    assert "[default: 8; 1<=x<=1048576]" in bench and "[default: cpu]" in bench
    train = " ".join(console("train", "--help").stdout.split())
    assert "[default: (runs/<recipe name>)]" in train and "[default: 0; 0<=x<=4294967295]" in train  # --seed


def test_a_recipe_named_without_its_suffix_gets_a_hint(tmp_path):
    proc = console("build", "recipes/crate_base", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "did you mean recipes/crate_base.yaml?" in proc.stderr
    typo = console("explain", "recipes/crate_bsae.yaml")
    assert typo.returncode == 2 and "did you mean recipes/crate_base.yaml?" in typo.stderr


def test_build_says_the_weights_are_fresh_and_what_to_do_next(tmp_path, capsys):
    assert main(["build", str(TINY), "--out", str(tmp_path / "out"), *SMALL]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "freshly initialised" in said
    assert f"unroll train {TINY}" in said
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors", "recipe.yaml"]


def test_out_that_is_an_existing_file_is_refused_before_any_work(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert main(["build", str(TINY), "--out", str(target), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "--out must be a folder" in err and str(target) in err
    assert target.read_text() == "keep me"
    assert main(["build", str(TINY), "--out", str(target / "below"), *SMALL]) == 2
    assert "is a file" in capsys.readouterr().err


def _fail_after(monkeypatch, code: int, where: str) -> None:
    """Make the weights writer write half its bytes and then fail with ``code`` (a full disk,
    a read-only mount), the way the operating system would."""
    import unroll.files as files

    real = files.write_durably

    def failing(path, data):
        real(path, data[: len(data) // 2])
        raise OSError(code, os.strerror(code), where)

    monkeypatch.setattr(files, "write_durably", failing)


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left"), (errno.EACCES, "permission denied"),
                                          (errno.EROFS, "read-only")])
def test_a_failed_write_loses_nothing_and_leaves_nothing(tmp_path, capsys, monkeypatch, code, reason):
    out = tmp_path / "out"
    assert main(["build", str(TINY), "--out", str(out), *SMALL]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    _fail_after(monkeypatch, code, str(out))
    assert main(["build", str(TINY), "--out", str(out), *SMALL, "--set", "architecture.depth=1"]) == 2
    err = capsys.readouterr().err
    assert reason in err and str(out) in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous build, whole; no temporaries
    fresh = tmp_path / "fresh" / "deeper"
    assert main(["build", str(TINY), "--out", str(fresh), *SMALL]) == 2
    assert not (tmp_path / "fresh").exists()  # the folders it made are gone too


def test_a_build_over_the_memory_limit_is_refused_with_the_estimate(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["build", str(ROOT / "recipes/crate_base.yaml"), "--out", str(out), "--max-memory", "0.05"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "22,796,008 parameters" in err and "more than the limit of 0.05 GiB" in err and "--max-memory" in err
    assert not out.exists()
    # the bounds are checked before the estimate: a width of 10^6 never reaches the allocator
    assert main(["build", str(TINY), "--out", str(out), "--set", "architecture.width=1000000"]) == 2
    assert "less than or equal to 16384" in capsys.readouterr().err


def test_main_returns_130_on_ctrl_c(monkeypatch, capsys):
    import unroll.recipe.load as load

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(load, "read_yaml", interrupted)
    assert main(["explain", str(TINY)]) == 130
    assert "interrupted" in capsys.readouterr().err


@pytest.fixture
def digits_weights(tmp_path) -> Path:
    """A freshly built crate_digits (small) and its weights file."""
    out = tmp_path / "built"
    assert main(["build", str(ROOT / "recipes/crate_digits.yaml"), "--out", str(out), "--set", "architecture.depth=2"]) == 0
    return out / "model.safetensors"


def test_measure_refuses_non_finite_weights_by_name_and_writes_nothing(tmp_path, capsys, digits_weights):
    from safetensors.torch import load_file

    from unroll.checkpoint import save_weights

    state = load_file(str(digits_weights))
    state["frontend.cls_token"][..., 0] = float("nan")
    broken = tmp_path / "nan.safetensors"
    save_weights(state, broken)  # a valid file, digest and all, of weights that are NaN
    out = tmp_path / "measured"
    capsys.readouterr()
    code = main(["measure", str(ROOT / "recipes/crate_digits.yaml"), "--set", "architecture.depth=2",
                 "--checkpoint", str(broken), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "frontend.cls_token" in err and "NaN" in err, err
    assert not out.exists()


def test_attention_on_a_truncated_image_says_so_and_writes_nothing(tmp_path, capsys, digits_weights):
    image = tmp_path / "cut.png"
    image.write_bytes((ROOT / "docs/tutorials/digit.png").read_bytes()[:200])
    out = tmp_path / "maps"
    capsys.readouterr()
    code = main(["attention", str(ROOT / "recipes/crate_digits.yaml"), "--set", "architecture.depth=2",
                 "--checkpoint", str(digits_weights), "--image", str(image), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and str(image) in err and "truncated" in err, err
    assert not out.exists()


def test_a_folder_that_cannot_be_looked_into_is_an_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    # as root, chmod cannot lock a folder; pathlib's stat raising EACCES is what a user would meet
    import pathlib

    locked = tmp_path / "locked"
    real = pathlib.Path.stat

    def stat(self, *args, **kwargs):
        if str(self).startswith(str(locked)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "stat", stat)
    assert main(["build", str(TINY), "--out", str(locked / "run"), *SMALL]) == 2
    assert "--out: cannot look here: permission denied" in capsys.readouterr().err
    assert main(["explain", str(locked / "recipe.yaml")]) == 2
    assert "cannot read the recipe (Permission denied)" in capsys.readouterr().err
