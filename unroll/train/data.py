"""Image classification data, opened lazily: what ``--data`` names, as a train and a validation split.

Sources:

- ``digits``: scikit-learn's 1,797 8x8 handwritten digits (embedded, no download), in memory;
- ``mixtures``: images near one of a few random low-rank subspaces (the theory's own setting), generated;
- ``DIR``: an ImageFolder (``DIR/<class>/<image>``), read by ``torchvision.datasets.ImageFolder``. With
  ``DIR/train`` and ``DIR/val`` those are the splits; otherwise a fixed stratified quarter is held out;
- ``cifar10:DIR`` / ``cifar100:DIR``: the binary distribution of CIFAR (:mod:`unroll.train.cifar`).

Nothing is decoded when a source is opened: an ImageFolder lists file names, CIFAR maps its files.
Each image is read, converted and transformed when a batch asks for it, in the loader's worker
processes (:mod:`unroll.train.loader`). The held-out split is fixed (independent of the training seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset, Subset

from unroll.errors import UnrollError, excerpt
from unroll.images import image_mode, open_image
from unroll.train.cifar import CIFAR_KINDS, CifarBinary

#: the most values (channels × height × width) of a mixtures image: generating one takes the QR of a
#: dim × dim matrix, seconds at 4,096 but minutes at 64×64×3 and 90 GB at 224×224×3
MIXTURES_MAX_VALUES = 4096
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: the split folders of a data directory that comes split
TRAIN, VAL = "train", "val"
#: the fraction of every class held out when a source comes unsplit
HELD_OUT = 0.25
DATA_HELP = "digits, mixtures, an ImageFolder directory (with train/ and val/, or split here), or cifar10:DIR / cifar100:DIR"


class Tensors(Dataset):
    """Images already in memory: (N, C, H, W) float32 and (N,) int64 labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self.targets[i]


@dataclass(frozen=True)
class Splits:
    """A source opened: both splits yield (image, label) with images not yet transformed."""

    train: Dataset
    val: Dataset
    classes: list[str]
    name: str
    #: True when the images are already in memory (worker processes would only add overhead)
    in_memory: bool = False


