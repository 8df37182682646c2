"""The recipe's ``training.augment``, ``training.evaluation`` and ``training.normalize`` as
torchvision transforms v2 pipelines.

Per image, for training (each part only when the recipe asks for it)::

    RandomResizedCrop(S, scale, ratio)  or  Resize((S, S))   # every image leaves at S x S
    RandomCrop(S, padding=shift)                             # random translations, zero-padded
    RandomHorizontalFlip(flip)
    RandAugment(ops, magnitude)
    ToDtype(float32, scale=True) -> Normalize(mean, std)

for evaluation ``Resize(resize) -> CenterCrop(S)`` or ``Resize((S, S))``, then the same
conversion; and per batch, for training, ``MixUp(mixup)`` or ``CutMix(cutmix)`` (one of the two,
chosen at random per batch, when both are on). Inputs may be PIL images (an ImageFolder), uint8
tensors (CIFAR) or float tensors in [0, 1] (digits): ``ToImage`` first makes each a tensor, and
a resize to the size an image already has returns it unchanged. (Cropping and resizing the PIL
image before ``ToImage`` instead fed CRATE-B on an H100 with 14 workers 1,310 to 1,620 images/s
against 1,690 to 1,830 this way, in one comparison on two starts of the machine.)
"""

from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import v2

from unroll.errors import UnrollError
from unroll.recipe.training import Training


def _to_model_input(training: Training, channels: int) -> list:
    steps = [v2.ToDtype(torch.float32, scale=True)]
    norm = training.normalize
    if norm is not None:
        if len(norm.mean) != channels:  # checked here, not in the schema: build and explain never normalise
            raise UnrollError(f"{len(norm.mean)} means and stds for {channels}-channel images (architecture.channels); "
                              "give one per channel", field="training.normalize")
        steps.append(v2.Normalize(norm.mean, norm.std))
    return steps


def train_transform(training: Training, image_size: int, channels: int) -> v2.Compose:
    """One training image -> a (C, S, S) float32 tensor, S = ``image_size``, C = ``channels``."""
    a = training.augment
    steps: list = [v2.ToImage()]
    if a.random_resized_crop is not None:
        crop = a.random_resized_crop
        steps.append(v2.RandomResizedCrop(image_size, scale=crop.scale, ratio=crop.ratio, antialias=True))
    else:
        steps.append(v2.Resize((image_size, image_size), antialias=True))
    if a.shift:
        steps.append(v2.RandomCrop(image_size, padding=a.shift))
    if a.flip:
        steps.append(v2.RandomHorizontalFlip(a.flip))
    if a.rand_augment is not None:
        steps.append(v2.RandAugment(num_ops=a.rand_augment.ops, magnitude=a.rand_augment.magnitude))
    return v2.Compose(steps + _to_model_input(training, channels))


def eval_transform(training: Training, image_size: int, channels: int) -> v2.Compose:
    """One evaluation image -> a (C, S, S) float32 tensor, deterministically."""
    resize = training.evaluation.resize
    steps: list = [v2.ToImage()]
    if resize is not None and resize < image_size:  # the centre crop would pad the image with black
        raise UnrollError(f"resize ({resize}) must be at least the model's image size ({image_size}): the centre "
                          f"crop of {image_size} px is taken from it", field="training.evaluation")
    if resize is not None:
        steps += [v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)]
    else:
        steps.append(v2.Resize((image_size, image_size), antialias=True))
    return v2.Compose(steps + _to_model_input(training, channels))


def batch_mixing(training: Training, classes: int) -> Callable | None:
    """(images (B, C, S, S), labels (B,)) -> (mixed images, soft labels (B, classes)), or None when
    the recipe mixes nothing."""
    a = training.augment
    mixers = ([v2.MixUp(alpha=a.mixup, num_classes=classes)] if a.mixup else []) + \
             ([v2.CutMix(alpha=a.cutmix, num_classes=classes)] if a.cutmix else [])
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
