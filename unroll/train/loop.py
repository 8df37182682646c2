"""``unroll train``: one command from a recipe to a trained, checkpointed classifier.

Data order depends only on the seed and the epoch, the RNG state is checkpointed, and the
learning rate follows a per-step schedule that is checkpointed too, so ``--resume`` continues
exactly where a run stopped. Each epoch ends with a row of ``metrics.csv``, a checkpoint folder
published whole (see :mod:`unroll.train.state`) and one plain line on the console (flushed, so a
redirected run can be followed); the live progress bar is drawn only on a terminal. A NaN or
infinite loss or weight stops the run with an error before anything non-finite is saved. A
folder holds one run: a new run into a folder with checkpoints is refused. Under ``torchrun``
every process trains a disjoint share of each global batch inside torch's
DistributedDataParallel (gloo on CPU, nccl on GPU); with equal shares, the averaged gradient is
the single-process gradient of the global batch.
"""

from __future__ import annotations

import atexit
import gc
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from unroll.finite import name_list, nonfinite_names
from unroll.errors import UnrollError, located
from unroll.files import output_folder, write_csv
from unroll.summary import data_constant_count
from unroll.train import data as datasets
from unroll.train import state
from unroll.train.optim import make_optimizer, warmup_cosine

METRICS = state.METRICS


@dataclass
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _world(device: torch.device) -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave)
    return World(dist.get_rank(), dist.get_world_size())


def _leave() -> None:
    """At exit, free what holds the process group, then the group itself. After an error the DDP
    model lingers in reference cycles; freed in the interpreter's final teardown, it took gloo's
    threads down with ``terminate`` (exit 134, after the error was printed) now and then."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def _shift(images: torch.Tensor, pixels: int, offsets: torch.Tensor) -> torch.Tensor:
    """Translate each image by its ``offsets`` (2, B) in [0, 2 pixels] (zero padding)."""
    if pixels == 0:
        return images
    padded = F.pad(images, (pixels,) * 4)
    h, w = images.shape[-2:]
    dy, dx = offsets
    rows = (torch.arange(h)[None, :] + dy[:, None])[:, None, :, None]
    cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, None, :]
    return padded.gather(2, rows.expand(-1, images.shape[1], -1, padded.shape[-1])).gather(
        3, cols.expand(-1, images.shape[1], h, -1))


def everywhere(value: float, world: World, device: torch.device) -> float:
    """``value`` summed over the processes: NaN or inf where it is so in any one, so that every
    process takes the same decision (one stopping alone leaves the others hanging in DDP's next
    all-reduce)."""
    if world.size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item()


def together(action, world: World, device: torch.device, only_main: bool = False):
    """``action()`` on every process (or on process 0 only: the writes of the run folder), and
    a failure on any one is a failure on all: the others would otherwise wait for it in the next
    collective, forever (nccl) or until gloo's connection drops (a traceback)."""
    error, result = None, None
    if world.main or not only_main:
        try:
            result = action()
        except UnrollError as e:
            error = e
    if everywhere(float(error is not None), world, device) > 0:
        raise error or UnrollError("another process failed (see its error); stopped with it")
    return result


def rank_share(batch: torch.Tensor, world: World) -> torch.Tensor:
    """This process's share of a global batch: every ``size``-th item from ``rank`` (disjoint,
    equal in size when ``size`` divides the batch)."""
    return batch[world.rank:: world.size]


def evaluate(model, data: datasets.Dataset, batch: int = 256, label_smoothing: float = 0.0) -> tuple[float, float]:
    """(mean loss, accuracy) on ``data``."""
    model.eval()
    total, correct, loss = 0, 0, 0.0
    with torch.no_grad():
        for i in range(0, len(data), batch):
            x, y = data.images[i: i + batch], data.labels[i: i + batch]
            logits = model(x.to(_device(model)))
            loss += F.cross_entropy(logits.float(), y.to(logits.device), label_smoothing=label_smoothing, reduction="sum").item()
            correct += (logits.argmax(-1).cpu() == y).sum().item()
            total += len(y)
    model.train()
    return loss / total, correct / total


def _device(model) -> torch.device:
    return next(model.parameters()).device


