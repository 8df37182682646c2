"""Read checkpoints of the reference implementations (CRATE, CRATE-alpha, CRATE-MAE, and crate-lm's
CRATE language model) into ``unroll``'s layout.

A layout maps each reference key to a key of the built model, with the rearrangement that takes
the reference tensor to the derivation's shape (e.g. the qkv weight (K p, d) becomes the subspace
bases U of shape (K, d, p)). Per-layer keys map to a step by its position in the layer, so the
recipe may name its steps freely.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from einops import rearrange

from unroll.checkpoint import check_state, save_weights
from unroll.derive.steps import DECODING, SYNTHESIS
from unroll.errors import UnrollError, shorten
from unroll.finite import name_list
from unroll.files import output_folder
from unroll.objective.compression import SUBSPACES
from unroll.objective.lasso import DICTIONARY
from unroll.relax.rules import NORM_BIAS, NORM_WEIGHT, OUTPUT, OUTPUT_BIAS

# per-layer reference key suffix -> (step index in the layer, parameter, einops pattern or None);
# the parameters by the names the terms and relaxations that define them export
_NORM = {"norm.weight": NORM_WEIGHT.attr, "norm.bias": NORM_BIAS.attr}
_MSSA = {
    **_NORM,
    "fn.qkv.weight": (SUBSPACES.attr, "(k p) d -> k d p"),
    "fn.to_out.0.weight": (OUTPUT.attr, "d (k p) -> k d p"),
    "fn.to_out.0.bias": OUTPUT_BIAS.attr,
}


def _step(index: int, table: dict) -> dict[str, tuple[int, str, str | None]]:
    return {f"{index}.{k}": (index, *(v if isinstance(v, tuple) else (v, None))) for k, v in table.items()}


_HEAD = {
    "mlp_head.0.weight": "head.norm.weight",
    "mlp_head.0.bias": "head.norm.bias",
    "mlp_head.1.weight": "head.fc.weight",
    "mlp_head.1.bias": "head.fc.bias",
}


@dataclass(frozen=True)
class Layout:
    name: str
    #: a key only this layout has, to recognise it
    marker: str
    globals: dict[str, str]
    #: (regex of a layer's prefix with the layer index as group 1, model prefix, per-layer table)
    stacks: tuple[tuple[str, str, dict], ...]
    #: keys the reference stores but never uses in its forward; dropped, and said so
    unused: tuple[str, ...] = field(default=())
    #: key -> the key whose tensor it must equal (a tied head stored twice); checked, then dropped
    tied: dict[str, str] = field(default_factory=dict)


CRATE = Layout(
    "CRATE",
    "to_patch_embedding.2.weight",
    {
        "cls_token": "frontend.cls_token",
        "pos_embedding": "frontend.pos_embedding",
        "to_patch_embedding.1.weight": "frontend.patch_norm.weight",
        "to_patch_embedding.1.bias": "frontend.patch_norm.bias",
        "to_patch_embedding.2.weight": "frontend.proj.weight",
        "to_patch_embedding.2.bias": "frontend.proj.bias",
        "to_patch_embedding.3.weight": "frontend.embed_norm.weight",
        "to_patch_embedding.3.bias": "frontend.embed_norm.bias",
        **_HEAD,
    },
    ((r"transformer\.layers\.(\d+)\.", "encoder", {**_step(0, _MSSA), **_step(1, {**_NORM, "fn.weight": DICTIONARY.attr})}),),
)
CRATE_ALPHA = Layout(
    "CRATE-alpha",
    "conv1.weight",
    {
        "cls_token": "frontend.cls_token",
        "pos_embedding": "frontend.pos_embedding",
        "conv1.weight": "frontend.proj.weight",
        "conv1.bias": "frontend.proj.bias",
        **_HEAD,
    },
    ((r"transformer\.layers\.(\d+)\.", "encoder", {**_step(0, _MSSA), **_step(1, {**_NORM, "fn.D": DICTIONARY.attr, "fn.D1": DECODING.attr})}),),
)
CRATE_MAE = Layout(
    "CRATE-MAE",
    "decoder_pos_embed",
    {
        "cls_token": "frontend.cls_token",
        "mask_token": "mask_token",
        "decoder_pos_embed": "frontend.pos_embedding",
        "patch_embed.proj.weight": "frontend.proj.weight",
        "patch_embed.proj.bias": "frontend.proj.bias",
        "norm.weight": "norm.weight",
        "norm.bias": "norm.bias",
        "decoder_norm.weight": "decoder_norm.weight",
        "decoder_norm.bias": "decoder_norm.bias",
        "decoder_pred.weight": "decoder_pred.weight",
        "decoder_pred.bias": "decoder_pred.bias",
    },
    (
        (r"blocks\.(\d+)\.layers\.0\.", "encoder", {**_step(0, _MSSA), **_step(1, {**_NORM, "fn.weight": DICTIONARY.attr})}),
        (r"decoder_blocks\.(\d+)\.layers\.0\.", "decoder", {**_step(0, {**_NORM, "fn.weight": SYNTHESIS.attr}), **_step(1, _MSSA)}),
    ),
    unused=("pos_embed", "decoder_embed.weight", "decoder_embed.bias"),
)
CRATE_GPT = Layout(
    "CRATE-GPT (crate-lm)",
    "transformer.wte.weight",
    {
        "transformer.wte.weight": "frontend.wte.weight",
        "transformer.wpe.weight": "frontend.wpe.weight",
        "transformer.ln_f.weight": "head.norm.weight",
        "transformer.ln_f.bias": "head.norm.bias",
    },
    ((r"transformer\.h\.(\d+)\.", "encoder", {
        "prenorm_1.weight": (0, NORM_WEIGHT.attr, None),
        "prenorm_1.bias": (0, NORM_BIAS.attr, None),
        "attn.c_attn.weight": (0, SUBSPACES.attr, "(k p) d -> k d p"),  # the one projection: q = k = v
        "attn.c_proj.weight": (0, OUTPUT.attr, "d (k p) -> k d p"),
        "attn.c_proj.bias": (0, OUTPUT_BIAS.attr, None),
        "prenorm_2.weight": (1, NORM_WEIGHT.attr, None),
        "prenorm_2.bias": (1, NORM_BIAS.attr, None),
        "ista.weight": (1, DICTIONARY.attr, "m d -> d m"),  # stored as D^T (4d, d)
    }),),
    tied={"lm_head.weight": "transformer.wte.weight"},
)
LAYOUTS = (CRATE, CRATE_ALPHA, CRATE_MAE, CRATE_GPT)


def read_reference(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a .pth file (bare, or under ``state_dict`` / ``model``), ``module.`` stripped."""
    path = Path(path)
    if not path.is_file():
        raise UnrollError("no such checkpoint file", where=str(path))
    if path.stat().st_size == 0:
        raise UnrollError("not a PyTorch checkpoint: the file is empty", where=str(path))
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then reads or refuses anyway
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise UnrollError(_unreadable(e), where=str(path)) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UnrollError("expected a state_dict of tensors (or one under 'state_dict' or 'model')", where=str(path))
    # DDP saves keys under "module.", a torch.compile'd model under "_orig_mod."
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def _unreadable(e: Exception) -> str:
    """torch's error, told short: without its advice to retry with ``weights_only=False``, which
    would let the file run arbitrary code."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if found := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return (f"the checkpoint holds a Python object ({found.group(1)}), not only tensors; unroll loads tensors "
                "only, as unpickling objects could run code: save just the state_dict (torch.save(model.state_dict(), F))")
    text = text.split("WeightsUnpickler error:", 1)[-1]  # past torch's advice, to its reason
    reason = next((line.strip() for line in text.splitlines() if line.strip()), "").split(". ")[0]
    return f"not a PyTorch checkpoint, or a damaged one ({type(e).__name__}{': ' + reason[:100] if reason else ''})"


def detect_layout(reference: dict[str, torch.Tensor], where: str) -> Layout:
    found = [layout for layout in LAYOUTS if layout.marker in reference]
    if len(found) != 1:
        markers = ", ".join(f"{layout.marker} ({layout.name})" for layout in LAYOUTS)
        raise UnrollError(f"cannot tell which reference layout this is; expected exactly one of the keys {markers}", where=where)
    return found[0]


def convert_reference(
    reference: dict[str, torch.Tensor], model: torch.nn.Module, where: str
) -> tuple[dict[str, torch.Tensor], Layout, list[str]]:
    """Map a reference state_dict onto ``model``: (state, layout, dropped unused keys)."""
    layout = detect_layout(reference, where)
    heads = model.network.heads
    stacks = [(re.compile(rx), prefix, table) for rx, prefix, table in layout.stacks]
    out, unexpected, dropped = {}, [], []
    for key, tensor in reference.items():
        if key in layout.globals:
            out[layout.globals[key]] = tensor
        elif key in layout.unused:
            dropped.append(key)
        elif key in layout.tied:
            twin = reference.get(layout.tied[key])
            if twin is None or not torch.equal(twin, tensor):
                raise UnrollError(f"{key} must equal {layout.tied[key]} (the model ties them: one tensor), and "
                                  "it does not", where=where)
        elif (target := _layer_target(key, stacks, model)) is not None:
            attr_key, pattern = target
            if pattern:
                try:
                    tensor = rearrange(tensor, pattern, **({"k": heads} if re.search(r"\bk\b", pattern) else {}))
                except Exception as e:
                    raise UnrollError(f"{shorten(key)}: cannot split {tuple(tensor.shape)} into {heads} heads ({str(e)[:200]})", where=where) from None
            if attr_key in out and not torch.equal(out[attr_key], tensor):
                # the recipe ties layers the reference trained apart: keeping one would be silent
                raise UnrollError(f"{shorten(key)} and another reference layer both map to {attr_key}, with "
                                  "different weights: the recipe shares one set of parameters between layers "
                                  "the checkpoint trained separately", where=where)
            out[attr_key] = tensor
        else:
            unexpected.append(key)
    if unexpected:
        raise UnrollError(f"unexpected keys for a {layout.name} checkpoint: {name_list(sorted(map(shorten, unexpected)))}",
                          where=where)
    check_state(model.state_dict(), out, where)
    return out, layout, dropped


def _layer_target(key: str, stacks, model: torch.nn.Module) -> tuple[str, str | None] | None:
    """The model key (and rearrangement) of a per-layer reference key, or None."""
    for rx, prefix, table in stacks:
        match = rx.match(key)
        if match and key[match.end():] in table:
            index, attr, pattern = table[key[match.end():]]
            layers = getattr(model.plan, prefix).layers  # the reference's layer i is our layer i + 1
            number = int(match.group(1))
            if number >= len(layers):
                return None
            layer = layers[number]
            if index < len(layer.steps):
                return f"{prefix}.layers.{layer.module}.steps.{layer.steps[index].name}.{attr}", pattern
    return None


def convert(recipe, checkpoint: str | Path, out: str | Path) -> tuple[Path, Layout, list[str]]:
    """``unroll convert``: read a reference checkpoint, check it against RECIPE, write safetensors."""
    from unroll.api import build

    out = Path(out)
    if out.is_dir():  # checked first: a bad --out should not cost a read of a large checkpoint
        raise UnrollError("--out must name a file (e.g. model.safetensors), and this is a folder", where=str(out))
    output_folder(out.parent, "the folder of --out")
    reference = read_reference(checkpoint)  # a missing or foreign file fails before the model is built
    detect_layout(reference, str(checkpoint))
    model = build(recipe)  # names the recipe in its errors
    state, layout, dropped = convert_reference(reference, model, str(checkpoint))
    return save_weights(state, out), layout, dropped
