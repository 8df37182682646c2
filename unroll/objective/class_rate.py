r"""The rate reduction of ReduNet: the coding rate of all samples minus that of each class.

Column convention (ReduNet's): ``Z`` (d x m) holds **one sample per column**, ``Π_j`` is the
diagonal m x m membership of class j (``Pi`` (J, m): row j is its diagonal, hard labels are
one-hot columns), ``ε`` the coding precision:

.. math::  \Delta R(Z, \Pi) = R(Z) - \sum_j \gamma_j R_j(Z \Pi_j)

.. math::  R(Z) = \tfrac12 \log\det(I_d + \alpha Z Z^T), \quad \alpha = \frac{d}{m \epsilon^2}

.. math::  R_j = \tfrac12 \log\det(I_d + \alpha_j Z \Pi_j Z^T), \quad
           \alpha_j = \frac{d}{\operatorname{tr}(\Pi_j) \epsilon^2}, \quad
           \gamma_j = \frac{\operatorname{tr}(\Pi_j)}{m}

With Π held fixed (``d log det A = tr(A⁻¹ dA)``):

.. math::  \nabla_Z \Delta R = E Z - \sum_j \gamma_j C_j Z \Pi_j, \quad
           E = \alpha (I + \alpha Z Z^T)^{-1}, \quad C_j = \alpha_j (I + \alpha_j Z \Pi_j Z^T)^{-1}

(``E z`` is the residual of z against its ridge regression on all samples, ``C_j z`` against
class j's.) A ReduNet layer takes one gradient-ascent step on a *single* sample z with E and
C_j **computed once from the training data** (the term's data constants, :meth:`ClassRate.fit`)
and its unknown membership estimated from how well each class explains it,

.. math::  \hat\pi_j(z) = \operatorname{softmax}_j(-\lambda \|C_j z\|), \qquad
           z \leftarrow z + \eta\,(E z - \textstyle\sum_j \gamma_j C_j z\, \hat\pi_j(z))

then projects z back onto the sphere (:class:`~unroll.objective.UnitNorm`). In ``unroll`` such
a layer sees each image as **one token** of width d (flattened pixels): the update acts on
every column of its input on its own, so a batch (B, d, 1), or the whole training set as one
(1, d, m), goes through the same layer. Empty classes (``tr Π_j = 0``) contribute nothing.

The step cannot be derived symbolically (its constants come from data and its memberships are a
softmax over classes), so ``unroll construct`` computes it, not ``unroll build``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import sympy as sp
import torch
from pydantic import Field

from unroll.errors import UnrollError
from unroll.objective.base import Gradient, Term, logdet_spd


def _gram_identity(Z: torch.Tensor, a: torch.Tensor | float) -> torch.Tensor:
    """``I_d + a Z Zᵀ`` for Z (..., d, m); ``a`` a number or a tensor broadcasting over the batch."""
    eye = torch.eye(Z.shape[-2], dtype=Z.dtype, device=Z.device)
    a = torch.as_tensor(a, dtype=Z.dtype, device=Z.device)
    return eye + a[..., None, None] * (Z @ Z.mT)


def rate(Z: torch.Tensor, eps: float) -> torch.Tensor:
    r"""``R(Z) = ½ log det(I + α Z Zᵀ)``, α = d/(m ε²), for Z (..., d, m) (samples as columns)."""
    d, m = Z.shape[-2:]
    return 0.5 * logdet_spd(_gram_identity(Z, d / (m * eps**2)))


def class_weights(Pi: torch.Tensor, eps: float, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(γ_j, α_j)`` of memberships ``Pi`` (..., J, m): γ_j = tr Π_j / m, α_j = d/(tr Π_j ε²)
    (0 for an empty class, whose term then vanishes)."""
    counts = Pi.sum(-1)
    gamma = counts / Pi.shape[-1]
    alpha = torch.where(counts > 0, d / (counts.clamp_min(torch.finfo(Pi.dtype).tiny) * eps**2), 0.0)
    return gamma, alpha


def class_rate(Z: torch.Tensor, Pi: torch.Tensor, eps: float) -> torch.Tensor:
    r"""``Σ_j γ_j R_j(Z Π_j)``, the compression term, for Z (..., d, m) and Pi (..., J, m)."""
    gamma, alpha = class_weights(Pi, eps, Z.shape[-2])
    ZPi = Z.unsqueeze(-3) * Pi.unsqueeze(-2)  # (..., J, d, m): Z Π_j
    gram = torch.eye(Z.shape[-2], dtype=Z.dtype, device=Z.device) + alpha[..., None, None] * (ZPi @ Z.unsqueeze(-3).mT)
    return (gamma * 0.5 * logdet_spd(gram)).sum(-1)


def rate_reduction(Z: torch.Tensor, Pi: torch.Tensor, eps: float) -> torch.Tensor:
    r"""``ΔR(Z, Π) = R(Z) - Σ_j γ_j R_j(Z Π_j)``."""
    return rate(Z, eps) - class_rate(Z, Pi, eps)


def expansion_operator(Z: torch.Tensor, eps: float) -> torch.Tensor:
    r"""``E = α (I + α Z Zᵀ)⁻¹`` (d x d): a d x d solve, however many samples Z has."""
    d, m = Z.shape[-2:]
    a = d / (m * eps**2)
    eye = torch.eye(d, dtype=Z.dtype, device=Z.device)
    return a * torch.linalg.solve(_gram_identity(Z, a), eye)


