r"""A masked autoencoder whose encoder and decoder layers are derived steps (CRATE-MAE).

images -> patch tokens -> (a learned mask token in place of each removed patch, a cls token,
positions) -> encoder layers -> LN -> decoder layers -> LN -> Linear to pixels per patch.

Masking follows reference section 4: per-sample uniform ``noise`` (B, L) orders the patches, the
``int(L (1 - r))`` with the lowest noise are kept. Re-inserting mask tokens at the removed places
and restoring the original order is the same as replacing the removed patches' tokens by the mask
token where they stand, which is what is computed here (no shuffle and unshuffle).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from unroll.errors import UnrollError
from unroll.lower.frontend import PatchEmbedding
from unroll.lower.model import Layer, LayerStack, RecipeModel
from unroll.network import Network
from unroll.plan import Plan, plan


class WhiteBoxAutoencoder(RecipeModel):
    def __init__(self, network: Network, optimize: bool = True):
        super().__init__()
        if network.decoder is None:
            raise UnrollError("a masked autoencoder needs a decoder", field="decoder")
        self.plan: Plan = plan(network)
        self.network = network
        self.optimize = optimize
        d, sizes, spec = network.width, dict(self.plan.sizes), network.frontend
        self.frontend = PatchEmbedding(spec, d)
        self.mask_token = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.encoder = LayerStack(self.plan.encoder, sizes, optimize)
        self.norm = nn.LayerNorm(d, eps=network.decoder.norm_eps)
        self.decoder = LayerStack(self.plan.decoder, sizes, optimize)
        self.decoder_norm = nn.LayerNorm(d, eps=network.decoder.norm_eps)
        self.decoder_pred = nn.Linear(d, spec.channels * spec.patch_size**2)

    def layer(self, i: int) -> Layer:
        """The module of encoder layer ``i`` (counted from 0, across groups)."""
        return self.encoder.layer(i)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p p C): the pixels of each patch in the order (p, q, c)."""
        p = self.network.frontend.patch_size
        return rearrange(images, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)

    def random_mask(self, patches: int, batch: int, mask_ratio: float, noise: torch.Tensor | None, device) -> torch.Tensor:
        """(B, L), 1 for removed patches: all but the ``int(L (1 - r))`` lowest-noise patches."""
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), found {mask_ratio}")
        if noise is None:
            noise = torch.rand(batch, patches, device=device)
        elif noise.shape != (batch, patches):
            raise ValueError(f"noise must have shape (batch, patches) = {(batch, patches)}, found {tuple(noise.shape)}")
        keep = int(patches * (1 - mask_ratio))
        rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # position in ascending noise order
        return (rank >= keep).to(torch.float32)

    def encode(self, images: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """images -> (latent (B, L + 1, d) after the encoder and its norm, mask (B, L))."""
        x = self.frontend.patches(images)
        mask = self.random_mask(x.shape[1], x.shape[0], mask_ratio, noise, x.device)
        x = torch.where(mask.unsqueeze(-1).bool(), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.frontend.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.network.frontend.positions != "none":
            x = x + self.frontend.pos_embedding
        return self.norm(self.encoder(x)), mask

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (B, L + 1, d) -> predicted pixels per patch (B, L, p p C), cls dropped."""
        x = self.decoder_norm(self.decoder(latent))
        return self.decoder_pred(x)[:, 1:]

    def loss(self, images: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the removed patches (0 when none is)."""
        target = self.patchify(images)
        if self.network.decoder.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((prediction - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1)

    def forward(self, images: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None):
        """-> (loss, prediction (B, L, p p C), mask (B, L) with 1 for removed patches).

        ``mask_ratio`` defaults to the recipe's (0.75 in CRATE-MAE)."""
        ratio = self.network.decoder.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask = self.encode(images, ratio, noise)
        prediction = self.decode(latent)
        return self.loss(images, prediction, mask), prediction, mask
