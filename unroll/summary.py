"""The numbers ``unroll build`` prints: parameters, FLOPs per sample, the steps' update rules."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from unroll.expr.printing import to_text


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(model: torch.nn.Module) -> int:
    """Forward FLOPs for one image (matrix products and attention, as torch counts them)."""
    spec = model.network.frontend
    images = torch.zeros(1, spec.channels, spec.image_size, spec.image_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(images)
    return counter.get_total_flops()


def step_rows(model) -> list[tuple[str, str, str]]:
    """(step, how it was derived, the update it computes) for each step of a layer."""
    rows = [(d.exact.name, d.exact.title, "Z⁺ = " + to_text(d.final.out)) for d in model.derived]
    for d in getattr(model, "decoder_derived", []):
        rows.append((f"decoder: {d.exact.name}", d.exact.title, "Z⁺ = " + to_text(d.final.out)))
    return rows
