r"""Forward construction (ReduNet): a network computed layer by layer from labelled training data,
in closed form, with no backpropagation.

**Data constants.** A term may declare constants computed from the training features and labels
instead of learned: it provides

- ``fit(Z, labels, classes) -> dict[str, Tensor]``: the constants, from the training features
  ``Z`` (d, m), one sample per column, and their labels (m,);
- ``constant_shapes(d, classes) -> dict[str, tuple]``: their shapes (to rebuild a stored network
  empty and load it);
- ``data_gradient(Z, constants) -> Tensor``: the term's gradient at ``Z`` (..., d, N) as a
  single sample sees it (each column on its own), the constants standing in for the data.

:class:`~unroll.objective.ClassRate` (ReduNet's ΔR) is one; a term of your own with these three
methods works the same way (:func:`construct` takes any :class:`~unroll.network.Network`).

**The network.** A parameter-free front end flattens each image to one vector of width
``d = channels × image_size²`` and normalises it onto the sphere; each image is one column
(token). Each layer runs the network's steps in order:

- a gradient step on data-constant terms, ``z ← z - η Σ_i w_i ∇f_i(z)`` (with ``-ΔR``:
  ``z + η (E z - Σ_j γ_j C_j z π̂_j(z))``), its constants **fitted on the training features that
  reach the layer** and stored as the layer's buffers;
- a proximal step on non-smooth terms, ``z ← prox_{η w g}(z)``, the term's own proximal operator
  (:class:`~unroll.objective.UnitNorm`: the projection onto the sphere).

The training features are then pushed through the finished layer (soft memberships, as any
sample) and the next layer is fitted on them. **No head is trained**: :class:`NearestSubspace`
keeps, per class, the top ``components`` principal directions ``U_j`` of that class's final
training features and classifies ``z`` by the smallest residual ``‖z - U_j U_jᵀ z‖``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import sympy as sp
import torch
from torch import nn

from unroll.derive.steps import GradientStep, ProximalStep
from unroll.errors import UnrollError
from unroll.expr.symbols import Z as Z_SYMBOL
from unroll.lower.interpret import CACHE, RAW, SIZES, Lowering
from unroll.network import Network
from unroll.objective.base import Objective, Term
from unroll.objective.class_rate import one_hot_memberships, rate, rate_reduction

#: the methods that make a term's constants computable from data (see the module)
DATA_METHODS = ("fit", "constant_shapes", "data_gradient")


def is_data_term(term: Term) -> bool:
    """Whether ``term`` declares data constants (all of :data:`DATA_METHODS`)."""
    return all(callable(getattr(term, name, None)) for name in DATA_METHODS)


def _parts(on: Objective | Term):
    return on.parts if isinstance(on, Objective) else on._as_objective().parts


def as_columns(images: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The front end: images (B, C, H, W) -> (B, d, 1), each flattened and normalised to norm 1
    (a blank image stays 0: the norm is floored)."""
    x = images.reshape(images.shape[0], -1).to(dtype)
    return (x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)).unsqueeze(-1)


