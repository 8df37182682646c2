r"""The negative log density of noisy tokens under a mixture of low-rank Gaussians: the term whose
gradient step is the optimal (Tweedie) denoiser.

Model (reference section 4): each token is drawn from an equal-weight mixture of K Gaussians
``N(0, U_k U_k^T)`` on subspaces with orthonormal bases ``U_k`` (d x p), then noised,
``z_t = z + t g`` with ``g ~ N(0, I)``. So ``z_t ~ (1/K) Σ_k N(0, U_k U_k^T + t^2 I)`` and

.. math::  S_t(Z) = -\sum_{j=1}^{N} \log p_t(z_j)
           = \sum_j \Big[\frac{\|z_j\|^2}{2t^2}
             - \log\sum_k \exp\big(\gamma \|U_k^T z_j\|^2\big)\Big] + \text{const},
           \qquad \gamma = \frac{1}{2 t^2 (1 + t^2)}

.. math::  \nabla_Z S_t = \frac{Z}{t^2} - 2\gamma \sum_k U_k \big(W_k \circ \mathbf{1}\pi_k\big),
           \quad W_k = U_k^T Z, \quad \pi_k = \operatorname{softmax}_k(\gamma\, \mathbf{1}^T (W_k \circ W_k))

``π_k`` is, per token, the posterior probability of subspace k. A gradient step with step size
``t^2`` is Tweedie's formula ``E[z | z_t] = z_t + t^2 ∇ log p_t(z_t)``, i.e.
``Z - t^2 ∇S_t = 1/(1+t^2) Σ_k U_k U_k^T Z diag(π_k)``. The step acts on each token alone; the
compression term's attention is its token-mixing counterpart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import Field

import sympy as sp
import torch

from unroll.expr.nodes import HeadSoftmax, HeadSum
from unroll.objective.base import Gradient, Term
from unroll.objective.compression import SUBSPACES, projected

t = sp.Symbol("t", positive=True)
gamma = sp.Symbol("gamma", positive=True)


@dataclass(frozen=True, eq=False)
class DenoisingScore(Term):
    """``noise``: the noise level t (standard deviation of the added Gaussian noise)."""

    noise: Annotated[float, Field(gt=0)] = 0.5
    label: ClassVar[str] = "S_t"

    def latex(self) -> str:
        return r"-\sum_j \log p_t(z_j \mid U)"

    def constants(self) -> dict[str, float]:
        return {"t": self.noise}

    def tweedie_step_size(self) -> float:
        """The step size that makes a gradient step on this term the posterior mean, ``t^2``."""
        return self.noise**2

    def gradient(self, X: sp.MatrixExpr) -> Gradient:
        U, W = SUBSPACES.symbol, projected(X)
        n, dim_head = X.shape[1], U.shape[1]
        energy = gamma * sp.OneMatrix(1, dim_head) * sp.HadamardProduct(W, W)
        pi = sp.MatrixSymbol("pi_k", 1, n)
        expr = X / t**2 - 2 * gamma * HeadSum(U * sp.HadamardProduct(W, sp.OneMatrix(dim_head, 1) * pi))
        where = ((gamma, 1 / (2 * t**2 * (1 + t**2))), (W, U.T * X), (pi, HeadSoftmax(energy)))
        return Gradient(expr, where=where, params=(SUBSPACES,))

    def value(self, Z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``-Σ_j log p_t(z_j)`` per sample, with the mixture's full covariances
        ``U_k U_k^T + t^2 I`` (so it holds for any U, orthonormal or not). ``Z``: (B, d, N)."""
        U = params[SUBSPACES.attr]  # (K, d, p)
        heads, dim = U.shape[0], U.shape[1]
        eye = torch.eye(dim, dtype=Z.dtype, device=Z.device)
        cov = U @ U.mT + self.noise**2 * eye  # (K, d, d)
        gaussians = torch.distributions.MultivariateNormal(torch.zeros(dim, dtype=Z.dtype), covariance_matrix=cov)
        tokens = Z.mT.unsqueeze(-2)  # (B, N, 1, d): broadcast against the K components
        log_p = torch.logsumexp(gaussians.log_prob(tokens), dim=-1) - math.log(heads)
        return -log_p.sum(-1)
