"""Saving and loading built models' weights: safetensors, written atomically."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unroll.errors import UnrollError
from unroll.files import atomic_write


def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp))


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a safetensors file into ``model``; any key or shape mismatch is an :class:`UnrollError`."""
    path = Path(path)
    if not path.is_file():
        raise UnrollError("no such checkpoint file", where=str(path))
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UnrollError(f"not a readable safetensors file ({e})", where=str(path)) from None
    check_state(model.state_dict(), state, str(path))
    model.load_state_dict(state, strict=True)


def check_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(found[k].shape)}"
        for k in expected
        if k in found and expected[k].shape != found[k].shape
    ]
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if wrong:
        problems.append("shape mismatches: " + "; ".join(wrong))
    if problems:
        raise UnrollError("checkpoint does not fit the model built from the recipe\n  " + "\n  ".join(problems), where=where)
