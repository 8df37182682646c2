"""The parts of a network that are not derived from an objective: tokenizer and classifier."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from unroll.network import ClassifierHead, PatchFrontend


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    r"""The fixed positional table of MAE, (grid², width), row-major over the patch grid.

    For the patch in row r and column c, the first half of the entries encodes c and the second
    half r, each as ``[sin(x ω), cos(x ω)]`` with ``ω_i = 10000^{-i/(width/4)}``, i < width/4.
    """
    if width % 4:
        raise ValueError(f"a 2-D sin-cos table needs a width divisible by 4, found {width}")
    omega = 10000.0 ** -(torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def encode(x: torch.Tensor) -> torch.Tensor:
        angles = x.reshape(-1, 1).double() * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


#: attribute names other stages address (fine-tuning's loading rules, unroll.train.init): the
#: positional table, the LayerNorm over a patch's pixels, the patch projection, the classifier
POSITIONS = "pos_embedding"
PATCH_NORM = "patch_norm"
PROJECTION = "proj"
CLASSIFIER = "fc"


class PatchEmbedding(nn.Module):
    def __init__(self, spec: PatchFrontend, width: int):
        super().__init__()
        self.spec = spec
        p = spec.patch_size
        patch_dim = spec.channels * p**2
        if spec.embedding == "pixels":
            pass  # no parameters; plan checks the width
        elif spec.embedding == "conv":
            self.proj = nn.Conv2d(spec.channels, width, kernel_size=p, stride=p)
        else:
            if spec.patch_norm:
                self.patch_norm = nn.LayerNorm(patch_dim, eps=spec.norm_eps)
            self.proj = nn.Linear(patch_dim, width)
            if spec.patch_norm:
                self.embed_norm = nn.LayerNorm(width, eps=spec.norm_eps)
        if spec.cls_token:
            self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        if spec.positions == "learned":
            self.pos_embedding = nn.Parameter(torch.randn(1, spec.tokens, width))
        elif spec.positions == "sincos":
            grid = spec.image_size // p
            table = sincos_2d(grid, width)
            if spec.cls_token:
                table = torch.cat([torch.zeros(1, width), table])
            self.register_buffer(POSITIONS, table[None])

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, d): one embedded token per patch, row-major over the grid."""
        p = self.spec.patch_size
        if self.spec.embedding == "pixels":  # onto the sphere (a blank patch stays 0: the norm is floored)
            x = rearrange(images, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)
            return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
        if self.spec.embedding == "conv":
            return self.proj(images).flatten(2).mT
        x = rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)
        if self.spec.patch_norm:
            return self.embed_norm(self.proj(self.patch_norm(x)))
        return self.proj(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, d) tokens as rows."""
        x = self.patches(images)
        if self.spec.cls_token:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.spec.positions != "none":
            x = x + self.pos_embedding
        return x


class Classifier(nn.Module):
    def __init__(self, spec: ClassifierHead, width: int):
        super().__init__()
        self.pool = spec.pool
        self.norm = nn.LayerNorm(width, eps=spec.norm_eps)
        self.fc = nn.Linear(width, spec.classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, d) -> (B, classes)."""
        pooled = tokens[:, 0] if self.pool == "cls" else tokens.mean(dim=1)
        return self.fc(self.norm(pooled))
