r"""The relaxations that take the exact variational-compression step (:mod:`unroll.objective.variational`)
to ToST's token statistics self-attention (TSSA, ``AttentionTSSA`` of the reference), with the
existing ``untie_output``, ``residual`` and ``pre_norm``:

* ``projection_bias``: ``W_k = U_kᵀ X → U_kᵀ X + c_k 1ᵀ`` (the reference's ``qkv_bias=True``).
* ``normalized_memberships``: the Π-step reads each coordinate normalised over the tokens, with a
  learned temperature per head, ``Pi_k = softmax_k(temp_k 1ᵀ (W̄_k ∘ W̄_k))``,
  ``W̄_k = W_k ⊘ ‖W_k‖_row`` (``temp`` (K, 1, 1), init 1).
* ``reciprocal_gain``: ``f'(x) = α / (1 + α x) → 1 / (1 + x)`` (α absorbed by the learned output
  and the learned projection), and the statistics' normaliser guarded, ``n_k → n_k + 1e-8``.

With ``causal: true`` on the last two, every statistic is a prefix sum over the tokens, so that
token j reads tokens 1..j only (``CausalSelfAttention_TSSA`` of the reference's language model):

* memberships ``softmax_k(temp_k 1ᵀ (W_k^∘2 ⊘ max(cumsum(W_k^∘2), 1e-12) + 1 denom_bias_k[:N]))``
  with a learned ``denom_bias_k`` (1 x block_size per head, init 0; stored (K, 1, block_size));
* statistics per token, ``S_k = cumsum(W_k^∘2 ∘ 1 Pi_k) ⊘ 1 (cumsum(Pi_k) + 1e-8 1ᵀ)`` (p x N), and
  gains ``D_k = 1 ⊘ (1 + S_k)`` (p x N) in place of ``D_k 1ᵀ``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import Field

import sympy as sp

from unroll.derive.update import Update, merge_params
from unroll.expr.nodes import Divide, HeadSoftmax, LeadingColumns, Norm, PrefixSum
from unroll.expr.vocabulary import maximum
from unroll.expr.printing import to_text
from unroll.expr.symbols import d, p
from unroll.objective.base import ParamSpec
from unroll.objective.compression import PROJECTION, SUBSPACES
from unroll.objective.variational import GAINS, MEMBERSHIPS, STATISTICS, energy
from unroll.relax.rules import _STRICT, _fail, _note, _Rule

#: what ``normalized_memberships`` introduces: one temperature per head, stored (K, 1, 1)
TEMPERATURE = ParamSpec("temp_k", 1, 1, ("ones",), "membership temperature per head", vector=False)
#: what ``projection_bias`` introduces: a bias per head on the projection, stored (K, p, 1)
PROJECTION_BIAS = ParamSpec("c_k", p, 1, ("uniform", d), "projection bias (qkv bias)", vector=False)


def _projection_symbol(u: Update, relaxation: str) -> sp.MatrixSymbol:
    """The symbol ``W_k`` the memberships are computed from (bound to ``U_kᵀ X [+ c_k 1ᵀ]``)."""
    pi = u.binding(MEMBERSHIPS.name)
    if pi is None:
        raise _fail(u, relaxation, f"the step has no memberships {MEMBERSHIPS.name} (a variational_compression step)")
    found = [s for s in pi.atoms(sp.MatrixSymbol) if s.name == PROJECTION]
    if len(found) != 1:
        raise _fail(u, relaxation, f"the memberships {to_text(pi)} read no projection W_k")
    return found[0]


def _rebind(u: Update, name: str, expr: sp.Basic, symbol: sp.MatrixSymbol | None = None) -> tuple:
    """The bindings with ``name`` bound to ``expr`` (and renamed to ``symbol`` if given: a new shape)."""
    return tuple(((symbol or s), expr) if s.name == name else (s, e) for s, e in u.where)


def denominator_bias(block_size: int) -> ParamSpec:
    """The causal memberships' learned bias per head and position (the reference's ``denom_bias``)."""
    return ParamSpec("denom_bias_k", 1, sp.Integer(block_size), ("zeros",), "causal membership bias per position",
                     vector=False)


@dataclass(frozen=True)
class ProjectionBias(_Rule):
    """``W_k = U_kᵀ X → U_kᵀ X + c_k 1ᵀ``: a learned bias per head on the projection."""

    __pydantic_config__: ClassVar = _STRICT

    name: ClassVar[str] = "projection_bias"
    rule: ClassVar[str] = "W_k = U_kᵀ X → U_kᵀ X + c_k 1ᵀ"

    def apply(self, u: Update) -> Update:
        W = u.binding(PROJECTION)
        if not (isinstance(W, sp.MatMul) and len(W.args) == 2 and W.args[0] == SUBSPACES.symbol.T):
            raise _fail(u, self.name, "found no projection W_k = U_kᵀ X to add a bias to")
        biased = W + PROJECTION_BIAS.symbol * sp.OneMatrix(1, W.shape[1])
        return u.evolve(where=_rebind(u, PROJECTION, biased), params=merge_params(u.params, (PROJECTION_BIAS,)),
                        notes=_note(u, self.name))


@dataclass(frozen=True)
class NormalizedMemberships(_Rule):
    """The Π-step on projections normalised over the tokens, with a learned temperature per head:
    ``softmax_k(c 1ᵀ (W_k ∘ W_k)) → softmax_k(temp_k 1ᵀ (W̄_k ∘ W̄_k))``, ``W̄_k = W_k ⊘ ‖W_k‖_row``."""

    __pydantic_config__: ClassVar = _STRICT

    #: normalise each coordinate by the prefix sums of its squares (token j reads tokens <= j)
    causal: bool = False
    #: the longest sequence a causal step reads: the length of its learned per-position bias
    block_size: Annotated[int, Field(ge=1, le=1 << 20)] | None = None
    name: ClassVar[str] = "normalized_memberships"

    @property
    def rule(self) -> str:
        if self.causal:
            return ("Pi_k → softmax_k(temp_k 1ᵀ (W_k^∘2 ⊘ cumsum(W_k^∘2) + 1 denom_bias_k[:N])), temp_k and "
                    f"denom_bias_k (1 x {self.block_size}) learned")
        return "Pi_k → softmax_k(temp_k 1ᵀ (W̄_k ∘ W̄_k)), W̄_k = W_k ⊘ ‖W_k‖_row, temp_k learned"

    def apply(self, u: Update) -> Update:
        W = _projection_symbol(u, self.name)
        if ReciprocalGain.name in u.notes:  # its statistics were made causal or not already
            raise _fail(u, self.name, f"apply {self.name} before {ReciprocalGain.name}, which must match its causal flag")
        if not isinstance(u.binding(MEMBERSHIPS.name), HeadSoftmax):
            raise _fail(u, self.name, "the memberships are not a softmax over heads")
        params: tuple[ParamSpec, ...] = (TEMPERATURE,)
        if not self.causal:
            normed = Divide(W, Norm(W, "rows"))  # each coordinate over the tokens, as F.normalize(dim=tokens)
            pi = HeadSoftmax(TEMPERATURE.symbol * energy(normed))
        else:
            if self.block_size is None:
                raise _fail(u, self.name, "causal memberships need block_size, the longest sequence (the length "
                                          "of their learned bias per position)")
            bias = denominator_bias(self.block_size)
            squares = sp.HadamardPower(W, 2)
            ratio = Divide(squares, maximum(PrefixSum(squares), 1e-12))  # the reference's clamp_min(1e-12)
            shifted = ratio + sp.OneMatrix(W.shape[0], 1) * LeadingColumns(bias.symbol, W.shape[1])
            pi = HeadSoftmax(TEMPERATURE.symbol * sp.OneMatrix(1, W.shape[0]) * shifted)
            params += (bias,)
        return u.evolve(where=_rebind(u, MEMBERSHIPS.name, pi), params=merge_params(u.params, params),
                        notes=_note(u, self.name))


@dataclass(frozen=True)
class ReciprocalGain(_Rule):
    """``D_k = α ⊘ (1 + α S_k) → 1 ⊘ (1 + S_k)`` and ``S_k``'s normaliser ``n_k → n_k + guard``."""

    __pydantic_config__: ClassVar = _STRICT

    #: added to each head's total membership n_k before dividing by it (the reference's 1e-8)
    guard: Annotated[float, Field(ge=0, le=1)] = 1e-8
    name: ClassVar[str] = "reciprocal_gain"

    #: statistics per token as prefix sums over the tokens (token j reads tokens <= j)
    causal: bool = False

    @property
    def rule(self) -> str:
        text = f"f'(x) = α/(1 + α x) → 1/(1 + x), n_k → n_k + {self.guard:g}"
        return text + (", statistics → prefix sums over the tokens" if self.causal else "")

    def apply(self, u: Update) -> Update:
        S = u.binding(STATISTICS.name)
        if u.binding(GAINS.name) is None or not isinstance(S, Divide):
            raise _fail(u, self.name, f"the step has no gains {GAINS.name} of statistics {STATISTICS.name}")
        causal_memberships = u.binding(MEMBERSHIPS.name).has(PrefixSum)
        if self.causal != causal_memberships:  # one causal half would let tokens read later ones
            raise _fail(u, self.name, "the memberships are causal: use reciprocal_gain {causal: true}"
                        if causal_memberships else "causal statistics need causal memberships: apply "
                        "normalized_memberships {causal: true} first")
        if self.causal:
            return self._causal(u)
        ones = sp.OneMatrix(p, 1)
        gains = Divide(ones, ones + STATISTICS)
        num, den = S.args
        if self.guard:
            den = den + sp.Float(self.guard) * ones
        where = _rebind(u.evolve(where=_rebind(u, GAINS.name, gains)), STATISTICS.name, Divide(num, den))
        return u.evolve(where=where, notes=_note(u, self.name))

    def _causal(self, u: Update) -> Update:
        """Statistics and gains per token (p x N): ``D_k 1ᵀ`` in the output becomes ``D_k``."""
        W = _projection_symbol(u, self.name)
        pi, (rows, n) = MEMBERSHIPS, W.shape
        S, D = sp.MatrixSymbol(STATISTICS.name, rows, n), sp.MatrixSymbol(GAINS.name, rows, n)
        counts = PrefixSum(pi)  # n_k over tokens <= j (1 x N)
        if self.guard:
            counts = counts + sp.Float(self.guard) * sp.OneMatrix(1, n)
        moments = Divide(PrefixSum(sp.HadamardProduct(sp.HadamardPower(W, 2), sp.OneMatrix(rows, 1) * pi)),
                         sp.OneMatrix(rows, 1) * counts)
        broadcast = sp.MatMul(GAINS, sp.OneMatrix(1, n))
        if not u.out.has(broadcast):
            raise _fail(u, self.name, f"found no gains {GAINS.name} 1ᵀ in the output to make per token")
        out = u.out.xreplace({broadcast: D})
        ones = sp.OneMatrix(rows, n)
        where = _rebind(u, STATISTICS.name, moments, S)
        where = _rebind(u.evolve(where=where), GAINS.name, Divide(ones, ones + S), D)
        return u.evolve(out=out, where=where, notes=_note(u, self.name))


TOST_RELAXATIONS = (ProjectionBias, NormalizedMemberships, ReciprocalGain)

__all__ = ["NormalizedMemberships", "ProjectionBias", "ReciprocalGain", "TOST_RELAXATIONS"]
