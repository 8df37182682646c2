"""The standard-transformer baseline that white-box language models are compared against.

The CRATE language-model comparison sets CRATE-GPT beside a GPT-2-style transformer of the same
width, depth, heads, vocabulary and context, trained on the same data; ``unroll train RECIPE
--baseline gpt`` trains this model in place of the recipe's. It is a point of comparison, not a
derived model, so it stays outside the recipe schema and the compiler: it is built from a
well-kept library component, :class:`torch.nn.TransformerEncoderLayer` (pre-norm, GELU, no
dropout), so that nothing of ours can make the baseline look worse than it is.

What it costs: a block here has ~12d² parameters (attention 4d², a 4x MLP 8d²) against ~6d² for a
CRATE-GPT block with a 4x dictionary (shared QKV d², output d², dictionary 4d²), which is why the
comparison reports parameter counts beside the losses; :func:`baseline_parameters` gives the
exact count without building the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BaselineLM(nn.Module):
    """GPT-2-style language model: token and learned position embeddings, ``depth`` pre-norm
    transformer blocks, a final LayerNorm and a head tied to the token embedding.

    ``causal=False`` gives the bidirectional (masked-LM) counterpart: the same blocks without the
    mask.
    """

    def __init__(self, vocab_size: int, context: int, width: int, depth: int, heads: int,
                 causal: bool = True) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.vocab_size = vocab_size
        self.context = context
        self.width = width
        self.depth = depth
        self.heads = heads
        self.causal = causal
        self.wte = nn.Embedding(vocab_size, width)
        self.wpe = nn.Embedding(context, width)
        # GPT-2's initialisation of the embeddings; N(0, 1) (nn.Embedding's default) would make the
        # tied head's first logits ~sqrt(d) times too large and the start loss far above log(vocab).
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.wpe.weight, mean=0.0, std=0.02)
        # A ModuleList rather than nn.TransformerEncoder: the mask goes to each layer as given,
        # with no nested-tensor conversion or mask-causality detection in between.
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model=width, nhead=heads, dim_feedforward=4 * width, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(depth))
        # Pre-norm blocks leave the residual stream unnormalised; GPT-2 normalises it before the head.
        self.ln_f = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` (B, T) int64 token ids, T <= context -> logits (B, T, vocab)."""
        if ids.dim() != 2:
            raise ValueError(f"BaselineLM takes token ids of shape (B, T), got shape {tuple(ids.shape)}")
        T = ids.shape[1]
        if T > self.context:
            raise ValueError(f"sequence of {T} tokens is longer than the model's context of {self.context} "
                             f"(it has only {self.context} learned positions)")
        positions = torch.arange(T, device=ids.device)  # (T,)
        x = self.wte(ids) + self.wpe(positions)  # (B, T, d)
        mask = None
        if self.causal:
            # -inf above the diagonal: position t attends to 0..t only. The mask itself is what
            # enforces causality; is_causal=True is only a hint that lets the kernel skip reading it.
            mask = nn.Transformer.generate_square_subsequent_mask(T, device=ids.device, dtype=x.dtype)  # (T, T)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=self.causal)  # (B, T, d)
        x = self.ln_f(x)  # (B, T, d)
        # Tied head: the one embedding tensor reads tokens in and scores them out.
        return F.linear(x, self.wte.weight)  # (B, T, vocab)


def baseline_parameters(vocab_size: int, context: int, width: int, depth: int) -> int:
    """The exact number of parameters of ``BaselineLM(vocab_size, context, width, depth, heads)``
    (heads split the width and add none)."""
    d = width
    # One nn.TransformerEncoderLayer with dim_feedforward = 4d, all with biases:
    #   self_attn.in_proj (Q, K, V stacked)   3d² + 3d
    #   self_attn.out_proj                      d² +  d
    #   linear1 (d -> 4d)                      4d² + 4d
    #   linear2 (4d -> d)                      4d² +  d
    #   norm1, norm2 (weight and bias each)           4d
    #   total                                 12d² + 13d
    per_block = 12 * d * d + 13 * d
    # wte (tied head: counted once) + wpe + blocks + ln_f (weight and bias).
    return vocab_size * d + context * d + depth * per_block + 2 * d
