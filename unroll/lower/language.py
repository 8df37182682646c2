"""The language model: token ids -> derived layers -> logits over the vocabulary.

The front end and the head are not derived from an objective (as for images): nanoGPT's token
and position embeddings in, and out a final LayerNorm and logits through the token embedding
itself, so the head is one tensor with ``wte`` (weight tying, as crate-lm and GPT-2 do). The layers
in between are the plan's, lowered as for any network: a causal model's steps carry the causal
relaxations (``softmax: {causal: true}``, causal token statistics) the recipe names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unroll.errors import UnrollError
from unroll.lower.model import FRONTEND, HEAD, Layer, LayerStack, RecipeModel
from unroll.network import LanguageHead, Network, TokenFrontend
from unroll.plan import Plan, plan

#: the token and position tables (the names of nanoGPT's, which crate-lm keeps)
TOKENS = "wte"
POSITIONS = "wpe"


class TokenEmbedding(nn.Module):
    """(B, T) token ids -> (B, T, d): ``wte[ids] + wpe[0..T)``."""

    def __init__(self, spec: TokenFrontend, width: int):
        super().__init__()
        self.spec = spec
        self.wte = nn.Embedding(spec.vocab_size, width)
        self.wpe = nn.Embedding(spec.context, width)
        for table in (self.wte, self.wpe):  # GPT-2's initialisation, which crate-lm keeps
            nn.init.normal_(table.weight, std=0.02)

    def forward(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``offset``: the position of the first id (tokens before it are cached, when streaming)."""
        t = offset + ids.shape[1]
        if t > self.spec.context:
            raise ValueError(f"a sequence of {t} tokens is longer than the context ({self.spec.context})")
        return self.wte(ids) + self.wpe(torch.arange(offset, t, device=ids.device))  # (B, T, d)


class FinalNorm(nn.Module):
    """(B, T, d) -> (B, T, d): the LayerNorm before the tied head (``ln_f``). The logits are the
    model's to take, through the token embedding, so that the table is one tensor, never an input."""

    def __init__(self, spec: LanguageHead, width: int):
        super().__init__()
        self.spec = spec
        self.norm = nn.LayerNorm(width, eps=spec.norm_eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(tokens)


class WhiteBoxLanguageModel(RecipeModel):
    """token ids (B, T) -> logits (B, T, vocab); every layer is a derived optimisation step."""

    def __init__(self, network: Network, optimize: bool = True):
        super().__init__()
        self.plan: Plan = plan(network)
        self.network = network
        self.optimize = optimize
        setattr(self, FRONTEND, TokenEmbedding(network.frontend, network.width))
        self.encoder = LayerStack(self.plan.encoder, dict(self.plan.sizes), optimize)
        setattr(self, HEAD, FinalNorm(network.head, network.width))

    def layer(self, i: int) -> Layer:
        """The module of layer ``i`` (counted from 0, across groups)."""
        return self.encoder.layer(i)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokens after the last layer, (B, T, d)."""
        return self.encoder(self.frontend(ids))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, vocab) logits; position t sees tokens up to t when the steps are causal."""
        return F.linear(self.head(self.encode(ids)), self.frontend.wte.weight)

    def stream(self, ids: torch.Tensor, cache: TokenCache) -> torch.Tensor:
        """(B, n) ids that follow the ``cache.offset`` tokens already read -> their logits
        (B, n, vocab), equal to the last n positions of ``forward`` on all of them; ``cache``
        (from :meth:`new_cache`) keeps what each step needs of the earlier tokens and moves on
        by n. Raises :class:`~unroll.lower.stream.NotStreamable` for a step that reads later tokens."""
        batch, n = ids.shape
        if cache.offset + n > self.network.frontend.context:  # before any step appends to the cache
            raise UnrollError(f"{cache.offset} tokens read and {n} more pass the context of "
                              f"{self.network.frontend.context}: the positions are absolute, start a new cache")
        if cache.batch not in (None, batch):
            raise UnrollError(f"the cache holds {cache.batch} sequences, these ids {batch}")
        cache.batch = batch
        x = self.frontend(ids, cache.offset)  # (B, n, d)
        x = self.encoder.stream(x, cache.layers, cache.offset)
        cache.offset += ids.shape[1]
        return F.linear(self.head(x), self.frontend.wte.weight)

    def new_cache(self) -> TokenCache:
        """An empty cache for :meth:`stream`, after checking every step streams (else
        :class:`~unroll.lower.stream.NotStreamable`, naming the step)."""
        for layer in self.encoder.layers:
            for step in layer.steps.values():
                step.stream_program()
        return TokenCache(0, [{} for _ in range(self.encoder.depth)])


@dataclass
class TokenCache:
    """What a language model keeps of the tokens it has read, for :meth:`WhiteBoxLanguageModel.stream`:
    their count, and per unrolled layer, per step, the cached values by name (``past(W_k)``: the
    projected earlier tokens of softmax attention; ``cumsum(...)``: running sums of causal ToST)."""

    offset: int
    layers: list[dict]
    #: the sequences read side by side, set by the first call
    batch: int | None = None

    def values(self) -> int:
        """Numbers held (the cache's size in elements)."""
        return sum(t.numel() for layer in self.layers for step in layer.values() for t in step.values())
