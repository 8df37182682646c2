"""CIFAR-10 and CIFAR-100 read lazily from their binary distribution (never the pickled one).

The format (https://www.cs.toronto.edu/~kriz/cifar.html, "binary version"):

- CIFAR-10, ``cifar-10-binary.tar.gz`` extracting to ``cifar-10-batches-bin/``: training records in
  ``data_batch_1.bin`` .. ``data_batch_5.bin`` (10,000 each), test records in ``test_batch.bin``.
  A record is 3,073 bytes: one label byte (0..9), then 3,072 pixel bytes. Class names are in
  ``batches.meta.txt``, one per line.
- CIFAR-100, ``cifar-100-binary.tar.gz`` extracting to ``cifar-100-binary/``: ``train.bin`` (50,000
  records) and ``test.bin`` (10,000). A record is 3,074 bytes: a coarse label byte (0..19), a fine
  label byte (0..99), then 3,072 pixel bytes. The fine label is the one used; its names are in
  ``fine_label_names.txt``.

The 3,072 pixel bytes are the red plane, then the green, then the blue, each 32x32 row-major:
reshaped to (3, 32, 32) they are already channels-first.

Files are memory-mapped: constructing a dataset takes the labels from the label column (the
operating system pages the files in, 180 MB for CIFAR-10, but no image is made of them), and an
image's pixels are copied out when that item is asked for.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors

from unroll.errors import UnrollError, shorten

CIFAR_KINDS = ("cifar10", "cifar100")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
IMAGE_SHAPE = (3, 32, 32)
PIXEL_BYTES = 3 * 32 * 32
#: how many entries of a folder an error message lists before cutting the list short
LISTED_ENTRIES = 8


@dataclass(frozen=True)
class _Layout:
    title: str  # CIFAR-10
    folder: str  # the folder the archive extracts to
    archive: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_byte: int  # where in a record the label used sits
    classes: int
    names: str
    python_folder: str  # the pickled distribution's folder, to recognise it
    python_files: tuple[str, ...]

    @property
    def record(self) -> int:
        return self.label_byte + 1 + PIXEL_BYTES

    def expected(self) -> str:
        return f"{self.listing} (the {self.title} binary distribution, {self.archive})"

    @property
    def listing(self) -> str:
        train = f"{self.train[0]} .. {self.train[-1]}" if len(self.train) > 1 else self.train[0]
        return f"{train} and {self.test[0]}"


_LAYOUTS = {
    "cifar10": _Layout("CIFAR-10", "cifar-10-batches-bin", "cifar-10-binary.tar.gz",
                       tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",),
                       label_byte=0, classes=10, names="batches.meta.txt",
                       python_folder="cifar-10-batches-py", python_files=("data_batch_1", "test_batch", "batches.meta")),
    "cifar100": _Layout("CIFAR-100", "cifar-100-binary", "cifar-100-binary.tar.gz", ("train.bin",), ("test.bin",),
                        label_byte=1, classes=100, names="fine_label_names.txt",
                        python_folder="cifar-100-python", python_files=("train", "test", "meta")),
}


class CifarBinary(torch.utils.data.Dataset):
    """One split of CIFAR-10 or CIFAR-100 from the binary distribution, read lazily.

    ``root`` is the extracted folder (``cifar-10-batches-bin`` / ``cifar-100-binary``) or a folder
    containing it; ``kind`` one of :data:`CIFAR_KINDS`. Items are ``(image, label)``: a uint8
    :class:`torchvision.tv_tensors.Image` of shape (3, 32, 32) and an int.
    """

    classes: list[str]
    targets: list[int]

    def __init__(self, root: str | Path, kind: str, train: bool):
        if kind not in _LAYOUTS:
            raise UnrollError(f"unknown CIFAR kind {shorten(repr(kind))}; expected one of {', '.join(CIFAR_KINDS)}",
                              field="kind")
        self.kind = kind
        self.train = bool(train)
        layout = _LAYOUTS[kind]
        self.folder = _folder(Path(root), layout)
        self.files = [self.folder / name for name in (layout.train if train else layout.test)]
        self._record = layout.record
        self._maps: list[np.memmap] | None = None
        counts = [_record_count(path, layout) for path in self.files]
        self._starts = list(np.cumsum([0, *counts])[:-1].tolist())
        self._length = sum(counts)
        self.targets = []
        for path, mapped in zip(self.files, self._mapped()):
            labels = np.asarray(mapped[:, layout.label_byte])  # a strided view: pages are touched, nothing decoded
            bad = np.flatnonzero(labels >= layout.classes)
            if len(bad):
                raise UnrollError(f"record {bad[0]:,} (from 0) has label {labels[bad[0]]}; {layout.title} labels are "
                                  f"0..{layout.classes - 1} ({len(bad):,} records of {path.name} are out of range)",
                                  where=str(path))
            self.targets.extend(labels.tolist())
        self.classes = _classes(self.folder / layout.names, layout)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, int]:
        if not -self._length <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} records")
        index %= self._length
        file = bisect.bisect_right(self._starts, index) - 1
        row = self._mapped()[file][index - self._starts[file]]
        # a copy: the map is read-only, and the tensor must outlive it
        pixels = np.array(row[self._record - PIXEL_BYTES:]).reshape(IMAGE_SHAPE)
        return tv_tensors.Image(torch.from_numpy(pixels)), self.targets[index]

    def __getstate__(self) -> dict[str, Any]:
        # a memmap pickles as an in-memory copy of the whole file: workers (spawn) reopen their own
        return {**self.__dict__, "_maps": None}

    def _mapped(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [np.memmap(path, dtype=np.uint8, mode="r", shape=(count, self._record))
                          for path, count in zip(self.files, self._counts())]
        return self._maps

    def _counts(self) -> list[int]:
        ends = [*self._starts[1:], self._length]
        return [end - start for start, end in zip(self._starts, ends)]

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return f"CifarBinary({str(self.folder)!r}, kind={self.kind!r}, {split}, {self._length:,} records)"


def _folder(root: Path, layout: _Layout) -> Path:
    """The folder holding ``layout``'s files: ``root`` itself or its ``layout.folder``."""
    if not root.exists():
        raise UnrollError(f"no such folder; expected {layout.folder} or a folder containing it", where=str(root))
    if not root.is_dir():
        raise UnrollError(f"found a file; expected the folder {layout.folder} ({layout.archive} extracted) or a "
                          "folder containing it", where=str(root))
    folder = root / layout.folder if (root / layout.folder).is_dir() else root
    wanted = [*layout.train, *layout.test]
    missing = [name for name in wanted if not (folder / name).is_file()]
    if missing:
        raise UnrollError(_misplaced(root, folder, layout, missing), where=str(folder))
    return folder


