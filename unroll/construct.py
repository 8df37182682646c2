r"""Forward construction (ReduNet): a network computed layer by layer from labelled training data,
in closed form, with no backpropagation.

**The network is the compiler's.** :class:`ConstructedNetwork` is the lowered network of
``unroll build`` (the plain lowering, float64): the same front end, the same derived steps
(:class:`~unroll.lower.step.LoweredStep`) that ``unroll explain`` prints. Construction only
fills the steps' **data constants** and replaces the classifier by a nearest-subspace one.

**Data constants.** A term declares constants computed from the training features instead of
learned by giving them, in its symbolic ``gradient``, as :class:`~unroll.objective.base.ParamSpec`
with ``init=("data",)`` (the lowered step keeps them as persistent buffers, zeros until filled),
and by providing

- ``fit(Z, labels, classes) -> dict[str, Tensor]``: their values from the training features
  ``Z`` (d, m), one sample per column, and their labels (m,), by the step's attribute names
  (``C_k`` -> ``C``, (K, ...)).

:class:`~unroll.objective.ClassRate` (ReduNet's ΔR, the classes as heads) is one; a term of your
own written the same way works too (:func:`construct` takes any :class:`~unroll.network.Network`).

**The network.** The front end (``embedding: pixels``, one patch the size of the image) makes each
image one token of width ``d = channels × image_size²``, its pixels on the sphere. Each layer
runs the network's steps in order, e.g. for ReduNet

- a gradient step on ``-ΔR``, ``Z + η (E Z - Σ_k V_k ∘ (1 γ_k π_k))``, ``V_k = C_k Z``,
  ``π_k = softmax_k(-λ ‖V_k‖)``, its constants **fitted on the training features that reach the
  step** and copied into its buffers;
- a proximal step on :class:`~unroll.objective.UnitNorm`, the projection onto the sphere.

The training features are then pushed through the finished step (the lowered step: soft
memberships, as any sample) and the next one is fitted on them. Steps with learned parameters
are refused (construction learns nothing). **No head is trained**: :class:`NearestSubspace`
keeps, per class, the top ``components`` principal directions ``U_j`` of that class's final
training features and classifies ``z`` by the smallest residual ``‖z - U_j U_jᵀ z‖``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from unroll.errors import UnrollError
from unroll.lower.step import LoweredStep
from unroll.network import Network
from unroll.objective.class_rate import one_hot_memberships, rate, rate_reduction


def fit_step(step: LoweredStep, parts, Z: torch.Tensor, labels: torch.Tensor, classes: int) -> None:
    """Fill ``step``'s data constants with its terms' ``fit`` on the features ``Z`` (d, m)."""
    filled: set[str] = set()
    for w in parts:
        fit = getattr(w.term, "fit", None)
        if not callable(fit):
            continue
        for key, value in fit(Z, labels, classes).items():
            if key not in step.specs or not step.specs[key].from_data or key in filled:
                raise UnrollError(f"step {step.update_name}: {w.term.label}.fit returned {key!r}, which is not one of "
                                  f"the step's data constants ({', '.join(step.data_constants)}) or is filled twice")
            buffer = getattr(step, key)
            if value.numel() != buffer.numel():
                raise UnrollError(f"step {step.update_name}: {w.term.label} fitted {key} of shape {tuple(value.shape)} "
                                  f"for {classes} classes, but the step holds {tuple(buffer.shape)}: with {w.term.label} "
                                  f"each class is a head, so architecture.heads must equal the number of classes")
            buffer.copy_(value.reshape(buffer.shape))
            filled.add(key)
    missing = set(step.data_constants) - filled
    if missing:
        raise UnrollError(f"step {step.update_name}: no term's fit computes {', '.join(sorted(missing))}")


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
    """Images (B, C, H, W) -> class scores (B, J): the lowered network of ``unroll build``
    (``frontend``, ``encoder``; plain lowering, float64) and a :class:`NearestSubspace` head.
    :meth:`features` gives the last layer's output."""

    def __init__(self, network: Network, components: int, dtype: torch.dtype = torch.float64):
        super().__init__()
        from unroll.lower.model import WhiteBoxClassifier

        front = network.frontend
        self.classes, self.dtype = network.head.classes, dtype
        d = front.channels * front.image_size**2
        if front.embedding != "pixels" or front.tokens != 1 or network.width != d:
            raise UnrollError(f"a constructed network sees each image as one token of its flattened pixels: set "
                              f"embedding: pixels, patch_size = image_size ({front.image_size}), cls_token: false "
                              f"and architecture.width = channels × image_size² = {d}", field="architecture")
        if network.decoder is not None:
            raise UnrollError("unroll construct builds classifiers, not autoencoders", field="decoder")
        if components > d:
            raise UnrollError(f"{components} principal directions per class cannot exceed the width ({d})",
                              field="construction.components")
        for group in network.groups:
            if group.tie and group.repeat > 1:
                raise UnrollError("tied layers share constants, but each constructed layer is fitted on the features "
                                  "that reach it; remove tie", field="architecture")
        lowered = WhiteBoxClassifier(network, optimize=False).to(dtype)
        self.plan = lowered.plan
        self.frontend, self.encoder = lowered.frontend, lowered.encoder
        for planned in self.plan.encoder.layers:
            for derived in planned.steps:
                step = self.encoder.layers[planned.module].steps[derived.name]
                learned = [name for name, _ in step.named_parameters()]
                if learned:
                    labels = ", ".join(w.term.label for w in derived.parts)
                    raise UnrollError(f"step {derived.name}: {labels} has no constants computed from data but learned "
                                      f"parameters ({', '.join(learned)}), which unroll construct cannot compute in "
                                      "closed form; a constructed step takes terms like class_rate (data constants) "
                                      "or parameter-free ones like unit_norm")
        if not any(step.data_constants for layer in self.encoder.layers for step in layer.steps.values()):
            raise UnrollError("no step has a term with constants computed from data (such as class_rate), so there "
                              "is nothing to construct", field="layer")
        self.head = NearestSubspace(self.classes, d, components, dtype)

    @property
    def depth(self) -> int:
        return self.encoder.depth

    def steps(self, layer: int):
        """``(name, lowered step, weighted terms)`` of encoder layer ``layer`` (from 0), in order."""
        planned = self.plan.encoder.layers[layer]
        for derived in planned.steps:
            yield derived.name, self.encoder.layers[planned.module].steps[derived.name], derived.parts

    def columns(self, images: torch.Tensor) -> torch.Tensor:
        """The front end: images (B, C, H, W) -> (B, d, 1), the pixels on the sphere."""
        return self.frontend(images.to(self.dtype)).mT

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, d, 1): the tokens after the last layer, as columns."""
        return self.encoder(self.frontend(images.to(self.dtype))).mT

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


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
        eps = next((float(w.term.eps) for derived in model.plan.encoder.steps() for w in derived.parts
                    if callable(getattr(w.term, "fit", None)) and hasattr(w.term, "eps")), 0.1)
    rows = []
    with torch.no_grad():
        Z = model.columns(images).squeeze(-1).T  # (d, m): samples as columns (the tokens of one batch)
        H = model.columns(held_out[0]).squeeze(-1).T if held_out is not None else None

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
        for layer in range(model.depth):
            for _, step, parts in model.steps(layer):
                if step.data_constants:
                    fit_step(step, parts, Z, labels, classes)  # on the features that reach this step
                Z = step.run(Z.T[None])[0].T  # the samples as the tokens of one batch
                if H is not None:
                    H = step.run(H.T[None])[0].T
            record(layer + 1)
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
    steps = sum(g.repeat * len(g.layer) for g in network.groups)  # an upper bound: every step holds them
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
    from unroll.train.transforms import eval_transform

    start = time.perf_counter()
    resolved = load_recipe(recipe, overrides)
    if resolved.task_kind != "classification":
        raise UnrollError(f"unroll construct builds classifiers of labelled images; this recipe's task is "
                          f"{resolved.task_kind}", where=str(recipe))
    settings = resolved.construction or Construct()
    a = resolved.architecture
    with located(str(recipe)):
        network = to_network(resolved)
        ConstructedNetwork(network, settings.components)  # the recipe's mistakes before the data is read
        folder = output_folder(out or Path("runs") / resolved.name)
        source = datasets.open_data(data or resolved.training.data, a.image_size, a.channels)
        labels = torch.tensor(datasets.labels_of(source.train) + datasets.labels_of(source.val), dtype=torch.int64)
        found = int(labels.max()) + 1 if len(labels) else 0
        if a.classes < 2:
            raise UnrollError("forward construction separates classes: at least 2 are needed",
                              field="architecture.classes")
        if len(torch.unique(labels)) < 2 or found > a.classes:
            raise UnrollError(f"forward construction needs labelled data of 2 to {a.classes} classes "
                              f"(architecture.classes); {source.name} has labels of {found} classes",
                              field="architecture.classes")
        need = memory_bytes(network, len(labels))
        if need > max_memory_gib * 2**30:
            raise UnrollError(f"constructing this network needs about {need / 2**30:.2f} GiB, more than the limit of "
                              f"{max_memory_gib:g} GiB; use fewer layers or classes, or raise --max-memory",
                              field="architecture")
        # construction reads every training image at once (its statistics are of the whole set)
        pixels = eval_transform(resolved.training, a.image_size, a.channels)
        train, held_out = datasets.stack(source.train, transform=pixels), datasets.stack(source.val, transform=pixels)
        model, rows = construct(network, *train, settings.components, held_out)
    write_files(folder, {"model.safetensors": weights_writer(model.state_dict()),
                         "recipe.yaml": text_writer(recipe_yaml(resolved)),
                         "metrics.csv": text_writer(csv_text(rows, METRICS))})
    return folder, rows, time.perf_counter() - start
