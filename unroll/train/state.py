"""Training checkpoints, each a folder written whole and published by one rename.

Layout of a run folder ``OUT``::

    OUT/checkpoints/epoch-0007/model.safetensors        the weights
                              train_state.safetensors  optimiser tensors, RNG state
                              train_state.json         epoch, schedule, optimiser scalars,
                                                       metrics rows, recipe digest, file digests
    OUT/checkpoints/epoch-0008/...                     the newest (the last KEEP are kept)
    OUT/model.safetensors                              a copy of the newest weights, for users
    OUT/metrics.csv, OUT/recipe.yaml

A checkpoint is built under a temporary name (``checkpoints/.tmp-…``), every file fsynced, then
renamed to ``epoch-NNNN`` in one atomic step: a crash at any moment leaves either the new folder
complete or none, and the previous checkpoints untouched (older ones are deleted only after the
new one is published). Resuming takes the newest checkpoint whose JSON validates, whose digests
match and whose content restores, and only then removes leftover temporary folders.
``OUT/model.safetensors`` is replaced atomically after each publication; resuming never reads it.
A folder holds one run: a new run into a folder that holds checkpoints is refused (see
:func:`check_fresh`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path

import torch

from unroll.checkpoint import check_finite, encode, fit, read_tensors, save_encoded, save_weights
from unroll.errors import UnrollError, excerpt, note, shorten
from unroll.files import os_error, write_durably, writing

CHECKPOINTS = "checkpoints"
STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
WEIGHTS = "model.safetensors"
#: temporary folders (being built, or being deleted) start with this; anything named so is debris
TMP_PREFIX = ".tmp-"
#: checkpoints kept: the newest and the one before, in case the newest is damaged later
KEEP = 2
_NAME = re.compile(r"epoch-(\d{4,})")
#: the columns of a metrics row (``metrics.csv``, and the rows a checkpoint records)
METRICS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr", "images_per_second",
           "loader_wait", "seconds"]
#: the columns of a language model's metrics rows (``tokens``: seen so far)
LANGUAGE_METRICS = ["epoch", "train_loss", "val_loss", "val_ppl", "tokens", "lr", "tokens_per_second", "loader_wait",
                    "seconds"]
#: what a hand-edited but well-typed state makes torch raise while it is restored
_BROKEN = (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError)


def weights_in(path: str | Path) -> Path:
    """The weights a user names: a weights file, or a run folder's ``model.safetensors`` (what
    ``--init``, ``unroll eval`` and ``unroll generate`` accept)."""
    path = Path(path)
    if path.is_dir():
        file = path / WEIGHTS
        if not file.is_file():
            raise UnrollError(f"a folder without {WEIGHTS} (expected a weights file or the output folder of "
                              "unroll train)", where=str(path))
        return file
    if not path.is_file():
        raise UnrollError("no such weights file (give model.safetensors, or the run folder that holds it)",
                          where=str(path))
    return path


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise UnrollError(f"cannot read this file: {e.strerror or type(e).__name__}", where=str(path)) from None


def recipe_digest(recipe) -> str:
    """Of the whole resolved recipe, training section included: resuming with another schedule,
    batch size or optimiser would not continue the same run."""
    return hashlib.sha256(json.dumps(recipe.resolved(), sort_keys=True).encode()).hexdigest()


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """The published checkpoint folders of a run, newest first (not yet validated)."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return []
    try:
        found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    except OSError as e:
        raise UnrollError(f"cannot read this folder: {e.strerror or type(e).__name__}", where=str(folder)) from None
    return sorted(found, reverse=True)


def check_fresh(out: Path) -> None:
    """Refuse a new run into a folder that holds one: mixed checkpoints of two runs would make a
    later ``--resume`` continue whichever is newest. Checked before any work; nothing is touched."""
    if found := checkpoints(out):
        raise UnrollError(f"already holds a training run (checkpoints up to epoch {found[0][0]}); continue it with "
                          "--resume, or choose another --out", where=str(out))
    if (Path(out) / STATE_JSON).is_file():
        raise UnrollError(f"already holds a training run, written by an older unroll ({STATE_JSON} at the top); "
                          "choose another --out", where=str(out))


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars["state"].setdefault(str(index), {})[name] = value
    return tensors, scalars


