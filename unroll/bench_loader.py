"""Does the streaming data loader keep up with a CRATE-T training step? ``python -m unroll.bench_loader``.

A synthetic ImageFolder is written to a temporary directory (``--images`` JPEGs of ImageNet's
typical 500x375, quality 90, in 10 class folders; the content is noise summed over several scales,
so files and decoding cost are close to real photographs; deleted at the end). Then, one after the
other, never two at once:

1. **loader**: the recipe's training pipeline (``train_transform`` of its ``training`` section:
   for ``crate_tiny`` a random-resized crop to 224, a flip and ImageNet normalisation) through
   ``train_loader`` with ``--workers`` processes, and again with none (the main process decodes);
   the first round of batches (one per worker: start-up) is not timed, then ``--steps`` batches are;
2. **step**: CRATE-T forward, cross-entropy, backward and a step of the recipe's optimiser on random (B, 3, 224, 224)
   batches, float32; one warm-up step, then the median of ``--steps`` steps;
3. **fed**: the same step fed by the loader with ``--workers`` processes, as ``unroll train``
   runs it: images/s, and the fraction of the wall time spent waiting for the next batch.

How to read it: the ratio loader images/s ÷ step images/s says whether the workers, left alone,
decode faster than the model consumes (>= 1: they keep up). It is an upper bound: while training,
the workers and the model's threads share the cores, so the **fed** row is what a user gets; its
wait fraction is the share of the step lost to the loader (0 when the loader is never late).
Timings on a shared machine drift; rerun when the rows disagree with each other.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from unroll.train.data import TRAIN, VAL
from unroll.train.loader import Transformed, batches, train_loader

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "crate_tiny.yaml"
CLASSES = 10
#: JPEG quality of the synthetic images (ImageNet's files are mostly 75-95)
QUALITY = 90


def write_image_folder(root: Path, images: int, size: tuple[int, int], seed: int = 0) -> float:
    """``images`` JPEGs of ``size`` (width, height) in ``root/train/<class>/`` (10 classes, fewer for
    fewer images), and one per class in
    ``root/val/`` (``open_data`` then takes every training image instead of holding a quarter
    out). Returns the mean file size in KiB, so that the report shows how realistic they are."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    classes = min(CLASSES, images)  # every class folder must hold an image
    total = 0
    for split, count in ((TRAIN, images), (VAL, classes)):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = root / split / f"class{i % classes}" / f"{i:06d}.jpg"
            Image.fromarray(_smooth_noise(rng, width, height)).save(path, quality=QUALITY)
            if split == TRAIN:
                total += path.stat().st_size
    return total / max(1, images) / 1024


