"""A step's parameters start as the recipe says (``init:``; unroll.derive.init): crate-lm's
initialisation in crate_gpt_base.yaml, checked on the built tensors' statistics; bad rules are
refused naming the step and the parameter."""

import math
from pathlib import Path

import pytest
import torch

import unroll
from unroll import GradientStep, Init
from unroll.errors import UnrollError
from unroll.network import LanguageHead, Network, TokenFrontend
from unroll.objective import Compression
from unroll.recipe import load_recipe
from unroll.relax import CompleteSubspaces, Neumann, Residual, SoftmaxSimilarity, UntieOutput

ROOT = Path(__file__).resolve().parents[1]
GPT = ROOT / "recipes/crate_gpt_base.yaml"
NARROW = ["architecture.width=128", "architecture.heads=4", "architecture.vocab_size=64", "architecture.context=8"]


def test_crate_gpt_base_starts_as_crate_lm():
    torch.manual_seed(0)
    model = unroll.build(load_recipe(GPT, NARROW))  # 12 layers, as crate-lm's
    layers = [model.layer(i) for i in range(12)]
    U = torch.cat([layer.steps["compress"].U.flatten() for layer in layers])  # c_attn
    O = torch.cat([layer.steps["compress"].O.flatten() for layer in layers])  # c_proj
    D = torch.cat([layer.steps["sparsify"].D.flatten() for layer in layers])  # ista.weight, transposed
    assert U.mean().abs() < 1e-3 and abs(U.std().item() / 0.02 - 1) < 0.02
    assert abs(O.std().item() / (0.02 / math.sqrt(24)) - 1) < 0.02
    assert all(layer.steps["compress"].b.eq(0).all() for layer in layers)
    bound = math.sqrt(6 / 128)  # kaiming_uniform_ of a (4d, d) weight: fan-in d
    assert D.abs().max() <= bound and D.abs().max() > 0.99 * bound
    assert abs(D.std().item() / (bound / math.sqrt(3)) - 1) < 0.02
    assert abs(model.frontend.wte.weight.std().item() / 0.02 - 1) < 0.05


def test_explain_shows_how_each_parameter_starts():
    text = unroll.explain(unroll.as_network(load_recipe(GPT)))
    assert "output operator, untied from U, starts N(0, (0.02/√(2L))²)" in text
    assert "output bias, starts zeros" in text and "sparse-coding dictionary, starts U(±√(6/d))" in text


def causal_step(depth: int = 3, tie: bool = False, **init) -> Network:
    step = GradientStep(Compression(eps=0.5), 1.0, "compress", (
        Neumann(1), CompleteSubspaces(), SoftmaxSimilarity("1/sqrt(p)", causal=True), UntieOutput(bias=True),
        Residual(True)), init=init)
    return Network((step,), width=32, heads=2, depth=depth, tie_layers=tie,
                   frontend=TokenFrontend(vocab_size=11, context=8), head=LanguageHead())


def test_the_python_api_and_the_depth_a_scaled_rule_divides_by():
    torch.manual_seed(1)
    model = unroll.build(causal_step(O=Init("normal", 0.5, depth_scaled=True), b=Init("ones")))
    O = torch.cat([model.layer(i).steps["compress"].O.flatten() for i in range(3)])
    assert abs(O.std().item() / (0.5 / math.sqrt(6)) - 1) < 0.05  # three layers: √(2 · 3)
    assert model.layer(2).steps["compress"].b.eq(1).all()


@pytest.mark.parametrize("rule, words", [
    ("{Q: zeros}", ["step compress", "no parameter 'Q'", "its parameters: norm_weight, norm_bias, U, O, b"]),
    ("{U: {normal: -1}}", ["field layer.0.init.U.normal: Input should be greater than 0"]),
    ("{U: {kaiming: q}}", ["field layer.0.init.U.kaiming: Input should be 'd', 'm' or 'p'"]),
    ("{U: twos}", ["field layer.0.init.U: Input should be 'zeros' or 'ones'"]),
    ("{U: 3}", ["field layer.0.init.U: expected zeros, ones, {normal: STD"]),
])
def test_bad_rules_are_refused_by_name(rule, words):
    with pytest.raises(UnrollError) as error:
        unroll.build(load_recipe(GPT, [*NARROW, f"layer.0.init={rule}"]))
    for word in words:  # the path is the recipe's keys, not the schema's union branches
        assert word in str(error.value), str(error.value)


def test_bad_rules_in_python_are_refused():
    with pytest.raises(UnrollError, match="unroll.Init"):
        causal_step(U=0.02)
    with pytest.raises(UnrollError, match="names a parameter twice"):
        GradientStep(Compression(eps=0.5), init=(("U", Init("zeros")), ("U", Init("ones"))))
    on = Compression(eps=0.5)
    assert GradientStep(on, init={"U": Init("zeros"), "b": Init("ones")}) == \
        GradientStep(on, init={"b": Init("ones"), "U": Init("zeros")})  # one order, whatever the dict's
    with pytest.raises(UnrollError, match="standard deviation"):
        Init("normal")
    with pytest.raises(UnrollError, match="fan-in"):
        Init("kaiming", fan_in="N")


def test_data_constants_have_no_initialisation_to_choose():
    with pytest.raises(UnrollError, match="computed from data"):
        unroll.build(load_recipe(ROOT / "recipes/redunet_digits.yaml", ["layer.0.init={E: zeros}"]))


def test_a_depth_scaled_rule_divides_by_every_unrolled_layer_tied_or_not():
    torch.manual_seed(2)
    model = unroll.build(causal_step(depth=8, tie=True, O=Init("normal", 1.0, depth_scaled=True)))
    assert len(model.encoder.layers) == 1  # one module, eight layers: L = 8
    assert abs(model.layer(0).steps["compress"].O.std().item() / (1 / 4) - 1) < 0.1


def test_a_step_lowered_alone_cannot_scale_by_a_depth_it_does_not_know():
    from unroll.derive import derive
    from unroll.derive.init import initialised
    from unroll.lower.step import LoweredStep

    update = initialised(derive(GradientStep(Compression(eps=0.5))), (("U", Init("normal", 0.02, depth_scaled=True)),))
    with pytest.raises(UnrollError, match="depth of the stack"):
        LoweredStep(update, {"d": 8, "p": 4, "K": 2}, [])


def test_an_inverted_decoder_step_starts_as_declared():
    from unroll.explain import explain

    rule = "layer.0.init={O: {normal: 0.02, depth_scaled: true}, b: zeros}"
    text = explain(unroll.as_network(load_recipe(ROOT / "recipes/crate_mae_tiny.yaml", [rule])))
    encoder, decoder = text.split("decoder:", 1)
    assert "output bias, starts zeros" in encoder and "starts" not in decoder
