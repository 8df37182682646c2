r"""``unroll features``: what each coordinate of a layer's sparse code responds to, in text.

A sparse-coding step (one that descends a lasso term: ISTA in CRATE) computes, for every token,
a code :math:`x \in \mathbb{R}^m` that explains the token through the step's dictionary,
:math:`z \approx D x`. Coordinate :math:`i` of the code is the weight of atom :math:`D_{:,i}`: a
candidate readable feature. For each coordinate this lists the held-out contexts that activate it
most, ranked by :math:`|x_i|` (the value itself for the non-negative codes of CRATE), and how many
of the tokens read it fires on (:math:`x_i \ne 0`); a coordinate that never fires is dead.

The code is a part of the step's computed update, found in the update itself
(:func:`code_expression`): when the update outputs the decoded signal :math:`D X` (CRATE's
language models, ``decode: tied``) the code is :math:`X`; otherwise the output is the code (vision
CRATE). It is evaluated with the plain lowering (:meth:`LoweredStep.evaluate`) on the step's
actual input, captured by a forward pre-hook, so it is the code the model computed, whatever the
step's relaxations and whatever layout it was lowered for.

Memory is bounded whatever the number of tokens read: windows go through the model in batches,
and each coordinate keeps only its running top ``N`` (``torch.topk`` over the kept candidates and
the batch's).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import sympy as sp
import torch
from sympy.matrices.expressions.matmul import MatMul

from unroll.errors import UnrollError
from unroll.files import text_writer, write_files
from unroll.lower.model import step_input
from unroll.objective import Lasso
from unroll.objective.lasso import DICTIONARY
from unroll.plan import DerivedStep, LayerPlan, Plan

#: contexts listed per coordinate
TOP = 5
#: held-out tokens read at most
TOKENS = 65_536
#: tokens of the window shown before and after the activating one
BEFORE = 12
AFTER = 3
#: tokens per forward: a batch of windows (the code of a batch is (tokens, m) floats)
BATCH_TOKENS = 8_192
#: how the pages show what would otherwise be invisible
NEWLINE, TAB, RETURN, SPACE = "⏎", "⇥", "␍", "␣"
MARKDOWN_FILE, HTML_FILE = "features.md", "features.html"


def is_sparse_step(derived: DerivedStep) -> bool:
    """A sparse-coding step: one that descends a lasso term (a code against a dictionary D)."""
    return any(isinstance(w.term, Lasso) for w in derived.parts)


def code_expression(update) -> sp.Basic:
    """The sparse code within ``update``'s output: ``X`` when the output is ``D X`` (``D`` the
    dictionary), else the output itself."""
    out = update.out
    if isinstance(out, MatMul) and out.args[0] == DICTIONARY.symbol:
        rest = out.args[1:]
        return rest[0] if len(rest) == 1 else MatMul(*rest)
    return out


def decodes(update) -> bool:
    """Whether ``update`` outputs its code decoded (``D X``) rather than the code itself."""
    return code_expression(update) is not update.out


def sparse_layer(plan: Plan, layer: int | None) -> tuple[LayerPlan, DerivedStep]:
    """The layer of ``plan`` (counted from 1 across groups, like ``unroll attention --layer``;
    None: the last that has one) and its sparse-coding step."""
    layers = plan.encoder.layers
    having = [x for x in layers if any(is_sparse_step(d) for d in x.steps)]
    if layer is None:
        if not having:
            raise UnrollError("no layer of this recipe has a sparse-coding step (one that descends a lasso term), "
                              "so there is no sparse code to read")
        planned = having[-1]
    elif not 1 <= layer <= len(layers):
        raise UnrollError(f"--layer must be between 1 and {len(layers)}, found {layer}")
    else:
        planned = layers[layer - 1]
    found = [d for d in planned.steps if is_sparse_step(d)]
    if not found:
        steps = ", ".join(d.name for d in planned.steps)
        hint = f"; layers with one: {', '.join(str(x.number) for x in having)}" if having else ""
        raise UnrollError(f"layer {planned.number} has no sparse-coding step (one that descends a lasso term); "
                          f"its steps: {steps}{hint}")
    return planned, found[-1]


def codes(model, planned: LayerPlan, derived: DerivedStep, ids: torch.Tensor) -> torch.Tensor:
    """(B, m, T): the sparse code of every token of ``ids`` (B, T) at ``derived`` in layer ``planned``."""
    step, Z = step_input(model, planned.number, derived.name, ids)  # (B, d, T), tokens as columns
    with torch.no_grad():
        return step.evaluate(code_expression(derived.final), Z)[:, 0]


@dataclass(frozen=True)
class Context:
    """One activation of a coordinate: its value, and where it was (a window and a position in it)."""

    value: float
    window: int
    position: int


@dataclass
class Features:
    """The running result over the windows read: for each of the m coordinates its top contexts
    and how many tokens it fired on."""

    layer: int
    step: str
    #: (windows, context) the ids read, in order
    ids: torch.Tensor
    #: (m, top): the kept activations, by |value| descending; 0 where a coordinate fired less often
    values: torch.Tensor
    #: (m, top): where each is, as ``window * context + position``
    where: torch.Tensor
    #: (m,): tokens the coordinate was non-zero on
    fired: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.ids.numel()

    @property
    def live(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self.fired).flatten()]

    @property
    def dead(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self.fired == 0).flatten()]

    def contexts(self, coordinate: int) -> list[Context]:
        """The coordinate's top contexts, strongest first (only where it fired)."""
        context = self.ids.shape[1]
        out = []
        for value, at in zip(self.values[coordinate].tolist(), self.where[coordinate].tolist()):
            if value != 0:
                out.append(Context(value, *divmod(at, context)))
        return out