def _smooth_noise(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8: noise at 1/64, 1/16, 1/4 and 1/2 of the size, upsampled bicubically and
    summed, plus faint pixel noise. One scale alone compresses to a few KiB, far cheaper to decode
    than a photograph; the sum lands near ImageNet's ~110 KiB per 500x375 file."""
    from PIL import Image

    out = np.zeros((height, width, 3), np.float32)
    for factor, amplitude in ((64, 70.0), (16, 35.0), (4, 25.0), (2, 12.0)):
        small = rng.normal(0.0, amplitude, (max(2, height // factor), max(2, width // factor), 3))
        channels = [Image.fromarray(small[..., k].astype(np.float32), mode="F").resize((width, height), Image.BICUBIC)
                    for k in range(3)]
        out += np.stack([np.asarray(ch) for ch in channels], axis=-1)
    out += rng.normal(0.0, 9.0, out.shape)
    return np.clip(out + 128.0, 0, 255).astype(np.uint8)


def _endless(loader, sampler) -> Iterator:
    """The loader's batches, epoch after epoch (a small folder may hold fewer than the steps need;
    each new epoch restarts the workers' prefetching, which a long ImageNet epoch rarely does)."""
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from batches(loader)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(dataset: Transformed, batch: int, workers: int, steps: int, pin: bool) -> float:
    """Images/s of ``steps`` batches after the first round. The workers start together and each
    makes one batch at once, so when the first arrives the others are (nearly) done too: timing
    from the first alone would count up to ``workers - 1`` batches made before the clock started."""
    loader, sampler = train_loader(dataset, batch, 0, 1, 0, workers, pin)
    stream = _endless(loader, sampler)
    for _ in range(max(1, workers)):
        next(stream)
    start = time.perf_counter()
    for _ in range(steps):
        next(stream)
    elapsed = time.perf_counter() - start
    _close(stream, loader)
    return steps * batch / elapsed


def _close(stream: Iterator, loader) -> None:
    """Stop the workers now: a persistent worker left alive goes on prefetching, and would run
    concurrently with the next measurement."""
    stream.close()
    iterator = getattr(loader, "_iterator", None)  # persistent workers are held by the loader
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    del loader
    gc.collect()


def make_step(model: torch.nn.Module, recipe, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One training step as ``unroll train`` takes it, in float32: forward, cross-entropy with the
    recipe's label smoothing, backward, the recipe's optimiser at its lr."""
    from unroll.train.optim import make_optimizer

    t = recipe.training
    optimizer = make_optimizer(t.optimizer, model.parameters(), t.lr, t.weight_decay)
    classes = recipe.architecture.classes

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        logits = model(images)
        loss = F.cross_entropy(logits, labels % classes, label_smoothing=t.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_rate(step: Callable, batch: int, shape: tuple[int, int, int], classes: int, steps: int,
              device: torch.device) -> float:
    """Images/s of the median of ``steps`` training steps on random batches, after one warm-up."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, *shape, generator=g).to(device)
    labels = torch.randint(0, classes, (batch,), generator=g).to(device)
    step(images, labels)  # warm-up: allocator, kernels, optimiser state
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step(images, labels)
        _sync(device)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def fed_rate(step: Callable, dataset: Transformed, batch: int, workers: int, steps: int,
             device: torch.device) -> tuple[float, float]:
    """(images/s, fraction of the time waiting for a batch) of ``steps`` steps fed by the loader,
    after one step that starts the workers and warms the model up."""
    pin = device.type == "cuda"
    loader, sampler = train_loader(dataset, batch, 0, 1, 0, workers, pin)
    stream = _endless(loader, sampler)

    def one() -> float:
        """One step; returns the seconds spent waiting for its batch."""
        start = time.perf_counter()
        images, labels = next(stream)
        waited = time.perf_counter() - start
        step(images.to(device, non_blocking=pin), labels.to(device, non_blocking=pin))
        _sync(device)
        return waited

    one()
    start = time.perf_counter()
    waited = sum(one() for _ in range(steps))
    elapsed = time.perf_counter() - start
    _close(stream, loader)
    return steps * batch / elapsed, waited / elapsed


def run(images: int = 256, batch: int = 32, workers: int = 2, steps: int = 5, size: tuple[int, int] = (500, 375),
        device: str = "cpu", recipe_path: Path = RECIPE, overrides: list[str] | None = None,
        console: Console | None = None) -> dict:
    """Every figure of the report (see the module docstring), as a JSON-ready dict."""
    from unroll.api import build
    from unroll.recipe import load_recipe
    from unroll.train.data import open_data
    from unroll.train.transforms import train_transform

    console = console or Console(stderr=True)
    dev = torch.device(device)
    recipe = load_recipe(recipe_path, overrides or [])
    a, t = recipe.architecture, recipe.training
    root = Path(tempfile.mkdtemp(prefix="unroll-bench-loader-"))
    try:
        console.print(f"writing {images} JPEGs of {size[0]}x{size[1]} to {root} …")
        mean_kib = write_image_folder(root, images, size)
        source = open_data(str(root), a.image_size, a.channels)
        dataset = Transformed(source.train, train_transform(t, a.image_size, a.channels), seed=0)
        pin = dev.type == "cuda"
        console.print(f"loader with {workers} workers …")
        loader = loader_rate(dataset, batch, workers, steps, pin)
        console.print("loader in the main process …")
        single = loader if workers == 0 else loader_rate(dataset, batch, 0, steps, pin)
        console.print(f"building {recipe.name} …")
        torch.manual_seed(0)
        model = build(recipe).to(dev).train()
        step = make_step(model, recipe, dev)
        console.print("training steps on random batches …")
        alone = step_rate(step, batch, (a.channels, a.image_size, a.image_size), a.classes, steps, dev)
        console.print(f"training steps fed by the loader ({workers} workers) …")
        fed, wait = fed_rate(step, dataset, batch, workers, steps, dev)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = loader / alone
    return {
        "recipe": str(recipe_path), "model": recipe.name, "overrides": overrides or [], "device": str(dev),
        "images": images, "image_width": size[0], "image_height": size[1], "mean_jpeg_kib": mean_kib,
        "input_size": a.image_size, "batch": batch, "workers": workers, "steps": steps,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loader_img_s": loader, "loader_0_workers_img_s": single, "step_img_s": alone,
        "fed_img_s": fed, "fed_wait_fraction": wait, "ratio": ratio,
        "keeps_up": ratio >= 1, "workers_needed": workers_needed(workers, ratio),
    }


def workers_needed(workers: int, ratio: float) -> int:
    """Workers that would match the step, assuming the loader scales linearly with them (it does
    until the cores run out); with no workers, the main process counts as one."""
    return max(workers, math.ceil(max(workers, 1) / ratio))


def verdict(r: dict) -> str:
    if r["keeps_up"]:
        return (f"the loader keeps up: {r['workers']} workers deliver {r['ratio']:.2f}x what the step consumes "
                f"(alone; fed, the step waits {100 * r['fed_wait_fraction']:.0f}% of the time)")
    return (f"the loader is {1 / r['ratio']:.2f}x too slow; it would need about {r['workers_needed']} workers "
            f"(fed, the step waits {100 * r['fed_wait_fraction']:.0f}% of the time)")


def report(r: dict, console: Console) -> None:
    where = torch.cuda.get_device_name(r["device"]) if r["device"].startswith("cuda") else "CPU, float32"
    table = Table(title=f"{r['model']} at {r['input_size']} px, batch {r['batch']}, {where}; "
                        f"{r['images']} JPEGs {r['image_width']}x{r['image_height']} (mean {r['mean_jpeg_kib']:.0f} KiB)")
    table.add_column("measured")
    table.add_column("images/s", justify="right")
    table.add_column("ms/batch", justify="right")
    table.add_column("÷ step", justify="right")
    w = r["workers"]
    rows = [(f"loader, {w} workers", r["loader_img_s"]),
            ("loader, main process (0 workers)", r["loader_0_workers_img_s"]),
            ("step: forward + backward + optimiser", r["step_img_s"]),
            (f"step fed by the loader ({w} workers; waits {100 * r['fed_wait_fraction']:.0f}%)", r["fed_img_s"])]
    for label, rate in rows:
        table.add_row(label, f"{rate:.1f}", f"{1e3 * r['batch'] / rate:.0f}", f"{rate / r['step_img_s']:.2f}")
    console.print(table)
    console.print(f"torch threads {r['torch_threads']}, os.cpu_count() {r['cpu_count']}; "
                  f"timed {r['steps']} batches each")
    console.print(verdict(r))


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 500x375, found {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, found {text!r}")
    return width, height


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="JPEGs in the synthetic folder")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed batches / steps per measurement")
    parser.add_argument("--size", type=_size, default=(500, 375), help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, repeatable (e.g. architecture.depth=1)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if min(args.images, args.batch, args.steps) < 1 or args.workers < 0:
        parser.error("--images, --batch and --steps must be positive, --workers at least 0")
    if args.batch > args.images:
        parser.error(f"--batch {args.batch} is larger than --images {args.images}")
    console = Console()
    result = run(args.images, args.batch, args.workers, args.steps, args.size, args.device, args.recipe,
                 args.overrides, Console(stderr=True))
    report(result, console)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
