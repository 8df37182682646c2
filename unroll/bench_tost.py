"""Forward time of one token-statistics (ToST) step against one CRATE compression step as the
number of tokens grows: ``python -m unroll.bench_tost``.

Both steps are lowered with the compiler's optimisations (the CRATE step's softmax attention runs
through ``scaled_dot_product_attention``); sizes are ViT-S-like (width 384, 6 heads), batch 1,
float32, inference mode. Each timing is the median of several runs, the two steps alternating so
that a noisy machine slows both alike. ToST's step costs O(N d p) per head, attention O(N² p):
the ToST time should grow about linearly (t(3137)/t(197) near 16), attention's faster.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from unroll.derive import GradientStep
from unroll.lower.model import lower_network
from unroll.network import ClassifierHead, Network, PatchFrontend
from unroll.objective import Compression, VariationalCompression
from unroll.relax import CompleteSubspaces, Neumann, PreNorm, Residual, SoftmaxSimilarity, UntieOutput
from unroll.relax import NormalizedMemberships, ProjectionBias, ReciprocalGain

TOKENS = (197, 785, 3137)  # 14², 28², 56² patches and a cls token
TOST = GradientStep(VariationalCompression(eps=0.5), 1.0, "tssa", (
    ProjectionBias(), NormalizedMemberships(), ReciprocalGain(), UntieOutput(bias=True), Residual(True), PreNorm(1e-5)))
CRATE = GradientStep(Compression(eps=0.5), 1.0, "compress", (
    Neumann(1), CompleteSubspaces(), SoftmaxSimilarity("1/sqrt(p)"), UntieOutput(bias=True), Residual(True), PreNorm(1e-5)))


def one_step(step: GradientStep, width: int, heads: int) -> torch.nn.Module:
    """The optimised layer of a one-step network; its ``run`` maps (B, N, d) -> (B, N, d)."""
    network = Network((step,), width=width, heads=heads, depth=1,
                      frontend=PatchFrontend(image_size=224, patch_size=16), head=ClassifierHead(classes=10))
    return lower_network(network, optimize=True).eval().layer(0)


def seconds(layer, x: torch.Tensor) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    layer.run(x)
    sync()
    return time.perf_counter() - start


def measure(width: int = 384, heads: int = 6, tokens=TOKENS, repeats: int = 15,
            device: str = "cpu") -> dict[int, tuple[float, float]]:
    """Median forward seconds ``(tost, attention)`` for each token count."""
    torch.manual_seed(0)
    tost, attention = one_step(TOST, width, heads).to(device), one_step(CRATE, width, heads).to(device)
    out = {}
    with torch.inference_mode():
        for n in tokens:
            x = torch.randn(1, n, width, device=device)
            for _ in range(3):  # warm up (allocator, kernels)
                seconds(tost, x), seconds(attention, x)
            times = [(seconds(tost, x), seconds(attention, x)) for _ in range(repeats)]
            out[n] = (statistics.median(t for t, _ in times), statistics.median(a for _, a in times))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    # the setting: 2 threads on an otherwise idle machine (on a busy one, try --threads 1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = measure(repeats=args.repeats, device=args.device)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print(f"forward, batch 1, width 384, 6 heads, float32, {where} (median ms)")
    print(f"{'N':>6} {'ToST':>10} {'attention':>10} {'attn/ToST':>10}")
    for n, (t, a) in results.items():
        print(f"{n:>6} {1e3 * t:>10.3f} {1e3 * a:>10.3f} {a / t:>10.2f}")
    first, last = results[TOKENS[0]], results[TOKENS[-1]]
    growth, ratio = last[0] / first[0], last[1] / last[0]
    print(f"ToST growth t({TOKENS[-1]})/t({TOKENS[0]}) = {growth:.1f}x (target <= 24x; tokens grew {TOKENS[-1] / TOKENS[0]:.1f}x)")
    print(f"attention/ToST at N = {TOKENS[-1]}: {ratio:.1f}x (target >= 3x)")


if __name__ == "__main__":
    main()