class FittedGradient(nn.Module):
    """``z ← z - η Σ_i w_i ∇f_i(z)`` over data-constant terms; term i's constants are buffers
    ``terms.i.<name>``."""

    def __init__(self, step: GradientStep, d: int, classes: int, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.name, self.step_size = step.name, float(step.step_size)
        parts = _parts(step.on)
        for w in parts:
            if not is_data_term(w.term):
                raise UnrollError(f"step {step.name}: {w.term.label} has no constants computed from data "
                                  f"({', '.join(DATA_METHODS)}), so unroll construct cannot compute it in closed "
                                  "form; a constructed gradient step takes terms like class_rate")
        if step.relax:
            raise UnrollError(f"step {step.name}: relaxations are not applied by unroll construct; remove relax")
        self.weights = [float(w.weight) for w in parts]
        self.term_objects = [w.term for w in parts]
        self.terms = nn.ModuleList()
        for term in self.term_objects:
            holder = nn.Module()
            for key, shape in term.constant_shapes(d, classes).items():
                holder.register_buffer(key, torch.zeros(shape, dtype=dtype))
            self.terms.append(holder)

    def fit(self, Z: torch.Tensor, labels: torch.Tensor, classes: int) -> None:
        """Fit every term's constants on the training features ``Z`` (d, m)."""
        for term, holder in zip(self.term_objects, self.terms):
            for key, value in term.fit(Z, labels, classes).items():
                getattr(holder, key).copy_(value)

    def forward(self, Z: torch.Tensor) -> torch.Tensor:
        direction = sum(w * term.data_gradient(Z, dict(holder.named_buffers()))
                        for w, term, holder in zip(self.weights, self.term_objects, self.terms))
        return Z - self.step_size * direction


class Proximal(nn.Module):
    """``z ← prox_{η w g}(z)`` for non-smooth terms g, each term's own proximal operator (its
    sympy expression, lowered as every step's is), applied in order; no parameters."""

    def __init__(self, step: ProximalStep, d: int):
        super().__init__()
        self.name = step.name
        parts = _parts(step.on)
        smooth = [w.term.label for w in parts if w.term.smooth]
        if smooth or step.iterations != 1 or step.relax or step.decode != "none":
            raise UnrollError(f"step {step.name}: unroll construct computes a proximal step on non-smooth terms "
                              "only, one iteration, without relaxations or decoding"
                              + (f" (smooth: {', '.join(smooth)})" if smooth else ""))
        self.d = d
        lowering = Lowering()
        self.proxes: list[tuple[Callable, dict[str, torch.Tensor]]] = []
        for w in parts:
            expr = w.term.prox(Z_SYMBOL, sp.nsimplify(step.step_size) * w.weight)
            constants = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in w.term.constants().items()}
            self.proxes.append((lowering.matrix(expr), constants))

    def forward(self, Z: torch.Tensor) -> torch.Tensor:
        """``Z`` (..., d, N): the lowered prox works on (B, 1, d, N)."""
        sizes = {"d": self.d, "N": Z.shape[-1], "K": 1, "p": self.d, "m": self.d}
        X = Z.reshape(-1, *Z.shape[-2:]).unsqueeze(1)
        for fn, constants in self.proxes:
            X = fn({Z_SYMBOL.name: X, SIZES: sizes, RAW: {}, CACHE: {}, **constants}).expand_as(X)
        return X.reshape(Z.shape)


def class_subspaces(Z: torch.Tensor, labels: torch.Tensor, classes: int, components: int) -> torch.Tensor:
    """``U`` (J, d, k): per class, the top k left singular vectors of its features (columns of
    Z (d, m)), uncentred as in ReduNet; zero columns where a class has fewer than k samples."""
    d = Z.shape[0]
    U = torch.zeros(classes, d, components, dtype=Z.dtype)
    for j in range(classes):
        members = Z[:, labels == j]
        if members.shape[1]:
            # the left singular vectors are the eigenvectors of the d x d Gram (eigh: ascending)
            left = torch.linalg.eigh(members @ members.T)[1].flip(-1)[:, : min(components, members.shape[1])]
            U[j, :, : left.shape[1]] = left
    return U