def train(recipe_path: str | Path, out: str | Path, data: str | None = None, seed: int = 0,
          overrides: list[str] | None = None, resume: bool = False, device: str | None = None,
          stop_after: int | None = None, console: Console | None = None) -> list[dict]:
    """Train ``recipe_path``'s classifier; returns the metrics rows (one per epoch).

    ``stop_after``: leave after this many epochs of this run (to test resuming). Ctrl-C
    (``KeyboardInterrupt``) propagates; the checkpoints already published stay whole.
    """
    from unroll.api import build
    from unroll.recipe import load_recipe, write_recipe

    console = console or Console(stderr=True)
    out = Path(out)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    world = _world(dev)
    recipe = load_recipe(recipe_path, overrides or [])
    output_folder(out)  # by every process: a bad --out fails now, and everywhere
    if resume and not out.is_dir():
        raise UnrollError("nothing to resume: no such folder", where=str(out))
    if not resume:  # by every process, so all stop together
        state.check_fresh(out)
    t, a = recipe.training, recipe.architecture
    if recipe.decoder is not None:
        raise UnrollError("unroll train trains classifiers; this recipe builds a masked autoencoder", where=str(recipe_path))
    if t.batch_size % world.size:
        raise UnrollError(f"batch_size ({t.batch_size}) must be divisible by the number of processes ({world.size})",
                          field="training.batch_size")
    with located(str(recipe_path)):
        full = datasets.load(data or t.data, a.image_size, a.channels)
    if len(full.classes) != a.classes:
        raise UnrollError(f"the data has {len(full.classes)} classes, the recipe's architecture.classes is {a.classes}",
                          where=str(recipe_path))
    train_set, val_set = datasets.split(full)

    torch.manual_seed(seed)
    with located(str(recipe_path)):
        model = build(recipe).to(dev)
    if data_constant_count(model):  # zeros until fitted: training would fit a head to the identity
        raise UnrollError("this recipe's layers hold constants computed from data (E, C_k, ...), not learned ones; "
                          "build it with unroll construct", where=str(recipe_path))
    optimizer = make_optimizer(t.optimizer, model.parameters(), t.lr, t.weight_decay)
    steps_per_epoch = len(train_set) // t.batch_size
    if steps_per_epoch == 0:
        raise UnrollError(f"batch_size ({t.batch_size}) is larger than the training split ({len(train_set)})",
                          field="training.batch_size")
    total = steps_per_epoch * t.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, t.warmup_epochs * steps_per_epoch, total))
    info = {"recipe": state.recipe_digest(recipe), "seed": seed, "data": data or t.data, "world_size": world.size}
    rows: list[dict] = []
    start = 0
    if resume:
        record = together(lambda: state.load(out, model, optimizer, scheduler, info, main=world.main), world, dev)
        start, rows = record["epoch"], record["metrics"]
        # each process chose its checkpoint itself: they must agree, or their loops would differ
        if everywhere(float(start), world, dev) != start * world.size:
            raise UnrollError("the processes found different newest checkpoints (is the folder shared by every "
                              "node?); resume from one that all of them see", where=str(out))
        # rows past the checkpoint (from a crash before it was published) are dropped
        together(lambda: write_csv(out / "metrics.csv", rows, METRICS), world, dev, only_main=True)
    else:
        together(lambda: write_recipe(recipe, out / "recipe.yaml"), world, dev, only_main=True)
    net = model
    if world.size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    # off a terminal a live bar shows nothing until the end: there, the per-epoch lines only
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
                        TimeElapsedColumn(), console=console, disable=not (world.main and console.is_terminal))
    task = progress.add_task("", total=steps_per_epoch, status="")
    with progress:
        for epoch in range(start, t.epochs if stop_after is None else min(t.epochs, start + stop_after)):
            began = time.perf_counter()
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            shifts = torch.Generator().manual_seed(seed * 7_919 + epoch)
            # one bar, reset each epoch: a bar per epoch would push the current one off a short terminal
            progress.reset(task, total=steps_per_epoch, description=f"epoch {epoch + 1}/{t.epochs}", status="")
            seen, loss_sum, correct = 0, 0.0, 0
            for step in range(steps_per_epoch):
                batch = order[step * t.batch_size: (step + 1) * t.batch_size]
                offsets = torch.randint(0, 2 * t.shift + 1, (2, len(batch)), generator=shifts)  # drawn for the global batch
                mine = rank_share(batch, world)
                x = _shift(train_set.images[mine], t.shift, rank_share(offsets.T, world).T).to(dev)
                y = train_set.labels[mine].to(dev)
                with amp:
                    logits = net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=t.label_smoothing)
                value = loss.item()
                if not math.isfinite(summed := everywhere(value, world, dev)):  # every later step would be NaN too
                    raise UnrollError(f"the loss became {'NaN' if math.isnan(summed) else 'infinite'} at epoch "
                                      f"{epoch + 1} step {step + 1}; lower training.lr (now {t.lr:g}); the "
                                      "checkpoints of earlier epochs are kept",
                                      where=str(recipe_path))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if t.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
                optimizer.step()
                scheduler.step()
                seen += len(y)
                loss_sum += value * len(y)
                correct += (logits.argmax(-1) == y).sum().item()
                rate = seen * world.size / (time.perf_counter() - began)
                progress.update(task, advance=1, status=f"loss {loss_sum / seen:.3f}  acc {correct / seen:.3f}  {rate:.0f} img/s")
            if world.size > 1:  # the epoch's training figures over all processes
                sums = torch.tensor([seen, loss_sum, correct], dtype=torch.float64, device=dev)
                dist.all_reduce(sums)
                seen, loss_sum, correct = int(sums[0]), float(sums[1]), float(sums[2])
            # in batches no larger than training's: the memory estimate checked that batch
            val_loss, val_acc = evaluate(model, val_set, min(256, t.batch_size), t.label_smoothing)
            row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen, "val_loss": val_loss,
                   "val_acc": val_acc, "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - began}
            rows.append(row)
            if bad := nonfinite_names(model.state_dict()):
                raise UnrollError(f"the weights became NaN or inf at epoch {epoch + 1} ({name_list(bad)}); lower "
                                  f"training.lr (now {t.lr:g}); the checkpoints of earlier epochs are kept",
                                  where=str(recipe_path))
            def commit(epoch=epoch):  # the checkpoint is the commit; metrics.csv is rewritten from it on resume
                write_csv(out / "metrics.csv", rows, METRICS)
                state.save(out, model, optimizer, scheduler, epoch + 1, info, rows)

            together(commit, world, dev, only_main=True)
            if world.main:
                console.print(
                    f"epoch {epoch + 1}/{t.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
                    f"val loss {val_loss:.4f} acc {val_acc:.4f}  lr {row['lr']:.3g}  {row['seconds']:.1f} s",
                    highlight=False, markup=False, soft_wrap=True)
    if world.size > 1:
        dist.barrier()
    return rows