def collect(model, ids: torch.Tensor, layer: int | None = None, top: int = TOP,
            batch_tokens: int = BATCH_TOKENS) -> Features:
    """The top ``top`` contexts of every coordinate of the sparse code of ``layer`` (see
    :func:`sparse_layer`) over the windows ``ids`` (W, T), read ``batch_tokens`` at a time."""
    if ids.numel() == 0:
        raise UnrollError("no text to read: the held-out split has no window")
    planned, derived = sparse_layer(model.plan, layer)
    device = next(model.parameters()).device
    count, context = ids.shape
    per_batch = max(1, batch_tokens // context)
    values = where = fired = None
    for start in range(0, count, per_batch):
        code = codes(model, planned, derived, ids[start:start + per_batch].to(device)).float()
        m = code.shape[1]
        flat = code.permute(1, 0, 2).reshape(m, -1)  # (m, tokens of the batch)
        at = torch.arange(start * context, start * context + flat.shape[1], device=device).expand(m, -1)
        if values is None:
            values = flat.new_zeros(m, 0)
            where = at.new_zeros(m, 0)
            fired = torch.zeros(m, dtype=torch.long, device=device)
        values, where = torch.cat([values, flat], 1), torch.cat([where, at], 1)
        keep = values.abs().topk(min(top, values.shape[1]), dim=1).indices
        values, where = values.gather(1, keep), where.gather(1, keep)
        fired += (flat != 0).sum(1)
    return Features(planned.number, derived.name, ids.cpu(), values.cpu(), where.cpu(), fired.cpu())


# --- pages ---------------------------------------------------------------------------------------

def visible(text: str, token: bool = False) -> str:
    """Line breaks, tabs and (in the activating token, where they matter most) spaces made visible."""
    text = text.replace("\r", RETURN).replace("\n", NEWLINE).replace("\t", TAB)
    return text.replace(" ", SPACE) if token else text


def spans(features: Features, c: Context, tokenizer) -> tuple[str, str, str]:
    """(before, token, after) as text: up to :data:`BEFORE` and :data:`AFTER` tokens of the
    window around the activating one (the model saw nothing outside its window), ``…`` where the
    window goes on."""
    window = features.ids[c.window].tolist()
    first, last = max(0, c.position - BEFORE), min(len(window), c.position + 1 + AFTER)
    before = ("…" if first > 0 else "") + tokenizer.decode(window[first:c.position])
    after = tokenizer.decode(window[c.position + 1:last]) + ("…" if last < len(window) else "")
    return before, tokenizer.decode([window[c.position]]), after


def ranges(numbers: list[int]) -> str:
    """``0-3, 7, 9-10``: a sorted list of integers, runs as ranges."""
    out, i = [], 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        out.append(str(numbers[i]) if i == j else f"{numbers[i]}-{numbers[j]}")
        i = j + 1
    return ", ".join(out)


def _markdown_text(text: str) -> str:
    # any ASCII punctuation may be backslash-escaped in Markdown; runs of spaces would collapse
    escaped = "".join("\\" + ch if ch in "\\`*_{}[]<>()#+-.!|~&" else ch for ch in text)
    return escaped.replace("  ", " \u00a0")


@dataclass(frozen=True)
class Header:
    """What a page says it was read from."""

    recipe: str
    checkpoint: str
    text: str


def _summary(features: Features, header: Header) -> list[tuple[str, str]]:
    m, windows, context = features.values.shape[0], *features.ids.shape
    live, dead = features.live, features.dead
    return [
        ("recipe", header.recipe),
        ("checkpoint", header.checkpoint),
        ("layer", f"{features.layer}, step {features.step}"),
        ("held-out text", f"{header.text}: {windows:,} windows of {context} tokens, {features.tokens:,} tokens"),
        ("code", f"{m:,} coordinates; coordinate i weighs atom D[:, i]"),
        ("live", f"{len(live):,} coordinates fire (are non-zero) on some token"),
        ("dead", f"{len(dead):,} never fire" + (f": {ranges(dead)}" if dead else "")),
        ("how to read", f"coordinates by index, each with its {features.values.shape[1]} strongest contexts by |activation| "
                 f"(up to {BEFORE} tokens before, {AFTER} after, within the model's window); {NEWLINE} a line break, "
                 f"{TAB} a tab, {SPACE} a space in the activating token"),
    ]


def _fires(features: Features, i: int) -> str:
    n = int(features.fired[i])
    return (f"fires on {n:,} token{'' if n == 1 else 's'} ({n / features.tokens:.2%}), "
            f"max |activation| {abs(float(features.values[i, 0])):.4g}")


def markdown(features: Features, tokenizer, header: Header) -> str:
    """``features.md``: the summary, then one table per live coordinate, the activating token bold
    (``<b>``: Markdown's ``**`` does not open next to punctuation inside a word, as in ``f(**x**)``)."""
    lines = [f"# Sparse features of {header.recipe}, layer {features.layer}", ""]
    lines += [f"- **{key}**: {_markdown_text(value)}" for key, value in _summary(features, header)]
    for i in features.live:
        lines += ["", f"## coordinate {i}", "", _fires(features, i), "", "| activation | context |", "|---:|---|"]
        for c in features.contexts(i):
            before, token, after = spans(features, c, tokenizer)
            text = (_markdown_text(visible(before)) + f"<b>{_markdown_text(visible(token, token=True))}</b>"
                    + _markdown_text(visible(after)))
            lines.append(f"| {c.value:.4g} | {text} |")
    return "\n".join(lines) + "\n"


_STYLE = """body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; }
table { border-collapse: collapse; } td, th { padding: 0.15rem 0.6rem; border-bottom: 1px solid #ddd; }
td.value { text-align: right; font-variant-numeric: tabular-nums; }
td.context { font-family: ui-monospace, monospace; white-space: pre; }
mark { background: #ffd54f; } dt { font-weight: bold; } dd { margin: 0 0 0.3rem 1rem; }"""


def html_page(features: Features, tokenizer, header: Header) -> str:
    """``features.html``: as :func:`markdown`, the activating token in ``<mark>``."""
    e = html.escape
    title = f"Sparse features of {header.recipe}, layer {features.layer}"
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
             f"<style>\n{_STYLE}\n</style></head><body>", f"<h1>{e(title)}</h1>", "<dl>"]
    parts += [f"<dt>{e(key)}</dt><dd>{e(value)}</dd>" for key, value in _summary(features, header)]
    parts.append("</dl>")
    for i in features.live:
        parts += [f'<h2 id="c{i}">coordinate {i}</h2>', f"<p>{e(_fires(features, i))}</p>",
                  "<table><tr><th>activation</th><th>context</th></tr>"]
        for c in features.contexts(i):
            before, token, after = spans(features, c, tokenizer)
            text = f"{e(visible(before))}<mark>{e(visible(token, token=True))}</mark>{e(visible(after))}"
            parts.append(f'<tr><td class="value">{c.value:.4g}</td><td class="context">{text}</td></tr>')
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write(features: Features, tokenizer, header: Header, folder: Path) -> list[Path]:
    """``features.md`` and ``features.html`` in ``folder``, both or neither."""
    return write_files(folder, {MARKDOWN_FILE: text_writer(markdown(features, tokenizer, header)),
                                HTML_FILE: text_writer(html_page(features, tokenizer, header))})
