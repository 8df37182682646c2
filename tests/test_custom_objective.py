"""A new objective, written only through the Python API, compiles and trains."""

import torch

import unroll
from unroll.objective import CodingRate, Compression, Custom
from unroll.relax import Learnable, PreNorm


def test_user_objective_compiles_and_trains_one_step():
    # maximise the coding rate, compress against subspaces, keep token energy in check
    energy = Custom("energy", lambda X: 0.5 * (X**2).sum() / X.shape[0], tex=r"\tfrac{1}{2N}\|Z\|_F^2")
    objective = Compression(eps=0.5) - CodingRate(eps=0.5) + 0.1 * energy
    step = unroll.GradientStep(objective, step_size=0.1, name="rate_reduction", relax=(Learnable(("kappa",)), PreNorm()))
    network = unroll.Network(
        (step,), width=16, heads=2, depth=2,
        frontend=unroll.PatchFrontend(image_size=8, patch_size=4),
        head=unroll.ClassifierHead(classes=3),
    )
    model = unroll.build(network)
    assert "kappa" in dict(model.layer(0).steps["rate_reduction"].named_parameters())
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["encoder.layers.0.steps.rate_reduction.U"].abs().sum() > 0
    optimiser.step()
    after = model.state_dict()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], after[k]) for k in before)