def _misplaced(root: Path, folder: Path, layout: _Layout, missing: list[str]) -> str:
    """Why ``folder`` lacks ``missing``: the other kind, the pickled distribution, or just absent."""
    entries = {p.name for p in folder.iterdir()}
    around = {p.name for p in root.iterdir()}
    for kind, other in _LAYOUTS.items():
        if other is layout:
            continue
        if (folder.name == other.folder or other.folder in around
                or all(name in entries for name in (*other.train, *other.test))):
            return (f"this looks like the {other.title} binary distribution ({other.listing}), not {layout.title}; "
                    f"read it with kind {kind!r}, or download {layout.archive} from {CIFAR_URL}")
    for other in _LAYOUTS.values():
        if (folder.name == other.python_folder or other.python_folder in around
                or all(name in entries for name in other.python_files)):
            return (f"this looks like the python (pickled) distribution of {other.title} "
                    f"({other.python_folder}, files without .bin), which unroll does not read; download the binary "
                    f"version, {layout.archive}, from {CIFAR_URL} and extract it")
    found = sorted(entries)
    listed = ", ".join(shorten(name) for name in found[:LISTED_ENTRIES])
    if len(found) > LISTED_ENTRIES:
        listed += f" and {len(found) - LISTED_ENTRIES:,} more"
    return (f"missing {', '.join(missing)}: expected {layout.expected()} in {folder}; "
            f"found {listed or 'an empty folder'}")


def _record_count(path: Path, layout: _Layout) -> int:
    size = path.stat().st_size
    if size == 0 or size % layout.record:
        other = [o for o in _LAYOUTS.values() if o is not layout and size and size % o.record == 0]
        hint = f" (a multiple of {other[0].title}'s {other[0].record:,}-byte records)" if other else ""
        raise UnrollError(f"{path.name} is {size:,} bytes{hint}; expected a non-zero multiple of {layout.title}'s "
                          f"record size, {layout.record:,} bytes", where=str(path))
    return size // layout.record


def _classes(path: Path, layout: _Layout) -> list[str]:
    """The names in ``path``, one a line; ``"0"``, ``"1"``, ... where the file is absent."""
    if not path.exists():
        return [str(i) for i in range(layout.classes)]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UnrollError(f"cannot read {path.name} as UTF-8 text ({e})", where=str(path)) from None
    while lines and not lines[-1].strip():  # the distributed files end with blank lines
        lines.pop()
    names = [line.strip() for line in lines]
    if len(names) != layout.classes:
        raise UnrollError(f"{path.name} has {len(names)} names, one a line; expected {layout.classes} "
                          f"({layout.title})", where=str(path))
    return names
