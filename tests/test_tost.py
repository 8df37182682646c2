"""ToST: the variational compression term, its Π-step and Z-gradient, and the relaxations that make
its gradient step the reference's token statistics self-attention (``AttentionTSSA``)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_printed_is_computed

import unroll
from unroll.derive import GradientStep, ProximalStep
from unroll.derive.steps import derive
from unroll.expr.numeric import evaluate
from unroll.lower.model import lower_network
from unroll.network import ClassifierHead, Network, PatchFrontend
from unroll.objective import L1, Lasso, NonNegative, VariationalCompression
from unroll.objective.variational import MEMBERSHIPS
from unroll.relax import NormalizedMemberships, PreNorm, ProjectionBias, ReciprocalGain, Residual, UntieOutput

ROOT = Path(__file__).resolve().parents[1]
TERM = VariationalCompression(eps=0.5)
TSSA = (ProjectionBias(), NormalizedMemberships(), ReciprocalGain(), UntieOutput(bias=True), Residual(True), PreNorm(1e-5))


def small(steps, width=12, heads=3) -> Network:
    return Network(tuple(steps), width=width, heads=heads, depth=1,
                   frontend=PatchFrontend(image_size=8, patch_size=2), head=ClassifierHead(classes=5))


def tssa_step(term=TERM):
    return GradientStep(term, 1.0, "tssa", TSSA)


# ---------------------------------------------------------------- the exact step, float64 ----

def _random(seed=0, K=3, d=12, p=4, n=9):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(K, d, p)) * 0.6, rng.normal(size=(d, n))


@pytest.mark.parametrize("seed", [0, 1])
def test_z_gradient_is_autograd_of_the_value_with_memberships_fixed(seed):
    U, Z = _random(seed)
    exact = derive(GradientStep(TERM, 0.7, "tssa"))
    values = {"U_k": U, "Z": Z, **exact.constants}
    printed_gradient = (Z - evaluate(exact.out, values, exact.where)) / 0.7
    Zt = torch.tensor(Z[None], requires_grad=True)
    params = {"U": torch.tensor(U)}
    Pi = TERM.membership_values(Zt, params).detach()  # the Π-step's memberships, then held fixed
    TERM.value_at(Zt, Pi, params).sum().backward()
    assert np.abs(Zt.grad[0].numpy() - printed_gradient).max() < 1e-12
    # value() is R^c_var at those same memberships
    assert torch.allclose(TERM.value(Zt, params), TERM.value_at(Zt, Pi, params))


def test_memberships_binding_is_the_pi_step():
    """The where-binding ``Pi_k`` the step computes is the term's closed-form Π-step."""
    model = lower_network(small([GradientStep(TERM, 1.0, "tssa")]), optimize=False).double()
    step = model.layer(0).steps["tssa"]
    names = [s.name for s, _ in step.bindings]
    assert names.index("W_k") < names.index("Pi_k") < names.index("S_k")
    Z = torch.randn(2, 12, 9, dtype=torch.float64)
    with torch.no_grad():
        computed = step.evaluate(MEMBERSHIPS, Z)[:, :, 0]  # (B, K, N)
        expected = TERM.membership_values(Z, {"U": step.U})
    assert (computed - expected).abs().max() < 1e-12
    assert torch.allclose(expected.sum(1), torch.ones(2, 9, dtype=torch.float64))


@pytest.mark.parametrize("eta", [0.25, 0.5, 2.0])
def test_pi_step_minimises_its_assignment_cost(eta):
    term = VariationalCompression(eps=0.5, membership_temperature=eta)
    U, Z = _random(3)
    Zt, params = torch.tensor(Z[None]), {"U": torch.tensor(U)}
    best = term.membership_values(Zt, params)  # (1, K, N)
    cost = term.assignment_cost(Zt, best, params)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    # random points of the simplex, one per token
    for _ in range(200):
        other = torch.distributions.Dirichlet(torch.ones(Z.shape[1], 3, dtype=torch.float64)).sample().T[None]
        assert term.assignment_cost(Zt, other, params) >= cost
    # small perturbations that stay on the simplex
    for _ in range(200):
        step = 1e-3 * torch.randn(best.shape, generator=gen, dtype=torch.float64)
        moved = (best + step - step.mean(1, keepdim=True)).clamp_min(1e-12)
        moved = moved / moved.sum(1, keepdim=True)
        assert term.assignment_cost(Zt, moved, params) >= cost - 1e-14


def test_printed_update_is_computed_exact_and_relaxed():
    for steps in ([GradientStep(TERM, 0.3, "tssa")], [tssa_step()],
                  [tssa_step(), ProximalStep(Lasso() + L1(lam=0.1) + NonNegative(), 0.1, name="sparsify", relax=(PreNorm(1e-5),))]):
        for optimize in (False, True):
            model = lower_network(small(steps), optimize).double()
            with torch.no_grad():
                for q in model.parameters():
                    q.add_(0.3 * torch.randn_like(q))
            assert_printed_is_computed(model, small(steps), torch.randn(2, 12, 7, dtype=torch.float64))


