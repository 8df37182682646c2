"""Lower a :class:`~unroll.network.Network`: derive, relax, validate, then build modules."""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass

import torch
from torch import nn

from unroll.derive.steps import Step, derive, step_name_problem
from unroll.derive.update import Update
from unroll.errors import UnrollError, excerpt
from unroll.graph.blocks import LayerGraph, build_layer_graph
from unroll.lower.frontend import Classifier, PatchEmbedding
from unroll.lower.step import LoweredStep, copy_module
from unroll.network import Network
from unroll.objective.base import Term
from unroll.objective.custom import Custom
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
    """Derive each step's exact update and relax it, in order. The derivation is pure and its
    result immutable, so it is cached: the memory estimate, the build and ``explain`` of one
    network derive it once."""
    try:
        return list(_derive_cached(tuple(steps), field))
    except TypeError:  # a step holding something unhashable: derive it afresh
        return list(_derive(tuple(steps), field))


def _derive(steps: tuple[Step, ...], field: str) -> tuple[DerivedStep, ...]:
    names = [s.name for s in steps]
    for name in names:
        if (problem := step_name_problem(name)) is not None:
            raise UnrollError(problem, field=field)
    if len(set(names)) != len(names):
        raise UnrollError(f"step names must be unique within a layer, found {names}", field=field)
    out = []
    for step in steps:
        exact = prune(derive(step))
        out.append(DerivedStep(step, exact, tuple(apply_all(exact, step.relax))))
    return tuple(out)


_derive_cached = functools.lru_cache(maxsize=32)(_derive)


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


class RecipeModel(nn.Module):
    """What every built model shares: it copies and pickles as what it was built from.

    Pickled (``torch.save(model, f)``, ``pickle``), a model is its :class:`Network`, the
    ``optimize`` flag, its state dict and its training mode; unpickling lowers the network again
    and loads the state, so a pickle stays valid across changes to the lowering. Loading needs
    ``torch.load(f, weights_only=False)``, as any pickled module does. A network whose custom
    terms hold lambdas cannot be pickled: its weights are saved with safetensors instead.
    """

    network: Network
    optimize: bool

    def __reduce__(self):
        _check_picklable(self.network)
        return rebuild, (self.network, self.optimize, self.state_dict(), self.training)

    def __deepcopy__(self, memo: dict) -> RecipeModel:
        return copy_module(self, memo)


def rebuild(network: Network, optimize: bool, state: dict[str, torch.Tensor], training: bool) -> nn.Module:
    """The model a pickle stored: lowered from ``network``, with the pickled weights (their
    dtype and device kept). Pickles name this function: its name and arguments are the format."""
    model = lower_network(network, optimize)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:  # a pickle from a version of unroll that lowered differently
        raise UnrollError(f"the pickled weights do not fit the model its network builds now "
                          f"({excerpt(str(e).splitlines()[-1].strip())})", where=network.name) from None
    return model.train(training)


def _check_picklable(network: Network) -> None:
    try:
        pickle.dumps(network)
    except Exception as e:  # pickle fails with PicklingError, AttributeError or TypeError
        names = [repr(t.name) for t in _custom_terms(network) if not _picklable(t.fn)]
        if names:
            terms = f"term {names[0]} holds" if len(names) == 1 else f"terms {', '.join(names)} hold"
            reason = f"the custom {terms} a function pickle cannot store (a lambda or a local function)"
        else:
            reason = f"its network cannot be pickled ({excerpt(str(e))})"
        raise UnrollError(
            f"cannot pickle the model {network.name!r}: {reason}; save the weights with unroll.checkpoint."
            "save_weights(model.state_dict(), path) and rebuild with unroll.build(recipe, checkpoint=path)") from None


def _custom_terms(network: Network) -> list[Custom]:
    steps = network.layer + (network.decoder.layer if network.decoder is not None else ())
    ons = [s.on._as_objective() if isinstance(s.on, Term) else s.on for s in steps]
    return [w.term for on in ons for w in on.parts if isinstance(w.term, Custom)]


def _picklable(value) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


class WhiteBoxClassifier(RecipeModel):
    """images (B, C, H, W) -> logits (B, classes); every layer is a derived optimisation step.

    ``optimize``: lower with the compiler's optimisations (:mod:`unroll.lower.optimize`); False
    computes every update exactly as ``unroll explain`` prints it (for debugging and baselines)."""

    def __init__(self, network: Network, optimize: bool = True):
        super().__init__()
        if network.depth < 1:
            raise UnrollError(f"depth must be at least 1, found {network.depth}", field="architecture.depth")
        self.network = network
        self.optimize = optimize
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