def _join_optimizer(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entry in scalars["state"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": scalars["param_groups"]}


def save(out: Path, model: torch.nn.Module, optimizer, scheduler, epoch: int, info: dict, metrics: list[dict]) -> Path:
    """Publish ``OUT/checkpoints/epoch-NNNN``, then prune older checkpoints and refresh
    ``OUT/model.safetensors``. Returns the checkpoint folder."""
    root = Path(out) / CHECKPOINTS
    final = root / checkpoint_name(epoch)
    tensors, scalars = _split_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    files = {WEIGHTS: encode(model.state_dict()), STATE_TENSORS: encode(tensors)}  # encoded once, also for OUT's copy
    record = {
        **info,
        "epoch": epoch,
        "optimizer": scalars,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "metrics": metrics,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    }
    files[STATE_JSON] = json.dumps(record, indent=1).encode()
    tmp = root / f"{TMP_PREFIX}{final.name}.{secrets.token_hex(4)}"
    try:
        os.makedirs(root, exist_ok=True)
        os.mkdir(tmp)
        for name, data in files.items():
            write_durably(tmp / name, data)
        _sync(tmp)
        if final.exists():  # a damaged epoch-N that the resume skipped: set it aside, then replace it
            os.rename(final, root / f"{TMP_PREFIX}old-{final.name}.{secrets.token_hex(4)}")
        os.rename(tmp, final)  # the commit
        _sync(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(e, final) from None
    except BaseException:  # Ctrl-C included: no debris, the previous checkpoints stay as they were
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with writing(root):
        _prune(Path(out), epoch)
    save_encoded(files[WEIGHTS], Path(out) / WEIGHTS)
    return final


def _sync(folder: Path) -> None:
    """fsync a folder: makes the names created or renamed in it durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(out: Path, epoch: int) -> None:
    """Keep the ``KEEP`` checkpoints up to ``epoch``; drop the rest (older ones, and damaged newer
    ones the resume skipped) and every leftover temporary folder. Each is first
    renamed to a temporary name, so a crash midway never leaves a half-deleted ``epoch-NNNN``."""
    root = out / CHECKPOINTS
    for n, folder in checkpoints(out):
        if not epoch - KEEP < n <= epoch:
            doomed = root / f"{TMP_PREFIX}old-{folder.name}.{secrets.token_hex(4)}"
            os.rename(folder, doomed)
    clean(out)


def clean(out: Path) -> None:
    """Remove what an interrupted save left: temporary checkpoint folders and the temporary file
    of ``OUT/model.safetensors``."""
    debris = [*(Path(out) / CHECKPOINTS).glob(f"{TMP_PREFIX}*"), *Path(out).glob(f".{WEIGHTS}.*.tmp")]
    for path in debris:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


_FIELDS = {"epoch": int, "recipe": str, "seed": int, "data": str, "world_size": int, "optimizer": dict,
           "scheduler": dict, "metrics": list, "files": dict}


def read_record(folder: Path, epoch: int) -> dict:
    """The checkpoint's JSON, checked: its fields, its epoch and metrics rows, and both tensor
    files' digests."""
    path = folder / STATE_JSON
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise UnrollError(f"{STATE_JSON} is missing", where=str(folder)) from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also a 5,000-digit number
        raise UnrollError(f"not a valid training state ({type(e).__name__})", where=str(path)) from None
    wrong = [f"{k} (expected {t.__name__})" for k, t in _FIELDS.items()
             if not isinstance(record.get(k) if isinstance(record, dict) else None, t)]
    if wrong:
        raise UnrollError(f"missing or malformed fields: {', '.join(wrong)}", where=str(path))
    if record["epoch"] != epoch or len(record["metrics"]) != epoch:
        raise UnrollError(f"expected epoch {epoch} and {epoch} metrics rows, found epoch {excerpt(record['epoch'])} "
                          f"and {len(record['metrics'])} rows", where=str(path))
    if bad := [i + 1 for i, row in enumerate(record["metrics"]) if not _is_row(row)]:
        raise UnrollError(f"the training state is damaged: metrics rows {', '.join(map(str, bad[:5]))} are not rows "
                          f"of numbers with the columns {', '.join(METRICS)} (or a language model's "
                          f"{', '.join(LANGUAGE_METRICS)})", where=str(path))
    for name in (WEIGHTS, STATE_TENSORS):
        file = folder / name
        if not file.is_file() or digest(file) != record["files"].get(name):
            raise UnrollError(f"does not match the digest in {STATE_JSON} (missing, truncated or replaced)", where=str(file))
    return record


def _is_row(row) -> bool:
    return (isinstance(row, dict) and sorted(row) in (sorted(METRICS), sorted(LANGUAGE_METRICS))
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row.values()))


def _nothing(out: Path) -> UnrollError:
    if (Path(out) / STATE_JSON).is_file():  # the layout before checkpoint folders: no optimiser history to trust
        return UnrollError(f"nothing to resume: this run was written by an older unroll, whose layout ({STATE_JSON} at "
                           "the top of the folder) cannot be resumed; start it again in another --out", where=str(out))
    return UnrollError(f"nothing to resume: no {CHECKPOINTS}/epoch-NNNN folder here (start the run without "
                       "--resume, or give the --out of the run to continue)", where=str(out))


def latest(out: Path, info: dict | None = None, restore=None) -> tuple[Path, dict]:
    """The newest complete checkpoint and its record; damaged ones are skipped with a note. Given
    ``info`` (this run's recipe digest, seed and data), a checkpoint of another run is refused;
    given ``restore(folder, record)``, one it fails to restore counts as damaged."""
    found = checkpoints(out)
    if not found:
        raise _nothing(out)
    problems = []
    for epoch, folder in found:
        try:
            record = read_record(folder, epoch)
        except UnrollError as e:
            problems.append(e.render())
            continue
        if info is not None:  # not damage: every checkpoint of the folder is of that other run
            _same_run(record, info, out)
        try:
            if restore is not None:
                restore(folder, record)
        except UnrollError as e:
            problems.append(e.render())
            continue
        for problem in problems:
            note(f"skipped a damaged checkpoint: {problem}")
        return folder, record
    more = f"\n  and {len(problems) - 5} more" if len(problems) > 5 else ""
    raise UnrollError("nothing to resume: every checkpoint is damaged\n  " + "\n  ".join(problems[:5]) + more,
                      where=str(out))


#: what follows a recipe's digest when a run trained a baseline model on it (``--baseline NAME``)
BASELINE_MARK = "+baseline-"


def _same_run(record: dict, info: dict, out: Path) -> None:
    ours, theirs = record["recipe"].partition(BASELINE_MARK), info["recipe"].partition(BASELINE_MARK)
    if ours[0] == theirs[0] and ours[2] != theirs[2]:
        trained = f"--baseline {ours[2]}" if ours[2] else "the recipe's own model"
        given = f"--baseline {theirs[2]}" if theirs[2] else "the recipe's own model"
        raise UnrollError(f"this run trained {trained}, not {given}; resume it as it was started", where=str(out))
    if record["recipe"] != info["recipe"]:
        raise UnrollError("this checkpoint was trained from another recipe: its architecture, objective, layer or "
                          "training settings differ from the ones given now", where=str(out))
    if record["seed"] != info["seed"]:
        raise UnrollError(f"the run was started with --seed {excerpt(record['seed'])}, not {info['seed']}", where=str(out))
    if record["data"] != info["data"]:
        raise UnrollError(f"the run was started on --data {excerpt(record['data'])}, not {excerpt(info['data'])}",
                          where=str(out))


def _same_kind(found, expected) -> bool:
    """``found`` (from JSON) has ``expected``'s structure: the same keys, lengths and kinds of value.
    torch loads a state of another structure without a word and fails steps later."""
    if isinstance(expected, dict):
        return isinstance(found, dict) and found.keys() == expected.keys() and all(
            _same_kind(found[k], v) for k, v in expected.items())
    if isinstance(expected, (list, tuple)):
        return isinstance(found, (list, tuple)) and len(found) == len(expected) and all(map(_same_kind, found, expected))
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return isinstance(found, (int, float)) and not isinstance(found, bool)
    return type(found) is type(expected)


def _restore(folder: Path, record: dict, model, optimizer, scheduler, expected: dict) -> None:
    """Load the checkpoint into the model, optimiser, scheduler and RNG; the tensors and the
    structure of the optimiser and scheduler state are checked first."""
    weights = fit(model.state_dict(), read_tensors(folder / WEIGHTS), str(folder / WEIGHTS))
    tensors = read_tensors(folder / STATE_TENSORS)
    check_finite(tensors, str(folder / STATE_TENSORS))
    try:
        joined = _join_optimizer(tensors, record["optimizer"])
        if not _same_kind(joined["param_groups"], expected["param_groups"]):
            raise ValueError("its optimizer settings do not have this recipe's optimizer's entries")
        if not _same_kind(record["scheduler"], expected["scheduler"]):
            raise ValueError("its scheduler settings do not have this recipe's schedule's entries")
        # AdamW and Lion keep only tensors per parameter, all in the tensors file (under the digest):
        # a number in the JSON in their place can only be an edit
        if not all(isinstance(v, torch.Tensor) for entry in joined["state"].values() for v in entry.values()):
            raise ValueError("its optimizer state holds values that are not tensors")
        if len({frozenset(entry) for entry in joined["state"].values()}) > 1:
            raise ValueError("its parameters' optimizer states have different entries")
        rng = tensors["rng.torch"]
        if rng.dtype != torch.uint8 or rng.shape != expected["rng"].shape:
            raise ValueError("its random generator state is not one")
        optimizer.load_state_dict(joined)
        for p, entry in optimizer.state.items():  # per-parameter tensors (moments) have the parameter's shape
            if any(name != "step" and v.shape != p.shape for name, v in entry.items()):
                raise ValueError("its optimizer state does not fit the model's parameters")
        scheduler.load_state_dict({**record["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
        torch.set_rng_state(rng)
    except _BROKEN as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UnrollError(f"the training state is damaged: {shorten(f'{type(e).__name__}: {reason}', 120)}",
                          where=str(folder / STATE_JSON)) from None
    model.load_state_dict(weights)


def load(out: Path, model: torch.nn.Module, optimizer, scheduler, info: dict, main: bool = True) -> dict:
    """Restore the newest complete checkpoint of this run (``info``: its recipe digest, seed and
    data) into the model, optimiser, scheduler and RNG; returns its record. Everything is checked
    before the folder is touched: then ``main`` (one process of a distributed run) removes
    leftovers and refreshes ``OUT/model.safetensors``."""
    expected = {"param_groups": optimizer.state_dict()["param_groups"], "rng": torch.get_rng_state(),
                "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}}
    _, record = latest(out, info, lambda folder, record: _restore(folder, record, model, optimizer, scheduler, expected))
    if main:
        clean(out)
        save_weights(model.state_dict(), Path(out) / WEIGHTS)  # a crash may have come before this copy was refreshed
    return record
