"""What `unroll explain` prints is what the lowered layer computes: each printed update,
evaluated on its own from its sympy tree (numpy, one sample at a time), against the lowered
torch module, in float64."""

import numpy as np
import pytest
import torch
from conftest import assert_printed_is_computed

from unroll.derive import GradientStep, ProximalStep
from unroll.derive.inverse import invert_layer
from unroll.explain import explain
from unroll.lower.model import lower_network
from unroll.network import ClassifierHead, Network, PatchFrontend
from unroll.objective import L1, Compression, DenoisingScore, Lasso, NonNegative
from unroll.relax import CompleteSubspaces, Neumann, PreNorm, Residual, SoftmaxSimilarity, UntieOutput

Rc = Compression(eps=0.5)
SPARSE = Lasso() + L1(lam=0.1) + NonNegative()
CRATE_COMPRESS = (
    Neumann(1), CompleteSubspaces(), SoftmaxSimilarity("1/sqrt(p)"), UntieOutput(bias=True), Residual(True), PreNorm(1e-5)
)

VARIANTS = {
    "a_exact_inverse": [GradientStep(Rc, 0.3, "compress")],
    "b_neumann_no_softmax": [GradientStep(Rc, 0.3, "compress", (Neumann(1), CompleteSubspaces()))],
    "c_softmax_tied_output": [
        GradientStep(Rc, 0.3, "compress", (Neumann(1), CompleteSubspaces(), SoftmaxSimilarity(1.0)))
    ],
    "d_crate_layer": [
        GradientStep(Rc, 1.0, "compress", CRATE_COMPRESS),
        ProximalStep(SPARSE, 0.1, name="sparsify", relax=(PreNorm(1e-5),)),
    ],
    "e_plain_soft_threshold": [ProximalStep(Lasso() + L1(lam=0.1), 0.1, name="sparsify")],
    "f_two_ista_from_zero_overcomplete": [
        ProximalStep(Lasso(expansion=4) + L1(lam=0.1) + NonNegative(), 0.1, 2, "zero", "decoupled", "sparsify")
    ],
    "g_crate_alpha_layer": [
        GradientStep(Rc, 1.0, "compress", CRATE_COMPRESS[:3] + (UntieOutput(bias=False), Residual(True), PreNorm(1e-6))),
        ProximalStep(Lasso(expansion=4) + L1(lam=0.1) + NonNegative(), 0.1, 2, "zero", "decoupled", "sparsify",
                     (Residual(True), PreNorm(1e-6))),
    ],
    "h_crate_decoder_layer": list(invert_layer((
        GradientStep(Rc, 1.0, "compress", CRATE_COMPRESS),
        ProximalStep(SPARSE, 0.1, name="sparsify", relax=(PreNorm(1e-5),)),
    ))),
    "i_tweedie_denoiser": [GradientStep(DenoisingScore(noise=0.6), 0.36, "denoise")],
    "j_causal_attention": [GradientStep(Rc, 1.0, "compress", (
        Neumann(1), CompleteSubspaces(), SoftmaxSimilarity("1/sqrt(p)", causal=True), UntieOutput(bias=True),
        Residual(True), PreNorm(1e-5)))],
}


def small(steps) -> Network:
    return Network(
        tuple(steps), width=12, heads=3, depth=1,
        frontend=PatchFrontend(image_size=8, patch_size=4), head=ClassifierHead(classes=5),
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_printed_update_is_computed(variant):
    model = lower_network(small(VARIANTS[variant])).double()
    with torch.no_grad():  # random weights everywhere, LayerNorms included
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    assert_printed_is_computed(model, small(VARIANTS[variant]), torch.randn(3, 12, 7, dtype=torch.float64))


def test_explain_names_every_relaxation_and_the_exact_step():
    text = explain(small(VARIANTS["d_crate_layer"]))
    assert "(β W_kᵀ W_k + I)⁻¹" in text  # the exact gradient of R^c, with its inverse
    for name in ("neumann", "complete_subspaces", "softmax", "untie_output", "residual", "pre_norm"):
        assert f"relaxation {name}:" in text
    assert "ReLU(Y - η λ 1 - η Dᵀ (D Y - Y))" in text  # the ISTA step as the reference computes it


def test_softmax_normalises_each_column_of_the_gram_matrix():
    """Tokens are columns: each column of softmax(Wᵀ W) sums to one (the row softmax of
    tokens-as-rows code). The Gram matrix is symmetric, so the wrong axis would not."""
    import sympy as sp

    from unroll.expr.nodes import Softmax
    from unroll.expr.numeric import evaluate

    W = sp.MatrixSymbol("W", 4, 7)
    S = evaluate(Softmax(W.T * W), {"W": np.random.randn(4, 7)})
    assert np.allclose(S.sum(axis=0), 1) and not np.allclose(S.sum(axis=1), 1)


def test_decoder_ascends_where_the_encoder_descends():
    """The decoder's attention step subtracts the learned output the encoder's adds."""
    text = explain(small(VARIANTS["h_crate_decoder_layer"]))
    assert "gradient ascent on R^c" in text
    assert "Z⁺ = Z - Σ_k[O_k W_k softmax(τ W_kᵀ W_k)] - b 1ᵀ" in text
    assert "Z⁺ = D Y" in text


def test_causal_attention_never_looks_ahead():
    for optimize in (False, True):
        model = lower_network(small(VARIANTS["j_causal_attention"]), optimize=optimize).double()
        Z = torch.randn(2, 12, 9, dtype=torch.float64)
        later = Z.clone()
        later[..., 5:] += torch.randn(2, 12, 4, dtype=torch.float64)  # change tokens 5..8 only
        with torch.no_grad():
            a, b = model.layer(0)(Z), model.layer(0)(later)
        assert torch.allclose(a[..., :5], b[..., :5]) and not torch.allclose(a[..., 5:], b[..., 5:])
