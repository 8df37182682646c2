"""Starting a model from another run's weights, for fine-tuning (``unroll train RECIPE --init F``).

:func:`initialise` loads a safetensors file (or a run folder's ``model.safetensors``) into a model
built from a recipe that may differ from the checkpoint's in what fine-tuning usually changes:
the number of classes, the image size, the patch size. The rules:

1. Every tensor with the same name and shape is copied exactly.
2. A classifier (``head.fc.weight``, ``head.fc.bias``) whose class count differs, at the same
   width, keeps the model's fresh initialisation (noted).
3. A learned positional embedding whose number of rows differs because the image size or patch
   size differs: the leading non-grid rows (the cls row; the model's row count minus its grid
   cells) are copied, and the grid rows are resampled as a square image to the model's grid
   (side = image_size // patch_size): bicubic, ``align_corners=False``, no antialiasing, as timm's
   ``resample_abs_pos_embed`` does (noted). A row count that is not the same leading rows plus a
   square grid is an error.
4. A patch embedding whose shape differs (the patch LayerNorm over C p² and the projection from
   it, or a convolution's kernel, when the patch size changed) at the same width cannot be reused:
   those tensors keep their fresh initialisation (noted by name).
5. Anything else is an :class:`~unroll.errors.UnrollError` naming the file, which lists in one
   message the tensors that differ in shape (checkpoint vs model), those the model needs that the
   checkpoint lacks and those the checkpoint has that the model does not. A file that is not a
   readable safetensors file, a digest that does not match, and NaN/inf anywhere in the
   checkpoint are errors too (:func:`unroll.checkpoint.read_tensors`, ``check_finite``).
6. Buffers (tensors in the state dict that are not learned) follow the same rules, with one
   difference for a positional table: a fixed one (``positions: sincos``) whose grid differs is
   not resampled but kept as the model computed it, since it is a function of the grid and the
   model's own table is the exact one for its size (noted; an unexplainable size is still an
   error).

Another floating dtype is converted to the model's (noted); any other dtype change is an error.
Everything is validated before anything is copied: after an error the model is untouched.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from unroll.checkpoint import check_finite, read_tensors
from unroll.errors import UnrollError, shorten
from unroll.finite import name_list, nonfinite_names
from unroll.lower import frontend as lowered
from unroll.lower.model import FRONTEND, HEAD
from unroll.train.state import weights_in

#: the positional embedding (a parameter when learned, a buffer when sin-cos)
POSITIONS = f"{FRONTEND}.{lowered.POSITIONS}"
#: the classifier's Linear(width -> classes)
CLASSIFIER = (f"{HEAD}.{lowered.CLASSIFIER}.weight", f"{HEAD}.{lowered.CLASSIFIER}.bias")
#: the patch embedding's tensors whose shape follows the patch size (the LayerNorm over C p² and
#: the projection's weight; its bias and the LayerNorm after it are over the width)
PATCH_NORM = (f"{FRONTEND}.{lowered.PATCH_NORM}.weight", f"{FRONTEND}.{lowered.PATCH_NORM}.bias")
PROJECTION = f"{FRONTEND}.{lowered.PROJECTION}.weight"


def initialise(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Load the weights in ``path`` (a safetensors file, or a run folder holding
    ``model.safetensors``) into ``model`` in place, by the rules of this module; returns a note
    for everything that was not a plain copy. Raises :class:`UnrollError`, leaving the model
    untouched, where the checkpoint does not fit."""
    file = weights_in(path)
    where = str(file)
    found = read_tensors(file)
    check_finite(found, where)  # even in tensors left unused: NaN anywhere means a diverged run
    target = model.state_dict()
    learned = {name for name, _ in model.named_parameters()}

    differ = [k for k in target if k in found and found[k].shape != target[k].shape]
    missing = [k for k in target if k not in found]
    extra = [k for k in found if k not in target]
    state = {k: found[k] for k in target if k in found and found[k].shape == target[k].shape}
    notes: list[str] = []
    explained: set[str] = set()
    reasons: list[str] = []

    if classifier := _classifier_change(target, found):
        names, note = classifier
        explained |= names
        notes.append(note)
    if POSITIONS in differ:
        resampled, note, reason = _positions(model, target[POSITIONS], found[POSITIONS], POSITIONS in learned)
        if reason:
            reasons.append(reason)
        if note:
            explained.add(POSITIONS)
            notes.append(note)
            if resampled is not None:
                state[POSITIONS] = resampled
    if patch := _patch_change(target, found, differ):
        names, note = patch
        explained |= names
        notes.append(note)

    unexplained = [k for k in differ if k not in explained]
    if unexplained or missing or extra:
        problems = []  # each list cut short: a foreign file may have thousands of keys
        if unexplained:
            shapes = [f"{k}: {tuple(found[k].shape)} in the checkpoint, {tuple(target[k].shape)} in the model"
                      for k in unexplained]
            problems.append(f"shape mismatches: {name_list(shapes, sep='; ')}")  # '; ': shapes hold commas
        problems.extend(reasons)
        if missing:
            problems.append(f"missing from the checkpoint: {name_list(missing)}")
        if extra:
            problems.append(f"not in the model: {name_list([shorten(k) for k in extra])}")
        raise UnrollError("the checkpoint does not fit the model, even with a new classifier, a resampled "
                          "positional embedding and a new patch embedding\n  " + "\n  ".join(problems), where=where)

    state, converted = _to_model_dtypes(target, state, where)
    if converted:
        notes.append(f"converted tensors from {', '.join(converted)} to fit the model")
    with torch.no_grad():  # the state dict's tensors share storage with the model's
        for name, tensor in state.items():
            target[name].copy_(tensor)
    return notes


