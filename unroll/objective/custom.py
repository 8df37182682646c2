r"""The escape hatch: any smooth term given as a torch function, differentiated by autograd.

    energy = Custom("energy", lambda X, W: 0.5 * ((X @ W) ** 2).sum() / X.shape[0],
                    params=(Param("W", ("d", "d"), init="uniform"),))

``fn(X, **params)`` maps **one sample's tokens as rows**, ``X`` of shape (N, d), and the term's
learned tensors (keyword arguments named as declared) to **one scalar** (a 0-dim tensor). The
compiler takes ``torch.func.grad`` of it with respect to X (vectorised over the batch with
``torch.func.vmap``), so ``∇f`` needs no closed form; gradients of the loss reach the
parameters through it.

Parameters (:class:`Param`): a name, a shape in the sizes ``d`` (width), ``K`` (heads), ``p``
(head dimension), ``m`` (dictionary atoms) and whole numbers, and an initialisation. Each layer
gets its own (shared only when the network ties layers); they are counted, saved and loaded with
the checkpoint and listed by ``unroll explain``. Naming rule: a name ending in ``_k`` (``W_k``)
is **per head**: stored and passed as (K, *shape) and saved as the name without ``_k`` (``W``),
like the compression term's ``U_k``. A one-entry shape ``("d",)`` is a vector (d,). A name that
another term or a relaxation of the same step uses (``U_k``, ``O_k``, ``b``, ``D``,
``norm_weight``, ...) is an error, not a shared tensor.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import sympy as sp
import torch

from unroll.errors import UnrollError, excerpt
from unroll.expr.nodes import SmoothGrad
from unroll.expr.symbols import SIZES, Z, size_value
from unroll.objective.base import Gradient, ParamSpec, Term

#: initialisations: U(±1/sqrt(fan_in)) as torch.nn.Linear, U(±sqrt(6/fan_in)), constants
INITS = ("uniform", "kaiming", "zeros", "ones")
#: names a parameter cannot take: the sizes and the step's input
_TAKEN = frozenset({*SIZES, Z.name})
#: the shape the probe of ``fn`` gives one sample: a few tokens are enough to see a non-scalar
_PROBE_TOKENS = 3


@dataclass(frozen=True)
class Param:
    """A learned tensor of a :class:`Custom` term: ``shape`` in sizes (``"d"``, ``"K"``, ``"p"``,
    ``"m"``) and whole numbers, one or two entries; ``init`` one of ``uniform`` (fan-in: the last
    entry), ``kaiming``, ``zeros``, ``ones``."""

    name: str
    shape: tuple[int | str, ...]
    init: Literal["uniform", "kaiming", "zeros", "ones"] = "uniform"

    def __post_init__(self):
        where = f"parameter {self.name!r}"
        if not isinstance(self.name, str) or not self.name.isidentifier() or keyword.iskeyword(self.name) \
                or self.name.startswith("_") or self.name in _TAKEN or len(self.name) > 64:
            raise UnrollError(f"a parameter name must be an identifier not starting with _ and not one of "
                              f"{', '.join(sorted(_TAKEN))}, found {excerpt(self.name)}")
        shape = (self.shape,) if isinstance(self.shape, (int, str)) else tuple(self.shape)
        if not 1 <= len(shape) <= 2:
            raise UnrollError(f"{where}: a shape has one or two entries, found {excerpt(self.shape)}")
        for dim in shape:
            if isinstance(dim, bool) or not (isinstance(dim, int) and dim >= 1 or isinstance(dim, str) and dim in SIZES
                                             and dim != "N"):
                raise UnrollError(f"{where}: each entry of the shape is a whole number or one of d, K, p, m "
                                  f"(the token count N varies), found {excerpt(dim)}")
        if self.init not in INITS:
            raise UnrollError(f"{where}: init must be one of {', '.join(INITS)}, found {excerpt(self.init)}")
        object.__setattr__(self, "shape", shape)

    def spec(self, term: str) -> ParamSpec:
        rows, *cols = (sp.Integer(x) if isinstance(x, int) else SIZES[x] for x in self.shape)
        fan_in = cols[0] if cols else rows
        init = (self.init, fan_in) if self.init in ("uniform", "kaiming") else (self.init,)
        return ParamSpec(self.name, rows, cols[0] if cols else sp.Integer(1), init,
                         f"a parameter of the custom term {term}", vector=not cols)


@dataclass(frozen=True, eq=False)
class Custom(Term):
    """A smooth term ``f(Z)`` given by ``fn(X, **params)``: X one sample's tokens as rows (N, d),
    the declared :class:`Param` tensors by name (per-head ones (K, ...)); returns a 0-dim tensor."""

    name: str = "f"
    fn: Callable[..., torch.Tensor] | None = None
    tex: str | None = None
    params: tuple[Param, ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier() or len(self.name) > 64:
            raise UnrollError(f"a custom term's name must be an identifier, found {excerpt(self.name)}")
        if not callable(self.fn):
            raise UnrollError(f"custom term {self.name}: fn must be a function of the tokens (N, d) to a scalar, "
                              f"found {type(self.fn).__name__}")
        params = (self.params,) if isinstance(self.params, Param) else tuple(self.params)
        for item in params:
            if not isinstance(item, Param):
                raise UnrollError(f"custom term {self.name}: params must be unroll.objective.Param, "
                                  f"found {type(item).__name__}")
        names = [q.name for q in params]
        if len(set(names)) != len(names):
            raise UnrollError(f"custom term {self.name}: parameter names must be unique, found {', '.join(names)}")
        object.__setattr__(self, "params", params)
        super().__post_init__()

    @property
    def label(self) -> str:  # type: ignore[override]
        return self.name

    @property
    def specs(self) -> tuple[ParamSpec, ...]:
        return tuple(q.spec(self.name) for q in self.params)

    def latex(self) -> str:
        return self.tex or r"\operatorname{%s}(Z)" % self.name

    def gradient(self, X: sp.MatrixExpr) -> Gradient:
        specs = self.specs
        return Gradient(SmoothGrad(X, self.name, *(q.symbol for q in specs)), params=specs)

    def _call(self) -> Callable[..., torch.Tensor]:
        """``fn`` with its parameters positional, in declaration order (for torch.func)."""
        names = [q.name for q in self.params]
        return lambda X, *values: self.fn(X, **dict(zip(names, values)))

    def row_grad(self) -> Callable[..., torch.Tensor]:
        """Per-sample gradient on a batch of rows (B, N, d), given the parameters in order."""
        return torch.func.vmap(torch.func.grad(self._call()), in_dims=(0,) + (None,) * len(self.params))

    def value(self, Z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per sample, ``Z`` (B, d, N); ``params`` by stored name (``W_k`` as ``W``)."""
        values = [params[q.attr] for q in self.specs]
        return torch.func.vmap(self._call(), in_dims=(0,) + (None,) * len(values))(Z.mT, *values)

    def check(self, sizes: dict[str, int]) -> None:
        """Call ``fn`` once on one sample of a few tokens: it must return one scalar. The probe
        is made of fixed values in torch's default dtype, so it leaves the random state alone
        (a seeded build stays reproducible) and meets tensors ``fn`` holds in their dtype."""
        dtype = torch.get_default_dtype()
        values = []
        for q in self.specs:
            shape = ((sizes["K"],) if q.per_head else ()) + tuple(
                size_value(x, sizes) for x in ((q.rows,) if q.is_vector else (q.rows, q.cols)))
            values.append(_probe(shape, dtype))
        X = _probe((_PROBE_TOKENS, sizes["d"]), dtype)
        try:
            out = self._call()(X, *values)
        except Exception as e:  # the user's code: say which term failed on what
            raise UnrollError(f"custom term {self.name}: fn failed on one sample's tokens of shape "
                              f"({_PROBE_TOKENS}, {sizes['d']}) (tokens as rows): {type(e).__name__}: "
                              f"{excerpt(str(e))}") from None
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            found = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise UnrollError(f"custom term {self.name}: fn must return one scalar per sample (a 0-dim tensor), "
                              f"found {found} for tokens of shape ({_PROBE_TOKENS}, {sizes['d']})")


def _probe(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Distinct values in [-1, 1], the same on every call."""
    count = 1
    for n in shape:
        count *= n
    return torch.linspace(-1, 1, count, dtype=dtype).reshape(shape)
