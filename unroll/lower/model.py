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


def derive_steps(steps: tuple[Step, ...], field: str = "layer") -> list[DerivedStep]:
    """Derive each step's exact update and relax it, in order."""
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise UnrollError(f"step names must be unique within a layer, found {names}", field=field)
    out = []
    for step in steps:
        exact = prune(derive(step))
        out.append(DerivedStep(step, exact, tuple(apply_all(exact, step.relax))))
    return out


def derive_layer(network: Network) -> list[DerivedStep]:
    return derive_steps(network.layer)


class LayerStack(nn.Module):
    """``depth`` applications of one derived layer, with their own weights or tied ones."""

    def __init__(self, derived: list[DerivedStep], sizes: dict[str, int], depth: int, tied: bool, optimize: bool = True):
        super().__init__()
        self.derived = derived
        self.graph = build_layer_graph([s.final for s in derived])
        self.layers = nn.ModuleList(Layer(self.graph, sizes, optimize) for _ in range(1 if tied else depth))
        self.depth = depth

    def layer(self, i: int) -> Layer:
        return self.layers[0 if len(self.layers) == 1 else i]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, d) -> (B, N, d), tokens as rows."""
        for i in range(self.depth):
            tokens = self.layer(i).run(tokens)
        return tokens


class Layer(nn.Module):
    """One unrolled iteration: the steps of the layer in order."""

    def __init__(self, graph: LayerGraph, sizes: dict[str, int], optimize: bool = True):
        super().__init__()
        self.steps = nn.ModuleDict(
            {u.name: LoweredStep(u, sizes, graph.order(u.name), optimize) for u in graph.updates}
        )

    def run(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, d) -> (B, N, d): each step in the layout it was lowered for."""
        for step in self.steps.values():
            tokens = step(tokens) if step.rows else step(tokens.mT).mT
        return tokens

    def forward(self, Z: torch.Tensor) -> torch.Tensor:
        """(B, d, N) -> (B, d, N), tokens as columns as in the derivation."""
        return self.run(Z.mT).mT


class WhiteBoxClassifier(nn.Module):
    """images (B, C, H, W) -> logits (B, classes); every layer is a derived optimisation step.

    ``optimize``: lower with the compiler's optimisations (:mod:`unroll.lower.optimize`); False
    computes every update exactly as ``unroll explain`` prints it (for debugging and baselines)."""

    def __init__(self, network: Network, optimize: bool = True):
        super().__init__()
        if network.depth < 1:
            raise UnrollError(f"depth must be at least 1, found {network.depth}", field="architecture.depth")
        self.network = network
        self.frontend = PatchEmbedding(network.frontend, network.width)
        self.encoder = LayerStack(derive_layer(network), network.sizes(), network.depth, network.tie_layers, optimize)
        self.head = Classifier(network.head, network.width)

    @property
    def derived(self) -> list[DerivedStep]:
        return self.encoder.derived

    def layer(self, i: int) -> Layer:
        return self.encoder.layer(i)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens after the last layer, (B, N, d)."""
        return self.encoder(self.frontend(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(images))


def lower_network(network: Network, optimize: bool = True) -> nn.Module:
    """A classifier, or a masked autoencoder when the network has a decoder."""
    if network.decoder is not None:
        from unroll.lower.autoencoder import WhiteBoxAutoencoder

        return WhiteBoxAutoencoder(network, optimize)
    return WhiteBoxClassifier(network, optimize)