def subspace_residuals(Z: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``‖z - U_j U_jᵀ z‖`` for each column z of Z (..., d, N): (..., J, N)."""
    Zj = Z.unsqueeze(-3)
    return torch.linalg.vector_norm(Zj - U @ (U.mT @ Zj), dim=-2)


class NearestSubspace(nn.Module):
    """Scores ``-‖z - U_j U_jᵀ z‖`` (B, J): the argmax is the nearest class subspace."""

    def __init__(self, classes: int, d: int, components: int, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.register_buffer("U", torch.zeros(classes, d, components, dtype=dtype))

    def forward(self, Z: torch.Tensor) -> torch.Tensor:
        return -subspace_residuals(Z, self.U).squeeze(-1)


class ConstructedNetwork(nn.Module):
    """Images (B, C, H, W) -> class scores (B, J); :meth:`features` gives each layer's output."""

    def __init__(self, network: Network, components: int, dtype: torch.dtype = torch.float64):
        super().__init__()
        front = network.frontend
        self.classes, self.dtype = network.head.classes, dtype
        d = front.channels * front.image_size**2
        if network.width != d:
            raise UnrollError(f"a constructed network works on flattened pixels, so architecture.width must be "
                              f"channels × image_size² = {d}, found {network.width}", field="architecture.width")
        if components > d:
            raise UnrollError(f"{components} principal directions per class cannot exceed the width ({d})",
                              field="construction.components")
        self.layers = nn.ModuleList()
        for group in network.groups:
            if group.tie and group.repeat > 1:
                raise UnrollError("tied layers share constants, but each constructed layer is fitted on the features "
                                  "that reach it; remove tie", field="architecture")
            for _ in range(group.repeat):
                self.layers.append(nn.ModuleList(_lower(step, d, self.classes, dtype) for step in group.layer))
        if not any(isinstance(s, FittedGradient) for layer in self.layers for s in layer):
            raise UnrollError("no step has a term with constants computed from data (such as class_rate), so there "
                              "is nothing to construct", field="layer")
        self.head = NearestSubspace(self.classes, d, components, dtype)

    def trajectory(self, Z: torch.Tensor) -> list[torch.Tensor]:
        """``Z`` (B, d, N) and the output of every layer after it."""
        out = [Z]
        for layer in self.layers:
            for step in layer:
                Z = step(Z)
            out.append(Z)
        return out

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trajectory(as_columns(images, self.dtype))[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _lower(step, d: int, classes: int, dtype: torch.dtype) -> nn.Module:
    if isinstance(step, GradientStep):
        return FittedGradient(step, d, classes, dtype)
    if isinstance(step, ProximalStep):
        return Proximal(step, d)
    raise UnrollError(f"step {step.name}: unroll construct computes gradient and proximal steps, "
                      f"found a {type(step).__name__}")


def _accuracy(train: torch.Tensor, labels: torch.Tensor, held: torch.Tensor, held_labels: torch.Tensor,
              classes: int, components: int) -> float:
    """Nearest-subspace accuracy on ``held`` (d, n) of subspaces fitted on ``train`` (d, m)."""
    U = class_subspaces(train, labels, classes, components)
    predicted = subspace_residuals(held, U).argmin(0)
    return float((predicted == held_labels).double().mean())


def measure_row(layer: int, Z: torch.Tensor, labels: torch.Tensor, classes: int, eps: float) -> dict:
    """R, Σγ_j R_j and ΔR of the training features Z (d, m) with their true labels."""
    Pi = one_hot_memberships(labels, classes, Z.dtype)
    R = float(rate(Z, eps))
    dR = float(rate_reduction(Z, Pi, eps))
    return {"layer": layer, "R": R, "Rc": R - dR, "delta_R": dR}


def construct(network: Network, images: torch.Tensor, labels: torch.Tensor, components: int = 12,
              held_out: tuple[torch.Tensor, torch.Tensor] | None = None, eps: float | None = None,
              on_layer: Callable[[dict], None] | None = None) -> tuple[ConstructedNetwork, list[dict]]:
    """Construct ``network`` from ``images`` (m, C, H, W) and ``labels`` (m,), layer by layer,
    without gradients: returns the model and one row per layer (0: the front end's output) of
    R, Rc, ΔR of the training features (precision ``eps``: the first class_rate term's, else 0.1)
    and, with ``held_out`` (images, labels), the nearest-subspace accuracy on it at that layer."""
    model = ConstructedNetwork(network, components)
    classes = model.classes
    labels = labels.long()
    if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise UnrollError(f"the training labels must lie in 0..{classes - 1} (architecture.classes = {classes})")
    if eps is None:
        eps = next((float(t.eps) for layer in model.layers for s in layer if isinstance(s, FittedGradient)
                    for t in s.term_objects if hasattr(t, "eps")), 0.1)
    rows = []
    with torch.no_grad():
        Z = as_columns(images, model.dtype).squeeze(-1).T  # (d, m): samples as columns
        H = as_columns(held_out[0], model.dtype).squeeze(-1).T if held_out is not None else None

        def record(layer: int) -> None:
            row = measure_row(layer, Z, labels, classes, eps)
            if H is not None:
                row["val_acc"] = _accuracy(Z, labels, H, held_out[1].long(), classes, components)
            if not all(math.isfinite(v) for v in row.values()):
                raise UnrollError(f"layer {layer}: the features became non-finite; try a smaller step size or a larger eps")
            rows.append(row)
            if on_layer is not None:
                on_layer(row)

        record(0)
        for number, layer in enumerate(model.layers, 1):
            for step in layer:
                if isinstance(step, FittedGradient):
                    step.fit(Z, labels, classes)  # on the features that reach this step
                Z = step(Z)
                if H is not None:
                    H = step(H)
            record(number)
        model.head.U.copy_(class_subspaces(Z, labels, classes, components))
    return model.eval(), rows


def load(network: Network, components: int, checkpoint) -> ConstructedNetwork:
    """A constructed network rebuilt from its stored buffers (``unroll construct``'s
    ``model.safetensors``)."""
    from unroll.checkpoint import load_weights

    model = ConstructedNetwork(network, components)
    load_weights(model, checkpoint)
    return model.eval()


def memory_bytes(network: Network, samples: int) -> int:
    """An estimate of what construction holds: every layer's constants (J + 1 matrices d x d per
    data term, float64) and a few copies of the features (d x samples)."""
    d = network.width
    J = network.head.classes
    steps = sum(g.repeat * len(g.layer) for g in network.groups)
    return 8 * (steps * (J + 1) * d * d + 4 * J * d * d + 6 * d * samples)


#: the columns of ``metrics.csv`` written by ``unroll construct``
METRICS = ["layer", "R", "Rc", "delta_R", "val_acc"]


def construct_recipe(recipe, data: str | None, out, overrides: list[str], max_memory_gib: float):
    """``unroll construct``: load and check the recipe and data, construct, write ``OUT``
    (``model.safetensors``, ``recipe.yaml``, ``metrics.csv``). Returns (folder, rows, seconds)."""
    import time
    from pathlib import Path

    from unroll.checkpoint import weights_writer
    from unroll.errors import located
    from unroll.files import csv_text, output_folder, text_writer, write_files
    from unroll.recipe import load_recipe, recipe_yaml, to_network
    from unroll.recipe.schema import Construct
    from unroll.train import data as datasets

    start = time.perf_counter()
    resolved = load_recipe(recipe, overrides)
    settings = resolved.construction or Construct()
    a = resolved.architecture
    with located(str(recipe)):
        network = to_network(resolved)
        ConstructedNetwork(network, settings.components)  # the recipe's mistakes before the data is read
        folder = output_folder(out or Path("runs") / resolved.name)
        dataset = datasets.load(data or resolved.training.data, a.image_size, a.channels)
        found = int(dataset.labels.max()) + 1 if len(dataset) else 0
        if a.classes < 2:
            raise UnrollError("forward construction separates classes: at least 2 are needed",
                              field="architecture.classes")
        if len(torch.unique(dataset.labels)) < 2 or found > a.classes:
            raise UnrollError(f"forward construction needs labelled data of 2 to {a.classes} classes "
                              f"(architecture.classes); {dataset.name} has labels of {found} classes",
                              field="architecture.classes")
        train, held_out = datasets.split(dataset)
        need = memory_bytes(network, len(dataset))
        if need > max_memory_gib * 2**30:
            raise UnrollError(f"constructing this network needs about {need / 2**30:.2f} GiB, more than the limit of "
                              f"{max_memory_gib:g} GiB; use fewer layers or classes, or raise --max-memory",
                              field="architecture")
        model, rows = construct(network, train.images, train.labels, settings.components,
                                (held_out.images, held_out.labels))
    write_files(folder, {"model.safetensors": weights_writer(model.state_dict()),
                         "recipe.yaml": text_writer(recipe_yaml(resolved)),
                         "metrics.csv": text_writer(csv_text(rows, METRICS))})
    return folder, rows, time.perf_counter() - start
