"""Independent eager reference of the CRATE image classifier (ground truth for tests).

Mirrors the reference implementation's computation literally, operating directly on a
state_dict with the reference key names. Deliberately does not import `unroll`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

LN_EPS = 1e-5
ISTA_STEP_SIZE = 0.1  # eta
ISTA_LAMBD = 0.1  # lambda


@dataclass
class CrateConfig:
    image_size: int = 32
    patch_size: int = 8
    channels: int = 3
    dim: int = 48
    heads: int = 4
    depth: int = 2
    num_classes: int = 10
    pool: str = "cls"  # 'cls' or 'mean'

    @property
    def dim_head(self) -> int:
        return self.dim // self.heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size**2


def reference_shapes(cfg: CrateConfig) -> dict[str, tuple[int, ...]]:
    """Every reference state_dict key with its shape, in reference order."""
    d, inner, pd = cfg.dim, cfg.heads * cfg.dim_head, cfg.patch_dim
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embedding": (1, cfg.num_patches + 1, d),
        "to_patch_embedding.1.weight": (pd,),
        "to_patch_embedding.1.bias": (pd,),
        "to_patch_embedding.2.weight": (d, pd),
        "to_patch_embedding.2.bias": (d,),
        "to_patch_embedding.3.weight": (d,),
        "to_patch_embedding.3.bias": (d,),
    }
    for i in range(cfg.depth):
        p = f"transformer.layers.{i}"
        shapes[f"{p}.0.norm.weight"] = (d,)
        shapes[f"{p}.0.norm.bias"] = (d,)
        shapes[f"{p}.0.fn.qkv.weight"] = (inner, d)
        shapes[f"{p}.0.fn.to_out.0.weight"] = (d, inner)
        shapes[f"{p}.0.fn.to_out.0.bias"] = (d,)
        shapes[f"{p}.1.norm.weight"] = (d,)
        shapes[f"{p}.1.norm.bias"] = (d,)
        shapes[f"{p}.1.fn.weight"] = (d, d)
    shapes["mlp_head.0.weight"] = (d,)
    shapes["mlp_head.0.bias"] = (d,)
    shapes["mlp_head.1.weight"] = (cfg.num_classes, d)
    shapes["mlp_head.1.bias"] = (cfg.num_classes,)
    return shapes


def random_reference_state_dict(cfg: CrateConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 tensors for every reference key (LayerNorm params perturbed off 1/0)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in reference_shapes(cfg).items():
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        is_layernorm = len(shape) == 1 and not name.endswith(
            ("to_patch_embedding.2.bias", "to_out.0.bias", "mlp_head.1.bias")
        )
        if name in ("cls_token", "pos_embedding"):
            sd[name] = 0.5 * x
        elif is_layernorm and name.endswith(".weight"):
            sd[name] = 1.0 + 0.2 * x
        elif is_layernorm:  # LayerNorm bias
            sd[name] = 0.2 * x
        elif len(shape) == 2:  # Linear weight (out, in)
            sd[name] = x * shape[1] ** -0.5
        else:  # Linear bias
            sd[name] = 0.1 * x
    return sd


def reference_param_count(cfg: CrateConfig) -> int:
    return sum(t.numel() for t in random_reference_state_dict(cfg).values())


def _ln(x: torch.Tensor, sd: dict, prefix: str, eps: float = LN_EPS) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def _mssa(x: torch.Tensor, sd: dict, p: str, cfg: CrateConfig, bias: bool = True) -> torch.Tensor:
    w = F.linear(x, sd[f"{p}.qkv.weight"])  # (B, N, heads*dim_head), no bias
    w = rearrange(w, "b n (h d) -> b h n d", h=cfg.heads)
    dots = torch.matmul(w, w.transpose(-1, -2)) * cfg.dim_head**-0.5
    attn = dots.softmax(dim=-1)
    out = torch.matmul(attn, w)
    out = rearrange(out, "b h n d -> b n (h d)")
    return F.linear(out, sd[f"{p}.to_out.0.weight"], sd[f"{p}.to_out.0.bias"] if bias else None)


def _ista(x: torch.Tensor, weight: torch.Tensor, lambd: float = ISTA_LAMBD) -> torch.Tensor:
    # literal copy of the reference OvercompleteISTAFC / ISTA block forward
    x1 = F.linear(x, weight, bias=None)
    grad_1 = F.linear(x1, weight.t(), bias=None)
    grad_2 = F.linear(x, weight.t(), bias=None)
    grad_update = ISTA_STEP_SIZE * (grad_2 - grad_1) - ISTA_STEP_SIZE * lambd
    return F.relu(x + grad_update)


def reference_forward(state_dict: dict[str, torch.Tensor], cfg: CrateConfig, images: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W) -> logits (B, num_classes)."""
    sd = state_dict
    p = cfg.patch_size
    x = rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)
    x = _ln(x, sd, "to_patch_embedding.1")
    x = F.linear(x, sd["to_patch_embedding.2.weight"], sd["to_patch_embedding.2.bias"])
    x = _ln(x, sd, "to_patch_embedding.3")
    b, n, _ = x.shape
    cls = sd["cls_token"].expand(b, -1, -1)
    x = torch.cat((cls, x), dim=1)
    x = x + sd["pos_embedding"][:, : n + 1]
    for i in range(cfg.depth):
        pre = f"transformer.layers.{i}"
        y = x + _mssa(_ln(x, sd, f"{pre}.0.norm"), sd, f"{pre}.0.fn", cfg)
        x = _ista(_ln(y, sd, f"{pre}.1.norm"), sd[f"{pre}.1.fn.weight"])
    x = x.mean(dim=1) if cfg.pool == "mean" else x[:, 0]
    x = _ln(x, sd, "mlp_head.0")
    return F.linear(x, sd["mlp_head.1.weight"], sd["mlp_head.1.bias"])
