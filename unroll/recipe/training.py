"""The ``training:`` section of a recipe: what ``unroll train`` and ``unroll eval`` read.

Plain data only; :mod:`unroll.train.transforms` turns ``augment``, ``evaluation`` and ``normalize``
into torchvision pipelines and :mod:`unroll.train.loop` reads the rest. Every field can be
overridden with ``--set training.<field>=<value>`` (``--set training.augment.flip=0``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_PIXELS = 8_192
MAX_ACCUMULATE = 4_096


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RandomResizedCrop(_Strict):
    """A crop of a random ``scale`` fraction of the image area and aspect ``ratio``, resized to the
    model's image size (torchvision's ``RandomResizedCrop``)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @model_validator(mode="after")
    def _ranges(self):
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale: expected 0 < low <= high <= 1 (fractions of the image area), found {list(self.scale)}")
        lo, hi = self.ratio
        if not 0 < lo <= hi <= 100:
            raise ValueError(f"ratio: expected 0 < low <= high (width / height), found {list(self.ratio)}")
        return self


class RandAugment(_Strict):
    """``ops`` random operations per image at ``magnitude`` out of 30 (Cubuk et al., 2020)."""

    ops: int = Field(2, ge=1, le=16)
    magnitude: int = Field(9, ge=0, le=30)


class Augment(_Strict):
    """The training pipeline, applied in this order to each image: random-resized crop (or a resize
    to the model's size when absent) -> ``shift`` -> horizontal flip -> RandAugment -> to float in
    [0, 1] -> ``training.normalize``; then to each batch, MixUp or CutMix."""

    random_resized_crop: RandomResizedCrop | None = None
    #: random translations of up to this many pixels, zero-padded (a random crop of the padded image)
    shift: int = Field(0, ge=0, le=64)
    #: probability of a horizontal flip
    flip: float = Field(0.0, ge=0, le=1)
    rand_augment: RandAugment | None = None
    #: alpha of MixUp's Beta(alpha, alpha) mixing weight; 0: off
    mixup: float = Field(0.0, ge=0, le=100)
    #: alpha of CutMix's Beta(alpha, alpha) box area; 0: off (with mixup too, each batch picks one)
    cutmix: float = Field(0.0, ge=0, le=100)


class Evaluation(_Strict):
    """The evaluation pipeline: resize the shorter side to ``resize`` and take the centre crop of
    the model's size, or, without ``resize``, resize the whole image to the model's size."""

    resize: int | None = Field(None, ge=1, le=MAX_PIXELS)


class Normalize(_Strict):
    """``(x - mean) / std`` per channel, after scaling pixels to [0, 1]; train and eval alike."""

    mean: list[float] = Field(min_length=1, max_length=64)
    std: list[float] = Field(min_length=1, max_length=64)

    @model_validator(mode="after")
    def _same_length(self):
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values and std {len(self.std)}; give one of each per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, found {self.std}")
        return self


class Training(_Strict):
    """How ``unroll train`` trains the recipe and ``unroll eval`` evaluates it."""

    data: str = Field("digits", min_length=1, max_length=4096,
                      description="digits, mixtures, an ImageFolder directory, or cifar10:DIR / cifar100:DIR; "
                                  "for a language model a text file or directory, or python-stdlib")
    epochs: int = Field(30, ge=1, le=100_000)
    #: images per optimiser step, over all processes and accumulation steps together
    batch_size: int = Field(64, ge=1, le=1 << 20)
    #: optimiser steps per epoch, at most (a random subset of the data each epoch: a language corpus
    #: of millions of windows is sampled, not swept); None: the whole training split
    epoch_steps: int | None = Field(None, ge=1, le=1 << 30)
    #: each step's batch is split into this many micro-batches whose gradients add up (less memory)
    accumulate: int = Field(1, ge=1, le=MAX_ACCUMULATE)
    optimizer: Literal["adamw", "lion"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.05, ge=0, le=10)
    warmup_epochs: int = Field(2, ge=0, le=100_000)
    #: ``step``: the rate changes every optimiser step, a linear warmup over ``warmup_epochs`` then a
    #: cosine over the remaining steps; ``epoch``: once per epoch, the smaller of a linear warmup and
    #: a cosine over all epochs (the reference CRATE ImageNet script; see unroll.train.optim)
    schedule: Literal["step", "epoch"] = "step"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    clip_grad: float | None = Field(1.0, gt=0, le=1e6)
    normalize: Normalize | None = None
    augment: Augment = Field(default_factory=Augment)
    evaluation: Evaluation = Field(default_factory=Evaluation)

    @model_validator(mode="after")
    def _micro_batches(self):
        if self.batch_size % self.accumulate:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by accumulate ({self.accumulate}): "
                             "the micro-batches are equal")
        return self
