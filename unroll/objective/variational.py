r"""The variational compression term of ToST (Wu et al., "Token Statistics Transformer"): an upper
bound of the compression term with soft memberships Π as an auxiliary variable, whose Z-gradient
is linear in the number of tokens.

With ``W_k = U_k^T Z`` (p x N), memberships ``π_k`` (1 x N, the k-th column of Π written as a row;
for each token j, ``(π_{j1}, ..., π_{jK})`` lies on the simplex) and ``n_k = π_k 1``:

.. math::  R^c_{var}(Z, Π \mid U) = \tfrac12 \sum_k \frac{n_k}{N} \sum_{i=1}^{p}
           f\Big(\frac{1}{n_k} \sum_j π_{jk} (W_k)_{ij}^2\Big),
           \qquad f(x) = \log\big(1 + α x\big), \quad α = \frac{d}{ε^2}

The inner argument is the weighted second moment of coordinate i of head k, ``S_k`` (p x 1):
``S_k = (W_k ∘ W_k) π_kᵀ ⊘ (1 n_k)``. With Π fixed,

.. math::  \nabla_Z R^c_{var} = \frac1N \sum_k U_k \big(D_k 1^T ∘ W_k ∘ 1 π_k\big)
           = \frac1N \sum_k U_k \operatorname{Diag}(D_k)\, W_k \operatorname{Diag}(π_k),
           \qquad D_k = f'(S_k) = α ⊘ (1 + α S_k)

(``∂/∂(W_k)_{ij}`` of head k's part is ``½ (n_k/N) f'(S_{ki}) 2 π_{jk} (W_k)_{ij} / n_k``): a diagonal
per head, so the cost is O(N d p) and no N x N matrix appears.

**The auxiliary step (Π-step).** Before the Z-step the memberships are set to the closed-form
minimiser, token by token, of the entropy-regularised assignment

.. math::  \min_{π_j \in Δ_K} \; -\sum_k π_{jk} \tfrac12 \|U_k^T z_j\|^2 + η \sum_k π_{jk} \log π_{jk}
           \quad\Longrightarrow\quad π_{jk} = \operatorname{softmax}_k\Big(\frac{\|U_k^T z_j\|^2}{2η}\Big)

(the Lagrangian's stationarity gives ``log π_{jk} = ‖U_k^T z_j‖²/2η + const``; the objective is
strictly convex on the simplex, so this is its only minimiser). A token is assigned mostly to
the subspaces that capture most of its energy; η (``membership_temperature``) sets how softly.
The gradient step is this Π-step followed by the Z-gradient with Π held fixed (alternating
minimisation, as the LASSO's code is an auxiliary variable of the sparse step). The Π-step is a
where-binding ``Pi_k`` of the update (:meth:`VariationalCompression.memberships`), so that
relaxations (``normalized_memberships``) and ``unroll explain`` see it like any other result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import Field

import sympy as sp
import torch

from unroll.expr.nodes import Divide, HeadSoftmax, HeadSum
from unroll.expr.symbols import N, d, p
from unroll.objective.base import Gradient, Term
from unroll.objective.compression import SUBSPACES, projected

alpha = sp.Symbol("alpha", positive=True)
#: η of the Π-step (a constant of the update; printed η_Pi)
MEMBERSHIP_TEMPERATURE = sp.Symbol("eta_Pi", positive=True)
#: the auxiliary variable: head k's memberships of the N tokens (1 x N), a where-binding
MEMBERSHIPS = sp.MatrixSymbol("Pi_k", 1, N)
#: the weighted second moment of each coordinate of head k (p x 1): the token statistics
STATISTICS = sp.MatrixSymbol("S_k", p, 1)
#: ``f'`` at the statistics (p x 1): the diagonal of D_k
GAINS = sp.MatrixSymbol("D_k", p, 1)


def energy(W: sp.MatrixExpr) -> sp.MatrixExpr:
    """``1ᵀ (W ∘ W)`` (1 x N): the squared norm of each column of ``W``."""
    return sp.OneMatrix(1, W.shape[0]) * sp.HadamardProduct(W, W)


def second_moments(W: sp.MatrixExpr, pi: sp.MatrixExpr) -> sp.MatrixExpr:
    """``S = (W ∘ W) πᵀ ⊘ (1 π 1)`` (p x 1): each coordinate's second moment over the tokens,
    weighted by the memberships π (1 x N) and divided by their total ``n_k = π 1``."""
    rows, n = W.shape
    return Divide(sp.HadamardProduct(W, W) * pi.T, sp.OneMatrix(rows, 1) * pi * sp.OneMatrix(n, 1))


def scale_rows_and_columns(D: sp.MatrixExpr, W: sp.MatrixExpr, pi: sp.MatrixExpr) -> sp.MatrixExpr:
    """``Diag(D) W Diag(π) = D 1ᵀ ∘ W ∘ 1 π`` for a column D and a row π, as a Hadamard product
    (O(p N), no diagonal matrix is formed)."""
    rows, n = W.shape
    return sp.HadamardProduct(D * sp.OneMatrix(1, n), W, sp.OneMatrix(rows, 1) * pi)


@dataclass(frozen=True, eq=False)
class VariationalCompression(Term):
    """``eps``: ε of f (α = d/ε²); ``membership_temperature``: η of the Π-step (0.5 makes its
    softmax read ``‖U_kᵀ z_j‖²`` unscaled, as ToST's learned temperature starts)."""

    eps: Annotated[float, Field(gt=0, le=1e6)] = 0.5
    membership_temperature: Annotated[float, Field(gt=0, le=1e6)] = 0.5
    label: ClassVar[str] = "R^c_var"

    def latex(self) -> str:
        return r"R^{c}_{\mathrm{var}}(Z, \Pi \mid U;\epsilon)"

    def constants(self) -> dict[str, float]:
        return {"epsilon": self.eps, MEMBERSHIP_TEMPERATURE.name: self.membership_temperature}

    def memberships(self, W: sp.MatrixExpr) -> sp.MatrixExpr:
        """The Π-step in closed form, ``π_k = softmax_k(1ᵀ (W_k ∘ W_k) / 2η)`` (1 x N) for the
        projections ``W_k = U_kᵀ X``: the minimiser of the entropy-regularised assignment in the
        module docstring (see :meth:`assignment_cost`)."""
        return HeadSoftmax(energy(W) / (2 * MEMBERSHIP_TEMPERATURE))

    def gradient(self, X: sp.MatrixExpr) -> Gradient:
        U, W = SUBSPACES.symbol, projected(X)
        pi, S, D = MEMBERSHIPS, STATISTICS, GAINS
        n = X.shape[1]
        f_prime = alpha * Divide(sp.OneMatrix(p, 1), sp.OneMatrix(p, 1) + alpha * S)  # α / (1 + α S)
        expr = HeadSum(U * scale_rows_and_columns(D, W, pi)) / n
        where = (
            (alpha, d / sp.Symbol("epsilon", positive=True) ** 2),
            (W, U.T * X),
            (pi, self.memberships(W)),  # the auxiliary step, then Π is held fixed
            (S, second_moments(W, pi)),
            (D, f_prime),
        )
        return Gradient(expr, where=where, params=(SUBSPACES,))

    # torch meaning ---------------------------------------------------------------------------
    def membership_values(self, Z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The Π-step on ``Z`` (B, d, N): memberships of shape (B, K, N), summing to 1 over K."""
        W = _project(Z, params)
        return torch.softmax(W.square().sum(-2) / (2 * self.membership_temperature), dim=1)

    def assignment_cost(self, Z: torch.Tensor, Pi: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the Π-step minimises over memberships ``Pi`` (B, K, N) on the simplex, per sample:
        ``Σ_j Σ_k [-π_jk ½‖U_kᵀ z_j‖² + η π_jk log π_jk]``."""
        energies = 0.5 * _project(Z, params).square().sum(-2)  # (B, K, N)
        entropy = torch.special.xlogy(Pi, Pi)
        return (-Pi * energies + self.membership_temperature * entropy).sum((-2, -1))

    def value_at(self, Z: torch.Tensor, Pi: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``R^c_var(Z, Π | U)`` per sample, ``Z`` (B, d, N), ``Pi`` (B, K, N)."""
        W = _project(Z, params)  # (B, K, p, N)
        n = Z.shape[-1]
        a = Z.shape[-2] / self.eps**2
        counts = Pi.sum(-1)  # n_k: (B, K)
        moments = (W.square() * Pi.unsqueeze(-2)).sum(-1) / counts.unsqueeze(-1)  # (B, K, p)
        return 0.5 * (counts / n * torch.log1p(a * moments).sum(-1)).sum(-1)

    def value(self, Z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``R^c_var`` at the memberships the step uses (the Π-step's), per sample; ``Z`` (B, d, N)."""
        return self.value_at(Z, self.membership_values(Z, params), params)


def _project(Z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """``W_k = U_kᵀ Z``: (B, K, p, N) from ``Z`` (B, d, N) and ``U`` (K, d, p)."""
    return params[SUBSPACES.attr].mT.unsqueeze(0) @ Z.unsqueeze(1)
