"""Optimisers and the learning-rate schedule.

AdamW is torch's. Lion (Chen et al., 2023) is small enough to write here:

.. math::  u = \\operatorname{sign}(\\beta_1 m + (1 - \\beta_1) g), \\quad
           \\theta \\leftarrow \\theta (1 - \\eta \\lambda) - \\eta u, \\quad
           m \\leftarrow \\beta_2 m + (1 - \\beta_2) g
"""

from __future__ import annotations

import math

import torch


class Lion(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"lr must be positive, found {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * beta1 + p.grad * (1 - beta1)), alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "lion":
        return Lion(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected adamw or lion")


def warmup_cosine_epochs(epoch: int, warmup: int, total: int) -> float:
    """Learning-rate factor of epoch ``epoch`` (from 0) of ``total``, as the reference CRATE
    ImageNet script computes it: the smaller of a linear warmup and a cosine over the whole run,

    .. math::  \\min\\left(\\frac{e + 1}{w}, \\tfrac12 \\left(1 + \\cos \\frac{\\pi e}{E}\\right)\\right)

    (no warmup when ``warmup`` is 0: the cosine alone, torch's ``CosineAnnealingLR``)."""
    cosine = 0.5 * (1 + math.cos(math.pi * min(epoch, total) / total))
    return min((epoch + 1) / warmup, cosine) if warmup else cosine


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear from 1/warmup to 1 over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
