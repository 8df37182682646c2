"""What ``unroll train`` trains a network to do: classify images, or model language.

The training loop (:mod:`unroll.train.loop`) is the same for every task: batches from the loader,
micro-batches, the optimiser, checkpoints, torchrun. A task supplies what differs: its data
(``train_set``/``val_set`` of (input, target) items), how a micro-batch becomes the model's input
and target (MixUp/CutMix for images, BERT's masking for a masked language model), the loss, what
counts as a hit, the validation figures and the columns of ``metrics.csv``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from unroll.errors import UnrollError, located
from unroll.train import data as datasets
from unroll.train import state
from unroll.train.evaluate import evaluate, summed
from unroll.train.loader import Transformed, seeded
from unroll.train.transforms import batch_mixing, eval_transform, train_transform
from unroll.train.world import World
from unroll.network import MASKED_LM

#: ``--data`` (or ``training.data``) naming the corpus every machine has: the Python standard library
PYTHON_STDLIB = "python-stdlib"


@dataclass
class ImageClassification:
    """Images -> classes: the recipe's augmentation per image, MixUp/CutMix per micro-batch,
    cross-entropy with label smoothing; validation top-1, top-5 and loss."""

    recipe: Any
    data: str
    seed: int
    columns: list[str] = field(default_factory=lambda: list(state.METRICS))
    unit: str = "images"

    def __post_init__(self):
        t, a = self.recipe.training, self.recipe.architecture
        source = datasets.open_data(self.data, a.image_size, a.channels)
        if len(source.classes) != a.classes:
            raise UnrollError(f"the data has {len(source.classes)} classes, the recipe's architecture.classes is "
                              f"{a.classes}; fine-tuning on it: --set architecture.classes={len(source.classes)}")
        self.name, self.in_memory = source.name, source.in_memory
        self.train_set = Transformed(source.train, train_transform(t, a.image_size, a.channels), self.seed)
        self.val_set = Transformed(source.val, eval_transform(t, a.image_size, a.channels))
        self.mixing = batch_mixing(t, a.classes)

    def describe(self) -> str:
        return (f"{self.name}: {len(self.train_set):,} training and {len(self.val_set):,} validation images, "
                f"{self.recipe.architecture.classes} classes")

    def prepare(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) of a micro-batch; MixUp/CutMix under ``seed`` make soft targets."""
        if self.mixing is None:
            return x, y
        with seeded(seed):
            return self.mixing(x, y)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """(the loss to differentiate, the summed loss, the images it sums over)."""
        loss = F.cross_entropy(logits.float(), target, label_smoothing=self.recipe.training.label_smoothing)
        return loss, loss.item() * len(target), len(target)

    def hits(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> int:
        return int((logits.argmax(-1) == y).sum().item())

    def count(self, x: torch.Tensor) -> int:
        return len(x)

    def validate(self, model, loader, device, autocast, world: World) -> dict:
        scores = evaluate(model, loader, device, autocast, world=world)
        return {"val_loss": scores.loss, "val_acc": scores.top1, "val_top5": scores.top5}

    def row(self, epoch: int, units: int, train_loss: float, hits: float, val: dict, lr: float, rate: float,
            wait: float, seconds: float) -> dict:
        return {"epoch": epoch, "train_loss": train_loss, "train_acc": hits, **val, "lr": lr,
                "images_per_second": rate, "loader_wait": wait, "seconds": seconds}

    def line(self, row: dict) -> str:
        return (f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  val loss {row['val_loss']:.4f} "
                f"acc {row['val_acc']:.4f} top-5 {row['val_top5']:.4f}")

    def save(self, out: Path) -> None:
        """Files beside the checkpoints (none for images)."""

    def check(self, model: torch.nn.Module, device: torch.device) -> None:
        """Nothing to check of an image classifier before training."""

    @property
    def source(self) -> str:
        return self.data


class MaskedWindows(torch.utils.data.Dataset):
    """Token windows with BERT's masking drawn per window: window ``i`` of epoch ``e`` is masked
    under :func:`~unroll.train.loader.sample_seed` ``(seed, e, i)`` (a validation window, keyed by
    index alone, under ``(seed, -1, i)``), whichever process or micro-batch reads it. Items are
    (inputs, targets): targets hold the original ids at the chosen positions, the ignore index
    elsewhere."""

    def __init__(self, windows, vocab_size: int, mask_id: int, task, seed: int):
        self.windows, self.vocab_size, self.mask_id, self.task, self.seed = windows, vocab_size, mask_id, task, seed

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, key):
        from unroll.train import text
        from unroll.train.loader import sample_seed

        epoch, index = key if isinstance(key, tuple) else (-1, key)
        x, _ = self.windows[index]
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        t = self.task
        return text.mask_tokens(x, self.vocab_size, self.mask_id, generator, t.rate, t.mask, t.random)


