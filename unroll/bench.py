"""``unroll bench``: what the compiler's optimisations buy, measured against the plain lowering.

Both builds have the same weights. (a) ``--no-optimize``: every update computed as ``unroll
explain`` prints it, attention through an explicit softmax matrix; (b) the default build. Runs of
a and b alternate in one process and medians are reported, so drift of a shared machine hits
both. Peak memory of a warm inference forward is measured with the torch profiler's memory
accounting on CPU and with the CUDA allocator's peak statistics on GPU.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from unroll.summary import forward_flops

# dense peak TFLOP/s by device name fragment and dtype, for the fraction of peak on GPU
PEAK_TFLOPS = {"H100": {torch.bfloat16: 989.0, torch.float32: 67.0}, "H200": {torch.bfloat16: 989.0, torch.float32: 67.0},
               "A100": {torch.bfloat16: 312.0, torch.float32: 19.5}}


def _inputs(model, batch: int, device: str) -> torch.Tensor:
    spec = model.network.frontend
    return torch.randn(batch, spec.channels, spec.image_size, spec.image_size, device=device)


def _loss(model, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    if isinstance(out, tuple):  # a masked autoencoder returns (loss, prediction, mask)
        return out[0]
    labels = torch.arange(images.shape[0], device=images.device) % out.shape[-1]
    return torch.nn.functional.cross_entropy(out, labels)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def build_pair(recipe: Path, overrides: list[str], device: str):
    """(plain, optimised) models of ``recipe`` with the same weights, on ``device``."""
    from unroll.api import build
    from unroll.recipe import load_recipe

    resolved = load_recipe(recipe, overrides)
    plain = build(resolved, optimize=False).to(device)
    fast = build(resolved).to(device)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def compare(plain, fast, batch: int, device: str, repeats: int, train: bool, dtype: torch.dtype | None = None) -> dict[str, list[float]]:
    """Alternate a and b: forward in inference mode, and a training step with AdamW."""
    images = _inputs(plain, batch, device)
    autocast = _autocast(device, dtype)
    times: dict[str, list[float]] = {"a_forward": [], "b_forward": [], "a_train": [], "b_train": []}
    optimizers = {m: torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (plain, fast)} if train else {}

    def forward(model):
        with torch.inference_mode(), autocast:
            model(images)

    def step(model):
        with autocast:
            loss = _loss(model, images)
        optimizers[model].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[model].step()

    for model in (plain, fast):  # warm up: allocators, kernels, cached factors
        forward(model)
    for _ in range(repeats):
        for tag, model in (("a", plain), ("b", fast)):
            times[f"{tag}_forward"].append(_timed(lambda: forward(model), device))
    if not train:  # training changes the weights, so it comes after the inference runs
        return times
    for model in (plain, fast):
        step(model)
    for _ in range(repeats):
        for tag, model in (("a", plain), ("b", fast)):
            times[f"{tag}_train"].append(_timed(lambda: step(model), device))
    return times


def _autocast(device: str, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on the device's type, or nothing."""
    return torch.autocast(device.split(":")[0], dtype=dtype) if dtype else nullcontext()


def peak_forward_mib(model, batch: int, device: str, dtype: torch.dtype | None = None) -> float:
    """Peak memory held by tensors during one warm inference forward, in MiB, beyond what was
    held before it: the CUDA allocator's peak on GPU; on CPU the running sum, in time order, of
    what each operator allocates and frees as the torch profiler accounts it."""
    images = _inputs(model, batch, device)
    autocast = _autocast(device, dtype)
    with torch.inference_mode(), autocast:
        model(images)  # warm: weight-only factors are formed and cached here
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            model(images)
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(images)
    held = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak / 2**20


#: the long-sequence case: the recipe with 8x8 patches (forward only)
LONG_SEQUENCE = ["architecture.patch_size=8"]


def run(recipe: Path, overrides: list[str], batch: int, device: str, repeats: int, long_sequence: bool,
        dtype: torch.dtype | None = None, memory: bool = True) -> list[dict]:
    """Rows of the report: one per case (the recipe, and its patch-8 long-sequence variant)."""
    cases = [("recipe", overrides, True)]
    if long_sequence:
        cases.append(("patch 8 (long sequence)", overrides + LONG_SEQUENCE, False))
    rows = []
    for label, case_overrides, train in cases:
        plain, fast = build_pair(recipe, case_overrides, device)
        tokens = plain.network.frontend.tokens
        times = compare(plain, fast, batch, device, repeats, train, dtype)
        flops = {tag: forward_flops(model, _inputs(model, batch, device)) for tag, model in (("a", plain), ("b", fast))}
        row = {"case": label, "tokens": tokens, "batch": batch}
        for tag in ("a", "b"):
            fwd = statistics.median(times[f"{tag}_forward"])
            row[f"{tag}_forward_img_s"] = batch / fwd
            row[f"{tag}_gflop_s"] = flops[tag] / fwd / 1e9
            row[f"{tag}_gflop"] = flops[tag] / 1e9
            if train:
                row[f"{tag}_train_img_s"] = batch / statistics.median(times[f"{tag}_train"])
            if memory:
                row[f"{tag}_peak_mib"] = peak_forward_mib(plain if tag == "a" else fast, batch, device, dtype)
        row["forward_ratio"] = row["b_forward_img_s"] / row["a_forward_img_s"]
        if train:
            row["train_ratio"] = row["b_train_img_s"] / row["a_train_img_s"]
        if memory and row["a_peak_mib"]:
            row["memory_ratio"] = row["b_peak_mib"] / row["a_peak_mib"]
        rows.append(row)
        del plain, fast
    return rows


@contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs its start and stop straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def device_peak_tflops(device: str, dtype: torch.dtype) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((table.get(dtype) for key, table in PEAK_TFLOPS.items() if key in name), None)


