"""``unroll train``: one command from a recipe to a trained, checkpointed classifier.

Images stream from :mod:`unroll.train.data` through the recipe's transforms
(:mod:`unroll.train.transforms`) in loader worker processes (:mod:`unroll.train.loader`), whose
order and augmentation depend only on the seed, the epoch and the image; the learning-rate
schedule (per step or per epoch) and the optimiser are checkpointed, so ``--resume`` continues
exactly where a run stopped. Each epoch ends with a row of ``metrics.csv``, a checkpoint folder
published whole (see :mod:`unroll.train.state`) and one plain line on the console (flushed, so a
redirected run can be followed); the live progress bar is drawn only on a terminal and shows the
images/s of the loader and of the model apart, so a slow one is seen. A NaN or infinite loss or
weight stops the run with an error before anything non-finite is saved. A folder holds one run: a
new run into a folder with checkpoints is refused.

A step's batch of ``training.batch_size`` images is split over the processes (torchrun: torch's
DistributedDataParallel, gloo on CPU, nccl on GPU) and, within each, into ``training.accumulate``
micro-batches whose gradients add up before the one update; the loss of each is scaled so that
the update is that of the whole batch's mean loss, however it was split.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from unroll.errors import UnrollError, excerpt, located
from unroll.files import output_folder, write_csv
from unroll.finite import name_list, nonfinite_names
from unroll.summary import data_constant_count
from unroll.network import CAUSAL_LM, LANGUAGE_TASKS
from unroll.train import state
from unroll.train.device import pick_device, precision_context
from unroll.train.init import initialise
from unroll.train.loader import batch_seed, batches, default_workers, eval_loader, train_loader
from unroll.train.optim import make_optimizer, warmup_cosine, warmup_cosine_epochs
from unroll.train.tasks import ImageClassification, open_task
from unroll.train.world import World, everywhere, join, next_together, together


#: --baseline: the models a white-box recipe can be compared against
BASELINES = ("gpt",)


def _check_baseline(recipe, name: str, where: str) -> None:
    if name not in BASELINES:
        raise UnrollError(f"--baseline must be one of {', '.join(BASELINES)}, found {excerpt(name)}")
    if recipe.task_kind not in LANGUAGE_TASKS:
        raise UnrollError(f"--baseline {name} is a language model; this recipe's task is {recipe.task_kind}", where=where)


def _baseline(recipe, name: str) -> torch.nn.Module:
    """The standard model ``name`` at the recipe's width, depth, heads, vocabulary and context."""
    from unroll.train.baseline import BaselineLM

    a = recipe.architecture
    return BaselineLM(a.vocab_size, a.context, a.width, a.depth or recipe.encoder_depth, a.heads,
                      causal=recipe.task_kind == CAUSAL_LM)


def _effective_batch(t, world: World) -> int:
    """Items (images or windows) per micro-batch of one process; the global batch must split evenly."""
    parts = world.size * t.accumulate
    if t.batch_size % parts:
        raise UnrollError(f"batch_size ({t.batch_size}) must be divisible by the number of processes ({world.size}) "
                          f"× accumulate ({t.accumulate})", field="training.batch_size")
    return t.batch_size // parts


def _rate(images: int, seconds: float) -> str:
    return f"{images / seconds:,.0f}" if seconds > 1e-9 else "∞"