def compression_operators(Z: torch.Tensor, Pi: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(C, γ)``: ``C_j = α_j (I + α_j Z Π_j Zᵀ)⁻¹`` stacked (..., J, d, d) and γ (..., J)."""
    d = Z.shape[-2]
    gamma, alpha = class_weights(Pi, eps, d)
    ZPi = Z.unsqueeze(-3) * Pi.unsqueeze(-2)
    eye = torch.eye(d, dtype=Z.dtype, device=Z.device)
    gram = eye + alpha[..., None, None] * (ZPi @ Z.unsqueeze(-3).mT)
    return alpha[..., None, None] * torch.linalg.solve(gram, eye.expand_as(gram)), gamma


def rate_reduction_gradient(Z: torch.Tensor, Pi: torch.Tensor, eps: float) -> torch.Tensor:
    r"""``∇_Z ΔR = E Z - Σ_j γ_j C_j Z Π_j`` (Π fixed), the closed form checked against autograd."""
    C, gamma = compression_operators(Z, Pi, eps)
    comp = (gamma[..., None, None] * (C @ Z.unsqueeze(-3)) * Pi.unsqueeze(-2)).sum(-3)
    return expansion_operator(Z, eps) @ Z - comp


def soft_memberships(Z: torch.Tensor, C: torch.Tensor, lam: float, gamma: torch.Tensor | None = None) -> torch.Tensor:
    r"""``π̂_j(z) = softmax_j(-λ ‖C_j z‖)`` for every column z of Z (..., d, N): (..., J, N).
    A sample that class j's subspace explains well has a small residual ``C_j z``. With ``gamma``,
    classes without training samples (γ_j = 0, C_j = 0: a residual of 0) get no membership."""
    return _memberships(C @ Z.unsqueeze(-3), lam, gamma)


def _memberships(CZ: torch.Tensor, lam: float, gamma: torch.Tensor | None) -> torch.Tensor:
    residual = torch.linalg.vector_norm(CZ, dim=-2)  # (..., J, N)
    if gamma is not None:
        residual = torch.where(gamma[:, None] > 0, residual, torch.inf)
    return torch.softmax(-lam * residual, dim=-2)


@dataclass(frozen=True, eq=False)
class ClassRate(Term):
    """``ΔR(Z, Π)`` (see the module): a maximised term, so write it with weight -1 in an objective.

    ``eps``: the coding precision ε; ``lam``: λ, how sharply the soft memberships of a layer pick
    the class whose subspace explains a sample best. Its data constants (:meth:`fit`) are ``E``
    (d, d), ``C`` (J, d, d) and ``gamma`` (J,)."""

    eps: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] = 0.1
    lam: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] = 500.0
    label: ClassVar[str] = "dR"

    def latex(self) -> str:
        return r"\Delta R(Z, \Pi; \epsilon)"

    def constants(self) -> dict[str, float]:
        return {"epsilon": self.eps, "lambda": self.lam}

    def gradient(self, X: sp.MatrixExpr) -> Gradient:
        raise UnrollError("the class rate reduction (class_rate) takes its constants E and C_j from labelled "
                          "training data: compute its layers with `unroll construct` (unroll.construct), "
                          "not build or train")

    def value(self, Z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per sample: ``Z`` (B, d, m), samples as columns; ``params["Pi"]`` the memberships
        (B, J, m) or (J, m)."""
        if "Pi" not in params:
            raise UnrollError("class_rate: its value needs the memberships Pi (J, m) of the samples")
        return rate_reduction(Z, params["Pi"], self.eps)

    # data constants: what `unroll construct` computes from the training set, once per layer --------
    def constant_shapes(self, d: int, classes: int) -> dict[str, tuple[int, ...]]:
        """The shapes of :meth:`fit`'s tensors, so that a stored network is rebuilt empty and loaded."""
        return {"E": (d, d), "C": (classes, d, d), "gamma": (classes,)}

    def fit(self, Z: torch.Tensor, labels: torch.Tensor, classes: int) -> dict[str, torch.Tensor]:
        """E, C_j and γ_j of the training features ``Z`` (d, m), samples as columns, and their
        labels (m,) in ``0..classes-1`` (hard memberships)."""
        Pi = one_hot_memberships(labels, classes, Z.dtype)
        C, gamma = compression_operators(Z, Pi, self.eps)
        return {"E": expansion_operator(Z, self.eps), "C": C, "gamma": gamma}

    def data_gradient(self, Z: torch.Tensor, constants: dict[str, torch.Tensor]) -> torch.Tensor:
        r"""``∇ΔR`` as one sample sees it, every column of Z (..., d, N) on its own:
        ``E z - Σ_j γ_j C_j z π̂_j(z)``, with the fitted constants and soft memberships (a class
        absent from the training data gets none)."""
        E, C, gamma = constants["E"], constants["C"], constants["gamma"]
        CZ = C @ Z.unsqueeze(-3)  # (..., J, d, N)
        pi = _memberships(CZ, self.lam, gamma)  # (..., J, N)
        return E @ Z - (gamma[:, None, None] * CZ * pi.unsqueeze(-2)).sum(-3)


def one_hot_memberships(labels: torch.Tensor, classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Π (J, m) of hard labels (m,): row j is the diagonal of Π_j."""
    return torch.nn.functional.one_hot(labels.long(), classes).T.to(dtype)
