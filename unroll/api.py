"""The Python entry points: ``unroll.build`` and ``unroll.load_recipe``."""

from __future__ import annotations

from pathlib import Path

import torch

from unroll.checkpoint import load_weights
from unroll.errors import located
from unroll.lower.model import lower_network
from unroll.network import Network
from unroll.recipe import Recipe, load_recipe, to_network


def as_network(recipe: str | Path | Recipe | Network, overrides: list[str] | None = None) -> Network:
    if isinstance(recipe, Network):
        return recipe
    where = str(recipe) if isinstance(recipe, (str, Path)) else None
    if where is not None:
        recipe = load_recipe(recipe, overrides)
    with located(where):
        return to_network(recipe)


def build(
    recipe: str | Path | Recipe | Network,
    checkpoint: str | Path | None = None,
    compile: bool = False,
    optimize: bool = True,
) -> torch.nn.Module:
    """Derive, relax, validate and lower ``recipe`` (a YAML path, a loaded recipe, or a
    :class:`~unroll.network.Network` built in Python) into a classifier images -> logits.

    ``optimize``: False lowers every update exactly as printed, with none of the compiler's
    optimisations (same weights, same function up to rounding).
    ``checkpoint``: a safetensors file of this model's weights. ``compile``: wrap with
    ``torch.compile``; the returned module then forwards to the compiled one, and keeps
    ``.network`` and ``.plan`` (each layer's derived steps) reachable through ``._orig_mod``.
    """
    with located(str(recipe) if isinstance(recipe, (str, Path)) else None):
        model = lower_network(as_network(recipe), optimize)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return torch.compile(model) if compile else model
