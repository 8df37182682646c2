"""The cls token's attention over the patches, per head: the emergent segmentation of CRATE.

The similarity a compression step computes is found in its derived update (the ``softmax`` node
the relaxation introduced) and evaluated on the step's actual input with the plain lowering, so
this works for any recipe whose layer has a softmax similarity, whatever its other steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from unroll.errors import UnrollError
from unroll.expr.nodes import Softmax
from unroll.files import bytes_writer, png_bytes, write_files
from unroll.images import read_image
from unroll.lower.model import step_input
from unroll.plan import DerivedStep


def _similarity(steps: tuple[DerivedStep, ...]) -> tuple[DerivedStep, Softmax] | None:
    """The first step whose computed update compares tokens through a softmax, and that softmax."""
    for derived in steps:
        u = derived.final
        found = list(u.out.atoms(Softmax)) + [
            a for _, e in u.where if getattr(e, "is_Matrix", False) for a in e.atoms(Softmax)]
        if found:
            return derived, found[0]
    return None


def cls_attention(model, images: torch.Tensor, layer: int) -> torch.Tensor:
    """(B, K, L): for each head, the attention weights of the cls token over the L patches
    in the compression step of ``layer``, counted from 1 across groups like ``unroll attention --layer``."""
    if not model.network.frontend.cls_token:
        raise UnrollError("the attention of the cls token needs a recipe with cls_token: true")
    layers = model.plan.encoder.layers
    if not 1 <= layer <= len(layers):
        raise UnrollError(f"--layer must be between 1 and {len(layers)}, found {layer}")
    planned = layers[layer - 1]
    found = _similarity(planned.steps)
    if found is None:
        having = [str(x.number) for x in layers if _similarity(x.steps) is not None]
        hint = f"; layers with one: {', '.join(having)}" if having else ""
        raise UnrollError(f"layer {layer} has no softmax similarity (attention) to look at{hint}")
    derived, softmax = found
    step, Z = step_input(model, layer, derived.name, images)  # (B, d, N), tokens as columns
    with torch.no_grad():
        similarity = step.evaluate(softmax, Z)  # (B, K, N, N): column j is token j's weights
    return similarity[:, :, 1:, 0]


def save_overlays(image: torch.Tensor, attention: torch.Tensor, folder: Path, grid: int) -> list[Path]:
    """One PNG per head (the image with the head's attention over it) and ``heads.png`` with all,
    written together: all of them or none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picture = image.permute(1, 2, 0).numpy()
    picture = (picture - picture.min()) / max(1e-8, float(picture.max() - picture.min()))
    size = picture.shape[0]
    maps = attention.reshape(attention.shape[0], grid, grid).numpy()
    cells = size // grid

    def draw(ax, k):
        ax.imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray")
        ax.imshow(np.kron(maps[k], np.ones((cells, cells))), cmap="inferno", alpha=0.6)
        ax.set_title(f"head {k + 1}", fontsize=9)
        ax.axis("off")

    pngs = {}
    for k in range(maps.shape[0]):
        fig, ax = plt.subplots(figsize=(3, 3))
        draw(ax, k)
        pngs[f"head_{k + 1}.png"] = png_bytes(fig, dpi=100, bbox_inches="tight")
    cols = min(4, maps.shape[0])
    rows = -(-maps.shape[0] // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        draw(ax, k) if k < maps.shape[0] else ax.axis("off")
    pngs["heads.png"] = png_bytes(fig, dpi=100, bbox_inches="tight")
    return write_files(folder, {name: bytes_writer(data) for name, data in pngs.items()})


def load_image(path: str | Path, image_size: int, channels: int) -> torch.Tensor:
    """(C, H, W) in [0, 1], converted to the recipe's channels and resized to its image size."""
    return read_image(path, image_size, channels, strict=False)
