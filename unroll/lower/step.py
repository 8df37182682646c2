"""One derived (and relaxed) update step as a ``torch.nn.Module``."""

from __future__ import annotations

import copy
import math

import sympy as sp
import torch
from torch import nn

from unroll.derive.init import normal_std
from unroll.derive.update import Update, used_names
from unroll.errors import UnrollError
from unroll.expr.printing import to_text
from unroll.expr.symbols import N, Z as Z_SYMBOL
from unroll.lower.interpret import CACHE, RAW, SIZES, Lowering, size_value
from unroll.lower.optimize import OptimizedLowering, optimize_expr, weights_of
from unroll.lower.stream import FRESH, OFFSET, STATE, NotStreamable, StreamProgram, stream_update
from unroll.objective.base import ParamSpec


def init_param(spec: ParamSpec, sizes: dict[str, int]) -> torch.Tensor:
    rows, cols = size_value(spec.rows, sizes), size_value(spec.cols, sizes)
    shape = ((sizes["K"],) if spec.per_head else ()) + ((rows,) if spec.is_vector else (rows, cols))
    kind = spec.init[0]
    if kind == "data":  # computed from data later (a term's ``fit``): zeros until then
        return torch.zeros(shape)
    if kind == "ones":
        return torch.ones(shape)
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "normal":
        return torch.empty(shape).normal_(0.0, normal_std(spec.init, sizes))
    fan_in = size_value(spec.init[1], sizes)
    bound = 1 / math.sqrt(fan_in) if kind == "uniform" else math.sqrt(6 / fan_in)
    return torch.empty(shape).uniform_(-bound, bound)


def attribute_problem(name: str) -> str | None:
    """Why a parameter or constant cannot be stored under ``name`` on a lowered step, or None."""
    if name.startswith("_") or hasattr(LoweredStep, name) or name in STEP_ATTRIBUTES or name in _MODULE_ATTRIBUTES:
        return f"{name!r} is taken by the lowered step (an attribute of torch modules or of unroll's steps)"
    return None


#: what every torch module sets on itself (``training``...)
_MODULE_ATTRIBUTES = frozenset(vars(nn.Module()))
#: what a lowered step stores besides its parameters and constants
STEP_ATTRIBUTES = frozenset({"update_name", "title", "update_text", "sizes", "specs", "constant_names",
                             "smooth_grads", "bindings", "optimized", "rows", "program", "result", "factor_cache",
                             "formula", "streaming"})


