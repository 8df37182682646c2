"""The parts of a network that are not derived from an objective: tokenizer and classifier."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from unroll.network import ClassifierHead, PatchFrontend


class PatchEmbedding(nn.Module):
    def __init__(self, spec: PatchFrontend, width: int):
        super().__init__()
        self.spec = spec
        patch_dim = spec.channels * spec.patch_size**2
        if spec.patch_norm:
            self.patch_norm = nn.LayerNorm(patch_dim, eps=spec.norm_eps)
        self.proj = nn.Linear(patch_dim, width)
        if spec.patch_norm:
            self.embed_norm = nn.LayerNorm(width, eps=spec.norm_eps)
        if spec.cls_token:
            self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        if spec.positions == "learned":
            self.pos_embedding = nn.Parameter(torch.randn(1, spec.tokens, width))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, d) tokens as rows."""
        p = self.spec.patch_size
        x = rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)
        if self.spec.patch_norm:
            x = self.embed_norm(self.proj(self.patch_norm(x)))
        else:
            x = self.proj(x)
        if self.spec.cls_token:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.spec.positions == "learned":
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
