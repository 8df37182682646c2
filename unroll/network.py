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
    """Images (B, C, H, W) -> tokens: p x p patches flattened as ``(p1 p2 c)``, LayerNorm,
    Linear to the width, LayerNorm; a learned cls token; a learned positional embedding."""

    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    patch_norm: bool = True
    norm_eps: float = 1e-5
    cls_token: bool = True
    positions: Literal["learned", "none"] = "learned"

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

    def sizes(self) -> dict[str, int]:
        """``d``, ``K`` and ``p``; the head dimension defaults to width / heads."""
        if self.head_dim is None and self.width % self.heads:
            raise UnrollError(
                f"heads ({self.heads}) must divide the width ({self.width}), or give head_dim",
                field="architecture.heads",
            )
        return {"d": self.width, "K": self.heads, "p": self.head_dim or self.width // self.heads}
