"""Generation with the cache against recomputing the window for every token:
``python -m unroll.bench_generate [RECIPE] [--set KEY=VALUE ...]``.

Both runs sample the same greedy continuation of the same prompt from the same model (random
weights, or ``--checkpoint``), float32, without autograd, on this machine's threads: one reads each
new token once through the model's streaming form (:mod:`unroll.lower.stream`), the other runs the
model's (optimised) forward over all tokens so far for every new one. With random weights the
context is raised to prompt + tokens when smaller, so that the cache is used throughout; a
checkpoint keeps its context, which must hold them. Each time is the median of
``--repeats`` runs, the two kinds alternating so that a noisy machine slows both alike; the
printed ratio is no-cache / cache, and both must give the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from unroll.errors import UnrollError
from unroll.generate import cache_problem, sample


def timed(model, prompt: list[int], tokens: int, cache: bool) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = sample(model, prompt, tokens, temperature=0.0, cache=cache)
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def measure(recipe: str, overrides: list[str], prompt: int, tokens: int, repeats: int, checkpoint: str | None = None,
            device: str = "cpu") -> dict:
    """``{"cache": s, "full": s, "same": bool, "parameters": n, "context": c}``: median seconds."""
    from unroll.api import build
    from unroll.recipe import load_recipe, to_network

    resolved = load_recipe(recipe, overrides)
    context = resolved.architecture.context
    if checkpoint is None:
        context = max(context, prompt + tokens)
        resolved = load_recipe(recipe, [*overrides, f"architecture.context={context}"])
    elif prompt + tokens > context:  # the position table is the checkpoint's
        raise UnrollError(f"--prompt {prompt} and --tokens {tokens} pass the checkpoint's context of {context}: "
                          "past it there is no cache to time")
    torch.manual_seed(0)
    model = build(to_network(resolved), checkpoint=checkpoint).to(device).eval()
    if problem := cache_problem(model):  # both runs would recompute the window: nothing to compare
        raise UnrollError(f"no cache to time: {problem}")
    ids = torch.randint(0, resolved.architecture.vocab_size, (prompt,)).tolist()
    cached, full = [], []
    for _ in range(repeats):
        cached.append(timed(model, ids, tokens, cache=True))
        full.append(timed(model, ids, tokens, cache=False))
    return {"cache": statistics.median(t for t, _ in cached), "full": statistics.median(t for t, _ in full),
            "same": all(out == full[0][1] for _, out in cached + full), "context": context,
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/crate_gpt_tiny.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    parser.add_argument("--checkpoint", default=None, help="model.safetensors (default: random weights)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        r = measure(args.recipe, args.set, args.prompt, args.tokens, args.repeats, args.checkpoint, args.device)
    except UnrollError as e:
        sys.exit(f"error: {e.render()}")
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print(f"{args.recipe} {' '.join(args.set)}: {r['parameters']:,} parameters, context {r['context']}, "
          f"{args.prompt}-token prompt, {args.tokens} new tokens (greedy), float32, {where}")
    print(f"with the cache    {r['cache']:8.3f} s  ({1e3 * r['cache'] / args.tokens:.2f} ms per token)")
    print(f"without (full)    {r['full']:8.3f} s  ({1e3 * r['full'] / args.tokens:.2f} ms per token)")
    print(f"speed-up {r['full'] / r['cache']:.2f}x; same tokens: {'yes' if r['same'] else 'NO'}")
    return r


if __name__ == "__main__":
    main()
