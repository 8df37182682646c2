"""Accuracy of a classifier on a validation split: top-1, top-5, mean cross-entropy, images/s.

Under torchrun each process evaluates its share (:func:`unroll.train.loader.eval_loader`) and the
sums are added over the processes, so every process returns the figures of the whole split.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from unroll.train.device import pick_device, precision_context
from unroll.train.loader import batches
from unroll.train.world import World, next_together

#: the columns ``unroll eval`` prints and writes
SCORES = ("top1", "top5", "loss", "images", "images_per_second")


@dataclass(frozen=True)
class Scores:
    top1: float
    top5: float  # top-k with k = min(5, classes)
    loss: float  # mean cross-entropy (no label smoothing)
    images: int
    images_per_second: float

    def as_dict(self) -> dict:
        return asdict(self)


def summed(model: torch.nn.Module, loader, device: torch.device, figures: Callable, size: int,
           autocast: contextlib.AbstractContextManager | None = None, world: World | None = None) -> torch.Tensor:
    """``figures(logits, target) -> list`` of ``size`` numbers per batch, summed over every batch of
    ``loader`` and over the processes (in eval mode, without gradients; the mode is restored)."""
    world = world or World()
    was_training = model.training
    model.eval()
    sums = torch.zeros(size, dtype=torch.float64)
    items = batches(loader)
    with torch.no_grad():
        while True:
            # shares may differ by a batch: the processes agree on each step, so that an
            # unreadable image in one stops them all instead of leaving the others in all_reduce
            batch, going = next_together(items, world, device)
            if not going:
                break
            if batch is None:
                continue
            x, target = (v.to(device, non_blocking=True) for v in batch)
            with autocast or contextlib.nullcontext():
                logits = model(x)
            sums += torch.tensor(figures(logits.float(), target), dtype=torch.float64)
    if world.size > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    model.train(was_training)
    return sums


def evaluate(model: torch.nn.Module, loader, device: torch.device,
             autocast: contextlib.AbstractContextManager | None = None,
             on_batch: Callable[[int], None] | None = None, world: World | None = None) -> Scores:
    """``model``'s scores over every batch of ``loader``. The loss is the plain cross-entropy,
    whatever label smoothing training used. ``world``: the processes that each evaluate their
    share. ``on_batch(n)``: called with each batch's size (a progress bar)."""

    def figures(logits: torch.Tensor, y: torch.Tensor) -> list[float]:  # images, loss, top-1 hits, top-5 hits
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, k), best first
        hits = top == y[:, None]
        if on_batch is not None:
            on_batch(len(y))
        return [len(y), F.cross_entropy(logits, y, reduction="sum").item(), hits[:, 0].sum().item(),
                hits.any(-1).sum().item()]

    began = time.perf_counter()
    sums = summed(model, loader, device, figures, 4, autocast, world)
    seconds = time.perf_counter() - began
    count = int(sums[0])
    if count == 0:
        return Scores(float("nan"), float("nan"), float("nan"), 0, 0.0)
    return Scores(sums[2].item() / count, sums[3].item() / count, sums[1].item() / count, count,
                  count / seconds if seconds > 0 else float("inf"))


def evaluate_recipe(recipe, network, checkpoint: str | Path, data: str | None = None, batch: int = 256,
                    workers: int | None = None, device: str | None = None, precision: str | None = None,
                    on_progress: Callable[[int, int], None] | None = None) -> tuple[Scores, str]:
    """(the scores of ``checkpoint``'s weights on the validation split of ``data``, the data's name).

    ``recipe`` is the resolved recipe and ``network`` its network; ``checkpoint`` a weights file or
    a run folder (its ``model.safetensors``). ``on_progress(done, total)`` after each batch.
    """
    from unroll.api import build
    from unroll.train.loader import default_workers, eval_loader
    from unroll.train.state import weights_in
    from unroll.train.tasks import ImageClassification

    checkpoint = weights_in(checkpoint)
    dev = pick_device(device)
    _, autocast = precision_context(precision, dev)
    task = ImageClassification(recipe, data or recipe.training.data, seed=0)  # its validation split, as training reads it
    model = build(network, checkpoint=checkpoint).to(dev)
    workers = default_workers(task.in_memory) if workers is None else workers
    loader = eval_loader(task.val_set, batch, 0, 1, workers, dev.type == "cuda")
    total, done = len(task.val_set), 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if on_progress is not None:
            on_progress(done, total)

    return evaluate(model, loader, dev, autocast=autocast, on_batch=advance), task.name
