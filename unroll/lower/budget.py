"""How much memory a build needs, estimated before a byte of it is allocated.

The parameters are counted exactly, by lowering the network on torch's ``meta`` device (shapes
without storage). The forward's activations are estimated from the sizes: the widest token
matrices a step holds at once (input, normalised copy, per-head projections, output) and, where
a step compares tokens, the attention matrices, K N² per sample. Inference keeps one layer's
temporaries alive at a time; training keeps every layer's for the backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unroll.errors import UnrollError
from unroll.expr.nodes import Softmax
from unroll.network import Network, TokenFrontend

#: float32
BYTES = 4
GIB = 1 << 30
#: what ``unroll build`` allows without ``--max-memory``
DEFAULT_LIMIT_GIB = 16.0
#: token matrices of the widest size a step holds at once (a deliberate over-count)
LIVE_MATRICES = 8


@dataclass(frozen=True)
class Estimate:
    parameters: int
    buffers: int
    #: peak activation bytes of one forward of ``batch`` images
    forward_bytes: int
    batch: int

    training: bool = False

    @property
    def total_bytes(self) -> int:
        # training holds weights, gradients and two optimiser moments
        return (self.parameters * (4 if self.training else 1) + self.buffers) * BYTES + self.forward_bytes

    def describe(self) -> str:
        images = "sample" if self.batch == 1 else "samples"
        state = " with gradients and optimiser moments" if self.training else ""
        return (f"about {human(self.total_bytes)}: {self.parameters:,} parameters{state} "
                f"({human(self.parameters * BYTES * (4 if self.training else 1))}) and a forward of "
                f"{self.batch} {images} ({human(self.forward_bytes)})")


def human(size: int) -> str:
    return f"{size / GIB:,.1f} GiB" if size >= GIB else f"{max(1, round(size / (1 << 20)))} MiB"


def estimate(network: Network, optimize: bool = True, batch: int = 1, training: bool = False,
             measuring: bool = False) -> Estimate:
    """The memory of ``network``'s weights and of one forward of ``batch`` images (float32).
    ``measuring``: ``unroll measure`` also keeps every step's input and output in float64."""
    from unroll.lower.model import lower_network

    with torch.device("meta"):
        model = lower_network(network, optimize)
    parameters = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    sizes = network.sizes()
    tokens, frontend = network.frontend.tokens, network.frontend
    if isinstance(frontend, TokenFrontend):  # the ids in, and the logits out (and their gradient)
        image = tokens + tokens * frontend.vocab_size * (2 if training else 1)
    else:
        image = frontend.channels * frontend.image_size**2
    layers = [(layer, _layer_values(layer.steps, sizes, tokens))
              for _, stack in model.plan.stacks() for layer in stack.layers]
    if training:  # every step and iteration of every layer is kept for the backward
        per_sample = image + sum(sum(values) for _, values in layers)
    else:  # one step's temporaries at a time
        per_sample = image + max(v for _, values in layers for v in values)
    if measuring:  # two float64 matrices (4 float32 values each) per step of each encoder layer
        per_sample += sum(4 * tokens * _widest(d, sizes) for layer in model.plan.encoder.layers for d in layer.steps)
    return Estimate(parameters, buffers, batch * per_sample * BYTES, batch, training)


def _widest(d, sizes: dict[str, int]) -> int:
    """The most rows a token matrix of this step has: the width, the heads' stacked projections,
    or an expanded code."""
    return max(sizes["d"], sizes["K"] * sizes["p"], d.final.expansion * sizes["d"])


def _layer_values(derived, sizes: dict[str, int], tokens: int) -> list[int]:
    """Activation values per sample held by each step of a layer: its widest token matrices, and
    the K attention matrices (N x N) of a step that compares tokens, once per iteration."""
    out = []
    for d in derived:
        wide = _widest(d, sizes)
        attention = 2 * sizes["K"] * tokens * tokens if d.final.out.atoms(Softmax) or any(
            getattr(e, "atoms", None) and e.atoms(Softmax) for _, e in d.final.where) else 0
        out.append(getattr(d.step, "iterations", 1) * (LIVE_MATRICES * tokens * wide + attention))
    return out


def check_budget(network: Network, limit_gib: float, optimize: bool = True, batch: int = 1,
                 training: bool = False, measuring: bool = False) -> Estimate:
    """Refuse a build whose :func:`estimate` exceeds ``limit_gib``, with the estimate in the message."""
    found = estimate(network, optimize, batch, training, measuring)
    if found.total_bytes > limit_gib * GIB:
        raise UnrollError(
            f"this {'training run' if training else 'build'} needs {found.describe()}, more than the limit of {limit_gib:g} GiB; "
            "use smaller sizes, " + ("split each batch into micro-batches (--set training.accumulate=N), " if training else "")
            + "or raise the limit with --max-memory GIB on a machine that has the memory",
            field="architecture")
    return found
