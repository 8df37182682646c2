"""The numbers ``unroll build`` prints: parameters, FLOPs per sample, the steps' update rules."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from unroll.expr.printing import to_text
from unroll.plan import Plan


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def data_constant_count(model: torch.nn.Module) -> int:
    """Values of the steps' data constants (``ParamSpec`` ``init`` ``("data",)``): buffers that
    ``unroll construct`` fills from the training data, not parameters."""
    from unroll.lower.step import LoweredStep

    return sum(getattr(m, attr).numel() for m in model.modules() if isinstance(m, LoweredStep)
               for attr in m.data_constants)


def _cpu_flash_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, taught the CPU flash-attention kernel it does not count."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def forward_flops(model: torch.nn.Module, images: torch.Tensor) -> int:
    """FLOPs of one warm inference forward on ``images``, as torch's counter sees them: weight-only
    factors the first call formed and cached are not counted again."""
    counter = flop_counter()
    with torch.inference_mode():
        model(images)
        with counter:
            model(images)
    return counter.get_total_flops()


def flops_per_sample(model: torch.nn.Module) -> int:
    """Forward FLOPs for one image, or one sequence of the full context (matrix products and
    attention, as torch counts them)."""
    from unroll.lower.model import sample_input

    return forward_flops(model, sample_input(model.network))


def step_rows(plan: Plan) -> list[tuple[str, str, str]]:
    """(step, how it was derived, the update it computes) for each step of each group of layers;
    with several groups (or a decoder) the step is prefixed by the layers it runs in."""
    rows = []
    for part, stack in plan.stacks():
        several = len(stack.groups) > 1 or plan.decoder is not None
        for where, group in zip(stack.spans("decoder layer" if part == "decoder" else "layer"), stack.groups):
            for d in group.steps:
                label = f"{where}: {d.name}" if several else d.name
                rows.append((label, d.exact.title, "Z⁺ = " + to_text(d.final.out)))
    return rows


def layout(plan: Plan) -> str:
    """``one layer, repeated 12 times`` or ``4 layers in 2 groups``."""
    groups = plan.encoder.groups
    if len(groups) == 1:
        return f"one layer, repeated {plan.encoder.depth} times"
    return f"{plan.encoder.depth} layers in {len(groups)} groups"
