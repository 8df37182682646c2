r"""How the exact coding-rate steps scale with the token count N: ``python -m unroll.bench_exact``.

The exact (unrelaxed) gradient steps contain ``X (I_N + c XᵀX)⁻¹`` with X r x N (r = p per head
for the compression ``R^c``, r = d for the coding rate ``R``). The plain lowering inverts the
N x N matrix as printed, O(N³); the optimised one solves the r x r system of the push-through
identity ``X (I_N + c XᵀX)⁻¹ = (I_r + c X Xᵀ)⁻¹ X`` once N > r, O(N r²): linear in N, so
``t(4096) / t(256)`` should be near 16 (the target is at most 24).

One layer of one step, float32, batch 1, in inference mode; runs of the two builds alternate and
medians are reported, so drift of a shared machine hits both. The plain form is timed up to
N = 1024, and beyond only where the N³ extrapolation from the last size it ran stays under
``--plain-budget`` seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

CASES = {
    # crate_tiny's sizes: width 384, 6 heads of p = 64
    "compression (d=384, K=6, p=64)": ("compression", 384, 6),
    "coding rate (d=32)": ("coding_rate", 32, 4),
}
TOKENS = (256, 1024, 4096)
#: token counts at which the plain (N x N) form is always timed, for comparison
PLAIN_ALWAYS = 1024


def layers(kind: str, width: int, heads: int):
    """(optimised, plain) layers of one exact gradient step with the same weights."""
    import unroll
    from unroll.objective import CodingRate, Compression

    objective = Compression(eps=0.5) if kind == "compression" else CodingRate(eps=0.5)
    step = unroll.GradientStep(objective, step_size=0.1, name="exact")
    net = unroll.Network((step,), width=width, heads=heads, depth=1,
                         frontend=unroll.PatchFrontend(image_size=16, patch_size=4, channels=1),
                         head=unroll.ClassifierHead(classes=2))
    fast, plain = unroll.build(net, optimize=True), unroll.build(net, optimize=False)
    plain.load_state_dict(fast.state_dict())
    return fast.layer(0).eval(), plain.layer(0).eval()


def _once(layer, Z: torch.Tensor) -> float:
    sync = torch.cuda.synchronize if Z.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    layer(Z)
    sync()
    return time.perf_counter() - start


def time_case(kind: str, width: int, heads: int, tokens=TOKENS, repeats: int = 5,
              plain_budget: float = 3.0, device: str = "cpu") -> dict[int, tuple[float, float | None]]:
    """N -> (optimised seconds, plain seconds or None), medians of alternating runs."""
    fast, plain = (layer.to(device) for layer in layers(kind, width, heads))
    out: dict[int, tuple[float, float | None]] = {}
    last_plain: tuple[int, float] | None = None
    with torch.inference_mode():
        for n in tokens:
            Z = torch.randn(1, width, n, device=device)
            # the N x N form grows as N³: beyond PLAIN_ALWAYS, run it only while its time
            # extrapolated from the last size stays affordable
            run_plain = (n <= PLAIN_ALWAYS or last_plain is None
                         or last_plain[1] * (n / last_plain[0]) ** 3 <= plain_budget)
            fast(Z)  # warm-up: first-call allocations, lazy kernels
            if run_plain:
                plain(Z)
            t_fast, t_plain = [], []
            for _ in range(repeats if not run_plain else max(3, repeats // 2)):
                t_fast.append(_once(fast, Z))
                if run_plain:
                    t_plain.append(_once(plain, Z))
            plain_time = statistics.median(t_plain) if run_plain else None
            if plain_time is not None:
                last_plain = (n, plain_time)
            out[n] = (statistics.median(t_fast), plain_time)
    return out


def _ms(t: float | None) -> str:
    return "skipped" if t is None else f"{t * 1e3:10.2f} ms"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unroll.bench_exact", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--plain-budget", type=float, default=3.0,
                        help="seconds a plain (N x N) run may be expected to take before it is skipped")
    args = parser.parse_args(argv)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}, float32, batch 1, inference mode")
    for title, (kind, width, heads) in CASES.items():
        times = time_case(kind, width, heads, repeats=args.repeats, plain_budget=args.plain_budget, device=args.device)
        print(f"\nexact {title}")
        print(f"{'N':>6}  {'optimised':>13}  {'plain N x N':>13}  {'speed-up':>8}")
        for n, (fast, plain) in times.items():
            ratio = f"{plain / fast:7.1f}x" if plain is not None else ""
            print(f"{n:>6}  {_ms(fast):>13}  {_ms(plain):>13}  {ratio:>8}")
        first, last = min(times), max(times)
        growth = times[last][0] / times[first][0]
        linear = last / first
        verdict = "ok" if growth <= 1.5 * linear else "above target"
        print(f"growth t({last})/t({first}) = {growth:.1f}x (linear {linear:.0f}x, target <= {1.5 * linear:.0f}x: {verdict})")


if __name__ == "__main__":
    main()
