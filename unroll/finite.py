"""Which tensors of a model hold NaN or infinity: a diverged run, or weights edited by hand.

Shared by every place that takes weights from the user (checkpoint loading, ``measure``), so
they name the same tensors the same way.
"""

from __future__ import annotations

import torch

#: the most tensor names an error lists
NAMES_SHOWN = 5


def nonfinite_names(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``state`` with any NaN or ±inf, in order."""
    return [name for name, t in state.items()
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]


def name_list(names: list[str], limit: int = NAMES_SHOWN, sep: str = ", ") -> str:
    """``a, b, c`` or, past ``limit`` names, ``a, b, ... and 7 more``: an error stays short."""
    shown = sep.join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
