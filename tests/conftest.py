import sys

import numpy as np
import pytest
import torch

from unroll.expr.numeric import evaluate


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def step_values(step) -> dict:
    """A lowered step's parameters and constants, by symbol name, as float64 numpy arrays."""
    values = {}
    for attr, spec in step.specs.items():
        v = getattr(step, attr).detach().double().numpy()
        values[spec.name] = v[:, None] if (v.ndim == 1 and not spec.per_head) else v
    for name in step.constant_names:
        values[name] = float(getattr(step, name))
    return values


def evaluate_printed(update, step, Z: np.ndarray) -> np.ndarray:
    """Evaluate the printed update expression of ``update`` on one sample Z (d x N), with the
    weights of the lowered ``step``, straight from the sympy tree."""
    smooth = {
        t.name: (lambda x, *params, t=t: t.row_grad()(torch.from_numpy(x.T)[None], *map(torch.from_numpy, params)).numpy()[0].T)
        for t in update.smooth_terms
    }
    return evaluate(update.out, {**step_values(step), "Z": Z}, update.where, smooth)


def assert_printed_is_computed(model, network, Z: torch.Tensor) -> None:
    """Layer 0 of ``model`` computes, on ``Z`` (B, d, N), exactly the updates that ``explain``
    prints for ``network``, evaluated from their sympy trees (float64)."""
    from unroll.explain import explain
    from unroll.expr.printing import to_text

    layer, printed = model.layer(0), Z.numpy()
    steps = model.plan.encoder.groups[0].steps
    for d in steps:
        step = layer.steps[d.final.name]
        printed = np.stack([evaluate_printed(d.final, step, z) for z in printed])
    with torch.no_grad():
        lowered = layer(Z).numpy()
    assert np.abs(printed - lowered).max() < 1e-10 * max(1.0, np.abs(lowered).max())
    text = explain(network)
    for d in steps:  # the expression checked above is the one explain prints
        assert "Z⁺ = " + to_text(d.final.out) in text


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: dynamo's caches and its recompile limit (8 per code object)
    are per process, so the models earlier tests compiled would count against a later test's."""
    yield
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()
