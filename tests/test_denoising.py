"""The denoising-score term: its derived gradient is the mixture's score, and a gradient step of
size t^2 on it (Tweedie) denoises data drawn from the model it assumes (float64)."""

import math

import numpy as np
import pytest
import torch

from unroll.derive import GradientStep, derive
from unroll.expr.numeric import evaluate
from unroll.expr.symbols import Z
from unroll.lower.step import LoweredStep
from unroll.objective import DenoisingScore


def orthonormal_subspaces(d: int, k: int, p: int) -> torch.Tensor:
    """K bases (K, d, p) of mutually orthogonal p-dimensional subspaces (k p <= d)."""
    q = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
    return q[:, : k * p].reshape(d, k, p).permute(1, 0, 2).contiguous()


def sample_mixture(U: torch.Tensor, samples: int, tokens: int) -> torch.Tensor:
    """Tokens (B, d, N), each from N(0, U_k U_k^T) with k uniform: the term's own model."""
    k, d, p = U.shape
    which = torch.randint(k, (samples, tokens))
    coeffs = torch.randn(samples, tokens, p, dtype=torch.float64)
    return torch.einsum("bndp,bnp->bdn", U[which], coeffs)


def posterior_mean(U: torch.Tensor, noisy: torch.Tensor, t: float) -> torch.Tensor:
    """E[x | x_t] written straight from reference section 4, independent of the derivation."""
    proj = torch.einsum("kdp,bdn->bknp", U, noisy)  # U_k^T x_t per token
    weights = torch.softmax((proj**2).sum(-1) / (2 * t**2 * (1 + t**2)), dim=1)  # (B, K, N)
    return torch.einsum("kdp,bknp,bkn->bdn", U, proj, weights) / (1 + t**2)


@pytest.mark.parametrize("d,k,p,t", [(9, 3, 3, 0.5), (16, 4, 2, 1.3), (12, 2, 5, 0.2)])
def test_score_is_autograd_of_the_mixture_log_density(d, k, p, t):
    term = DenoisingScore(noise=t)
    U = orthonormal_subspaces(d, k, p)
    X = torch.randn(1, d, 7, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(term.value(X, {"U": U}).sum(), X)
    g = term.gradient(Z)
    derived = evaluate(g.expr, {"Z": X[0].detach().numpy(), "U_k": U.numpy(), "t": t}, g.where)
    expected = grad[0].numpy()
    assert np.abs(derived - expected).max() / np.abs(expected).max() < 1e-10


def test_value_is_the_mixture_density():
    """One token, one component: the value is the Gaussian's negative log density."""
    U = orthonormal_subspaces(4, 1, 2)
    x = torch.randn(1, 4, 1, dtype=torch.float64)
    cov = U[0] @ U[0].T + 0.49 * torch.eye(4, dtype=torch.float64)
    quad = x[0, :, 0] @ torch.linalg.solve(cov, x[0, :, 0])
    expected = 0.5 * (quad + torch.logdet(cov) + 4 * math.log(2 * math.pi))
    assert torch.allclose(DenoisingScore(noise=0.7).value(x, {"U": U})[0], expected)


@pytest.mark.parametrize("t", [0.3, 0.8])
def test_tweedie_step_denoises_mixture_data(t):
    d, k, p = 24, 4, 3
    U = orthonormal_subspaces(d, k, p)
    clean = sample_mixture(U, 64, 16)
    noisy = clean + t * torch.randn_like(clean)
    term = DenoisingScore(noise=t)
    update = derive(GradientStep(term, step_size=term.tweedie_step_size()))
    step = LoweredStep(update, {"d": d, "K": k, "p": p}, [s.name for s, _ in update.where]).double()
    step.U.data.copy_(U)
    with torch.no_grad():
        denoised = step(noisy)
    assert torch.allclose(denoised, posterior_mean(U, noisy, t), atol=1e-12)
    mse_noisy = ((noisy - clean) ** 2).mean()
    mse_denoised = ((denoised - clean) ** 2).mean()
    # most of the noise is orthogonal to the true subspace and is removed
    assert mse_denoised < 0.5 * mse_noisy
