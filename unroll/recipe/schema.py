"""The recipe schema: an objective, the steps of one layer with their relaxations, an architecture.

Terms and relaxations are validated straight into the library's own dataclasses, so a recipe
can name exactly what the Python API can build, with the same argument names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import sympy as sp

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, TypeAdapter, ValidationError, field_validator, model_validator

from unroll.derive.steps import GradientStep, ProximalStep
from unroll.network import ClassifierHead, Network, PatchFrontend
from unroll.objective import CodingRate, Compression, DenoisingScore, L1, Lasso, NonNegative, Objective, Weighted
from unroll.relax.rules import RELAXATIONS

TERMS: dict[str, type] = {
    "coding_rate": CodingRate,
    "compression": Compression,
    "denoising_score": DenoisingScore,
    "l1": L1,
    "nonnegative": NonNegative,
    "lasso": Lasso,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Architecture(_Strict):
    width: PositiveInt
    heads: PositiveInt
    head_dim: PositiveInt | None = None
    depth: PositiveInt
    tie_layers: bool = False
    image_size: PositiveInt = 224
    patch_size: PositiveInt = 16
    channels: PositiveInt = 3
    classes: PositiveInt = 1000
    pool: Literal["cls", "mean"] = "cls"
    patch_norm: bool = True
    cls_token: bool = True
    positions: Literal["learned", "none"] = "learned"
    norm_eps: PositiveFloat = 1e-5
    head_norm_eps: PositiveFloat = 1e-5

    @model_validator(mode="after")
    def _check_sizes(self):
        if self.head_dim is None and self.width % self.heads:
            raise ValueError(
                f"heads ({self.heads}) must divide width ({self.width}); give head_dim to use other sizes"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size ({self.patch_size}) must divide image_size ({self.image_size})")
        if self.pool == "cls" and not self.cls_token:
            raise ValueError("pool: cls needs cls_token: true")
        return self


def _validate_args(kind: str, registry: dict[str, type], name: Any, args: Any) -> dict:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; expected one of: {', '.join(registry)}")
    cls = registry[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    if args is None:
        args = {}
    elif not isinstance(args, dict):
        if not fields:
            raise ValueError(f"{kind} {name} takes no arguments, found {args!r}")
        args = {fields[0]: args}  # shorthand: `neumann: 1`, `residual: true`
    try:
        obj = TypeAdapter(cls).validate_python(args)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ValueError(
            f"{kind} {name}: {where + ': ' if where else ''}{first['msg']} (found {first.get('input')!r}); "
            f"arguments: {', '.join(fields) or 'none'}"
        ) from None
    return {name: dataclasses.asdict(obj)}


class StepSpec(_Strict):
    name: str
    gradient: list[str] | None = Field(default=None, description="terms a gradient step descends")
    proximal: list[str] | None = Field(default=None, description="terms a proximal-gradient step minimises")
    step_size: PositiveFloat = 1.0
    iterations: PositiveInt = 1
    warm_start: Literal["input", "zero"] = "input"
    decode: Literal["none", "tied", "decoupled"] = "none"
    relax: list[dict[str, Any]] = []

    @field_validator("relax", mode="before")
    @classmethod
    def _relaxations(cls, value):
        if not isinstance(value, list):
            raise ValueError(f"expected a list of relaxations, found {value!r}")
        out = []
        for item in value:
            if isinstance(item, str):
                item = {item: None}
            if not isinstance(item, dict) or len(item) != 1:
                raise ValueError(f"each relaxation is a name or a one-key mapping, found {item!r}")
            (name, args), = item.items()
            out.append(_validate_args("relaxation", RELAXATIONS, name, args))
        return out

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.gradient is None) == (self.proximal is None):
            raise ValueError(f"step {self.name} needs exactly one of 'gradient' or 'proximal' (a list of term names)")
        return self

    @property
    def terms(self) -> list[str]:
        return self.gradient if self.gradient is not None else self.proximal


class Recipe(_Strict):
    name: str
    description: str = ""
    architecture: Architecture
    objective: dict[str, dict[str, Any]]
    layer: list[StepSpec] = Field(min_length=1)

    @field_validator("objective", mode="before")
    @classmethod
    def _terms(cls, value):
        if not isinstance(value, dict) or not value:
            raise ValueError("expected a mapping from term names to terms, e.g. {Rc: {term: compression}}")
        out = {}
        for key, entry in value.items():
            if not isinstance(entry, dict) or "term" not in entry:
                raise ValueError(f"term {key}: expected a mapping with a 'term' kind, found {entry!r}")
            entry = dict(entry)
            kind, weight = entry.pop("term"), entry.pop("weight", 1.0)
            if not isinstance(weight, (int, float)):
                raise ValueError(f"term {key}: weight must be a number, found {weight!r}")
            try:
                (_, args), = _validate_args("term", TERMS, kind, entry).items()
            except ValueError as e:
                raise ValueError(f"term {key}: {e}") from None
            out[key] = {"term": kind, "weight": float(weight), **args}
        return out

    @model_validator(mode="after")
    def _steps_name_terms(self):
        for step in self.layer:
            unknown = [t for t in step.terms if t not in self.objective]
            if unknown:
                raise ValueError(
                    f"step {step.name} names {', '.join(unknown)}, not in the objective "
                    f"(terms: {', '.join(self.objective)})"
                )
        return self


def _objective(recipe: Recipe, names: list[str]) -> Objective:
    parts = []
    for key in names:
        entry = dict(recipe.objective[key])
        kind, weight = entry.pop("term"), entry.pop("weight")
        parts.append(Weighted(sp.nsimplify(weight), TERMS[kind](**entry)))
    return Objective(tuple(parts))


def to_network(recipe: Recipe) -> Network:
    a = recipe.architecture
    steps = []
    for s in recipe.layer:
        relax = tuple(RELAXATIONS[name](**args) for item in s.relax for name, args in item.items())
        on = _objective(recipe, s.terms)
        if s.gradient is not None:
            steps.append(GradientStep(on, s.step_size, s.name, relax))
        else:
            steps.append(ProximalStep(on, s.step_size, s.iterations, s.warm_start, s.decode, s.name, relax))
    return Network(
        layer=tuple(steps),
        width=a.width,
        heads=a.heads,
        depth=a.depth,
        head_dim=a.head_dim,
        tie_layers=a.tie_layers,
        frontend=PatchFrontend(a.image_size, a.patch_size, a.channels, a.patch_norm, a.norm_eps, a.cls_token, a.positions),
        head=ClassifierHead(a.classes, a.pool, a.head_norm_eps),
        name=recipe.name,
    )
