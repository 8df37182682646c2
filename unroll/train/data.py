"""Image classification data: scikit-learn's 8x8 digits (embedded, no download), an ImageFolder
directory, or synthetic mixtures of low-rank Gaussians (the theory's own setting).

Every source returns float tensors (N, C, H, W) and integer labels; :func:`split` makes the fixed,
stratified held-out quarter used for evaluation (independent of the training seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from unroll.errors import UnrollError
from unroll.images import image_mode, read_image

#: the most values (channels × height × width) of a mixtures image: generating one takes the QR of a
#: dim × dim matrix, seconds at 4,096 but minutes at 64×64×3 and 90 GB at 224×224×3
MIXTURES_MAX_VALUES = 4096
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Dataset:
    images: torch.Tensor  # (N, C, H, W) float32
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> Dataset:
        return Dataset(self.images[index], self.labels[index], self.classes, self.name)


def digits() -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits, one channel, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return Dataset(images, torch.tensor(data.target, dtype=torch.int64), [str(c) for c in range(10)], "digits")


def mixtures(classes: int = 4, per_class: int = 300, image_size: int = 8, channels: int = 1,
             rank: int = 3, noise: float = 0.05, seed: int = 0) -> Dataset:
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
    images = x.reshape(-1, channels, image_size, image_size)
    return Dataset(images, labels, [f"subspace {k}" for k in range(classes)], "mixtures")


def image_folder(root: str | Path, image_size: int, channels: int) -> Dataset:
    """``root/<class>/<image>``: one folder per class, images resized to ``image_size``."""
    root = Path(root)
    if not root.is_dir():
        raise UnrollError("no such data directory", where=str(root))
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise UnrollError("expected one sub-folder per class (an ImageFolder), found none", where=str(root))
    image_mode(channels, root)
    images, labels = [], []
    for label, folder in enumerate(folders):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(read_image(path, image_size, channels))
                labels.append(label)
    if not images:
        raise UnrollError(f"no images found in {len(folders)} class folders", where=str(root))
    return Dataset(torch.stack(images), torch.tensor(labels), [f.name for f in folders], root.name)


def load(spec: str, image_size: int, channels: int) -> Dataset:
    """``digits``, ``mixtures`` (generated at the recipe's image size) or a directory path."""
    if spec == "digits":
        data = digits()
        if data.images.shape[1:] != (channels, image_size, image_size):
            raise UnrollError(f"digits are 1×8×8 images, the recipe's are {channels}×{image_size}×{image_size}; "
                              "train recipes/crate_digits.yaml, or give --data an ImageFolder of your images",
                              field="architecture")
        return data
    if spec == "mixtures":
        return mixtures(image_size=image_size, channels=channels)
    if not Path(spec).is_dir():
        found = "found a file" if Path(spec).exists() else "no such data directory"
        raise UnrollError(f"{found}; expected digits, mixtures, or an ImageFolder directory", where=spec)
    return image_folder(spec, image_size, channels)


def split(data: Dataset, held_out: float = 0.25, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, validation): a fixed stratified held-out fraction of every class."""
    g = torch.Generator().manual_seed(seed)
    val = []
    for c in torch.unique(data.labels):
        members = torch.nonzero(data.labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        val.append(members[: int(round(held_out * len(members)))])
    val_index = torch.cat(val).sort().values
    mask = torch.ones(len(data), dtype=torch.bool)
    mask[val_index] = False
    return data.subset(torch.nonzero(mask).flatten()), data.subset(val_index)
