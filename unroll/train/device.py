"""Where and in which precision training and evaluation run."""

from __future__ import annotations

import contextlib
import os

import torch

from unroll.errors import UnrollError, excerpt

#: --precision: bfloat16 autocast or plain float32
PRECISIONS = ("bfloat16", "float32")


def pick_device(name: str | None) -> torch.device:
    """``name``, else the GPU when there is one; under torchrun, each process's own GPU."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnrollError("--device cuda: no CUDA device is available")
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def precision_context(name: str | None, device: torch.device) -> tuple[str, contextlib.AbstractContextManager]:
    """(the precision's name, its autocast context): bf16 autocast on a GPU unless float32 is asked for."""
    name = name or ("bfloat16" if device.type == "cuda" else "float32")
    if name not in PRECISIONS:
        raise UnrollError(f"--precision must be one of {', '.join(PRECISIONS)}, found {excerpt(name)}")
    if name == "float32":
        return name, contextlib.nullcontext()
    return name, torch.autocast(device.type, dtype=torch.bfloat16)
