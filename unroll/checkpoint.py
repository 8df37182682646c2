"""Saving and loading built models' weights: safetensors with a digest of the tensors.

``save_weights`` stores, in the file's safetensors ``__metadata__``, the format version
(:data:`FORMAT_KEY`) and a sha256 over the sorted tensor names, dtypes, shapes and raw bytes
(:data:`DIGEST_KEY`); ``load_weights`` recomputes it, so flipped bytes in the data section are an
error rather than silently wrong weights. Loading also refuses NaN/inf tensors and tensors that
do not fit the model, and converts other floating dtypes (with a note). Files are written whole
(temporary name, fsync, rename): a crash never leaves half a checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as encode_safetensors

from unroll.errors import UnrollError, excerpt, note, shorten
from unroll.files import Writer, atomic_write, bytes_writer
from unroll.finite import name_list, nonfinite_names

#: ``__metadata__`` key of the format version of a file ``save_weights`` wrote
FORMAT_KEY = "unroll.format"
#: ``__metadata__`` key of the sha256 of the tensors (see :func:`tensor_digest`)
DIGEST_KEY = "unroll.sha256"
FORMAT = "1"


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted names, dtypes, shapes and raw bytes: independent of the file's
    header layout, so it checks what is loaded, not how it was serialised."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # any dtype, bfloat16 included, as bytes
    return h.hexdigest()


def encode(state: dict[str, torch.Tensor]) -> bytes:
    """The safetensors bytes of ``state``, with the format version and the digest."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    return encode_safetensors(tensors, metadata={FORMAT_KEY: FORMAT, DIGEST_KEY: tensor_digest(tensors)})


def weights_writer(state: dict[str, torch.Tensor]) -> Writer:
    """Writes :func:`encode` of ``state`` (encoded now, so later edits of the weights don't show)."""
    return bytes_writer(encode(state))


def save_encoded(data: bytes, path: str | Path) -> Path:
    """Write bytes :func:`encode` returned (a training checkpoint reuses its own for the user's copy)."""
    return atomic_write(Path(path), bytes_writer(data))


def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    return save_encoded(encode(state), path)


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, its digest verified (a file without one, from an
    older ``unroll`` or elsewhere, loads with a note)."""
    path = Path(path)
    if not path.is_file():
        raise UnrollError("no such checkpoint file", where=str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except PermissionError:
        raise UnrollError("cannot read this file: permission denied", where=str(path)) from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).rsplit(": ", 1)[-1][:80] or type(e).__name__  # safetensors' reason, not its whole chain
        raise UnrollError(f"not a safetensors checkpoint (truncated, or another format: {reason})", where=str(path)) from None
    version = metadata.get(FORMAT_KEY, FORMAT)
    if version != FORMAT:
        raise UnrollError(f"expected checkpoint format {FORMAT}, found format {excerpt(version)} (written by another "
                          "version of unroll)", where=str(path))
    if DIGEST_KEY not in metadata:
        note("this checkpoint carries no digest of its tensors, so it cannot be checked for corruption", str(path))
    elif tensor_digest(tensors) != metadata[DIGEST_KEY]:
        raise UnrollError("the tensors do not match the digest stored with them (corrupted file)", where=str(path))
    return tensors


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse NaN/inf: such weights make every output NaN, far from where they came from."""
    bad = nonfinite_names(state)
    if bad:
        raise UnrollError(f"NaN or inf values in {len(bad)} tensor(s): {name_list(bad)}", where=where)


def check_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(shorten(k) for k in set(found) - set(expected))
    wrong = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(found[k].shape)}"
             for k in expected if k in found and expected[k].shape != found[k].shape]
    problems = []  # each list cut short: a foreign file may have thousands of keys
    if missing:
        problems.append(f"missing keys: {name_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {name_list(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {name_list(wrong, sep='; ')}")  # '; ': shapes hold commas
    if problems:
        ours, theirs = model_kind(expected), model_kind(found)
        what = f": these are the weights of {theirs}, the recipe builds {ours}" if theirs and ours and theirs != ours else ""
        raise UnrollError(f"checkpoint does not fit the model built from the recipe{what}\n  " + "\n  ".join(problems),
                          where=where)


def model_kind(state: dict[str, torch.Tensor]) -> str | None:
    """"a language model" or "an image model", by the front end the keys name; None if neither."""
    from unroll.lower.language import TOKENS
    from unroll.lower.model import FRONTEND

    if any(k.startswith(f"{FRONTEND}.{TOKENS}.") for k in state):
        return "a language model"
    if any(k.startswith(f"{FRONTEND}.") for k in state):
        return "an image model"
    return None


def fit(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """``found`` checked against the model's ``expected`` state: keys, shapes, finite values and
    dtypes; another floating dtype is converted (and said), anything else refused."""
    check_state(expected, found, where)
    check_finite(found, where)
    refused = [f"{k} ({found[k].dtype}, expected {expected[k].dtype})" for k in expected
               if found[k].dtype != expected[k].dtype
               and not (found[k].is_floating_point() and expected[k].is_floating_point())]
    if refused:
        raise UnrollError(f"tensors of the wrong kind: {name_list(refused)}", where=where)
    state = {k: v.to(expected[k].dtype) for k, v in found.items()}
    if overflow := nonfinite_names(state):  # checked after converting: 1e300 is finite in float64, inf in float32
        raise UnrollError(f"values too large for the model's dtype (they become inf) in {len(overflow)} tensor(s): "
                          f"{name_list(overflow)}", where=where)
    converted = sorted({f"{found[k].dtype} to {expected[k].dtype}".replace("torch.", "")
                        for k in expected if found[k].dtype != expected[k].dtype})
    if converted:
        note(f"converted tensors from {', '.join(converted)} to fit the model", where)
    return state


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a safetensors file into ``model``; every problem is an :class:`UnrollError`."""
    state = fit(model.state_dict(), read_tensors(path), str(path))
    model.load_state_dict(state, strict=True)
