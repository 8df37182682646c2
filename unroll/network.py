"""A whole network as plain data: a front end, groups of unrolled layers of steps, and a head.

This is what both the Python API and the recipe loader produce, and what the compiler plans
(:mod:`unroll.plan`) and lowers.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import Annotated, Literal

from pydantic import Field

from unroll.derive.steps import STEP_TYPES, Step
from unroll.errors import UnrollError
from unroll.fields import check_fields


Size = Annotated[int, Field(strict=True, ge=1)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def _steps(layer: object, where: str) -> tuple[Step, ...]:
    """``layer`` as a tuple of steps, or an error naming the first item that is not one."""
    if isinstance(layer, STEP_TYPES):
        layer = (layer,)
    if not isinstance(layer, (tuple, list)) or not layer:
        raise UnrollError(f"expected a non-empty tuple of steps, found {type(layer).__name__}", field=where)
    for i, step in enumerate(layer):
        if not isinstance(step, STEP_TYPES):
            kinds = ", ".join(t.__name__ for t in STEP_TYPES)
            raise UnrollError(f"item {i} is a {type(step).__name__}, not a step ({kinds})", field=where)
    return tuple(layer)


@dataclass(frozen=True)
class Group:
    """``repeat`` consecutive layers, each running the steps of ``layer`` in order; ``tie``: the
    repeats share one set of parameters (one module applied ``repeat`` times)."""

    layer: tuple[Step, ...]
    repeat: Size = 1
    tie: bool = False

    def __post_init__(self):
        object.__setattr__(self, "layer", _steps(self.layer, "group.layer"))
        check_fields(self, "group")


def _groups(layer, depth, tie: bool, layers, where: str) -> tuple[tuple[Group, ...], int]:
    """The groups and the depth of ``layer`` repeated ``depth`` times, or of ``layers``."""
    if layer is not None:
        if layers:
            raise UnrollError("give either layer (with depth) or layers, not both", field=f"{where}layers")
        if depth is None or isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise UnrollError(f"depth must be a whole number at least 1, found {depth!r}", field=f"{where}depth")
        return (Group(layer, depth, tie),), depth
    if not layers or not isinstance(layers, (tuple, list)):
        raise UnrollError("give the layer (a tuple of steps) and depth, or layers (a list of Group)", field=f"{where}layers")
    groups = tuple(layers)
    for i, group in enumerate(groups):
        if not isinstance(group, Group):
            raise UnrollError(f"item {i} is a {type(group).__name__}, not a Group(layer, repeat, tie)", field=f"{where}layers")
    total = sum(g.repeat for g in groups)
    if depth is not None and depth != total:
        raise UnrollError(f"with layers the depth is the sum of the repeats ({total}), found depth {depth} "
                          "(leave depth out)", field=f"{where}depth")
    return groups, total


def _settle(obj, layer, depth, tie: bool, layers, where: str) -> None:
    """Check ``layer``/``depth`` or ``layers`` and keep them as given, so that
    ``dataclasses.replace(network, depth=2)`` works; ``layers`` is stored as a tuple and, with it,
    ``depth`` as None (the depth is the repeats' sum, :attr:`total_depth`). Nothing derived is
    stored: a network pickled by an earlier version, without ``layers``, reads the same."""
    _groups(layer, depth, tie, layers, where)
    if layers:
        object.__setattr__(obj, "layers", tuple(layers))
        object.__setattr__(obj, "depth", None)


@dataclass(frozen=True)
class PatchFrontend:
    """Images (B, C, H, W) -> tokens: p x p patches to the width, a learned cls token, a learned
    positional embedding.

    ``embedding``: ``linear`` flattens each patch as ``(p1 p2 c)`` and applies Linear (CRATE,
    with ``patch_norm`` a LayerNorm before and after it); ``conv`` is a Conv2d with kernel and
    stride p (CRATE-alpha, CRATE-MAE), the same map with the weights laid out ``(c p1 p2)``;
    ``pixels`` has no parameters: each patch's pixels, flattened ``(c p1 p2)`` and normalised onto
    the unit sphere, are its token (ReduNet: patch_size = image_size, one token per image, the
    width channels × patch_size²).
    """

    image_size: Size = 224
    patch_size: Size = 16
    channels: Size = 3
    patch_norm: bool = True
    norm_eps: Positive = 1e-5
    cls_token: bool = True
    #: ``sincos``: the fixed 2-D sin-cos table of MAE (a zero row for cls), stored as a buffer
    positions: Literal["learned", "sincos", "none"] = "learned"
    embedding: Literal["linear", "conv", "pixels"] = "linear"

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        return self.patches + int(self.cls_token)


@dataclass(frozen=True)
class TokenFrontend:
    """Token ids (B, T) -> tokens (B, T, d): an embedding of ``vocab_size`` rows plus a learned
    position embedding of ``context`` rows (nanoGPT's ``wte`` and ``wpe``); T <= ``context``."""

    vocab_size: Size = 50304
    context: Size = 1024

    @property
    def tokens(self) -> int:
        """The most tokens a sequence has (what the plan checks per-position parameters against)."""
        return self.context


#: the tasks of a language model: next-token prediction under a causal mask, or BERT's masked tokens
CAUSAL_LM, MASKED_LM = "causal_lm", "masked_lm"
LANGUAGE_TASKS = (CAUSAL_LM, MASKED_LM)


@dataclass(frozen=True)
class LanguageHead:
    """A final LayerNorm, then logits through the token embedding itself (the head is tied to
    ``wte``: one tensor); ``task`` says what the logits are trained to predict."""

    task: Literal["causal_lm", "masked_lm"] = "causal_lm"
    norm_eps: Positive = 1e-5


@dataclass(frozen=True)
class ClassifierHead:
    """Pool the cls token (or the mean token), LayerNorm, Linear to the classes."""

    classes: Size = 1000
    pool: Literal["cls", "mean"] = "cls"
    norm_eps: Positive = 1e-5


@dataclass(frozen=True)
class MaskedAutoencoder:
    """The masked-autoencoding task of CRATE-MAE (reference section 4): the encoder sees every
    patch, with a learned mask token in place of the ``mask_ratio`` fraction it is denied; a
    decoder of ``depth`` layers of ``layer`` (usually :func:`~unroll.derive.inverse.invert_layer`
    of the encoder's) predicts the pixels; the loss is the mean squared error on masked patches,
    against per-patch normalised pixels when ``norm_pix_loss``. ``norm_eps``: the LayerNorms after
    the encoder and after the decoder."""

    layer: tuple[Step, ...] | None = None
    depth: int | None = None
    mask_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.75
    norm_pix_loss: bool = False
    norm_eps: Positive = 1e-6
    #: instead of ``layer`` and ``depth``: the decoder's groups of layers
    layers: tuple[Group, ...] = ()
    #: the repeats of ``layer`` share their parameters
    tie: bool = False

    def __post_init__(self):
        _settle(self, self.layer, self.depth, self.tie, self.layers, "decoder.")
        check_fields(self, "decoder")

    def groups(self, tie_layers: bool = False) -> tuple[Group, ...]:
        """The decoder's layers as groups; ``layer`` and ``depth`` make one, tied when ``tie`` or
        the network's ``tie_layers`` says so."""
        return _groups(self.layer, self.depth, self.tie or tie_layers, self.layers, "decoder.")[0]

    @property
    def total_depth(self) -> int:
        return _groups(self.layer, self.depth, self.tie, self.layers, "decoder.")[1]


@dataclass(frozen=True)
class Network:
    """``layer`` (a tuple of steps) repeated ``depth`` times, its repeats sharing parameters when
    ``tie_layers``; or ``layers``, a sequence of :class:`Group` (different layers, each repeated,
    tied or not), whose repeats add up to the depth::

        Network(layers=[Group(crate_layer, 2), Group(attention_only, 2, tie=True)], width=384, heads=6)
    """

    layer: tuple[Step, ...] | None = None
    _: KW_ONLY
    width: Annotated[int, Field(strict=True, ge=1)]
    heads: Annotated[int, Field(strict=True, ge=1)]
    depth: int | None = None
    head_dim: Annotated[int, Field(strict=True, ge=1)] | None = None
    tie_layers: bool = False
    frontend: PatchFrontend | TokenFrontend = field(default_factory=PatchFrontend)
    head: ClassifierHead | LanguageHead = field(default_factory=ClassifierHead)
    name: str = "network"
    #: a masked autoencoder instead of a classifier (then ``head`` is unused)
    decoder: MaskedAutoencoder | None = None
    #: the layers as groups; filled from ``layer`` and ``depth`` when those are given
    layers: tuple[Group, ...] = ()

    def __post_init__(self):
        if self.tie_layers and self.layer is None and self.layers:
            raise UnrollError("tie_layers applies to layer and depth; with layers, give each Group its tie",
                              field="architecture.tie_layers")
        check_fields(self, "architecture")
        _settle(self, self.layer, self.depth, self.tie_layers, self.layers, "architecture.")
        for name, kinds in (("frontend", (PatchFrontend, TokenFrontend)), ("head", (ClassifierHead, LanguageHead)),
                            ("decoder", (MaskedAutoencoder,))):
            part = getattr(self, name)
            if not isinstance(part, kinds) and not (name == "decoder" and part is None):
                raise UnrollError(f"{name} must be a {' or a '.join(k.__name__ for k in kinds)}, found "
                                  f"{type(part).__name__}", field=name)
            if part is not None:
                check_fields(part, "decoder" if name == "decoder" else "architecture")
        if isinstance(self.frontend, TokenFrontend) != isinstance(self.head, LanguageHead):
            raise UnrollError("a language model reads tokens and predicts tokens: give a TokenFrontend with a "
                              "LanguageHead, or a PatchFrontend with a ClassifierHead", field="architecture")
        if isinstance(self.head, LanguageHead) and self.decoder is not None:
            raise UnrollError("a language model has no masked-autoencoder decoder", field="decoder")

    @property
    def groups(self) -> tuple[Group, ...]:
        """The layers as groups: one for ``layer`` and ``depth``, else ``layers``."""
        return _groups(self.layer, self.depth, self.tie_layers, self.layers, "architecture.")[0]

    @property
    def decoder_groups(self) -> tuple[Group, ...]:
        """The decoder's layers as groups; one given as ``layer`` ties like the encoder's."""
        return () if self.decoder is None else self.decoder.groups(self.tie_layers)

    @property
    def total_depth(self) -> int:
        """Layers in all: ``depth``, or the sum of the groups' repeats."""
        return _groups(self.layer, self.depth, self.tie_layers, self.layers, "architecture.")[1]

    def sizes(self) -> dict[str, int]:
        """``d``, ``K`` and ``p``; the head dimension defaults to width / heads."""
        if self.head_dim is None and self.width % self.heads:
            raise UnrollError(
                f"heads ({self.heads}) must divide the width ({self.width}), or give head_dim",
                field="architecture.heads",
            )
        return {"d": self.width, "K": self.heads, "p": self.head_dim or self.width // self.heads}
