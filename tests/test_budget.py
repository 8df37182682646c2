"""The memory estimate ``unroll build`` checks before allocating: exact parameter counts without
allocating them, and a forward estimate that bounds what a forward really holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from unroll import build
from unroll.bench import peak_forward_mib
from unroll.lower.budget import BYTES, estimate
from unroll.recipe import load_recipe, to_network

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, parameters", [
    ("crate_base", 22_796_008), ("crate_alpha_l14", 253_650_920), ("crate_mae_base", 43_745_280),
])
def test_parameters_are_counted_exactly_without_allocating_them(name, parameters):
    # the counts the README states, measured from real builds of the reference layouts
    assert estimate(to_network(load_recipe(ROOT / f"recipes/{name}.yaml"))).parameters == parameters


@pytest.mark.parametrize("name, overrides", [
    ("crate_tiny", ["architecture.depth=2"]),
    ("crate_alpha_b32", ["architecture.depth=2", "architecture.image_size=128"]),
])
def test_the_forward_estimate_bounds_the_measured_peak(name, overrides):
    recipe = load_recipe(ROOT / f"recipes/{name}.yaml", overrides)
    found = estimate(to_network(recipe), batch=2)
    measured_mib = peak_forward_mib(build(recipe).eval(), 2, "cpu")
    assert found.forward_bytes / 2**20 >= measured_mib > 0
    assert found.forward_bytes / 2**20 < 20 * measured_mib  # an estimate, not a blanket refusal


def test_training_counts_every_layer_and_the_optimiser_state():
    network = to_network(load_recipe(ROOT / "recipes/crate_tiny.yaml"))
    inference, training = estimate(network, batch=4), estimate(network, batch=4, training=True)
    assert training.forward_bytes > 10 * inference.forward_bytes  # 12 layers kept for the backward
    assert training.total_bytes - training.forward_bytes == 4 * inference.parameters * BYTES + inference.buffers * BYTES


def test_measuring_counts_the_float64_copies_of_every_step():
    network = to_network(load_recipe(ROOT / "recipes/crate_tiny.yaml"))
    plain, measuring = estimate(network, batch=2), estimate(network, batch=2, measuring=True)
    tokens, steps, layers = 197, 2, 12
    # per sample and step: input and output, 384 rows each, float64 (4 float32-sized bytes each)
    assert measuring.forward_bytes - plain.forward_bytes == 2 * layers * steps * 4 * tokens * 384 * BYTES
