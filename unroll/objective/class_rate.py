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
(1, d, m), goes through the same layer.

**In the language.** :meth:`ClassRate.gradient` is that step written symbolically, the classes
playing the role of **heads** (the per-head index ``k``; a recipe sets ``architecture.heads`` to
the number of classes): ``E``, ``C_k`` and ``gamma_k`` are parameters of the step whose ``init``
is ``("data",)`` (:data:`DATA_CONSTANTS`), so the lowered step keeps them as persistent buffers,
zeros until ``unroll construct`` fills them with :meth:`ClassRate.fit`. ``unroll build`` and
``unroll explain`` derive, print and lower it like any other step:

.. math::  Z^+ = Z - \kappa\,(\textstyle\sum_k V_k \circ (\mathbf 1 \gamma_k \pi_k) - E Z), \quad
           V_k = C_k Z, \quad \pi_k = \operatorname{softmax}_k(-\lambda\, \|V_k\|_{col})

An empty class (``tr Π_j = 0``) contributes nothing: γ_j = 0, and :meth:`ClassRate.fit` gives it
the limit of ``C_j = α_j I`` as α_j → ∞, capped at :data:`EMPTY_CLASS_ALPHA` times d/ε², so that
its residual is huge and it takes no membership.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import sympy as sp
import torch
from pydantic import Field

from unroll.errors import UnrollError
from unroll.expr.nodes import HeadSoftmax, HeadSum
from unroll.expr.symbols import d
from unroll.expr.vocabulary import column_norms
from unroll.objective.base import Gradient, ParamSpec, Term, logdet_spd

LAMBDA = sp.Symbol("lambda", positive=True)
#: an empty class's C_j = α_j I, α_j = d / (tr Π_j ε²) -> ∞, is stored with α_j = this × d/ε²
EMPTY_CLASS_ALPHA = 1e6
#: ReduNet's data constants, parameters of the step computed from data (``init`` ``("data",)``):
#: registered as persistent buffers, zeros until :meth:`ClassRate.fit` fills them. The classes are
#: the heads (``_k``): ``architecture.heads`` must be the number of classes.
DATA_CONSTANTS = (
    ParamSpec("E", d, d, ("data",), "expansion operator α (I + α Z Zᵀ)⁻¹, from the training features"),
    ParamSpec("C_k", d, d, ("data",), "per class: compression operator α_k (I + α_k Z Π_k Zᵀ)⁻¹"),
    ParamSpec("gamma_k", 1, 1, ("data",), "per class: its share of the training samples", vector=False),
)


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
        r"""``∇ΔR`` as each token (sample) sees it, the classes as heads (``k``):

        ``E X - Σ_k V_k ∘ (1 γ_k π_k)``, ``V_k = C_k X``, ``π_k = softmax_k(-λ ‖V_k‖_columns)``,
        with the data constants E, C_k, γ_k parameters of the step (:data:`DATA_CONSTANTS`)."""
        dim, n = X.shape
        V = sp.MatrixSymbol("V_k", dim, n)
        pi = sp.MatrixSymbol("pi_k", 1, n)
        residual = sp.OneMatrix(1, dim) * column_norms(V) / dim  # 1 x N: ‖C_k x_j‖ per token
        E, C, gamma = (spec.symbol for spec in DATA_CONSTANTS)
        expr = E * X - HeadSum(sp.HadamardProduct(V, sp.OneMatrix(dim, 1) * gamma * pi))
        where = ((V, C * X), (pi, HeadSoftmax(-LAMBDA * residual)))
        return Gradient(expr, where=where, params=DATA_CONSTANTS)

    def value(self, Z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per sample: ``Z`` (B, d, m), samples as columns; ``params["Pi"]`` the memberships
        (B, J, m) or (J, m)."""
        if "Pi" not in params:
            raise UnrollError("class_rate: its value needs the memberships Pi (J, m) of the samples")
        return rate_reduction(Z, params["Pi"], self.eps)

    # data constants: what `unroll construct` computes from the training set, once per layer --------
    def fit(self, Z: torch.Tensor, labels: torch.Tensor, classes: int) -> dict[str, torch.Tensor]:
        """E, C_j and γ_j of the training features ``Z`` (d, m), samples as columns, and their
        labels (m,) in ``0..classes-1`` (hard memberships): by the attributes of the lowered step's
        buffers (:data:`DATA_CONSTANTS`), E (d, d), C (J, d, d), gamma (J, 1, 1)."""
        Pi = one_hot_memberships(labels, classes, Z.dtype)
        C, gamma = compression_operators(Z, Pi, self.eps)
        d = Z.shape[0]
        empty = gamma == 0  # C_j = α_j I with α_j -> ∞: a residual so large it takes no membership
        C = torch.where(empty[:, None, None], EMPTY_CLASS_ALPHA * d / self.eps**2 * torch.eye(d, dtype=Z.dtype), C)
        E, C_k, gamma_k = (spec.attr for spec in DATA_CONSTANTS)
        return {E: expansion_operator(Z, self.eps), C_k: C, gamma_k: gamma[:, None, None]}


def one_hot_memberships(labels: torch.Tensor, classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Π (J, m) of hard labels (m,): row j is the diagonal of Π_j."""
    return torch.nn.functional.one_hot(labels.long(), classes).T.to(dtype)
