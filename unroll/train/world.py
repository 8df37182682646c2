"""The processes of one run under torchrun, and how they agree.

One process per GPU (nccl) or CPU share (gloo); :func:`everywhere` and :func:`together` make every
decision that may stop a run a decision of all processes, so that none is left waiting in a
collective for one that stopped.
"""

from __future__ import annotations

import atexit
import gc
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from unroll.errors import UnrollError


@dataclass
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def join(device: torch.device) -> World:
    """This process's place in the run: the process group is started here when torchrun started several."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave)
    return World(dist.get_rank(), dist.get_world_size())


def _leave() -> None:
    """At exit, free what holds the process group, then the group itself. After an error the DDP
    model lingers in reference cycles; freed in the interpreter's final teardown, it took gloo's
    threads down with ``terminate`` (exit 134, after the error was printed) now and then."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def everywhere(value: float, world: World, device: torch.device) -> float:
    """``value`` summed over the processes: NaN or inf where it is so in any one, so that every
    process takes the same decision (one stopping alone leaves the others hanging in DDP's next
    all-reduce)."""
    if world.size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item()


def together(action, world: World, device: torch.device, only_main: bool = False):
    """``action()`` on every process (or on process 0 only: the writes of the run folder), and
    a failure on any one is a failure on all: the others would otherwise wait for it in the next
    collective, forever (nccl) or until gloo's connection drops (a traceback)."""
    error, result = None, None
    if world.main or not only_main:
        try:
            result = action()
        except UnrollError as e:
            error = e
    if everywhere(float(error is not None), world, device) > 0:
        raise error or UnrollError("another process failed (see its error); stopped with it")
    return result


def next_together(items: Iterator, world: World, device: torch.device) -> tuple[Any, bool]:
    """(this process's next item, or None where its own are exhausted; whether any process still
    has one). An :class:`UnrollError` in any process's iterator (an unreadable image) is raised by
    every process, so none waits alone in the next collective."""
    item, error, left = None, None, 1.0
    try:
        item = next(items)
    except StopIteration:
        left = 0.0
    except UnrollError as e:
        error = e
    failed = float(error is not None)
    if world.size > 1:
        flags = torch.tensor([failed, left], dtype=torch.float64, device=device)
        dist.all_reduce(flags)
        failed, left = flags.tolist()
    if failed:
        raise error or UnrollError("another process failed (see its error); stopped with it")
    return item, left > 0
