"""A whole network as plain data: a front end, ``depth`` unrolled layers of steps, and a head.

This is what both the Python API and the recipe loader produce, and what the compiler lowers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from unroll.derive.steps import Step
from unroll.errors import UnrollError


@dataclass(frozen=True)
class PatchFrontend:
    """Images (B, C, H, W) -> tokens: p x p patches to the width, a learned cls token, a learned
    positional embedding.

    ``embedding``: ``linear`` flattens each patch as ``(p1 p2 c)`` and applies Linear (CRATE,
    with ``patch_norm`` a LayerNorm before and after it); ``conv`` is a Conv2d with kernel and
    stride p (CRATE-alpha, CRATE-MAE), the same map with the weights laid out ``(c p1 p2)``.
    """

    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    patch_norm: bool = True
    norm_eps: float = 1e-5
    cls_token: bool = True
    #: ``sincos``: the fixed 2-D sin-cos table of MAE (a zero row for cls), stored as a buffer
    positions: Literal["learned", "sincos", "none"] = "learned"
    embedding: Literal["linear", "conv"] = "linear"

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        return self.patches + int(self.cls_token)


@dataclass(frozen=True)
class ClassifierHead:
    """Pool the cls token (or the mean token), LayerNorm, Linear to the classes."""

    classes: int = 1000
    pool: Literal["cls", "mean"] = "cls"
    norm_eps: float = 1e-5


@dataclass(frozen=True)
class MaskedAutoencoder:
    """The masked-autoencoding task of CRATE-MAE (reference section 4): the encoder sees every
    patch, with a learned mask token in place of the ``mask_ratio`` fraction it is denied; a
    decoder of ``depth`` layers of ``layer`` (usually :func:`~unroll.derive.inverse.invert_layer`
    of the encoder's) predicts the pixels; the loss is the mean squared error on masked patches,
    against per-patch normalised pixels when ``norm_pix_loss``. ``norm_eps``: the LayerNorms after
    the encoder and after the decoder."""

    layer: tuple[Step, ...]
    depth: int
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    norm_eps: float = 1e-6


@dataclass(frozen=True)
class Network:
    layer: tuple[Step, ...]
    width: int
    heads: int
    depth: int
    head_dim: int | None = None
    tie_layers: bool = False
    frontend: PatchFrontend = field(default_factory=PatchFrontend)
    head: ClassifierHead = field(default_factory=ClassifierHead)
    name: str = "network"
    #: a masked autoencoder instead of a classifier (then ``head`` is unused)
    decoder: MaskedAutoencoder | None = None

    def sizes(self) -> dict[str, int]:
        """``d``, ``K`` and ``p``; the head dimension defaults to width / heads."""
        if self.head_dim is None and self.width % self.heads:
            raise UnrollError(
                f"heads ({self.heads}) must divide the width ({self.width}), or give head_dim",
                field="architecture.heads",
            )
        return {"d": self.width, "K": self.heads, "p": self.head_dim or self.width // self.heads}
