"""Lower a :class:`~unroll.network.Network`: derive, relax, validate, then build modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unroll.derive.steps import Step, derive
from unroll.derive.update import Update
from unroll.errors import UnrollError
from unroll.graph.blocks import LayerGraph, build_layer_graph
from unroll.lower.frontend import Classifier, PatchEmbedding
from unroll.lower.step import LoweredStep
from unroll.network import Network
from unroll.relax.rules import apply_all, prune


@dataclass(frozen=True)
class DerivedStep:
    """A step's exact update, then its update after each relaxation (the last one is computed)."""

    step: Step
    exact: Update
    relaxed: tuple[tuple[object, Update], ...]

    @property
    def final(self) -> Update:
        return self.relaxed[-1][1] if self.relaxed else self.exact


def derive_layer(network: Network) -> list[DerivedStep]:
    names = [s.name for s in network.layer]
    if len(set(names)) != len(names):
        raise UnrollError(f"step names must be unique within a layer, found {names}", field="layer")
    out = []
    for step in network.layer:
        exact = prune(derive(step))
        out.append(DerivedStep(step, exact, tuple(apply_all(exact, step.relax))))
    return out


class Layer(nn.Module):
    """One unrolled iteration: the steps of the layer in order."""

    def __init__(self, graph: LayerGraph, sizes: dict[str, int]):
        super().__init__()
        self.steps = nn.ModuleDict(
            {u.name: LoweredStep(u, sizes, graph.order(u.name)) for u in graph.updates}
        )

    def forward(self, Z: torch.Tensor) -> torch.Tensor:
        for step in self.steps.values():
            Z = step(Z)
        return Z


class WhiteBoxClassifier(nn.Module):
    """images (B, C, H, W) -> logits (B, classes); every layer is a derived optimisation step."""

    def __init__(self, network: Network):
        super().__init__()
        if network.depth < 1:
            raise UnrollError(f"depth must be at least 1, found {network.depth}", field="architecture.depth")
        self.network = network
        self.derived = derive_layer(network)
        self.graph = build_layer_graph([s.final for s in self.derived])
        sizes = network.sizes()
        self.frontend = PatchEmbedding(network.frontend, network.width)
        distinct = 1 if network.tie_layers else network.depth
        self.layers = nn.ModuleList(Layer(self.graph, sizes) for _ in range(distinct))
        self.depth = network.depth
        self.head = Classifier(network.head, network.width)

    def layer(self, i: int) -> Layer:
        return self.layers[0 if len(self.layers) == 1 else i]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens after the last layer, (B, N, d)."""
        Z = self.frontend(images).mT  # tokens as columns from here on, as in the derivation
        for i in range(self.depth):
            Z = self.layer(i)(Z)
        return Z.mT

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(images))


def lower_network(network: Network) -> WhiteBoxClassifier:
    return WhiteBoxClassifier(network)
