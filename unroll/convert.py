"""Read checkpoints of the reference CRATE implementation into ``unroll``'s layout.

A layout maps each reference key to a key of the built model, with the rearrangement that
takes the reference tensor to the derivation's shape (e.g. the qkv weight (K p, d) becomes the
subspace bases U of shape (K, d, p)).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from einops import rearrange

from unroll.checkpoint import check_state, save_weights
from unroll.errors import UnrollError

# reference key (per layer ``i``) -> (step index in the layer, parameter, einops pattern or None)
CRATE_LAYER = {
    "0.norm.weight": (0, "norm_weight", None),
    "0.norm.bias": (0, "norm_bias", None),
    "0.fn.qkv.weight": (0, "U", "(k p) d -> k d p"),
    "0.fn.to_out.0.weight": (0, "O", "d (k p) -> k d p"),
    "0.fn.to_out.0.bias": (0, "b", None),
    "1.norm.weight": (1, "norm_weight", None),
    "1.norm.bias": (1, "norm_bias", None),
    "1.fn.weight": (1, "D", None),
}
CRATE_GLOBAL = {
    "cls_token": "frontend.cls_token",
    "pos_embedding": "frontend.pos_embedding",
    "to_patch_embedding.1.weight": "frontend.patch_norm.weight",
    "to_patch_embedding.1.bias": "frontend.patch_norm.bias",
    "to_patch_embedding.2.weight": "frontend.proj.weight",
    "to_patch_embedding.2.bias": "frontend.proj.bias",
    "to_patch_embedding.3.weight": "frontend.embed_norm.weight",
    "to_patch_embedding.3.bias": "frontend.embed_norm.bias",
    "mlp_head.0.weight": "head.norm.weight",
    "mlp_head.0.bias": "head.norm.bias",
    "mlp_head.1.weight": "head.fc.weight",
    "mlp_head.1.bias": "head.fc.bias",
}
_LAYER_KEY = re.compile(r"transformer\.layers\.(\d+)\.(.+)")


def read_reference(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a .pth file (bare, or under ``state_dict`` / ``model``), ``module.`` stripped."""
    path = Path(path)
    if not path.is_file():
        raise UnrollError("no such checkpoint file", where=str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise UnrollError(f"cannot read the checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})", where=str(path)) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UnrollError("expected a state_dict of tensors (or one under 'state_dict' or 'model')", where=str(path))
    return {k.removeprefix("module."): v for k, v in obj.items()}


def convert_crate(reference: dict[str, torch.Tensor], model: torch.nn.Module, where: str) -> dict[str, torch.Tensor]:
    """Map a reference CRATE state_dict onto ``model`` (built from a CRATE recipe)."""
    steps = list(model.layer(0).steps.keys())
    heads = model.network.heads
    out, unexpected = {}, []
    for key, tensor in reference.items():
        match = _LAYER_KEY.fullmatch(key)
        if key in CRATE_GLOBAL:
            out[CRATE_GLOBAL[key]] = tensor
        elif match and match.group(2) in CRATE_LAYER and len(steps) == 2:
            step, attr, pattern = CRATE_LAYER[match.group(2)]
            if pattern:
                try:
                    tensor = rearrange(tensor, pattern, k=heads)
                except Exception as e:
                    raise UnrollError(f"{key}: cannot split {tuple(tensor.shape)} into {heads} heads ({e})", where=where) from None
            out[f"layers.{match.group(1)}.steps.{steps[step]}.{attr}"] = tensor
        else:
            unexpected.append(key)
    if unexpected:
        raise UnrollError("unexpected keys for a CRATE checkpoint: " + ", ".join(sorted(unexpected)), where=where)
    check_state(model.state_dict(), out, where)
    return out


def convert(recipe, checkpoint: str | Path, out: str | Path) -> Path:
    """``unroll convert``: read a reference checkpoint, check it against RECIPE, write safetensors."""
    from unroll.api import build

    model = build(recipe)
    state = convert_crate(read_reference(checkpoint), model, str(checkpoint))
    save_weights(state, out)
    return Path(out)