class LoweredStep(nn.Module):
    """Computes ``update.out`` from ``Z`` of shape (B, d, N), tokens as columns (or, optimised,
    (B, N, d), tokens as rows).

    Parameters are attributes named after their symbols (``U_k`` -> ``U`` of shape (K, d, p));
    fixed constants are non-persistent buffers, learnable ones parameters. A parameter whose
    ``init`` is ``("data",)`` (computed from data, as ReduNet's E and C_k) is a persistent buffer:
    zeros until filled, saved in the checkpoint, not trained.

    The lowered program is a tree of closures, which pickle cannot store: a step is copied
    (``copy.deepcopy``) but pickled only as part of a whole model (see
    :class:`~unroll.lower.model.RecipeModel`).
    """

    #: the longest update text ``repr`` shows
    REPR_CHARS = 100

    def __init__(self, update: Update, sizes: dict[str, int], order: list[str], optimize: bool = False):
        super().__init__()
        self.update_name = update.name
        self.title = update.title
        self.update_text = "Z⁺ = " + to_text(update.out)
        sizes = {**sizes, "m": update.expansion * sizes["d"]}
        self.sizes = sizes
        self.specs = {spec.attr: spec for spec in update.params}
        for spec in update.params:
            if spec.from_data:  # a data constant: stored with the model, never trained
                self.register_buffer(spec.attr, init_param(spec, sizes))
            else:
                self.register_parameter(spec.attr, nn.Parameter(init_param(spec, sizes)))
        for name, value in update.constants.items():
            if name in update.learnable:
                self.register_parameter(name, nn.Parameter(torch.tensor(float(value))))
            else:  # float64 so that .double() keeps the exact value; as a 0-dim tensor it
                # never promotes the float32 activations it multiplies
                self.register_buffer(name, torch.tensor(float(value), dtype=torch.float64), persistent=False)
        self.constant_names = tuple(update.constants)
        grads = {t.name: t.row_grad() for t in update.smooth_terms}
        self.smooth_grads = grads
        self.bindings = tuple(update.where)
        #: the update as derived and relaxed (what ``explain`` prints), before any optimisation
        self.formula = update.out
        #: the streaming form (:mod:`unroll.lower.stream`), made on first use: only generation needs it
        self.streaming: StreamProgram | NotStreamable | None = None
        bound = {s.name: e for s, e in update.where}
        out = update.out
        self.optimized = optimize
        #: the optimised lowering holds every matrix transposed: tokens as rows, as kernels like them
        self.rows = optimize
        if optimize:
            weights = weights_of(update)
            out = optimize_expr(out, bound, weights)
            bound = {name: optimize_expr(e, bound, weights) for name, e in bound.items()}
            used = used_names(out, bound)
            order = [name for name in order if name in used]
            lowering = OptimizedLowering(grads, sizes)
        else:
            lowering = Lowering(grads)
        self.program = [(name, lowering.matrix(bound[name])) for name in order]
        self.result = lowering.matrix(out)
        #: weight-only factors the optimised program formed, kept here rather than in its
        #: closures so that a copy of the step has its own (see ``OptimizedLowering._LinearMap``)
        self.factor_cache: dict = {}

    def extra_repr(self) -> str:
        text = self.update_text
        if len(text) > self.REPR_CHARS:
            text = text[: self.REPR_CHARS - 1] + "…"
        shapes = [f"{name} {tuple(p.shape)}" for name, p in self.named_parameters(recurse=False)]
        shapes += [f"{name} {tuple(self._buffers[name].shape)} (data)" for name in self.specs
                   if name in self._buffers]
        constants = [f"{name}={float(getattr(self, name)):g}" for name in self.constant_names
                     if name not in self._parameters]
        return "\n".join([f"name={self.update_name}: {self.title}", text,
                          ", ".join([f"rows={self.rows}", *shapes, *constants])])

    def __deepcopy__(self, memo: dict) -> LoweredStep:
        return copy_module(self, memo)

    def __reduce__(self):
        raise UnrollError(
            f"a lowered step ({self.update_name}) cannot be pickled on its own: pickle the whole model "
            "(torch.save(model, path)), or save model.state_dict() and rebuild with unroll.build")

    def _env(self, Z: torch.Tensor, rows: bool | None = None) -> dict:
        """Values by symbol name, 4-D; in the row layout every matrix is held transposed
        (as views: a weight is never copied to be transposed)."""
        rows = self.rows if rows is None else rows
        tokens = Z.shape[-2] if rows else Z.shape[-1]
        env: dict = {Z_SYMBOL.name: Z.unsqueeze(1), SIZES: {**self.sizes, N.name: tokens}, RAW: {},
                     CACHE: self.factor_cache}
        for attr, spec in self.specs.items():
            raw = getattr(self, attr)
            env[RAW][spec.name] = raw
            if spec.per_head:
                env[spec.name] = (raw.mT if rows else raw).unsqueeze(0)
            elif raw.dim() == 1:
                env[spec.name] = raw[None, None, None, :] if rows else raw[None, None, :, None]
            else:
                env[spec.name] = (raw.mT if rows else raw)[None, None]
        for name in self.constant_names:
            env[name] = getattr(self, name)
        return env

    def evaluate(self, expr: sp.Basic, Z: torch.Tensor) -> torch.Tensor:
        """A part of this step's computed update (an expression in its symbols, such as the
        softmax similarity) evaluated on ``Z`` (B, d, N), tokens as columns, with the plain
        lowering: a 4-D value (B|1, K|1, rows, cols)."""
        lowering = Lowering(self.smooth_grads)
        bound = {s.name: e for s, e in self.bindings}
        used = used_names(expr, bound)
        env = self._env(Z, rows=False)
        for s, e in self.bindings:
            if s.name in used:
                env[s.name] = lowering.matrix(e)(env)
        return lowering.matrix(expr)(env)

    @property
    def data_constants(self) -> list[str]:
        """The attributes of this step's data constants (``ParamSpec`` ``init`` ``("data",)``):
        buffers that ``unroll construct`` fills from the training data."""
        return [attr for attr, spec in self.specs.items() if spec.from_data]

    def run(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, d) -> (B, N, d), tokens as rows whatever layout the step was lowered for."""
        return self(tokens) if self.rows else self(tokens.mT).mT

    def stream_program(self) -> StreamProgram:
        """This step's streaming form, or :class:`NotStreamable` saying why it has none."""
        if self.streaming is None:
            try:
                self.streaming = stream_update(self.formula, self.bindings, self.smooth_grads)
            except NotStreamable as e:
                self.streaming = e
        if isinstance(self.streaming, NotStreamable):
            raise NotStreamable(f"step {self.update_name}: {self.streaming}")
        return self.streaming

    def stream(self, tokens: torch.Tensor, state: dict, offset: int) -> torch.Tensor:
        """(B, n, d) new tokens at positions ``offset ..`` -> their outputs (B, n, d), tokens as
        rows; ``state`` holds what the step keeps of the earlier tokens (empty at position 0)
        and is updated. The outputs equal the last n of ``run`` on every token so far."""
        program = self.stream_program()
        env = self._env(tokens.mT, rows=False)
        env.update({STATE: state, FRESH: {}, OFFSET: offset})
        return program(env).squeeze(1).mT

    def forward(self, Z: torch.Tensor) -> torch.Tensor:
        """``Z``: (B, d, N), tokens as columns; (B, N, d) for an optimised step (``rows``)."""
        env = self._env(Z)
        for name, fn in self.program:
            env[name] = fn(env)
        return self.result(env).squeeze(1)


def copy_module(module: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of ``module`` as if it had no ``__reduce__``: every attribute deep-copied.

    The lowered closures are shared with the original, which is safe: they hold no state (their
    only cache lives in the step's ``factor_cache``, which is copied) and read the weights from
    the env each call."""
    clone = type(module).__new__(type(module))
    memo[id(module)] = clone
    clone.__setstate__(copy.deepcopy(module.__dict__, memo))
    return clone
