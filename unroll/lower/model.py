"""Lower a :class:`~unroll.plan.Plan` into modules: the network's layers, front end and head."""

from __future__ import annotations

import pickle

import torch
from torch import nn

from unroll.derive.init import DEPTH
from unroll.errors import UnrollError, excerpt
from unroll.graph.blocks import LayerGraph
from unroll.lower.frontend import Classifier, PatchEmbedding
from unroll.lower.step import LoweredStep, copy_module
from unroll.network import Network
from unroll.objective.base import Term
from unroll.objective.custom import Custom
from unroll.plan import Plan, StackPlan, plan


#: the classifier's parts, as its state-dict keys begin (unroll.train.init addresses them)
FRONTEND = "frontend"
HEAD = "head"

class LayerStack(nn.Module):
    """The unrolled layers of a stack, group after group.

    ``layers`` holds one module per set of parameters: a group's repeats each get their own, or
    share one when the group is tied (so one group of ``depth`` layers keeps the keys
    ``layers.<i>.steps.<step>.<param>``). ``schedule`` lists, per unrolled layer, its module."""

    def __init__(self, stack: StackPlan, sizes: dict[str, int], optimize: bool = True):
        super().__init__()
        self.stack = stack
        sizes = {**sizes, DEPTH: len(stack.layers)}  # what a depth-scaled initialisation divides by
        self.layers = nn.ModuleList(
            Layer(g.graph, sizes, optimize) for g in stack.groups for _ in range(g.modules))
        self.schedule = tuple(layer.module for layer in stack.layers)
        self.depth = len(self.schedule)

    def layer(self, i: int) -> Layer:
        """The module of unrolled layer ``i`` (counted from 0)."""
        return self.layers[self.schedule[i]]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, d) -> (B, N, d), tokens as rows."""
        for module in self.schedule:
            tokens = self.layers[module].run(tokens)
        return tokens

    def stream(self, tokens: torch.Tensor, states: list[dict], offset: int) -> torch.Tensor:
        """(B, n, d) new tokens at positions ``offset ..`` -> their outputs; ``states``: one
        dict per unrolled layer (a tied module's repeats each keep their own earlier tokens)."""
        for module, state in zip(self.schedule, states, strict=True):
            tokens = self.layers[module].stream(tokens, state, offset)
        return tokens


class Layer(nn.Module):
    """One unrolled iteration: the steps of the layer in order."""

    steps: nn.ModuleDict

    def __init__(self, graph: LayerGraph, sizes: dict[str, int], optimize: bool = True):
        super().__init__()
        self.steps = nn.ModuleDict(
            {u.name: LoweredStep(u, sizes, graph.order(u.name), optimize) for u in graph.updates}
        )

    def run(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, d) -> (B, N, d): each step in the layout it was lowered for."""
        for step in self.steps.values():
            tokens = step.run(tokens)
        return tokens

    def stream(self, tokens: torch.Tensor, state: dict, offset: int) -> torch.Tensor:
        """(B, n, d) -> (B, n, d): the new tokens through each step's streaming form
        (:mod:`unroll.lower.stream`); ``state`` holds each step's cache by name."""
        for name, step in self.steps.items():
            tokens = step.stream(tokens, state.setdefault(name, {}), offset)
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
    plan: Plan

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
    stacks = [network.groups, network.decoder_groups]
    ons = [step.on._as_objective() if isinstance(step.on, Term) else step.on
           for groups in stacks for group in groups for step in group.layer]
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
        self.plan: Plan = plan(network)
        self.network = network
        self.optimize = optimize
        self.frontend = PatchEmbedding(network.frontend, network.width)
        self.encoder = LayerStack(self.plan.encoder, dict(self.plan.sizes), optimize)
        self.head = Classifier(network.head, network.width)

    def layer(self, i: int) -> Layer:
        """The module of encoder layer ``i`` (counted from 0, across groups)."""
        return self.encoder.layer(i)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens after the last layer, (B, N, d)."""
        return self.encoder(self.frontend(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(images))


def step_input(model: nn.Module, layer: int, step: str, inputs: torch.Tensor) -> tuple[LoweredStep, torch.Tensor]:
    """(the lowered step, its input (B, d, N) with tokens as columns) of step ``step`` of encoder
    layer ``layer`` (counted from 1 across groups) when ``model`` runs on ``inputs``, without
    autograd. A tied module runs once per layer of its group: its call for this layer is taken."""
    schedule = model.encoder.schedule
    module = schedule[layer - 1]
    lowered = model.encoder.layers[module].steps[step]
    call = schedule[: layer - 1].count(module)
    captured: list[torch.Tensor] = []
    handle = lowered.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
    Z = captured[call]
    return lowered, Z.mT if lowered.rows else Z


def sample_input(network: Network, batch: int = 1) -> torch.Tensor:
    """Zeros of the shape the network reads: images (B, C, H, W), or token ids (B, context)."""
    from unroll.network import TokenFrontend

    spec = network.frontend
    if isinstance(spec, TokenFrontend):
        return torch.zeros(batch, spec.context, dtype=torch.int64)
    return torch.zeros(batch, spec.channels, spec.image_size, spec.image_size)


def lower_network(network: Network, optimize: bool = True) -> nn.Module:
    """A classifier, a masked autoencoder when the network has a decoder, or a language model when
    it reads tokens."""
    from unroll.network import TokenFrontend

    if isinstance(network.frontend, TokenFrontend):
        from unroll.lower.language import WhiteBoxLanguageModel

        return WhiteBoxLanguageModel(network, optimize)
    if network.decoder is not None:
        from unroll.lower.autoencoder import WhiteBoxAutoencoder

        return WhiteBoxAutoencoder(network, optimize)
    return WhiteBoxClassifier(network, optimize)