def digits() -> Tensors:
    """scikit-learn's 1,797 8x8 handwritten digits, one channel, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return Tensors(images, torch.tensor(data.target, dtype=torch.int64))


def mixtures(classes: int = 4, per_class: int = 300, image_size: int = 8, channels: int = 1,
             rank: int = 3, noise: float = 0.05, seed: int = 0) -> Tensors:
    """Images whose pixels lie near one of ``classes`` random ``rank``-dimensional subspaces
    (a mixture of low-rank Gaussians); the label is the subspace."""
    g = torch.Generator().manual_seed(seed)
    dim = channels * image_size * image_size
    if classes * rank > dim:
        raise UnrollError(f"mixtures of {classes} subspaces of rank {rank} need images of at least {classes * rank} "
                          f"pixels, the recipe's have {channels}×{image_size}×{image_size}; raise architecture.image_size",
                          field="architecture")
    if dim > MIXTURES_MAX_VALUES:
        raise UnrollError(f"mixtures are generated for small images: at most {MIXTURES_MAX_VALUES:,} values per image "
                          f"(channels × height × width), the recipe's have {dim:,} ({channels}×{image_size}×{image_size}); "
                          "give --data an ImageFolder", field="architecture")
    bases = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0][:, : classes * rank].reshape(dim, classes, rank)
    labels = torch.arange(classes).repeat_interleave(per_class)
    coeffs = torch.randn(len(labels), rank, generator=g)
    x = torch.einsum("dkr,nr->nkd", bases, coeffs)[torch.arange(len(labels)), labels]
    x = x + noise * torch.randn(x.shape, generator=g)
    return Tensors(x.reshape(-1, channels, image_size, image_size), labels)


class ImageReader:
    """The ImageFolder's loader: one file decoded and converted to the recipe's channels. A
    picklable object, not a closure, so that worker processes started by spawn can use it."""

    def __init__(self, channels: int):
        self.channels = channels

    def __call__(self, path: str):
        return open_image(path, self.channels)


def image_folder(root: Path, channels: int):
    """``root/<class>/<image>`` as a lazy ``torchvision.datasets.ImageFolder`` (file names only)."""
    from torchvision.datasets import ImageFolder

    image_mode(channels, root)  # an unsupported channel count fails now, not in a worker
    if not root.is_dir():
        raise UnrollError("no such data directory", where=str(root))
    try:
        return ImageFolder(str(root), loader=ImageReader(channels), is_valid_file=_is_image)
    except FileNotFoundError as e:  # no class folders, or class folders without images
        raise UnrollError(f"expected an ImageFolder (one sub-folder per class, holding {', '.join(IMAGE_SUFFIXES)} "
                          f"files): {_first_line(e)}", where=str(root)) from None
    except OSError as e:
        raise UnrollError(f"cannot read this folder: {e.strerror or type(e).__name__}", where=str(root)) from None


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES) and not Path(path).name.startswith(".")


def _first_line(e: Exception) -> str:
    return excerpt(str(e).splitlines()[0] if str(e) else type(e).__name__, 300).strip("'\"")


def open_data(spec: str, image_size: int, channels: int) -> Splits:
    """The source ``spec`` names (see the module docstring), both splits, nothing decoded."""
    if spec == "digits":
        if (channels, image_size) != (1, 8):
            raise UnrollError(f"digits are 1×8×8 images, the recipe's are {channels}×{image_size}×{image_size}; "
                              "train recipes/crate_digits.yaml, or give --data an ImageFolder of your images",
                              field="architecture")
        return _held_out(digits(), [str(c) for c in range(10)], "digits", in_memory=True)
    if spec == "mixtures":
        data = mixtures(image_size=image_size, channels=channels)
        return _held_out(data, [f"subspace {k}" for k in range(4)], "mixtures", in_memory=True)
    kind, sep, rest = spec.partition(":")
    if sep and kind in CIFAR_KINDS:
        if channels != 3:
            raise UnrollError(f"CIFAR images have 3 channels, the recipe's architecture.channels is {channels}",
                              where=spec)
        train, val = CifarBinary(rest, kind, train=True), CifarBinary(rest, kind, train=False)
        return Splits(train, val, train.classes, kind)
    root = Path(spec)
    if not root.is_dir():
        found = "found a file" if root.exists() else "no such data directory"
        raise UnrollError(f"{found}; expected {DATA_HELP}", where=spec)
    if (root / TRAIN).is_dir() and (root / VAL).is_dir():
        train, val = image_folder(root / TRAIN, channels), image_folder(root / VAL, channels)
        if train.classes != val.classes:
            missing = sorted(set(train.classes) ^ set(val.classes))
            raise UnrollError(f"{TRAIN}/ and {VAL}/ must hold the same class folders; only one of them has "
                              f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}", where=spec)
        return Splits(train, val, train.classes, root.name)
    folder = image_folder(root, channels)
    return _held_out(folder, folder.classes, root.name)


def _held_out(data: Any, classes: list[str], name: str, in_memory: bool = False) -> Splits:
    train, val = held_out_split(data.targets)
    return Splits(Subset(data, train), Subset(data, val), classes, name, in_memory)


def held_out_split(targets: Sequence[int], held_out: float = HELD_OUT, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): a fixed stratified ``held_out`` fraction of every class."""
    labels = torch.as_tensor(list(targets))
    g = torch.Generator().manual_seed(seed)
    val = []
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        val.append(members[: int(round(held_out * len(members)))])
    val_index = torch.cat(val).sort().values if val else torch.zeros(0, dtype=torch.int64)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[val_index] = False
    return torch.nonzero(mask).flatten().tolist(), val_index.tolist()


def labels_of(data: Dataset) -> list[int]:
    """Every item's label, read from the labels the sources keep (no image is decoded)."""
    if isinstance(data, Subset):
        every = labels_of(data.dataset)
        return [every[i] for i in data.indices]
    return list(data.targets)


def stack(data: Dataset, count: int | None = None, transform: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` items of ``data`` (all by default) as (images, labels) tensors, for the
    commands that need a small sample at once (``measure``, ``construct``)."""
    count = len(data) if count is None else min(count, len(data))
    items = [data[i] for i in range(count)]
    images = [transform(x) if transform else x for x, _ in items]
    return torch.stack(images), torch.tensor([y for _, y in items], dtype=torch.int64)
