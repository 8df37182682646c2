"""The CRATE language model as crate-lm's ``crate_overcomplete.py`` computes it, written here from
the reference description (shared/reference/family-and-language.md, section 4), in nanoGPT's
layout and key names: the independent side of the equivalence tests."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSubspaceAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, width, bias=False)  # the one projection U: q = k = v
        self.c_proj = nn.Linear(width, width, bias=True)

    def forward(self, x):  # (B, T, d)
        b, t, d = x.shape
        q = self.c_attn(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, q, q, is_causal=True)  # scale 1/sqrt(hs)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class OvercompleteISTA(nn.Module):
    def __init__(self, width: int, step: float = 0.1, lam: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(4 * width, width))  # D^T, D of shape (d, 4d)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.step, self.lam = step, lam

    def forward(self, u):  # (B, T, d) -> (B, T, d)
        dt_u = u @ self.weight.T  # D^T u, (B, T, 4d)
        a1 = F.relu(self.step * dt_u - self.step * self.lam)
        d_a1 = a1 @ self.weight  # D a1
        a2 = F.relu(a1 + self.step * (dt_u - d_a1 @ self.weight.T) - self.step * self.lam)
        return a2 @ self.weight  # D a2


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.prenorm_1 = nn.LayerNorm(width)
        self.attn = CausalSubspaceAttention(width, heads)
        self.prenorm_2 = nn.LayerNorm(width)
        self.ista = OvercompleteISTA(width)

    def forward(self, x):
        x = x + self.attn(self.prenorm_1(x))
        return self.ista(self.prenorm_2(x))  # no residual


class CrateGPT(nn.Module):
    def __init__(self, vocab: int, context: int, width: int, heads: int, depth: int):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, width), wpe=nn.Embedding(context, width),
            h=nn.ModuleList([Block(width, heads) for _ in range(depth)]), ln_f=nn.LayerNorm(width)))
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one tensor

    def forward(self, idx):  # (B, T) -> (B, T, vocab)
        t = idx.shape[1]
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(t, device=idx.device))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))