def _classifier_change(target: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> tuple[set[str], str] | None:
    """The classifier's names and a note when only its class count differs, else None (and any
    difference is left to the error)."""
    weight, bias = CLASSIFIER
    if weight not in target or weight not in found:
        return None
    new, old = target[weight], found[weight]
    if new.ndim != 2 or old.ndim != 2 or new.shape[1] != old.shape[1] or new.shape[0] == old.shape[0]:
        return None  # same classes, or another width: not a classifier swap
    names = {weight}
    if bias in target or bias in found:
        # a bias that does not match its own weight's class count is not explained by new classes
        if bias not in target or bias not in found or target[bias].shape != (new.shape[0],) \
                or found[bias].shape != (old.shape[0],):
            return None
        names.add(bias)
    return names, (f"the classifier is new: {old.shape[0]} classes in the checkpoint, {new.shape[0]} here "
                   f"({', '.join(sorted(names, reverse=True))} keep their fresh initialisation)")


def _positions(model: torch.nn.Module, new: torch.Tensor, old: torch.Tensor,
               learned: bool) -> tuple[torch.Tensor | None, str, str]:
    """(the tensor to load, or None to keep the model's; a note, '' when the difference is not
    explained; why not, '' where the shape mismatch says it all)."""
    shapes = f"{tuple(old.shape)} in the checkpoint, {tuple(new.shape)} in the model"
    side = _grid_side(model)
    if side is None or new.ndim != 3 or old.ndim != 3 or new.shape[0] != old.shape[0] or new.shape[2] != old.shape[2]:
        return None, "", ""  # another width: listed with the other shape mismatches
    leading = new.shape[1] - side * side  # the cls row(s): what the model has beyond its grid
    cells = old.shape[1] - leading
    old_side = math.isqrt(cells) if cells > 0 else 0
    if leading < 0 or old_side == 0 or old_side * old_side != cells:
        return None, "", (f"{POSITIONS} ({shapes}) cannot be resampled: {old.shape[1]} rows are not "
                          f"{leading} leading row(s) and a square grid of patches")
    sizes = f"{old_side}x{old_side} to {side}x{side} patches"
    if not learned:
        return None, f"the fixed positional table is the model's own for {side}x{side} patches (the checkpoint's is " \
                     f"for {old_side}x{old_side})", ""
    # bicubic needs float32 at least on the CPU; the result is converted to the model's dtype later
    work = old if old.dtype in (torch.float32, torch.float64) else old.float()
    grid = work[:, leading:].reshape(old.shape[0], old_side, old_side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(old.shape[0], side * side, -1)
    return torch.cat([work[:, :leading], grid], dim=1), f"positional embedding interpolated from {sizes}", ""


def _grid_side(model: torch.nn.Module) -> int | None:
    """The side of the model's square patch grid, from its front end's spec (None if it has none)."""
    try:
        spec = model.get_submodule(FRONTEND).spec
        return int(spec.image_size) // int(spec.patch_size)
    except (AttributeError, TypeError, ValueError):
        return None


def _patch_change(target: dict[str, torch.Tensor], found: dict[str, torch.Tensor],
                  differ: list[str]) -> tuple[set[str], str] | None:
    """The patch embedding's differing tensors and a note when the projection still maps to the
    model's width and the patch LayerNorm matches the projection's input in each, else None."""
    names = [k for k in (*PATCH_NORM, PROJECTION) if k in differ]
    if not names or PROJECTION not in target or PROJECTION not in found:
        return None
    new, old = target[PROJECTION], found[PROJECTION]
    if new.ndim != old.ndim or new.ndim < 2 or new.shape[0] != old.shape[0]:
        return None  # another width, or a linear embedding against a convolution
    for state, proj in ((target, new), (found, old)):
        inputs = math.prod(proj.shape[1:])
        if any(k in state and state[k].shape != (inputs,) for k in PATCH_NORM if k in differ):
            return None
    fresh = ", ".join(f"{k} {tuple(found[k].shape)} -> {tuple(target[k].shape)}" for k in names)
    return set(names), f"the patch embedding cannot be reused (the patch size differs): {fresh} keep their fresh " \
                       f"initialisation"


def _to_model_dtypes(target: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                     where: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` in the model's dtypes, and the conversions made: floating to floating only."""
    refused = [f"{k} ({v.dtype}, expected {target[k].dtype})" for k, v in state.items()
               if v.dtype != target[k].dtype and not (v.is_floating_point() and target[k].is_floating_point())]
    if refused:
        raise UnrollError(f"tensors of the wrong kind: {name_list(refused)}", where=where)
    converted = sorted({f"{v.dtype} to {target[k].dtype}".replace("torch.", "")
                        for k, v in state.items() if v.dtype != target[k].dtype})
    state = {k: v.to(target[k].dtype) for k, v in state.items()}
    if overflow := nonfinite_names(state):  # 1e300 is finite in float64, inf in float32
        raise UnrollError(f"values too large for the model's dtype (they become inf) in {len(overflow)} tensor(s): "
                          f"{name_list(overflow)}", where=where)
    return state, converted