@dataclass
class LanguageModelling:
    """Token windows -> the next token (``causal_lm``) or the masked ones (``masked_lm``, BERT's
    15% / 80-10-10); a byte-level BPE tokenizer trained on the training text (or the run's own
    ``tokenizer.json`` on resume, or the user's); validation loss and perplexity per token.

    The loss of a micro-batch is its summed cross-entropy divided by the number of positions one
    window predicts on average (every one for a causal model, ``rate`` of them for a masked one)
    times the micro-batch's windows: a constant, so that micro-batches and processes add up to the
    update of the whole batch however the masked positions fall, and a batch without one is 0."""

    recipe: Any
    data: str | None
    seed: int
    out: Path
    resume: bool
    tokenizer: str | Path | None = None
    cache: str | Path | None = None
    columns: list[str] = field(default_factory=lambda: list(state.LANGUAGE_METRICS))
    unit: str = "tokens"

    def __post_init__(self):
        from unroll.train import text

        a = self.recipe.architecture
        self.spec = self.data or PYTHON_STDLIB
        own = self.out / text.TOKENIZER_FILE
        given = own if self.resume and own.is_file() else self.tokenizer
        splits = text.open_tokens(None if self.spec == PYTHON_STDLIB else self.spec, a.vocab_size, a.context,
                                  cache=self.cache, tokenizer=given)
        self.text = text
        self.tokenizer_model = splits.tokenizer
        self.name, self.in_memory = splits.name, splits.in_memory
        self.train_set, self.val_set = splits.train, splits.val
        self.masked = self.recipe.task_kind == MASKED_LM
        self.per_window = a.context * (self.recipe.task.rate if self.masked else 1.0)
        if self.masked:  # random replacements among the tokenizer's own tokens, not the padding rows
            mask_id = text.token_id(splits.tokenizer, text.MASK)
            real = text.vocab_size_of(splits.tokenizer)
            self.train_set = MaskedWindows(splits.train, real, mask_id, self.recipe.task, self.seed)
            self.val_set = MaskedWindows(splits.val, real, mask_id, self.recipe.task, self.seed)

    @property
    def source(self) -> str:
        """What the run read, as its checkpoints record it (the standard library's changes with Python)."""
        return f"{self.spec} ({self.name})" if self.spec == PYTHON_STDLIB else self.spec

    def describe(self) -> str:
        context = self.recipe.architecture.context
        return (f"{self.name}: {len(self.train_set):,} training and {len(self.val_set):,} validation windows of "
                f"{context} tokens, vocabulary {self.recipe.architecture.vocab_size:,}")

    def prepare(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y  # the next tokens, or (masked by the dataset) the inputs and their masked targets

    def _summed(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=self.text.IGNORE_INDEX,
                               reduction="sum")

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """(the loss to differentiate, the summed cross-entropy, the positions it sums over)."""
        summed = self._summed(logits, target)
        counted = int((target != self.text.IGNORE_INDEX).sum().item())
        return summed / (self.per_window * len(target)), summed.item(), counted

    def hits(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> int:
        counted = target != self.text.IGNORE_INDEX
        return int(((logits.argmax(-1) == target) & counted).sum().item())

    def count(self, x: torch.Tensor) -> int:
        return x.numel()

    def validate(self, model, loader, device, autocast, world: World) -> dict:
        """Mean cross-entropy per predicted token over the held-out windows (masked ones drawn
        per window, the same every epoch and on any number of processes)."""
        def figures(logits: torch.Tensor, target: torch.Tensor) -> list[float]:  # loss summed, tokens
            return [self._summed(logits, target).item(), (target != self.text.IGNORE_INDEX).sum().item()]

        total, tokens = summed(model, loader, device, figures, 2, autocast, world).tolist()
        loss = total / max(tokens, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}

    def row(self, epoch: int, units: int, train_loss: float, hits: float, val: dict, lr: float, rate: float,
            wait: float, seconds: float) -> dict:
        """``units``: the tokens of one epoch, all processes (every epoch trains as many)."""
        return {"epoch": epoch, "train_loss": train_loss, **val, "tokens": epoch * units, "lr": lr,
                "tokens_per_second": rate, "loader_wait": wait, "seconds": seconds}

    def line(self, row: dict) -> str:
        return (f"train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f} ppl {row['val_ppl']:.1f}  "
                f"{row['tokens']:,} tokens")

    def save(self, out: Path) -> None:
        """The tokenizer beside the checkpoints: resuming, generating and evaluating read this one."""
        self.text.save_tokenizer(self.tokenizer_model, out)

    def check(self, model: torch.nn.Module, device: torch.device) -> None:
        """A causal language model must never look ahead: trained on next tokens, a model that sees
        them would learn to copy. Checked on two sequences that differ in their last token."""
        if self.masked:
            return
        a = self.recipe.architecture
        length = min(a.context, 8)
        ids = torch.randint(0, a.vocab_size, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
        other = ids.clone()
        other[0, -1] = (other[0, -1] + 1) % a.vocab_size
        with torch.no_grad():
            leaked = not torch.allclose(model(ids)[0, :-1].float(), model(other)[0, :-1].float(), atol=1e-6)
        if leaked:
            raise UnrollError("task causal_lm needs a causal model, and this one looks ahead: a token's logits "
                              "changed with a later token; make every step that mixes tokens causal (softmax: "
                              "{causal: true}, normalized_memberships: {causal: true, ...}), or say task: masked_lm")


def text_spec(recipe, data: str | None) -> str | None:
    """The corpus a language recipe reads (what ``unroll train``, ``measure`` and ``features`` open):
    ``--data``, else the recipe's ``training.data`` when it names one; None for the corpus every
    machine has, the standard library (named, or by default: the schema's default is an image set)."""
    named = recipe.training.data if "data" in recipe.training.model_fields_set else None
    spec = data or named
    return None if spec == PYTHON_STDLIB else spec


def open_task(recipe, data: str | None, seed: int, out: Path, resume: bool, tokenizer: str | Path | None,
              where: str) -> ImageClassification | LanguageModelling:
    """The task the recipe states, with its data opened (nothing decoded yet)."""
    from unroll.network import LANGUAGE_TASKS

    with located(where):
        if recipe.task_kind in LANGUAGE_TASKS:
            if tokenizer is not None and resume:
                raise UnrollError("--tokenizer starts a run with that tokenizer; --resume continues with the run's "
                                  "own tokenizer.json: give one")
            return LanguageModelling(recipe, text_spec(recipe, data), seed, out, resume, tokenizer)
        if tokenizer is not None:
            raise UnrollError("--tokenizer is for language models; this recipe classifies images")
        return ImageClassification(recipe, data or recipe.training.data, seed)