def train(recipe_path: str | Path, out: str | Path, data: str | None = None, seed: int = 0,
          overrides: list[str] | None = None, resume: bool = False, device: str | None = None,
          stop_after: int | None = None, console: Console | None = None, *, init: str | Path | None = None,
          workers: int | None = None, compile: bool = False, precision: str | None = None,
          tokenizer: str | Path | None = None, baseline: str | None = None) -> list[dict]:
    """Train ``recipe_path``'s classifier or language model (:mod:`unroll.train.tasks`); returns the
    metrics rows (one per epoch). ``tokenizer``: a language model's ``tokenizer.json`` to use instead
    of training one on the data. ``baseline``: ``gpt`` trains, instead of the recipe's white-box
    model, the standard transformer of :mod:`unroll.train.baseline` at the recipe's shape, on the
    same data, tokenizer, optimiser and steps (a comparison; it is not derived from anything).

    ``init``: start from these weights (fine-tuning; see :mod:`unroll.train.init`). ``workers``:
    loader processes (default: none for data in memory, else up to 8). ``compile``: torch.compile
    the model for the training steps. ``precision``: ``bfloat16`` (autocast; the default on a GPU)
    or ``float32``. ``stop_after``: leave after this many epochs of this run (to test resuming).
    Ctrl-C (``KeyboardInterrupt``) propagates; the checkpoints already published stay whole.
    """
    from unroll.api import build
    from unroll.recipe import load_recipe, write_recipe

    console = console or Console(stderr=True)
    out = Path(out)
    dev = pick_device(device)
    if init is not None and resume:
        raise UnrollError("--init starts a run from weights, --resume continues a run from its checkpoint: give one")
    precision, amp = precision_context(precision, dev)
    world = join(dev)
    recipe = load_recipe(recipe_path, overrides or [])
    output_folder(out)  # by every process: a bad --out fails now, and everywhere
    if resume and not out.is_dir():
        raise UnrollError("nothing to resume: no such folder", where=str(out))
    if not resume:  # by every process, so all stop together
        state.check_fresh(out)
    t, a = recipe.training, recipe.architecture
    if recipe.decoder is not None:
        raise UnrollError("unroll train trains classifiers and language models; this recipe builds a masked "
                          "autoencoder", where=str(recipe_path))
    if baseline is not None:  # before any data is read
        _check_baseline(recipe, baseline, str(recipe_path))
    micro = _effective_batch(t, world)
    # process 0 first: a language model's tokenizer and token cache are made once, then read by the others
    opened = together(lambda: open_task(recipe, data, seed, out, resume, tokenizer, str(recipe_path)), world, dev,
                      only_main=True)
    task = together(lambda: opened or open_task(recipe, data, seed, out, resume, tokenizer, str(recipe_path)), world,
                    dev)
    steps_per_epoch = len(task.train_set) // t.batch_size
    if t.epoch_steps is not None:
        steps_per_epoch = min(steps_per_epoch, t.epoch_steps)
    if steps_per_epoch == 0:
        raise UnrollError(f"batch_size ({t.batch_size}) is larger than the training split ({len(task.train_set)} "
                          "items)", field="training.batch_size")
    workers = default_workers(task.in_memory) if workers is None else workers
    pin = dev.type == "cuda"
    loader, order = train_loader(task.train_set, micro, world.rank, world.size, seed, workers, pin)
    val_loader = eval_loader(task.val_set, min(256, micro), world.rank, world.size, workers, pin)

    torch.manual_seed(seed)
    with located(str(recipe_path)):
        model = (build(recipe) if baseline is None else _baseline(recipe, baseline)).to(dev)
    if data_constant_count(model):  # zeros until fitted: training would fit a head to the identity
        raise UnrollError("this recipe's layers hold constants computed from data (E, C_k, ...), not learned ones; "
                          "build it with unroll construct", where=str(recipe_path))
    started_from = initialise(model, init) if init is not None else []
    task.check(model, dev)
    # the convolution's fast layout on a GPU
    channels_last = dev.type == "cuda" and isinstance(task, ImageClassification) and a.embedding == "conv"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(t.optimizer, model.parameters(), t.lr, t.weight_decay)
    per_epoch = t.schedule == "epoch"
    if per_epoch:
        factor = lambda n: warmup_cosine_epochs(n, t.warmup_epochs, t.epochs)  # noqa: E731
    else:
        factor = lambda n: warmup_cosine(n, t.warmup_epochs * steps_per_epoch, steps_per_epoch * t.epochs)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    # a baseline run trains another model on the recipe's data: never resumed as the recipe's own
    digest = state.recipe_digest(recipe) + ("" if baseline is None else f"{state.BASELINE_MARK}{baseline}")
    info = {"recipe": digest, "seed": seed, "data": task.source, "world_size": world.size}
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
        together(lambda: write_csv(out / "metrics.csv", rows, task.columns), world, dev, only_main=True)
    else:
        together(lambda: write_recipe(recipe, out / "recipe.yaml"), world, dev, only_main=True)
    together(lambda: task.save(out), world, dev, only_main=True)
    net = model
    if world.size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    step_net = torch.compile(net) if compile else net
    if world.main:
        for line in started_from:
            console.print(f"--init: {line}", highlight=False, markup=False, soft_wrap=True)
        if baseline is not None:
            from unroll.summary import parameter_count

            with torch.device("meta"):
                white_box = parameter_count(build(recipe))
            console.print(f"--baseline {baseline}: {parameter_count(model):,} parameters (the recipe's white-box "
                          f"model: {white_box:,})", highlight=False, markup=False, soft_wrap=True)
        console.print(f"{task.describe()}; batch {t.batch_size} = {world.size} process"
                      f"{'es' if world.size > 1 else ''} × {t.accumulate} accumulation step{'s' if t.accumulate > 1 else ''} "
                      f"× {micro}; {workers} loader worker{'s' if workers != 1 else ''}; {precision}"
                      f"{', compiled' if compile else ''}{', channels_last' if channels_last else ''}",
                      highlight=False, markup=False, soft_wrap=True)

    # off a terminal a live bar shows nothing until the end: there, the per-epoch lines only
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
                        TimeElapsedColumn(), console=console, disable=not (world.main and console.is_terminal))
    bar = progress.add_task("", total=steps_per_epoch, status="")
    with progress:
        for epoch in range(start, t.epochs if stop_after is None else min(t.epochs, start + stop_after)):
            began = time.perf_counter()
            order.set_epoch(epoch)
            batches_of_epoch = batches(loader, steps_per_epoch * t.accumulate)
            # one bar, reset each epoch: a bar per epoch would push the current one off a short terminal
            progress.reset(bar, total=steps_per_epoch, description=f"epoch {epoch + 1}/{t.epochs}", status="")
            seen, predicted, loss_sum, correct, waited, stepped = 0, 0, 0.0, 0.0, 0.0, 0.0
            for step in range(steps_per_epoch):
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for part in range(t.accumulate):
                    ready = time.perf_counter()
                    (x, y), _ = next_together(batches_of_epoch, world, dev)  # an unreadable image stops all
                    computing = time.perf_counter()
                    waited += computing - ready
                    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                    # MixUp/CutMix or masking, per micro-batch, seeded by its place in the run
                    x, target = task.prepare(x, y, batch_seed(seed, epoch, step, world.rank * t.accumulate + part))
                    if channels_last:  # after mixing: its outputs are contiguous
                        x = x.contiguous(memory_format=torch.channels_last)
                    # gradients are all-reduced once per step, at its last micro-batch
                    sync = world.size == 1 or part == t.accumulate - 1
                    with contextlib.nullcontext() if sync else net.no_sync():
                        with amp:
                            logits = step_net(x)
                        loss, summed, counted = task.loss(logits, target)
                        (loss / t.accumulate).backward()
                    step_loss += loss.item()
                    seen += task.count(x)
                    loss_sum += summed
                    correct += task.hits(logits, y, target)
                    predicted += counted
                    stepped += time.perf_counter() - computing
                # before the update: a non-finite step never reaches the weights
                if not math.isfinite(total := everywhere(step_loss, world, dev)):  # every later step would be NaN too
                    raise UnrollError(f"the loss became {'NaN' if math.isnan(total) else 'infinite'} at epoch "
                                      f"{epoch + 1} step {step + 1}; lower training.lr (now {t.lr:g}); the "
                                      "checkpoints of earlier epochs are kept",
                                      where=str(recipe_path))
                computing = time.perf_counter()
                if t.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
                optimizer.step()
                if not per_epoch:
                    scheduler.step()
                stepped += time.perf_counter() - computing
                progress.update(bar, advance=1, status=f"loss {loss_sum / max(predicted, 1):.3f}  acc {correct / max(predicted, 1):.3f}  "
                                f"{_rate(seen * world.size, time.perf_counter() - began)} {task.unit}/s (loader "
                                f"{_rate(seen, waited)}, model {_rate(seen, stepped)})")
            lr = scheduler.get_last_lr()[0]  # per epoch: the rate this epoch trained with; per step: the next step's
            if per_epoch:
                scheduler.step()
            if world.size > 1:  # the epoch's training figures over all processes
                sums = torch.tensor([seen, predicted, loss_sum, correct], dtype=torch.float64, device=dev)
                dist.all_reduce(sums)
                seen, predicted, loss_sum, correct = int(sums[0]), int(sums[1]), float(sums[2]), float(sums[3])
            seconds = time.perf_counter() - began
            val = task.validate(model, val_loader, dev, amp, world)
            row = task.row(epoch + 1, seen, loss_sum / max(predicted, 1), correct / max(predicted, 1), val, lr, seen / seconds,
                           waited / seconds, seconds)
            rows.append(row)
            if bad := nonfinite_names(model.state_dict()):
                raise UnrollError(f"the weights became NaN or inf at epoch {epoch + 1} ({name_list(bad)}); lower "
                                  f"training.lr (now {t.lr:g}); the checkpoints of earlier epochs are kept",
                                  where=str(recipe_path))
            def commit(epoch=epoch):  # the checkpoint is the commit; metrics.csv is rewritten from it on resume
                write_csv(out / "metrics.csv", rows, task.columns)
                state.save(out, model, optimizer, scheduler, epoch + 1, info, rows)

            together(commit, world, dev, only_main=True)
            if world.main:
                console.print(
                    f"epoch {epoch + 1}/{t.epochs}  {task.line(row)}  lr {lr:.3g}  {seen / seconds:,.0f} {task.unit}/s, "
                    f"{waited / seconds:.0%} waiting for data  {seconds:.1f} s",
                    highlight=False, markup=False, soft_wrap=True)
    if world.size > 1:
        dist.barrier()
    return rows