# --------------------------------------------------- same function as the reference ------------

class AttentionTSSA(torch.nn.Module):
    """ToST's vision operator, transcribed from the reference's facts (tokens as rows, (B, N, d))."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, dim, bias=True)
        self.temp = torch.nn.Parameter(torch.ones(heads, 1))
        self.to_out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        w = self.qkv(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # b h n d
        w_normed = F.normalize(w, dim=-2)
        Pi = torch.softmax((w_normed**2).sum(-1) * self.temp, dim=1)  # b h n
        dots = ((Pi / (Pi.sum(-1, keepdim=True) + 1e-8)).unsqueeze(-2) @ (w**2))  # b h 1 d
        attn = 1 / (1 + dots)
        out = -(w * Pi.unsqueeze(-1)) * attn
        return self.to_out(out.transpose(1, 2).flatten(2))


class Block(torch.nn.Module):
    """Pre-LayerNorm and a residual around the operator."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.attn = AttentionTSSA(dim, heads)

    def forward(self, x):
        return x + self.attn(self.norm(x))


def copy_into_reference(step, ref: Block, heads: int):
    """Our weights into the transcription: U_k, c_k are the blocks of qkv, O_k of to_out; our
    output bias enters with the sign of the descent step (``-b``), the reference's with +."""
    copy_weights(step, ref.norm, ref.attn.qkv, ref.attn.temp, ref.attn.to_out)


def copy_weights(step, norm, projection, temp, output) -> None:
    """The weights a transcription shares with our step: the LayerNorm, U_k and c_k as the blocks of
    the one projection, temp, O_k as the blocks of the output projection and its bias."""
    K, d, p = step.U.shape
    with torch.no_grad():
        norm.weight.copy_(step.norm_weight)
        norm.bias.copy_(step.norm_bias)
        projection.weight.copy_(step.U.permute(0, 2, 1).reshape(K * p, d))
        projection.bias.copy_(step.c.reshape(K * p))
        temp.copy_(step.temp.reshape(K, 1))
        output.weight.copy_(step.O.permute(1, 0, 2).reshape(d, K * p))
        output.bias.copy_(-step.b)


@pytest.mark.parametrize("optimize", [False, True])
def test_tssa_step_is_the_reference_operator(optimize):
    width, heads = 48, 4
    model = lower_network(small([tssa_step()], width, heads), optimize)
    step = model.layer(0).steps["tssa"]
    with torch.no_grad():  # move every weight off its init (temperatures, biases, LayerNorm too)
        for q in step.parameters():
            q.add_(0.2 * torch.randn_like(q))
    ref = Block(width, heads)
    copy_into_reference(step, ref, heads)
    x = torch.randn(3, 17, width)  # (B, N, d)
    with torch.no_grad():
        ours = model.layer(0).run(x)
        theirs = ref(x)
    assert (ours - theirs).abs().max() < 1e-5


def test_optimized_and_plain_lowerings_agree():
    network = small([tssa_step()], 24, 3)
    plain, fast = lower_network(network, False), lower_network(network, True)
    with torch.no_grad():
        for q in plain.parameters():
            q.add_(0.2 * torch.randn_like(q))
    fast.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(plain(images), fast(images), atol=1e-5)


def test_torch_compile_agrees_with_eager():
    model = lower_network(small([tssa_step()], 24, 3)).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(compiled(images), model(images), atol=1e-5)


# ------------------------------------------------------------------------- recipes ------------

@pytest.mark.parametrize("name", ["tost_digits", "tost_small"])
def test_recipes_build_and_explain(name):
    network = unroll.as_network(ROOT / f"recipes/{name}.yaml")
    text = unroll.explain(network)
    assert "Pi_k = softmax_k(temp_k 1ᵀ (W_k ⊘ ‖W_k‖_row)^∘2)" in text
    if name == "tost_digits":
        model = unroll.build(network).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


# ------------------------------------------------------------------------- causal -------------

BLOCK = 24
CAUSAL_TSSA = (ProjectionBias(), NormalizedMemberships(causal=True, block_size=BLOCK), ReciprocalGain(causal=True),
               UntieOutput(bias=True), Residual(True), PreNorm(1e-5))


