"""A small CRATE-MAE learns to complete masked images: after a few hundred AdamW steps on CPU its
masked reconstruction loss on held-out images is below that of the mean training image and at
most half of where it started."""

from pathlib import Path

import torch

import unroll
from unroll.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["architecture.image_size=16", "architecture.patch_size=4", "architecture.width=32",
         "architecture.heads=2", "architecture.depth=2", "decoder.depth=2"]


def structured_images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 16, 16): per-channel planes plus an oriented wave, random per image, so that the
    visible patches determine the hidden ones (unlike noise)."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    a, b, c = (torch.randn(n, 3, 1, 1, generator=g) for _ in range(3))
    freq = 1 + 2 * torch.rand(n, 1, 1, 1, generator=g)
    return a * x + b * y + 0.5 * c * torch.sin(3 * freq * x)


def held_out_loss(model, images, noise, prediction=None):
    with torch.no_grad():
        loss, pred, mask = model(images, noise=noise)
        if prediction is not None:
            loss = model.loss(images, model.patchify(prediction.expand_as(images)), mask)
    return float(loss)


def test_small_crate_mae_learns_masked_completion():
    torch.manual_seed(0)
    model = unroll.build(load_recipe(ROOT / "recipes/crate_mae_tiny.yaml", SMALL))
    train, test = structured_images(512, seed=0), structured_images(256, seed=1)
    noise = torch.rand(256, 16, generator=torch.Generator().manual_seed(2))
    start = held_out_loss(model, test, noise)
    mean_image = held_out_loss(model, test, noise, prediction=train.mean(0, keepdim=True))

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(3)
    for _ in range(400):
        loss, _, _ = model(train[torch.randint(0, 512, (64,), generator=g)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    end = held_out_loss(model, test, noise)
    print(f"held-out masked loss: start {start:.3f}, mean image {mean_image:.3f}, trained {end:.3f}")
    assert end < mean_image, (end, mean_image)
    assert end <= 0.5 * start, (end, start)
