"""Streaming a causal model token by token (unroll.lower.stream): the new tokens' outputs equal a
forward over every token — ours and the reference transcription's — whatever the chunks; steps
that read later tokens are refused with the reason; generation with the cache samples the same
tokens as without it."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import unroll
from unroll.bench_generate import main as bench_generate
from unroll.derive import GradientStep
from unroll.expr.printing import to_text
from unroll.generate import cache_problem, sample
from unroll.lower.model import lower_network
from unroll.lower.stream import NotStreamable
from unroll.network import LanguageHead, Network, TokenFrontend
from unroll.objective import Compression
from unroll.recipe import load_recipe
from unroll.relax import CompleteSubspaces, Neumann, PreNorm, Residual, SoftmaxSimilarity, UntieOutput

from test_language_model import reference_and_ours

ROOT = Path(__file__).resolve().parents[1]
TINY = ["architecture.width=32", "architecture.heads=2", "architecture.vocab_size=50", "architecture.context=24"]


def randomised(recipe: str, overrides=(), optimize: bool = True) -> torch.nn.Module:
    """The recipe's model in float64 with every weight random (ToST's per-position bias and
    LayerNorms included, which start at zeros and ones)."""
    torch.manual_seed(0)
    model = unroll.build(load_recipe(ROOT / recipe, [*TINY, *overrides]), optimize=optimize).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def streamed(model, ids: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """Logits of ``ids`` read in the chunks that ``cuts`` (positions) make, through one cache."""
    cache = model.new_cache()
    bounds = [0, *cuts, ids.shape[1]]
    out = [model.stream(ids[:, a:b], cache) for a, b in zip(bounds, bounds[1:]) if b > a]
    assert cache.offset == ids.shape[1]
    return torch.cat(out, dim=1)


TOST = ["layer.0.relax.1.normalized_memberships.block_size=24"]
MODELS = {name: randomised(recipe, extra, optimize) for name, recipe, extra, optimize in [
    ("crate_gpt", "recipes/crate_gpt_tiny.yaml", (), True),
    ("crate_gpt_plain", "recipes/crate_gpt_tiny.yaml", (), False),
    ("tost_gpt", "recipes/tost_gpt_tiny.yaml", TOST, True)]}


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(sorted(MODELS)), cuts=st.lists(st.integers(1, 23), max_size=6).map(sorted))
def test_any_chunking_streams_the_full_forwards_logits(name, cuts):
    model = MODELS[name]
    ids = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(len(cuts)))
    with torch.no_grad():
        assert (streamed(model, ids, cuts) - model(ids)).abs().max().item() < 1e-10


def test_streaming_matches_the_reference_transcription():
    reference, model, _, _ = reference_and_ours()  # crate-lm's model and ours with its weights
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (streamed(model, ids, [7, 8, 9]) - reference(ids)).abs().max().item() < 1e-10


def test_what_is_cached_attention_keeps_projected_tokens_tost_running_sums():
    for name, grows in (("crate_gpt", True), ("tost_gpt", False)):
        model = MODELS[name]
        cache = model.new_cache()
        with torch.no_grad():
            model.stream(torch.zeros(1, 5, dtype=torch.int64), cache)
            size5 = cache.values()
            model.stream(torch.zeros(1, 5, dtype=torch.int64), cache)
        first = next(iter(model.layer(0).steps))  # the attention step; the sparse step keeps nothing
        step, sparse = cache.layers[0][first], cache.layers[0]["sparsify"]
        step = {to_text(node): value for node, value in step.items()}  # keyed by the cached expressions
        assert sparse == {}
        if grows:  # past(W_k): K heads x p x tokens, per unrolled layer
            assert list(step) == ["past(W_k)"] and step["past(W_k)"].shape == (1, 2, 16, 10)
            assert cache.values() == 2 * size5
        else:  # prefix sums keep one column each, whatever the length
            assert all(t.shape[-1] == 1 for t in step.values()) and len(step) == 3
            assert cache.values() == size5


def lm_network(*relaxations, depth: int = 1, tie: bool = False) -> Network:
    step = GradientStep(Compression(eps=0.5), 1.0, "compress", relaxations)
    return Network((step,), width=16, heads=2, depth=depth, tie_layers=tie,
                   frontend=TokenFrontend(vocab_size=11, context=8), head=LanguageHead())


@pytest.mark.parametrize("relaxations, reason", [
    ((), "token count N"),  # the exact step: β = p/(ε² N)
    ((Neumann(1), CompleteSubspaces(), UntieOutput(bias=True), Residual(True)), "sums over all tokens"),  # W_k W_kᵀ
    ((Neumann(1), CompleteSubspaces(), SoftmaxSimilarity("1/sqrt(p)"), UntieOutput(bias=True), Residual(True)),
     "softmax over all tokens"),
])
def test_steps_that_read_later_tokens_do_not_stream(relaxations, reason):
    model = lower_network(lm_network(*relaxations)).eval()
    with pytest.raises(NotStreamable, match=reason) as e:
        model.new_cache()
    assert "step compress" in str(e.value)
    assert reason in cache_problem(model)


def test_a_tied_stack_keeps_one_cache_per_unrolled_layer():
    causal = (Neumann(1), CompleteSubspaces(), SoftmaxSimilarity("1/sqrt(p)", causal=True), UntieOutput(bias=True),
              Residual(True), PreNorm(1e-5))
    torch.manual_seed(1)
    model = lower_network(lm_network(*causal, depth=3, tie=True)).double().eval()
    assert len(model.encoder.layers) == 1  # one module, three layers
    ids = torch.randint(0, 11, (1, 8))
    with torch.no_grad():
        assert (streamed(model, ids, [3, 4]) - model(ids)).abs().max().item() < 1e-10


def test_greedy_generation_is_the_same_with_and_without_the_cache():
    model = MODELS["crate_gpt"]
    prompt = [3, 1, 4, 1, 5]
    for tokens in (10, 30):  # within the context, and sliding past it (24)
        with_cache = sample(model, prompt, tokens, temperature=0.0)
        assert with_cache == sample(model, prompt, tokens, temperature=0.0, cache=False)
        assert len(with_cache) == tokens
    seeded = dict(temperature=1.0, top_k=5, seed=7)
    assert sample(model, prompt, 12, **seeded) == sample(model, prompt, 12, cache=False, **seeded)


def test_the_generation_benchmark_runs_and_compares(capsys):
    result = bench_generate(["recipes/crate_gpt_tiny.yaml", *[f"--set={o}" for o in TINY], "--prompt", "4",
                             "--tokens", "12", "--repeats", "1", "--threads", "1"])
    assert result["same"] and result["context"] == 24 and result["cache"] > 0 and result["full"] > 0
    assert "speed-up" in capsys.readouterr().out


def test_explain_says_what_generation_keeps():
    from unroll.explain import explain
    from unroll.recipe import to_network

    text = explain(to_network(load_recipe(ROOT / "recipes/crate_gpt_tiny.yaml", TINY)))
    assert "generation: token by token, keeps past(W_k) of the earlier tokens" in text
    assert "generation: token by token, keeps nothing of the earlier tokens" in text  # the sparse step
    assert "no cache, every token recomputes the window" in explain(lm_network())  # the exact step uses N
    assert "generation:" not in explain(to_network(load_recipe(ROOT / "recipes/crate_bert_tiny.yaml")))  # not causal


# --- the rewrite on expressions: what it accepts computes the full value, the rest is refused ---

import sympy as sp  # noqa: E402

from unroll.expr.nodes import LayerNorm, LeadingColumns, PrefixSum, ReLU, Softmax  # noqa: E402
from unroll.expr.symbols import N, Z, d  # noqa: E402
from unroll.lower.interpret import RAW, SIZES, Lowering  # noqa: E402
from unroll.lower.stream import FRESH, OFFSET, STATE, stream_update  # noqa: E402

WIDTH, LENGTH = 4, 7
W = sp.MatrixSymbol("W", d, d)
GAINS = {name: sp.MatrixSymbol(name, d, 1) for name in ("g1", "b1", "g2", "b2")}
LN1 = LayerNorm(Z, GAINS["g1"], GAINS["b1"], sp.Float(1e-5))
LN2 = LayerNorm(Z, GAINS["g2"], GAINS["b2"], sp.Float(1e-5))  # prints as LN1 does: LN(Z)


def expression_env(columns: torch.Tensor, offset: int = 0) -> dict:
    g = torch.Generator().manual_seed(5)
    raw = {name: torch.randn(WIDTH, generator=g, dtype=torch.float64) for name in GAINS}
    return {"Z": columns.unsqueeze(1), "W": torch.randn(1, 1, WIDTH, WIDTH, generator=g, dtype=torch.float64),
            SIZES: {"d": WIDTH, "N": columns.shape[-1]}, RAW: raw, STATE: {}, FRESH: {}, OFFSET: offset}


def full_and_streamed(out, cuts=(3, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` by the plain lowering on every token, and by its streaming form chunk by chunk."""
    tokens = torch.randn(1, WIDTH, LENGTH, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    full = Lowering().matrix(out)(expression_env(tokens))
    program, state, parts = stream_update(out, ()), {}, []
    bounds = [0, *cuts, LENGTH]
    for a, b in zip(bounds, bounds[1:]):
        env = expression_env(tokens[..., a:b], a)
        env[STATE] = state
        parts.append(program(env))
    return full, torch.cat(parts, dim=-1)


@pytest.mark.parametrize("name, out", [
    ("two attentions whose values print alike", LN1 * Softmax(LN1.T * LN1, causal=True)
     + LN2 * Softmax(LN2.T * LN2, causal=True)),
    ("two prefix sums that print alike", PrefixSum(LN1) + PrefixSum(LN2)),
    ("attention through a weight", W * Z * Softmax(Z.T * W.T * W * Z, causal=True)),
])
def test_accepted_expressions_stream_their_full_value(name, out):
    full, streamed = full_and_streamed(out)
    assert (full - streamed).abs().max().item() < 1e-12, name


@pytest.mark.parametrize("out, reason", [
    (ReLU(sp.Transpose(Z.T * Z * Z.T)), "sums over all tokens"),
    (sp.Transpose(ReLU(Z.T * Z * Z.T)), "transpose of a value with a row per token"),
    (W * (Z * Softmax(Z.T * W, causal=True)) * Z, "not N x N"),
    (Z + LeadingColumns(sp.MatrixSymbol("P", d, 9), 3) * sp.OneMatrix(3, N), "per-position table"),
    (Z * Softmax(Z.T * Z), "not causal"),
])
def test_expressions_that_read_later_tokens_are_refused(out, reason):
    with pytest.raises(NotStreamable, match=reason):
        stream_update(out, ())


def test_a_cache_refuses_another_batch_and_the_end_of_the_context():
    from unroll.errors import UnrollError

    model = MODELS["crate_gpt"]
    cache = model.new_cache()
    with torch.no_grad():
        model.stream(torch.zeros(2, 20, dtype=torch.int64), cache)
        with pytest.raises(UnrollError, match="holds 2 sequences"):
            model.stream(torch.zeros(1, 1, dtype=torch.int64), cache)
        with pytest.raises(UnrollError, match="pass the context of 24"):
            model.stream(torch.zeros(2, 5, dtype=torch.int64), cache)
        assert cache.offset == 20  # nothing was appended by the refused calls
        assert model.stream(torch.zeros(2, 4, dtype=torch.int64), cache).shape == (2, 4, 50)


def test_the_benchmark_keeps_a_checkpoints_context(tmp_path, capsys):
    from unroll.checkpoint import save_weights

    save_weights(unroll.build(load_recipe(ROOT / "recipes/crate_gpt_tiny.yaml", TINY)).state_dict(), tmp_path / "m.safetensors")
    args = ["recipes/crate_gpt_tiny.yaml", *[f"--set={o}" for o in TINY], "--checkpoint", str(tmp_path / "m.safetensors"),
            "--repeats", "1", "--threads", "1", "--prompt", "4"]
    with pytest.raises(SystemExit, match="pass the checkpoint's context of 24"):
        bench_generate([*args, "--tokens", "30"])
    assert bench_generate([*args, "--tokens", "20"])["context"] == 24
