"""``unroll generate``: text sampled from a trained language model, one token at a time.

Each new token is drawn from the model's distribution at the last position, ``softmax(logits /
temperature)`` restricted to the ``top_k`` most likely tokens (greedy at temperature 0, and below
:data:`GREEDY_BELOW`), under a
seeded generator. The positions are learned and absolute, so the model reads at most its context:
a prompt longer than the context is refused, and once prompt and new tokens pass it the model
reads the last ``context`` tokens (a sliding window), which the command says before sampling.

Within the context, each new token is read once, through the model's streaming form
(:mod:`unroll.lower.stream`): the steps keep what they need of the earlier tokens (softmax
attention the projected tokens, causal ToST its running sums), so a token costs O(context)
rather than a forward over the whole window. Past the context the window slides, every position
changes, and each token is a full forward of the window again (absolute positions admit no
cache there). A model with a step that cannot stream is sampled the same way without a cache.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unroll.errors import UnrollError

#: temperatures below this sample the most likely token (their softmax is the argmax's, in the limit)
GREEDY_BELOW = 1e-6


def cache_problem(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot read one token at a time with a cache (a step that is not causal
    token by token, or a model without a streaming form), or None."""
    from unroll.lower.stream import NotStreamable

    if not hasattr(model, "new_cache"):
        return f"{type(model).__name__} has no streaming form"
    try:
        model.new_cache()
    except NotStreamable as e:
        return str(e)
    return None


def sample(model: torch.nn.Module, ids: list[int], tokens: int, temperature: float = 1.0, top_k: int | None = None,
           seed: int = 0, cache: bool = True) -> list[int]:
    """``tokens`` new ids after ``ids``, drawn as the module docstring says; ``cache``: read each
    token once while within the context (when the model can), else recompute every window."""
    context = model.network.frontend.context
    if temperature < 0:
        raise UnrollError(f"--temperature must be at least 0 (0: the most likely token), found {temperature:g}")
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    kept = model.new_cache() if cache and cache_problem(model) is None else None

    def next_logits(seq: list[int]) -> torch.Tensor:  # (vocab,): the distribution of the token after seq
        if kept is not None and len(seq) <= context:
            unread = torch.tensor(seq[kept.offset:], device=device)[None]  # (1, n): the prompt, then one
            return model.stream(unread, kept)[0, -1]
        return model(torch.tensor(seq[-context:], device=device)[None])[0, -1]

    out = list(ids)
    with torch.no_grad():
        for _ in range(tokens):
            logits = next_logits(out).float().cpu()
            if temperature < GREEDY_BELOW:  # logits / temperature would overflow: the limit is the argmax
                out.append(int(logits.argmax()))
                continue
            if top_k is not None and top_k < logits.numel():  # exactly k, ties broken by topk's order
                best = logits.topk(top_k).indices
                logits = torch.full_like(logits, float("-inf")).index_copy(0, best, logits[best])
            probabilities = torch.softmax(logits.double() / temperature, dim=-1)
            out.append(int(torch.multinomial(probabilities, 1, generator=generator)))
    return out[len(ids):]


def generate(recipe, network, checkpoint: str | Path, prompt: str, tokens: int, temperature: float, top_k: int | None,
             seed: int, tokenizer: str | Path | None = None, device: str | None = None) -> tuple[str, list[str]]:
    """(the generated text, notes). ``checkpoint``: a weights file, or a run folder holding
    ``model.safetensors`` and the run's ``tokenizer.json``; ``tokenizer`` overrides the latter."""
    from unroll.api import build
    from unroll.train import text
    from unroll.train.device import pick_device
    from unroll.train.state import weights_in

    weights = weights_in(checkpoint)
    a = recipe.architecture
    tok = text.run_tokenizer(weights, tokenizer, a.vocab_size)
    ids = tok.encode(prompt).ids
    if not ids:
        raise UnrollError("the prompt is empty: give --prompt some text to continue")
    if len(ids) > a.context:
        raise UnrollError(f"the prompt is {len(ids):,} tokens, longer than the model's context of {a.context:,}; "
                          "shorten it")
    notes = []
    if len(ids) + tokens > a.context:
        notes.append(f"prompt ({len(ids)} tokens) and {tokens} new tokens pass the context of {a.context}: each new "
                     f"token is predicted from the last {a.context} tokens (a sliding window: once it slides, every position "
                     "moves and each token recomputes the window, without the cache)")
    model = build(network, checkpoint=weights).to(pick_device(device)).eval()
    if problem := cache_problem(model):
        notes.append(f"no cache: {problem}; every new token recomputes the whole window")
    new = sample(model, ids, tokens, temperature, top_k, seed)
    return tok.decode(new), notes
