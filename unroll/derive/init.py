r"""How a step's parameters start, when the recipe says otherwise than the terms that declare them.

Each parameter's default initialisation comes with its declaration (:class:`ParamSpec` ``init``:
``torch.nn.Linear``'s uniform for projections, Kaiming's for dictionaries, ones and zeros for
LayerNorm). A step may override it per parameter, by the name the lowered step stores it under
(``U``, ``O``, ``b``, ``D``, ``norm_weight``; ``unroll explain`` lists them):

* ``Init("normal", std)``: :math:`\mathcal N(0, \sigma^2)` entries, GPT-2's and nanoGPT's 0.02;
* ``Init("normal", std, depth_scaled=True)``: :math:`\sigma / \sqrt{2L}` for a stack of L layers
  (every unrolled layer, a tied group's repeats included; a decoder counts its own), GPT-2's scaling of the projections that write into the residual stream (two per layer), so
  that the residual's variance does not grow with depth;
* ``Init("kaiming", fan_in="d")``: :math:`U(-\sqrt{6/n}, \sqrt{6/n})` with n the size named
  (``d``, ``m`` or ``p``): ``torch.nn.init.kaiming_uniform_``'s bound for that fan-in;
* ``Init("zeros")``, ``Init("ones")``.

crate-lm starts its projections this way (``c_attn`` and ``c_proj`` N(0, 0.02), ``c_proj`` scaled
by depth, biases zero, its ISTA weight Dᵀ (4d x d) Kaiming-uniform with fan-in d, where our
default for D is fan-in m): ``crate_gpt_base.yaml`` says so in ``init:``. The steps of a decoder
inverted from the encoder (``decoder.layer: invert``) do not inherit these rules: their parameters
are new ones, which an explicit ``decoder.layer`` initialises as it says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, get_args

from unroll.derive.update import Update
from unroll.errors import UnrollError
from unroll.expr.symbols import SIZES

#: the kinds of initialisation a step may ask for
KINDS = ("normal", "kaiming", "zeros", "ones")
#: the sizes a Kaiming initialisation may take as its fan-in
FanIn = Literal["d", "m", "p"]
FAN_INS = get_args(FanIn)
#: the largest standard deviation a normal initialisation may ask for
MAX_STD = 10.0
#: the size name under which a stack's depth reaches the lowered steps (for ``depth_scaled``)
DEPTH = "L"


@dataclass(frozen=True)
class Init:
    """One parameter's initialisation (see the module docstring)."""

    kind: Literal["normal", "kaiming", "zeros", "ones"]
    std: float | None = None
    depth_scaled: bool = False
    fan_in: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UnrollError(f"an initialisation is one of {', '.join(KINDS)}, found {self.kind!r}")
        if self.kind == "normal":
            if isinstance(self.std, bool) or not isinstance(self.std, (int, float)) or not 0 < self.std <= MAX_STD:
                raise UnrollError(f"a normal initialisation needs a standard deviation in (0, {MAX_STD:g}], found {self.std!r}")
            if not isinstance(self.depth_scaled, bool):
                raise UnrollError(f"depth_scaled is true or false, found {self.depth_scaled!r}")
        elif self.std is not None or self.depth_scaled:
            raise UnrollError(f"{self.kind} takes no standard deviation or depth scaling")
        if (self.kind == "kaiming") != (self.fan_in is not None) or (self.fan_in is not None and self.fan_in not in FAN_INS):
            raise UnrollError(f"a kaiming initialisation, and only it, names its fan-in: one of {', '.join(FAN_INS)}, "
                              f"found {self.fan_in!r}")

    @property
    def text(self) -> str:
        """As ``explain`` prints it among the parameter's notes."""
        if self.kind == "normal":
            return f"N(0, ({self.std:g}/√(2L))²)" if self.depth_scaled else f"N(0, {self.std:g}²)"
        if self.kind == "kaiming":
            return f"U(±√(6/{self.fan_in}))"
        return self.kind

    @property
    def spec(self) -> tuple:
        """As a :class:`ParamSpec` ``init``: ``("normal", std, scaled)``, ``("kaiming", fan_in)``,
        ``("zeros",)``, ``("ones",)``."""
        if self.kind == "normal":
            return ("normal", float(self.std), self.depth_scaled)
        if self.kind == "kaiming":
            return ("kaiming", SIZES[self.fan_in])
        return (self.kind,)

def normal_std(spec_init: tuple, sizes: dict[str, int]) -> float:
    """The standard deviation a ``("normal", std, scaled)`` init draws with, for these sizes:
    ``sizes[L]`` is the depth of the stack the step is unrolled in (every layer, a tied group's
    repeats included; a decoder's its own), which :class:`~unroll.lower.model.LayerStack` sets."""
    _, std, scaled = spec_init
    if not scaled:
        return std
    if DEPTH not in sizes:
        raise UnrollError(f"a depth-scaled initialisation needs the depth of the stack ({DEPTH} among the sizes, as "
                          "unroll.build gives it); this step was lowered on its own")
    return std / math.sqrt(2 * sizes[DEPTH])


def initialised(update: Update, inits: tuple[tuple[str, Init], ...]) -> Update:
    """``update`` with the parameters named in ``inits`` (by stored name) starting as they say."""
    if not inits:
        return update
    by_attr = {spec.attr: spec for spec in update.params}
    for name, rule in inits:
        spec = by_attr.get(name)
        if spec is None:
            have = ", ".join(by_attr) or "none"
            raise UnrollError(f"init: the step has no parameter {name!r} (its parameters: {have})")
        if spec.from_data:
            raise UnrollError(f"init: {name} is computed from data (unroll construct), not learned: it has no "
                              "initialisation to choose")
    rules = dict(inits)
    params = tuple(replace(spec, init=rules[spec.attr].spec, note=f"{spec.note}, starts {rules[spec.attr].text}".lstrip(", "))
                   if spec.attr in rules else spec for spec in update.params)
    return update.evolve(params=params)
