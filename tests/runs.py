"""What tests that compare training runs share: a run's weights, their largest difference, and
the same ``unroll train`` under torchrun with two processes and as one process."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def torchrun_and_one(args: list[str], tmp_path: Path, env: dict | None = None) -> tuple[Path, Path]:
    """(the run folder of ``python args`` under torchrun with 2 processes, that of ``python args``
    as one process), each written under ``tmp_path`` with ``--out``; both must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    folders = tmp_path / "ddp", tmp_path / "one"
    launchers = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"], [sys.executable]
    for launcher, folder in zip(launchers, folders):
        done = subprocess.run([*launcher, *args, "--out", str(folder)], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    return folders