class CausalSelfAttentionTSSA(torch.nn.Module):
    """ToST's causal operator, transcribed from the reference's facts (tokens as rows, (B, T, d))."""

    def __init__(self, dim, heads, block_size):
        super().__init__()
        self.heads = heads
        self.c_attn = torch.nn.Linear(dim, dim)
        self.c_proj = torch.nn.Linear(dim, dim)
        self.temp = torch.nn.Parameter(torch.ones(heads, 1))
        self.denom_bias = torch.nn.Parameter(torch.zeros(heads, block_size, 1))

    def forward(self, x):
        B, T, _ = x.shape
        w = self.c_attn(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # b h t d
        w_sq = w**2
        denom = torch.cumsum(w_sq, dim=-2).clamp_min(1e-12)
        w_normed = w_sq / denom + self.denom_bias[:, :T]
        Pi = torch.softmax(w_normed.sum(-1) * self.temp, dim=1)  # b h t
        dots = torch.cumsum(w_sq * Pi.unsqueeze(-1), dim=-2) / (torch.cumsum(Pi, dim=-1) + 1e-8).unsqueeze(-1)
        y = -(w * Pi.unsqueeze(-1)) / (1 + dots)
        return self.c_proj(y.transpose(1, 2).flatten(2))


class CausalBlock(torch.nn.Module):
    def __init__(self, dim, heads, block_size):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.attn = CausalSelfAttentionTSSA(dim, heads, block_size)

    def forward(self, x):
        return x + self.attn(self.norm(x))


def causal_model(optimize, width=48, heads=4):
    model = lower_network(small([GradientStep(TERM, 1.0, "tssa", CAUSAL_TSSA)], width, heads), optimize)
    with torch.no_grad():
        for q in model.layer(0).steps["tssa"].parameters():
            q.add_(0.2 * torch.randn_like(q))
    return model


@pytest.mark.parametrize("optimize", [False, True])
def test_causal_step_is_the_reference_operator(optimize):
    width, heads = 48, 4
    model = causal_model(optimize, width, heads)
    step = model.layer(0).steps["tssa"]
    ref = CausalBlock(width, heads, BLOCK)
    copy_weights(step, ref.norm, ref.attn.c_attn, ref.attn.temp, ref.attn.c_proj)
    with torch.no_grad():
        ref.attn.denom_bias.copy_(step.denom_bias.mT)  # (K, 1, block) -> (K, block, 1)
    x = torch.randn(3, 19, width)
    with torch.no_grad():
        assert (model.layer(0).run(x) - ref(x)).abs().max() < 1e-5


@pytest.mark.parametrize("optimize", [False, True])
def test_causal_step_reads_no_later_token(optimize):
    layer = causal_model(optimize).layer(0)
    x = torch.randn(2, 20, 48)
    with torch.no_grad():
        before = layer.run(x)
        for t in (0, 7, 18):
            changed = x.clone()
            changed[:, t + 1] += 3 * torch.randn(2, 48)
            after = layer.run(changed)
            assert torch.equal(after[:, : t + 1], before[:, : t + 1])
            assert not torch.allclose(after[:, t + 1], before[:, t + 1])


def test_causal_printed_update_is_computed():
    steps = [GradientStep(TERM, 1.0, "tssa", CAUSAL_TSSA)]
    for optimize in (False, True):
        model = lower_network(small(steps), optimize).double()
        with torch.no_grad():
            for q in model.parameters():
                q.add_(0.3 * torch.randn_like(q))
        assert_printed_is_computed(model, small(steps), torch.randn(2, 12, 11, dtype=torch.float64))


def test_causal_memberships_need_a_block_size():
    with pytest.raises(unroll.UnrollError, match="block_size"):
        unroll.plan(small([GradientStep(TERM, 1.0, "tssa", (NormalizedMemberships(causal=True),))]))


def test_causal_step_refuses_more_tokens_than_its_block_size():
    layer = causal_model(True).layer(0)
    with pytest.raises(unroll.UnrollError, match="block_size"):
        layer.run(torch.randn(1, BLOCK + 1, 48))
    # and a network with more tokens than the block is refused when planned (17 tokens here)
    short = (ProjectionBias(), NormalizedMemberships(causal=True, block_size=4), ReciprocalGain(causal=True),
             UntieOutput(bias=True), Residual(True))
    with pytest.raises(unroll.UnrollError, match="holds 4 positions \\(its block_size\\) but the network has 17 tokens"):
        unroll.plan(small([GradientStep(TERM, 1.0, "tssa", short)]))


@pytest.mark.parametrize("relax, says", [
    ((NormalizedMemberships(causal=True, block_size=BLOCK), ReciprocalGain()), "the memberships are causal"),
    ((NormalizedMemberships(), ReciprocalGain(causal=True)), "causal statistics need causal memberships"),
    ((ReciprocalGain(), NormalizedMemberships(causal=True, block_size=BLOCK)), "apply normalized_memberships before"),
    ((NormalizedMemberships(causal=True, block_size=BLOCK), ReciprocalGain(causal=True), Residual(True)),
     "scales by a function of N"),
])
def test_a_step_that_would_read_later_tokens_is_refused(relax, says):
    """Half a causal step, or one whose output still scales by 1/N, lets token t see what follows."""
    with pytest.raises(unroll.UnrollError, match=says):
        unroll.plan(small([GradientStep(TERM, 1.0, "tssa", relax)]))


def test_causal_torch_compile_agrees_with_eager():
    layer = causal_model(True).layer(0).eval()
    compiled = torch.compile(layer.run, backend="eager", fullgraph=True)
    x = torch.randn(2, 13, 48)
    with torch.no_grad():
        assert torch.allclose(compiled(x), layer.run(x), atol=1e-5)
