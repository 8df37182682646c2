"""Independent eager references of CRATE-alpha and CRATE-MAE (reference sections 4 and 5), written
from the reference description and operating on state_dicts with the reference key names.
Shares the CRATE pieces of `reference_crate`; deliberately does not import `unroll`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from reference_crate import CrateConfig, _ista, _ln, _mssa


Config = CrateConfig  # the same small sizes: image 32, patch 8, width 48, 4 heads, depth 2


def _random(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random weights: LayerNorms near 1/0 but not at them, matrices scaled by fan-in."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes.items():
        x = torch.randn(shape, generator=g)
        if "norm" in name and name.endswith("weight"):
            sd[name] = 1.0 + 0.2 * x
        elif "norm" in name:
            sd[name] = 0.2 * x
        elif len(shape) == 2:
            sd[name] = x * shape[1] ** -0.5
        elif len(shape) == 4:  # conv (out, in, p, p)
            sd[name] = x * (shape[1] * shape[2] * shape[3]) ** -0.5
        else:
            sd[name] = 0.5 * x
    return sd


# ---------------------------------------------------------------- CRATE-alpha (section 5) ----

def alpha_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    d, p = cfg.dim, cfg.patch_size
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embedding": (1, cfg.num_patches + 1, d),
        "conv1.weight": (d, cfg.channels, p, p),
        "conv1.bias": (d,),
    }
    for i in range(cfg.depth):
        pre = f"transformer.layers.{i}"
        shapes |= {
            f"{pre}.0.norm.weight": (d,), f"{pre}.0.norm.bias": (d,),
            f"{pre}.0.fn.qkv.weight": (d, d), f"{pre}.0.fn.to_out.0.weight": (d, d),
            f"{pre}.1.norm.weight": (d,), f"{pre}.1.norm.bias": (d,),
            f"{pre}.1.fn.D": (d, 4 * d), f"{pre}.1.fn.D1": (d, 4 * d),
        }
    shapes |= {"mlp_head.0.weight": (d,), "mlp_head.0.bias": (d,),
               "mlp_head.1.weight": (cfg.num_classes, d), "mlp_head.1.bias": (cfg.num_classes,)}
    return shapes


def random_alpha_state_dict(cfg: Config, seed: int = 0) -> dict[str, torch.Tensor]:
    return _random(alpha_shapes(cfg), seed)


def _odl(y, D, D1, eta=0.1, lambd=0.1):
    """Two ISTA iterations from zero on rows y (B, N, d), decoded by D1; D, D1 are (d, 4d)."""
    a1 = F.relu(eta * (y @ D) - eta * lambd)
    residual = a1 @ D.T - y
    a2 = F.relu(a1 - eta * (residual @ D) - eta * lambd)
    return a2 @ D1.T


def alpha_forward(sd: dict, cfg: Config, images: torch.Tensor) -> torch.Tensor:
    x = F.conv2d(images, sd["conv1.weight"], sd["conv1.bias"], stride=cfg.patch_size)
    x = rearrange(x, "b d h w -> b (h w) d")
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embedding"]
    for i in range(cfg.depth):
        pre = f"transformer.layers.{i}"
        x = x + _mssa(_ln(x, sd, f"{pre}.0.norm", 1e-6), sd, f"{pre}.0.fn", cfg, bias=False)
        x = x + _odl(_ln(x, sd, f"{pre}.1.norm", 1e-6), sd[f"{pre}.1.fn.D"], sd[f"{pre}.1.fn.D1"])
    return F.linear(_ln(x[:, 0], sd, "mlp_head.0", 1e-5), sd["mlp_head.1.weight"], sd["mlp_head.1.bias"])


# ------------------------------------------------------------------ CRATE-MAE (section 4) ----

def sincos_table(dim: int, grid: int) -> np.ndarray:
    """(1 + grid², dim): a zero row for cls, then per patch [enc(column), enc(row)]."""
    def enc(pos: int) -> list[float]:
        quarter = dim // 4
        omegas = [10000.0 ** (-i / quarter) for i in range(quarter)]
        return [np.sin(pos * w) for w in omegas] + [np.cos(pos * w) for w in omegas]

    rows = [[0.0] * dim]
    for r in range(grid):
        for c in range(grid):
            rows.append(enc(c) + enc(r))
    return np.array(rows, dtype=np.float32)


def mae_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    d, p, n = cfg.dim, cfg.patch_size, cfg.num_patches
    shapes = {
        "cls_token": (1, 1, d), "mask_token": (1, 1, d),
        "pos_embed": (1, n + 1, d), "decoder_pos_embed": (1, n + 1, d),
        "patch_embed.proj.weight": (d, cfg.channels, p, p), "patch_embed.proj.bias": (d,),
    }
    for i in range(cfg.depth):
        pre = f"blocks.{i}.layers.0"
        shapes |= {
            f"{pre}.0.norm.weight": (d,), f"{pre}.0.norm.bias": (d,),
            f"{pre}.0.fn.qkv.weight": (d, d), f"{pre}.0.fn.to_out.0.weight": (d, d), f"{pre}.0.fn.to_out.0.bias": (d,),
            f"{pre}.1.norm.weight": (d,), f"{pre}.1.norm.bias": (d,), f"{pre}.1.fn.weight": (d, d),
        }
    shapes |= {"norm.weight": (d,), "norm.bias": (d,), "decoder_embed.weight": (d, d), "decoder_embed.bias": (d,)}
    for i in range(cfg.depth):
        pre = f"decoder_blocks.{i}.layers.0"
        shapes |= {
            f"{pre}.0.norm.weight": (d,), f"{pre}.0.norm.bias": (d,), f"{pre}.0.fn.weight": (d, d),
            f"{pre}.1.norm.weight": (d,), f"{pre}.1.norm.bias": (d,),
            f"{pre}.1.fn.qkv.weight": (d, d), f"{pre}.1.fn.to_out.0.weight": (d, d), f"{pre}.1.fn.to_out.0.bias": (d,),
        }
    shapes |= {"decoder_norm.weight": (d,), "decoder_norm.bias": (d,),
               "decoder_pred.weight": (p * p * cfg.channels, d), "decoder_pred.bias": (p * p * cfg.channels,)}
    return shapes


def random_mae_state_dict(cfg: Config, seed: int = 0) -> dict[str, torch.Tensor]:
    sd = _random(mae_shapes(cfg), seed)
    table = torch.from_numpy(sincos_table(cfg.dim, cfg.image_size // cfg.patch_size))[None]
    sd["pos_embed"] = table.clone()
    sd["decoder_pos_embed"] = table.clone()
    return sd


def mae_forward(sd: dict, cfg: Config, images: torch.Tensor, mask_ratio: float, noise: torch.Tensor, norm_pix_loss: bool = False):
    """-> (loss, pred (B, L, p p c), mask (B, L)), shuffling and unshuffling like MAE does."""
    p = cfg.patch_size
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    x = rearrange(x, "b d h w -> b (h w) d")
    B, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(B, L)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x], dim=1)
    mask_tokens = sd["mask_token"].repeat(B, L + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, D))
    x = torch.cat([x[:, :1], x_], dim=1) + sd["decoder_pos_embed"]
    for i in range(cfg.depth):
        pre = f"blocks.{i}.layers.0"
        x = x + _mssa(_ln(x, sd, f"{pre}.0.norm", 1e-5), sd, f"{pre}.0.fn", cfg, bias=True)
        x = _ista(_ln(x, sd, f"{pre}.1.norm", 1e-5), sd[f"{pre}.1.fn.weight"], lambd=0.5)  # CRATE-MAE's λ
    x = _ln(x, sd, "norm", 1e-6)
    for i in range(cfg.depth):
        pre = f"decoder_blocks.{i}.layers.0"
        z = F.linear(_ln(x, sd, f"{pre}.0.norm", 1e-5), sd[f"{pre}.0.fn.weight"])
        x = z - _mssa(_ln(z, sd, f"{pre}.1.norm", 1e-5), sd, f"{pre}.1.fn", cfg, bias=True)
    x = _ln(x, sd, "decoder_norm", 1e-6)
    pred = F.linear(x, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, 1:]
    target = rearrange(images, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)
    if norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    loss = (loss * mask).sum() / mask.sum()
    return loss, pred, mask
