"""The recipe schema: an objective, the steps of one layer with their relaxations, an architecture.

Terms and relaxations are validated straight into the library's own dataclasses, so a recipe
can name exactly what the Python API can build, with the same argument names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
import math
import re
from typing import Annotated, Any, Literal, Union

import sympy as sp

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, ValidationInfo, field_validator, model_validator

from unroll.derive.init import MAX_STD, FanIn, Init
from unroll.derive.inverse import invert_groups, invert_layer
from unroll.derive.steps import MAX_ITERATIONS, GradientStep, ProximalStep, SynthesisStep, step_name_problem
from unroll.network import LANGUAGE_TASKS, ClassifierHead, Group, LanguageHead, MaskedAutoencoder, Network, PatchFrontend, TokenFrontend
from unroll.objective import CodingRate, Compression, DenoisingScore, L1, Lasso, NonNegative, Objective, Weighted
from unroll.objective import Box, ElasticNet, GroupSparsity, UnitNorm, VariationalCompression
from unroll.objective import ClassRate
from unroll.errors import excerpt
from unroll.relax.rules import RELAXATIONS
from unroll.recipe.training import Training

TERMS: dict[str, type] = {
    "coding_rate": CodingRate,
    "compression": Compression,
    "denoising_score": DenoisingScore,
    "l1": L1,
    "nonnegative": NonNegative,
    "lasso": Lasso,
    "elastic_net": ElasticNet,
    "group_sparsity": GroupSparsity,
    "box": Box,
    "unit_norm": UnitNorm,
    "class_rate": ClassRate,
    "variational_compression": VariationalCompression,
}


# Upper limits, checked before anything is derived or allocated. Generous: every bundled recipe
# and a 1024-token, 50304-word language model fit well inside; `unroll build` then estimates the
# memory of what is left (see unroll.lower.budget).
MAX_WIDTH = 16_384
MAX_HEADS = 1_024
MAX_DEPTH = 128  # GPT-3 has 96 layers; the FLOP count of a build walks every layer
MAX_IMAGE_SIZE = 8_192
MAX_TOKENS = 65_536
MAX_VOCAB = 1 << 20
MAX_CHANNELS = 64
MAX_CLASSES = 1 << 18
MAX_STEPS = 32  # steps per layer
MAX_GROUPS = 32  # groups of different layers
# MAX_ITERATIONS, the proximal iterations of one step, is the steps' own bound (imported above)
MAX_LAYER_ITERATIONS = 64  # iterations of all the steps of one layer (a gradient step counts 1)
#: depth x iterations per layer, encoder and decoder together: every unrolled step is lowered,
#: and counted by the FLOP counter of `unroll build`, one at a time
MAX_UNROLLED = 512
MAX_TERMS = 32
MAX_RELAXATIONS = 32
MAX_MAGNITUDE = 1e6  # step sizes and term weights
MAX_NAME = 64

#: a recipe name becomes the default output folder (build/<name>): one safe path component
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"

Size = Annotated[int, Field(ge=1)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Architecture(_Strict):
    width: int = Field(ge=1, le=MAX_WIDTH)
    heads: int = Field(ge=1, le=MAX_HEADS)
    head_dim: int | None = Field(None, ge=1, le=MAX_WIDTH, validate_default=True)
    #: with ``layer``: how often it repeats; with ``layers`` the depth is the sum of the repeats
    depth: int | None = Field(None, ge=1, le=MAX_DEPTH)
    tie_layers: bool = False
    image_size: int = Field(224, ge=1, le=MAX_IMAGE_SIZE)
    patch_size: int = Field(16, ge=1, le=MAX_IMAGE_SIZE)
    channels: int = Field(3, ge=1, le=MAX_CHANNELS)
    classes: int = Field(1000, ge=1, le=MAX_CLASSES)
    pool: Literal["cls", "mean"] = "cls"
    patch_norm: bool = True
    cls_token: bool = True
    positions: Literal["learned", "sincos", "none"] = "learned"
    #: ``pixels``: each patch's flattened pixels, normalised onto the sphere, as its token (no
    #: parameters; width = channels × patch_size², patch_norm, cls_token false, positions none)
    embedding: Literal["linear", "conv", "pixels"] = "linear"
    norm_eps: Positive = 1e-5
    head_norm_eps: Positive = 1e-5
    #: a language model's (task: causal_lm or masked_lm): the vocabulary and the longest sequence
    vocab_size: int | None = Field(None, ge=2, le=MAX_VOCAB)
    context: int | None = Field(None, ge=1, le=MAX_TOKENS)

    @field_validator("head_dim")
    @classmethod
    def _head_dim_or_even_heads(cls, head_dim: int | None, info: ValidationInfo) -> int | None:
        width, heads = info.data.get("width"), info.data.get("heads")
        if head_dim is None and width is not None and heads is not None and width % heads:
            raise ValueError(f"heads ({heads}) must divide width ({width}); give head_dim to use other sizes")
        return head_dim

    @field_validator("patch_size")
    @classmethod
    def _patch_divides_image(cls, patch: int, info: ValidationInfo) -> int:
        image = info.data.get("image_size")
        if image is not None and image % patch:
            raise ValueError(f"patch_size ({patch}) must divide image_size ({image})")
        return patch

    @model_validator(mode="after")
    def _check_sizes(self):
        tokens = (self.image_size // self.patch_size) ** 2
        if tokens > MAX_TOKENS:
            raise ValueError(f"{tokens:,} patches ((image_size / patch_size)²); at most {MAX_TOKENS:,} are allowed")
        if self.embedding == "conv" and self.patch_norm:
            raise ValueError("patch_norm applies to the linear embedding; set patch_norm: false with embedding: conv")
        if self.positions == "sincos" and self.width % 4:
            raise ValueError(f"positions: sincos needs a width divisible by 4, found {self.width}")
        if self.patch_norm and self.embedding == "linear" and self.channels * self.patch_size**2 == 1:
            raise ValueError(
                "a patch of one pixel and one channel is a single value, which the patch LayerNorm maps to "
                "zero (erasing the input); use larger patches or patch_norm: false"
            )
        if self.pool == "cls" and not self.cls_token:
            raise ValueError("pool: cls needs cls_token: true")
        if self.embedding == "pixels":
            pixels = self.channels * self.patch_size**2
            if self.width != pixels:
                raise ValueError(f"embedding: pixels makes each patch's pixels its token, so width must be "
                                 f"channels × patch_size² = {pixels}, found {self.width}")
            if self.patch_norm or self.cls_token or self.positions != "none":
                raise ValueError("embedding: pixels has no parameters: set patch_norm: false, cls_token: false "
                                 "and positions: none")
        return self


def _nonfinite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_nonfinite(v) for v in value)
    return isinstance(value, dict) and any(_nonfinite(v) for v in value.values())


def _validate_args(kind: str, registry: dict[str, type], name: Any, args: Any) -> dict:
    """``{name: arguments}`` of a term or relaxation, validated by its own dataclass (whose
    field annotations carry the bounds, so a new term states them in its own module)."""
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"unknown {kind} {excerpt(name)}; expected one of: {', '.join(registry)}")
    cls = registry[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    arguments = f"arguments: {', '.join(fields) or 'none'}"
    if args is None:
        args = {}
    elif not isinstance(args, dict):
        if not fields:
            raise ValueError(f"{kind} {name} takes no arguments, found {excerpt(args)}")
        args = {fields[0]: args}  # shorthand: `neumann: 1`, `residual: true`
    unknown = [key for key in args if key not in fields]
    if unknown:
        raise ValueError(f"{kind} {name}: unknown argument {excerpt(unknown[0])}; {arguments}")
    for key, value in args.items():
        if _nonfinite(value):
            raise ValueError(f"{kind} {name}: {key} must be a finite number, found {value}; {arguments}")
    try:
        obj = TypeAdapter(cls).validate_python(args)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ValueError(
            f"{kind} {name}: {where + ': ' if where else ''}{first['msg']} (found {excerpt(first.get('input'))}); "
            f"{arguments}"
        ) from None
    return {name: dataclasses.asdict(obj)}


TermNames = Annotated[list[str], Field(min_length=1, max_length=MAX_TERMS)]


class NormalInit(_Strict):
    """``{normal: 0.02}``: N(0, std²) entries; ``depth_scaled: true`` divides std by √(2L)."""

    normal: float = Field(gt=0, le=MAX_STD)
    depth_scaled: bool = False


class KaimingInit(_Strict):
    """``{kaiming: d}``: U(±√(6/n)) for the fan-in n named (d, m or p)."""

    kaiming: FanIn


#: the prefix of a discriminated union's branch names, which error paths leave out
UNION_TAG = "union-"


def _init_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return f"{UNION_TAG}name"
    if isinstance(value, (NormalInit, KaimingInit)):
        return f"{UNION_TAG}{type(value).__name__}"
    if isinstance(value, dict):
        return f"{UNION_TAG}NormalInit" if "normal" in value else f"{UNION_TAG}KaimingInit" if "kaiming" in value else None
    return None


#: a parameter's initialisation in a recipe: zeros, ones, a normal or a Kaiming-uniform distribution
#: (told apart by their key first, so that a mistake gets one message, not one per alternative)
InitSpec = Annotated[
    Union[Annotated[Literal["zeros", "ones"], Tag(f"{UNION_TAG}name")], Annotated[NormalInit, Tag(f"{UNION_TAG}NormalInit")],
          Annotated[KaimingInit, Tag(f"{UNION_TAG}KaimingInit")]],
    Discriminator(_init_kind, custom_error_type="init",
                  custom_error_message="expected zeros, ones, {normal: STD, depth_scaled: BOOL} or {kaiming: d|m|p}")]


class StepSpec(_Strict):
    name: str
    gradient: TermNames | None = Field(default=None, description="terms a gradient step descends")
    proximal: TermNames | None = Field(default=None, description="terms a proximal-gradient step minimises")
    synthesis: TermNames | None = Field(default=None, description="terms whose dictionary re-synthesises the signal")
    step_size: float = Field(1.0, gt=0, le=MAX_MAGNITUDE)
    iterations: int = Field(1, ge=1, le=MAX_ITERATIONS)
    warm_start: Literal["input", "zero"] = "input"
    decode: Literal["none", "tied", "decoupled"] = "none"
    relax: list[dict[str, Any]] = []
    init: dict[str, InitSpec] = Field(default_factory=dict, description="initialisation by stored parameter name (U, O, b, D, ...)")

    @field_validator("name")
    @classmethod
    def _identifier(cls, name: str) -> str:
        if (problem := step_name_problem(name)) is not None:
            raise ValueError(problem)
        return name

    @field_validator("relax", mode="before")
    @classmethod
    def _relaxations(cls, value):
        if not isinstance(value, list):
            raise ValueError(f"expected a list of relaxations, found {excerpt(value)}")
        if len(value) > MAX_RELAXATIONS:
            raise ValueError(f"at most {MAX_RELAXATIONS} relaxations, found {len(value)}")
        out = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                item = {item: None}
            if not isinstance(item, dict) or len(item) != 1:
                raise ValueError(f"item {i}: each relaxation is a name or a one-key mapping, found {excerpt(item)}")
            (name, args), = item.items()
            try:
                out.append(_validate_args("relaxation", RELAXATIONS, name, args))
            except ValueError as e:
                raise ValueError(f"item {i}: {e}") from None
        return out

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in ("gradient", "proximal", "synthesis") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                f"step {self.name} needs exactly one of 'gradient', 'proximal' or 'synthesis' "
                f"(a list of term names), found {', '.join(kinds) or 'none'}"
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("gradient", "proximal", "synthesis") if getattr(self, k) is not None)

    @property
    def terms(self) -> list[str]:
        return getattr(self, self.kind)


def _unique_names(steps: list[StepSpec], field: str) -> list[StepSpec]:
    names = [step.name for step in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"{field}: step names must be unique, found {', '.join(names)}")
    return steps


class GroupSpec(_Strict):
    """``repeat`` layers of ``steps``; ``tie``: the repeats share one set of parameters."""

    steps: list[StepSpec] = Field(min_length=1, max_length=MAX_STEPS)
    repeat: int = Field(1, ge=1, le=MAX_DEPTH)
    tie: bool = False

    @field_validator("steps")
    @classmethod
    def _unique(cls, steps: list[StepSpec]) -> list[StepSpec]:
        return _unique_names(steps, "steps")


#: the image fields of ``architecture``, which a language model's recipe must not set
IMAGE_FIELDS = ("image_size", "patch_size", "channels", "classes", "pool", "patch_norm", "cls_token", "positions",
                "embedding", "norm_eps")
TOKEN_FIELDS = ("vocab_size", "context")
TASKS = ("classification", "masked_autoencoding", *LANGUAGE_TASKS)


class Task(_Strict):
    """What the network is trained to do. ``masked_lm`` (BERT's objective): ``rate`` of the tokens
    are chosen; of those, ``mask`` are replaced by the ``[MASK]`` token, ``random`` by a random
    token, and the rest kept; the loss is the cross-entropy on the chosen positions."""

    kind: Literal["classification", "masked_autoencoding", "causal_lm", "masked_lm"]
    rate: float = Field(0.15, gt=0, lt=1)
    mask: float = Field(0.8, ge=0, le=1)
    random: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value):
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _rates(self):
        given = self.model_fields_set - {"kind"}
        if given and self.kind != "masked_lm":
            raise ValueError(f"{', '.join(sorted(given))}: masking rates belong to task masked_lm, not {self.kind}")
        if self.mask + self.random > 1:
            raise ValueError(f"mask ({self.mask}) and random ({self.random}) are shares of the chosen tokens: "
                             "together at most 1")
        return self


class Decoder(_Strict):
    """Masked autoencoding (CRATE-MAE): ``layer: invert`` runs the encoder layers backwards
    (each step undone, in reverse order; several groups are undone in reverse order too), or give
    the decoder's steps like ``layer``. ``depth``: the decoder's layers; with ``invert`` it
    defaults to the encoder's."""

    layer: Literal["invert"] | list[StepSpec] = "invert"
    depth: int | None = Field(None, ge=1, le=MAX_DEPTH)
    mask_ratio: float = Field(0.75, ge=0, lt=1)
    norm_pix_loss: bool = False
    norm_eps: Positive = 1e-6

    @field_validator("layer", mode="before")
    @classmethod
    def _invert_or_steps(cls, value):
        if not isinstance(value, list) and value != "invert":
            raise ValueError(f"expected 'invert' (undo the encoder layer) or a list of steps, found {excerpt(value)}")
        if isinstance(value, list) and not 1 <= len(value) <= MAX_STEPS:
            raise ValueError(f"expected 1 to {MAX_STEPS} steps, found {len(value)}")
        return value


class Construct(_Strict):
    """How ``unroll construct`` computes the network from data (forward construction, ReduNet):
    the nearest-subspace classifier keeps ``components`` principal directions per class."""

    components: int = Field(12, ge=1, le=MAX_WIDTH)


class Recipe(_Strict):
    name: str = Field(description="letters, digits, '.', '_' and '-': it names the output folder")
    description: str = Field("", max_length=10_000)
    architecture: Architecture
    objective: dict[str, dict[str, Any]]
    #: one layer, repeated ``architecture.depth`` times ...
    layer: list[StepSpec] | None = Field(None, min_length=1, max_length=MAX_STEPS)
    #: ... or groups of different layers, one after the other
    layers: list[GroupSpec] | None = Field(None, min_length=1, max_length=MAX_GROUPS)
    decoder: Decoder | None = None
    #: classification (the default), or masked_autoencoding (the default with a decoder), causal_lm, masked_lm
    task: Task | None = None
    training: Training = Field(default_factory=Training)
    #: only read by ``unroll construct`` (absent: its defaults)
    construction: Construct | None = None

    @field_validator("name")
    @classmethod
    def _safe_file_name(cls, name: str) -> str:
        if not re.fullmatch(SAFE_NAME, name) or len(name) > MAX_NAME:
            raise ValueError(f"the name becomes a folder (build/<name>), so it must be one file name of at most "
                             f"{MAX_NAME} letters, digits, '.', '_' or '-', not starting with '.' or '-'; found {excerpt(name)}")
        return name

    @field_validator("objective", mode="before")
    @classmethod
    def _terms(cls, value):
        if not isinstance(value, dict) or not value:
            raise ValueError("expected a mapping from term names to terms, e.g. {Rc: {term: compression}}")
        if len(value) > MAX_TERMS:
            raise ValueError(f"at most {MAX_TERMS} terms, found {len(value)}")
        out = {}
        for key, entry in value.items():
            if not isinstance(key, str) or not key.isidentifier() or len(key) > MAX_NAME:
                raise ValueError(f"a term's name must be an identifier of at most {MAX_NAME} characters, found {excerpt(key)}")
            if not isinstance(entry, dict) or "term" not in entry:
                raise ValueError(f"term {key}: expected a mapping with a 'term' kind, found {excerpt(entry)}")
            entry = dict(entry)
            kind, weight = entry.pop("term"), entry.pop("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ValueError(f"term {key}: weight must be a number, found {excerpt(weight)}")
            if not (isinstance(weight, float) and math.isfinite(weight) or isinstance(weight, int)) \
                    or not -MAX_MAGNITUDE <= weight <= MAX_MAGNITUDE:
                raise ValueError(f"term {key}: weight must be a finite number within ±{MAX_MAGNITUDE:g}, found {excerpt(weight)}")
            try:
                (_, args), = _validate_args("term", TERMS, kind, entry).items()
            except ValueError as e:
                raise ValueError(f"term {key}: {e}") from None
            out[key] = {"term": kind, "weight": float(weight), **args}
        return out

    @model_validator(mode="after")
    def _one_layout(self):
        a = self.architecture
        if (self.layer is None) == (self.layers is None):
            raise ValueError("give either layer (the steps of one layer, repeated architecture.depth times) or "
                             "layers (a list of {steps, repeat, tie}), " + ("not both" if self.layer else "found neither"))
        if self.layer is not None and a.depth is None:
            raise ValueError("architecture.depth: required with layer (how often the layer repeats)")
        if self.layers is not None:
            total = sum(g.repeat for g in self.layers)
            if a.depth is not None:
                raise ValueError(f"architecture.depth: with layers the depth is the sum of the repeats ({total}); "
                                 "remove depth")
            if a.tie_layers:
                raise ValueError("architecture.tie_layers: with layers, give each group its own tie")
            if total > MAX_DEPTH:
                raise ValueError(f"layers: {total} layers in all; at most {MAX_DEPTH}")
        task = self.decoder
        if task is not None:
            if task.layer != "invert" and task.depth is None:
                raise ValueError("decoder.depth: required with the decoder's own steps")
            if task.layer == "invert" and self.layers is not None and len(self.layers) > 1 and task.depth is not None \
                    and task.depth != self.encoder_depth:
                raise ValueError(f"decoder.depth: inverting {len(self.layers)} groups of layers gives "
                                 f"{self.encoder_depth} layers (each group undone as often as it repeats), found "
                                 f"{task.depth}; remove decoder.depth")
        return self

    @property
    def groups(self) -> list[tuple[list[StepSpec], int, bool]]:
        """(steps, repeat, tie) of each group of layers."""
        if self.layers is None:
            return [(self.layer, self.architecture.depth, self.architecture.tie_layers)]
        return [(g.steps, g.repeat, g.tie) for g in self.layers]

    @property
    def encoder_depth(self) -> int:
        return sum(repeat for _, repeat, _ in self.groups)

    def resolved(self) -> dict:
        """Every field spelled out, as plain data that reads back as this recipe: without the
        fields the task does not read (image fields of a language model, token fields of an image
        model), and a task's masking rates only where it masks."""
        foreign = IMAGE_FIELDS if self.task_kind in LANGUAGE_TASKS else TOKEN_FIELDS
        data = self.model_dump(mode="json", exclude={"architecture": set(foreign)})
        if self.task is None:
            del data["task"]
        elif self.task.kind != "masked_lm":
            data["task"] = self.task.kind
        return data

    @property
    def task_kind(self) -> str:
        if self.task is not None:
            return self.task.kind
        return "masked_autoencoding" if self.decoder is not None else "classification"

    @model_validator(mode="after")
    def _task_fits(self):
        kind, a = self.task_kind, self.architecture
        if (kind == "masked_autoencoding") != (self.decoder is not None):
            raise ValueError(f"task {kind} " + ("needs a decoder section" if self.decoder is None else
                                                "has no decoder: remove the decoder section, or say task: masked_autoencoding"))
        if kind in LANGUAGE_TASKS:
            missing = [f for f in TOKEN_FIELDS if getattr(a, f) is None]
            if missing:
                raise ValueError(f"architecture.{' and architecture.'.join(missing)}: required by task {kind}")
            images = sorted(set(IMAGE_FIELDS) & a.model_fields_set)
            if images:
                raise ValueError(f"architecture.{', architecture.'.join(images)}: image fields, but task {kind} reads "
                                 "tokens (give vocab_size and context)")
        else:
            tokens = sorted(f for f in TOKEN_FIELDS if getattr(a, f) is not None)
            if tokens:
                raise ValueError(f"architecture.{', architecture.'.join(tokens)}: token fields, but task {kind} reads "
                                 "images; a language model says task: causal_lm or task: masked_lm")
        return self

    @model_validator(mode="after")
    def _unrolled_size(self):
        for steps, _, _ in self.groups:
            per_layer = sum(step.iterations for step in steps)
            if per_layer > MAX_LAYER_ITERATIONS:
                raise ValueError(f"layer: {per_layer} iterations in one layer (a gradient step counts 1); "
                                 f"at most {MAX_LAYER_ITERATIONS}")
        unrolled = sum(repeat * sum(step.iterations for step in steps) for steps, repeat, _ in self.groups)
        if self.decoder is not None:
            if self.decoder.layer == "invert" and len(self.groups) > 1:  # each group undone as often
                unrolled += sum(repeat * sum(step.iterations for step in steps) for steps, repeat, _ in self.groups)
            elif self.decoder.layer == "invert":
                steps, repeat, _ = self.groups[0]
                unrolled += (self.decoder.depth or repeat) * sum(step.iterations for step in steps)
            else:
                unrolled += self.decoder.depth * sum(step.iterations for step in self.decoder.layer)
        if unrolled > MAX_UNROLLED:
            raise ValueError(f"{unrolled:,} unrolled steps (depth x iterations per layer, decoder included); "
                             f"at most {MAX_UNROLLED}")
        return self

    @model_validator(mode="after")
    def _steps_name_terms(self):
        decoder_steps = self.decoder.layer if self.decoder and self.decoder.layer != "invert" else []
        _unique_names(self.layer or [], "layer")
        _unique_names(decoder_steps, "decoder.layer")
        for step in [*(s for steps, _, _ in self.groups for s in steps), *decoder_steps]:
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


def _init(rule: InitSpec) -> Init:
    if isinstance(rule, NormalInit):
        return Init("normal", rule.normal, rule.depth_scaled)
    if isinstance(rule, KaimingInit):
        return Init("kaiming", fan_in=rule.kaiming)
    return Init(rule)


def _steps(recipe: Recipe, specs: list[StepSpec]) -> tuple:
    steps = []
    for s in specs:
        relax = tuple(RELAXATIONS[name](**args) for item in s.relax for name, args in item.items())
        on = _objective(recipe, s.terms)
        init = {name: _init(rule) for name, rule in s.init.items()}
        if s.kind == "gradient":
            steps.append(GradientStep(on, s.step_size, s.name, relax, init=init))
        elif s.kind == "proximal":
            steps.append(ProximalStep(on, s.step_size, s.iterations, s.warm_start, s.decode, s.name, relax, init=init))
        else:
            steps.append(SynthesisStep(on, s.name, relax, init=init))
    return tuple(steps)


def _ends(recipe: Recipe) -> dict:
    """The front end and the head the task reads and writes through."""
    a = recipe.architecture
    if recipe.task_kind in LANGUAGE_TASKS:
        return dict(frontend=TokenFrontend(a.vocab_size, a.context), head=LanguageHead(recipe.task_kind, a.head_norm_eps))
    return dict(frontend=PatchFrontend(a.image_size, a.patch_size, a.channels, a.patch_norm, a.norm_eps, a.cls_token,
                                       a.positions, a.embedding),
                head=ClassifierHead(a.classes, a.pool, a.head_norm_eps))


def to_network(recipe: Recipe) -> Network:
    a = recipe.architecture
    groups = tuple(Group(_steps(recipe, steps), repeat, tie) for steps, repeat, tie in recipe.groups)
    decoder = None
    if recipe.decoder is not None:
        r = recipe.decoder
        if r.layer != "invert":
            decoder = MaskedAutoencoder(_steps(recipe, r.layer), r.depth, tie=a.tie_layers)
        elif len(groups) == 1:  # one layer undone, as often as the decoder's depth says
            decoder = MaskedAutoencoder(invert_layer(groups[0].layer), r.depth or groups[0].repeat, tie=groups[0].tie)
        else:
            decoder = MaskedAutoencoder(layers=invert_groups(groups))
        decoder = replace(decoder, mask_ratio=r.mask_ratio, norm_pix_loss=r.norm_pix_loss, norm_eps=r.norm_eps)
    # one group is written as `layer` and `depth` (and reads back as network.layer, network.depth)
    layout = dict(layers=groups) if recipe.layer is None else dict(
        layer=groups[0].layer, depth=a.depth, tie_layers=a.tie_layers)
    return Network(
        **layout,
        width=a.width,
        heads=a.heads,
        head_dim=a.head_dim,
        **_ends(recipe),
        name=recipe.name,
        decoder=decoder,
    )
