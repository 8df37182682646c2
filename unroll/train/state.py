"""Training checkpoints: weights and optimiser tensors as safetensors, the rest as JSON.

``DIR/model.safetensors`` holds the model's weights (what ``unroll.build(recipe, checkpoint=...)``
loads); ``DIR/train_state.safetensors`` the optimiser's tensors and the RNG state;
``DIR/train_state.json`` the epoch, the schedule, the optimiser's scalars, a digest of the
resolved recipe and of both tensor files. Every file is written to a temporary name and renamed,
the JSON last: a crash leaves the previous checkpoint whole, and a resume checks the digests.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unroll.checkpoint import check_state
from unroll.errors import UnrollError

STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
WEIGHTS = "model.safetensors"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recipe_digest(recipe) -> str:
    """Of the whole resolved recipe, training section included: resuming with another schedule,
    batch size or optimiser would not continue the same run."""
    return hashlib.sha256(json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().contiguous().cpu()
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


def save(folder: Path, model: torch.nn.Module, optimizer, scheduler, epoch: int, info: dict) -> None:
    """All three files are written to temporary names first and renamed only when all are
    complete, the JSON last: a failure while writing leaves the previous checkpoint as it was."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tensors, scalars = _split_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    staged: list[tuple[Path, Path]] = []
    try:
        for name, content in ((WEIGHTS, weights), (STATE_TENSORS, tensors)):
            tmp = _temporary(folder, name)
            staged.append((tmp, folder / name))
            save_file(content, str(tmp))
        record = {
            **info,
            "epoch": epoch,
            "optimizer": scalars,
            "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
            "files": {final.name: digest(tmp) for tmp, final in staged},
        }
        tmp = _temporary(folder, STATE_JSON)
        staged.append((tmp, folder / STATE_JSON))
        tmp.write_text(json.dumps(record, indent=1))
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def _temporary(folder: Path, name: str) -> Path:
    fd, path = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return Path(path)


def load(folder: Path, model: torch.nn.Module, optimizer, scheduler, expected_recipe: str) -> dict:
    """Restore everything ``save`` wrote; returns the JSON record. Errors name the problem."""
    path = folder / STATE_JSON
    if not path.is_file():
        raise UnrollError("nothing to resume: no training state here", where=str(path))
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UnrollError(f"the training state is not valid JSON ({e})", where=str(path)) from None
    if record.get("recipe") != expected_recipe:
        raise UnrollError("this checkpoint was trained from another recipe: its architecture, objective, layer or "
                          "training settings differ from the ones given now", where=str(path))
    for name, expected in record.get("files", {}).items():
        file = folder / name
        if not file.is_file() or digest(file) != expected:
            raise UnrollError(f"{name} does not match the training state (missing, truncated or replaced)", where=str(file))
    try:
        weights = load_file(str(folder / WEIGHTS))
        tensors = load_file(str(folder / STATE_TENSORS))
    except (SafetensorError, OSError) as e:
        raise UnrollError(f"unreadable checkpoint ({e})", where=str(folder)) from None
    check_state(model.state_dict(), weights, str(folder / WEIGHTS))
    model.load_state_dict(weights)
    optimizer.load_state_dict(_join_optimizer(tensors, record["optimizer"]))
    scheduler.load_state_dict({**record["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    torch.set_rng_state(tensors["rng.torch"])
    return record
