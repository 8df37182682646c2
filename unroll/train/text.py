"""Text data for the white-box language models: a corpus of files, a byte-level BPE tokenizer,
and the token stream of each split as windows of next-token (or masked-token) targets.

**Sources** (:func:`open_text`). A directory: every file under it, recursively, in sorted order,
hidden files and folders (``.git``) left out; or a single file; or, with no spec, the default
corpus: the ``*.py`` files of the running Python's standard library (``sysconfig``'s ``stdlib``
path, any ``site-packages``/``dist-packages`` folder left out, its ``test`` packages kept: they are
ordinary Python too). Its name records the Python version (``python3.11-stdlib``), since the
corpus changes with it. A file is text when it decodes as UTF-8 and holds no NUL byte; every
other file is skipped and counted (:attr:`TextSource.skipped`).

**Split.** Whole files are held out, not lines: a file is a validation file when the SHA-256 of
its relative path, read as a fraction of 2**64, is below :data:`HELD_OUT` (5%). The split depends
on the path alone, so it is the same on every run and machine, and adding a file never moves
another. A corpus of at least two files always holds out one and trains on one. A single file is
cut instead, at the last line break before 95% of its bytes: its tail is the validation text.

**Tokenizer.** A byte-level BPE (GPT-2's pre-tokenizer and decoder, the ``tokenizers`` library)
trained on the training files only, at most ``max_train_bytes`` of them (the files in the order
of their path digests, so the sample is fixed and spread over the corpus). Its first ids are the
special tokens: ``<|endoftext|>`` = 0, ``[MASK]`` = 1 (:data:`SPECIAL_TOKENS`), then the 256
byte tokens, then the merges; so ``vocab_size`` must be at least 258. Text containing
``<|endoftext|>`` literally is encoded as its bytes: only the stream's separators are id 0. A
run keeps its tokenizer as ``tokenizer.json`` (:func:`save_tokenizer`); :func:`load_tokenizer`
reuses one, or a user's own (GPT-2's), whose vocabulary must fit the recipe's ``vocab_size``.

**Token stream.** Each split is its files' ids, each file followed by ``<|endoftext|>``, in file
order. It is cached as a ``.npy`` file (uint16 when every id fits, vocabularies up to 65,536,
else uint32) in the cache folder (``--cache``, else ``$UNROLL_CACHE/tokens``, else
``~/.cache/unroll/tokens``), named by the digest of the file list (paths, sizes, mtimes) and the
tokenizer's JSON, written atomically: a second run maps it at once. A trained tokenizer is
cached the same way, keyed by the training files, ``vocab_size`` and the cap.

**Windows** (:class:`TokenWindows`). Item ``i`` is ``(x, y)``: ``x`` the ``context`` ids at the
non-overlapping offset ``i * context``, ``y`` the same ids shifted by one (the next tokens), both
int64. Masked-LM batches are made from ``x`` by :func:`mask_tokens` (BERT's 15% / 80-10-10 rule).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from unroll.errors import UnrollError, excerpt
from unroll.files import atomic_write, text_writer, write_durably

EOT = "<|endoftext|>"
MASK = "[MASK]"
#: in this order they take ids 0 and 1 of a trained tokenizer
SPECIAL_TOKENS = (EOT, MASK)
TOKENIZER_FILE = "tokenizer.json"
#: special tokens, then one token per byte: the smallest vocabulary a trained tokenizer can have
MIN_VOCAB = len(SPECIAL_TOKENS) + 256
#: the fraction of the files held out for validation
HELD_OUT = 0.05
#: where a single file is cut: the text after this fraction of its bytes is the validation text
SINGLE_FILE_TRAIN = 1 - HELD_OUT
#: the most bytes of training text a tokenizer learns from: the whole standard library (30 MB
#: of training files, 5 s on 2 cores at vocab 512 or 4096), a sample of a larger corpus
MAX_TRAIN_BYTES = 32_000_000
#: the target of positions a loss ignores (torch's ``cross_entropy`` default)
IGNORE_INDEX = -100
CACHE_ENV = "UNROLL_CACHE"
#: bumped whenever the cached files' content changes meaning: old caches are then never read
CACHE_FORMAT = 1
#: folders of the standard library that hold installed packages, not the standard library
PACKAGE_FOLDERS = ("site-packages", "dist-packages")
#: files encoded per call to the tokenizer: enough for its threads, few enough for memory
ENCODE_BATCH = 64


@dataclass(frozen=True)
class TextFile:
    """One file of a corpus, or a byte range of one (a single-file corpus is cut in two)."""

    path: str
    #: the path relative to the corpus root, with ``/``: what the split is decided on
    rel: str
    size: int
    mtime_ns: int
    span: tuple[int, int] | None = None

    def read(self) -> str:
        data = _read_bytes(Path(self.path))
        if self.span is not None:
            data = data[self.span[0]:self.span[1]]
        return data.decode("utf-8")

    def key(self) -> list:
        """What identifies this content in a cache key: a changed file changes its size or mtime."""
        return [self.path, self.size, self.mtime_ns, list(self.span) if self.span else None]


@dataclass(frozen=True)
class TextSource:
    """A corpus opened and split; nothing is tokenized yet."""

    train: tuple[TextFile, ...]
    val: tuple[TextFile, ...]
    name: str
    root: str
    #: files skipped as not UTF-8 text (binary, or another encoding)
    skipped: int

    def describe(self) -> str:
        skipped = f", {self.skipped:,} skipped as not UTF-8 text" if self.skipped else ""
        return f"{self.name}: {len(self.train):,} training and {len(self.val):,} held-out files{skipped}"


# --- sources -------------------------------------------------------------------------------------

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_name() -> str:
    return f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib"


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UnrollError(f"cannot read this file: {e.strerror or type(e).__name__}", where=str(path)) from None


def is_text(data: bytes) -> bool:
    """UTF-8 without NUL bytes: a NUL decodes as UTF-8 but marks a binary file."""
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def walk(root: Path, suffix: str | None = None, exclude: Sequence[str] = ()) -> list[Path]:
    """Every file under ``root``, sorted by relative path; hidden names and ``exclude`` folders
    left out, symbolic links to folders not followed (a link loop would never end)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in exclude)
        for name in files:
            if not name.startswith(".") and (suffix is None or name.endswith(suffix)):
                found.append(Path(folder) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def held_out_fraction(rel: str) -> float:
    """Where the path falls in [0, 1): a file is held out when this is below the held-out fraction."""
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def split_files(files: Sequence[TextFile], held_out: float = HELD_OUT) -> tuple[tuple[TextFile, ...], tuple[TextFile, ...]]:
    """(training files, held-out files), both in the given order; at least one of each for two files or more."""
    val = {f.rel for f in files if held_out_fraction(f.rel) < held_out}
    by_fraction = sorted(files, key=lambda f: held_out_fraction(f.rel))
    if not val and len(files) >= 2:  # a small corpus: the file nearest to the threshold stands in
        val = {by_fraction[0].rel}
    if len(val) == len(files) and len(files) >= 2:
        val.discard(by_fraction[-1].rel)
    return tuple(f for f in files if f.rel not in val), tuple(f for f in files if f.rel in val)


def _cut(data: bytes, fraction: float) -> int:
    """A byte offset near ``fraction`` of ``data`` that starts a line, else a character."""
    cut = int(len(data) * fraction)
    line = data.rfind(b"\n", 0, cut)
    if line > 0:
        return line + 1
    while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:  # inside a multi-byte character
        cut -= 1
    return cut


def _text_file(path: Path, rel: str) -> TextFile:
    stat = path.stat()
    return TextFile(str(path), rel, stat.st_size, stat.st_mtime_ns)


def open_text(spec: str | Path | None = None, held_out: float = HELD_OUT) -> TextSource:
    """The corpus ``spec`` names (a directory, a file, or None for the standard library), split."""
    if spec is None:
        root, name = stdlib_root(), stdlib_name()
        paths = walk(root, suffix=".py", exclude=PACKAGE_FOLDERS)
    else:
        root = Path(spec)
        name = root.name or str(root)
        if root.is_dir():
            paths = walk(root)
        elif root.exists():
            paths = [root]
        else:
            raise UnrollError("no such file or directory", where=str(spec))
    if not paths:
        raise UnrollError("no files here: expected a folder of UTF-8 text files, or one such file", where=str(root))
    files, skipped = [], 0
    for path in paths:
        data = _read_bytes(path)
        if not is_text(data):
            skipped += 1
            continue
        rel = path.name if path == root else path.relative_to(root).as_posix()
        files.append((path, rel, data))
    if not files:
        raise UnrollError(f"no UTF-8 text files here: all {skipped:,} files were skipped as not UTF-8 text "
                          "(binary, or another encoding)", where=str(root))
    if len(files) == 1:
        path, rel, data = files[0]
        whole = _text_file(path, rel)
        cut = _cut(data, SINGLE_FILE_TRAIN)
        if cut == 0 or cut == len(data):
            raise UnrollError(f"one text file of {len(data):,} bytes cannot be split into training and held-out "
                              "text; give a longer file or a folder of files", where=str(path))
        train = TextFile(whole.path, rel, whole.size, whole.mtime_ns, (0, cut))
        val = TextFile(whole.path, rel, whole.size, whole.mtime_ns, (cut, len(data)))
        return TextSource((train,), (val,), name, str(root), skipped)
    train_files, val_files = split_files([_text_file(path, rel) for path, rel, _ in files], held_out)
    return TextSource(train_files, val_files, name, str(root), skipped)


# --- tokenizer -----------------------------------------------------------------------------------

def _prepared(tokenizer):
    # text that spells a special token is still text: only the separators this module inserts are specials
    tokenizer.encode_special_tokens = True
    return tokenizer


def sample_text(files: Sequence[TextFile], max_bytes: int | None) -> Iterator[str]:
    """The training text a tokenizer learns from: the files in the order of their path digests
    (a fixed sample spread over the corpus), at most ``max_bytes`` (None: all)."""
    left = math.inf if max_bytes is None else max_bytes
    for f in sorted(files, key=lambda f: (hashlib.sha256(f.rel.encode()).digest(), f.span)):
        if left <= 0:
            return
        text = f.read()
        size = len(text.encode("utf-8"))
        if size > left:
            text = text.encode("utf-8")[: int(left)].decode("utf-8", errors="ignore")
            size = int(left)
        left -= size
        yield text


def _train(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def train_tokenizer(files: Sequence[TextFile], vocab_size: int, max_bytes: int | None = MAX_TRAIN_BYTES):
    """A byte-level BPE of at most ``vocab_size`` tokens learnt from ``files`` (the training split)."""
    if vocab_size < MIN_VOCAB:
        raise UnrollError(f"a byte-level tokenizer needs a vocab_size of at least {MIN_VOCAB} "
                          f"({len(SPECIAL_TOKENS)} special tokens and 256 bytes), the recipe's is {vocab_size}",
                          field="vocab_size")
    return _prepared(_train(sample_text(files, max_bytes), vocab_size))


def vocab_size_of(tokenizer) -> int:
    return tokenizer.get_vocab_size(with_added_tokens=True)


def check_vocab(tokenizer, vocab_size: int, where: str | None = None) -> None:
    size = vocab_size_of(tokenizer)
    if size > vocab_size:
        raise UnrollError(f"the tokenizer has {size:,} tokens, more than the recipe's vocab_size of {vocab_size:,}; "
                          "raise vocab_size or give a smaller tokenizer", where=where, field="vocab_size")


def token_id(tokenizer, token: str, where: str | None = None) -> int:
    """The id of a special token (:data:`EOT`, :data:`MASK`), which the tokenizer must have."""
    found = tokenizer.token_to_id(token)
    if found is None:
        need = "masked-LM training" if token == MASK else "separating files"
        raise UnrollError(f"the tokenizer has no {token} token, which {need} needs", where=where)
    return found


def save_tokenizer(tokenizer, folder: str | Path) -> Path:
    """``folder/tokenizer.json``, written atomically."""
    return atomic_write(Path(folder) / TOKENIZER_FILE, text_writer(tokenizer.to_str()))


def load_tokenizer(path: str | Path, vocab_size: int | None = None):
    """A tokenizer saved as JSON by the ``tokenizers`` library (this module's, or e.g. GPT-2's);
    its vocabulary must fit ``vocab_size`` and hold :data:`EOT`."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    text = _read_bytes(path) if path.exists() else None
    if text is None:
        raise UnrollError("no such tokenizer file", where=str(path))
    try:
        tokenizer = Tokenizer.from_str(text.decode("utf-8"))
    except Exception as e:  # the library raises a bare Exception for any malformed JSON
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnrollError(f"not a tokenizer JSON (as the tokenizers library saves): {excerpt(message, 200)}",
                          where=str(path)) from None
    if vocab_size is not None:
        check_vocab(tokenizer, vocab_size, str(path))
    token_id(tokenizer, EOT, str(path))
    return _prepared(tokenizer)


def run_tokenizer(weights: str | Path | None, tokenizer: str | Path | None, vocab_size: int):
    """The tokenizer a run's weights were trained with: ``tokenizer`` when given (a user's
    ``--tokenizer``), else the run's ``tokenizer.json`` beside the weights (``runs/x/model.safetensors``)
    or at the run's top for a checkpoint's (``runs/x/checkpoints/epoch-0003/model.safetensors``).
    None with neither weights nor ``tokenizer``: the caller trains (or reuses) the corpus's own BPE."""
    if tokenizer is None and weights is not None:
        folder = Path(weights).parent
        candidates = [folder / TOKENIZER_FILE, folder.parent.parent / TOKENIZER_FILE]
        tokenizer = next((c for c in candidates if c.is_file()), None)
        if tokenizer is None:
            raise UnrollError(f"no {TOKENIZER_FILE} beside these weights (unroll train saves one in its run folder); "
                              "give the run's with --tokenizer", where=str(weights))
    return None if tokenizer is None else load_tokenizer(tokenizer, vocab_size)


# --- token cache ---------------------------------------------------------------------------------

def default_cache() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root) / "tokens" if root else Path.home() / ".cache" / "unroll" / "tokens"


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def encode_files(files: Sequence[TextFile], tokenizer) -> np.ndarray:
    """The files' ids, each file followed by :data:`EOT`, as one array of :func:`id_dtype`."""
    dtype, eot = id_dtype(vocab_size_of(tokenizer)), token_id(tokenizer, EOT)
    parts = []
    for start in range(0, len(files), ENCODE_BATCH):
        batch = files[start:start + ENCODE_BATCH]
        for ids in _encode(tokenizer, [f.read() for f in batch]):
            parts.append(np.asarray(ids, dtype=dtype))
            parts.append(np.asarray([eot], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _save_npy(array: np.ndarray):
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
    return write


def cached_ids(files: Sequence[TextFile], tokenizer, cache: str | Path | None = None) -> np.ndarray:
    """The split's token stream, memory-mapped from the cache (encoded and written on a miss)."""
    cache = Path(cache) if cache is not None else default_cache()
    key = digest({"format": CACHE_FORMAT, "files": [f.key() for f in files], "tokenizer": tokenizer.to_str()})
    path = cache / f"ids-{key}.npy"
    if not path.exists():
        atomic_write(path, _save_npy(encode_files(files, tokenizer)))
    return np.load(path, mmap_mode="r")


def cached_tokenizer(files: Sequence[TextFile], vocab_size: int, max_bytes: int | None, cache: str | Path | None = None):
    """:func:`train_tokenizer`, trained once per (training files, vocab_size, cap) and kept in the cache."""
    import tokenizers

    cache = Path(cache) if cache is not None else default_cache()
    key = digest({"format": CACHE_FORMAT, "files": [f.key() for f in files], "vocab_size": vocab_size,
                  "max_bytes": max_bytes, "tokenizers": tokenizers.__version__})
    path = cache / f"bpe-{key}.json"
    if path.exists():
        return load_tokenizer(path, vocab_size)
    tokenizer = train_tokenizer(files, vocab_size, max_bytes)
    atomic_write(path, lambda tmp: write_durably(tmp, tokenizer.to_str().encode("utf-8")))
    return tokenizer


# --- windows -------------------------------------------------------------------------------------

def _memmap_location(ids: np.memmap) -> tuple[str, int]:
    """(file, byte offset) of the first element of ``ids``: a slice of a memmap keeps its
    parent's ``offset``, so the offset is recomputed from where the data lies in the mapping."""
    mapped = np.frombuffer(ids._mmap, dtype=np.uint8)  # numpy maps from offset rounded down to a granule
    start = ids.offset - ids.offset % mmap.ALLOCATIONGRANULARITY
    return str(ids.filename), start + (ids.ctypes.data - mapped.ctypes.data)


class TokenWindows(Dataset):
    """Non-overlapping windows of a token stream: item ``i`` is ``(x, y)``, ``x = ids[i*c : i*c + c]``,
    ``y = ids[i*c + 1 : i*c + c + 1]`` (int64). Nothing is read until an item is. A memory-mapped
    stream pickles as its file name and offset (worker processes map it again), never its data.
    Keys may be ``(epoch, index)`` (the training loader's sampler hands those)."""

    def __init__(self, ids: np.ndarray | str | Path, context: int):
        if context < 1:
            raise ValueError(f"context must be positive, got {context}")
        if isinstance(ids, (str, Path)):
            ids = np.load(ids, mmap_mode="r")
        if ids.ndim != 1:
            raise ValueError(f"a token stream is one-dimensional, got shape {ids.shape}")
        self.context = context
        self.dtype, self.count = ids.dtype, len(ids)
        self.location = _memmap_location(ids) if isinstance(ids, np.memmap) and ids._mmap is not None else None
        self._ids: np.ndarray | None = ids

    @property
    def ids(self) -> np.ndarray:
        if self._ids is None:
            path, offset = self.location
            self._ids = np.memmap(path, dtype=self.dtype, mode="r", offset=offset, shape=(self.count,))
        return self._ids

    def __len__(self) -> int:
        return max(0, (self.count - 1) // self.context)

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        index = key[1] if isinstance(key, tuple) else key
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} of {len(self)}")
        start = index * self.context
        chunk = torch.from_numpy(self.ids[start:start + self.context + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.location is not None:
            state["_ids"] = None
        return state


@dataclass(frozen=True)
class TextSplits:
    """A corpus opened for a language model: both splits as windows, and their tokenizer."""

    train: TokenWindows
    val: TokenWindows
    tokenizer: Any
    name: str
    #: files skipped as not UTF-8 text
    skipped: int
    #: a window is a slice of a memory map: worker processes would only add overhead
    in_memory: bool = True


def open_tokens(spec: str | Path | None, vocab_size: int, context: int, cache: str | Path | None = None,
                tokenizer: Any = None, max_train_bytes: int | None = MAX_TRAIN_BYTES) -> TextSplits:
    """The corpus ``spec`` names, tokenized (by ``tokenizer``: a ``tokenizer.json`` or one already
    loaded, else a BPE trained on its training files) and cut into windows of ``context`` tokens."""
    source = open_text(spec)
    if isinstance(tokenizer, (str, Path)):
        tok = load_tokenizer(tokenizer, vocab_size)
    elif tokenizer is not None:  # loaded (run_tokenizer's): its vocabulary was checked then
        tok = tokenizer
    else:
        tok = cached_tokenizer(source.train, vocab_size, max_train_bytes, cache)
    splits = {}
    for split, files in (("training", source.train), ("held-out", source.val)):
        windows = TokenWindows(cached_ids(files, tok, cache), context)
        if len(windows) == 0:
            raise UnrollError(f"the {split} text is {windows.count:,} tokens, less than one window of "
                              f"context + 1 = {context + 1:,}; give more text or a shorter context",
                              where=source.root)
        splits[split] = windows
    return TextSplits(splits["training"], splits["held-out"], tok, source.name, source.skipped)


def spread(count: int, n: int) -> list[int]:
    """``min(n, count)`` indices of ``range(count)``, evenly spaced from 0: a sample of a split's
    windows that reaches every part of it (its files are in order) rather than its first files."""
    n = min(n, count)
    return [i * count // n for i in range(n)]


@dataclass(frozen=True)
class HeldOut:
    """Windows of held-out text, as a command that reads a trained model's text sees them."""

    #: (windows, context) int64 ids, windows evenly spread over the held-out split
    ids: torch.Tensor
    tokenizer: Any
    #: the corpus's name (``python3.11-stdlib``, a folder's name)
    name: str
    #: the windows the held-out split has in all
    available: int


def held_out_windows(spec: str | Path | None, vocab_size: int, context: int, windows: int, tokenizer: Any = None,
                     cache: str | Path | None = None) -> HeldOut:
    """``windows`` windows of ``context`` tokens of the held-out split of ``spec`` (as
    :func:`open_tokens` opens it, ``tokenizer`` included), spread over it (:func:`spread`)."""
    splits = open_tokens(spec, vocab_size, context, cache=cache, tokenizer=tokenizer)
    val = splits.val
    ids = torch.stack([val[i][0] for i in spread(len(val), windows)])
    return HeldOut(ids, splits.tokenizer, splits.name, len(val))


# --- objectives and baselines --------------------------------------------------------------------

def mask_tokens(ids: torch.Tensor, vocab_size: int, mask_id: int, generator: torch.Generator,
                rate: float = 0.15, mask: float = 0.8, random: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each position is chosen with probability ``rate``; a chosen one becomes
    ``mask_id`` with probability ``mask``, a uniformly random id in [0, vocab_size) with
    probability ``random``, else stays. (inputs, targets): targets are the original ids at the
    chosen positions and :data:`IGNORE_INDEX` elsewhere. The draws come from ``generator``
    (on its device), so a batch's masking depends on its seed alone."""
    draw = dict(generator=generator, device=generator.device)
    chosen = (torch.rand(ids.shape, **draw) < rate).to(ids.device)
    kind = torch.rand(ids.shape, **draw).to(ids.device)
    replacement = torch.randint(0, vocab_size, ids.shape, **draw).to(ids.device, ids.dtype)
    inputs = torch.where(chosen & (kind < mask), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (kind >= mask) & (kind < mask + random), replacement, inputs)
    targets = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return inputs, targets


def unigram_entropy(ids: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> float:
    """The entropy, in nats per token, of the ids' own frequencies: the loss of a model that knows
    only how often each token occurs, which a language model must beat."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(ids), chunk):  # a memory map is read piecewise, never copied whole to int64
        part = np.asarray(ids[start:start + chunk])
        if part.size and int(part.max()) >= vocab_size:
            raise ValueError(f"id {int(part.max())} is outside a vocabulary of {vocab_size}")
        counts += np.bincount(part, minlength=vocab_size)
    total = counts.sum()
    if total == 0:
        raise ValueError("no tokens")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())
