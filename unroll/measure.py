r"""Measure, layer by layer, the objective each layer was derived from.

For every step of every layer, the terms that step optimises are evaluated (float64) at the
step's output, with that layer's own parameters: R^c(Z|U) after a compression step, the l1 norm
and the fraction of exact zeros after a sparse-coding step, a user's custom term after the step
that descends it. For every layer output the coding rate R(Z) and the sparse rate reduction

.. math::  R(Z) - R^c(Z \mid U) - \lambda \|X\|_1 / N

are reported too (the quantity CRATE's layers ascend; X is the sparse code, the layer output Z
itself in vision CRATE). Values are means over the samples: images, or windows of text.

A sparse-coding step that outputs its code decoded, ``D X`` (CRATE's language models), is
measured on its code X (:func:`unroll.features.code_expression`, evaluated on the step's input):
its terms, and ``<step>: code zeros`` and ``<step>: code l1`` (the fraction of exact zeros and
the mean |x|), since the decoded tokens are dense whatever the code.

Measurement is a view: forward hooks are attached for the measuring forward and removed
after it, so a model that is not being measured runs exactly as built.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from unroll.errors import UnrollError
from unroll.features import code_expression, decodes, is_sparse_step
from unroll.files import bytes_writer, csv_text, png_bytes, text_writer, write_files
from unroll.finite import name_list, nonfinite_names
from unroll.expr.nodes import LayerNorm
from unroll.objective import CodingRate, Compression, L1, Lasso
from unroll.objective.base import Term
from unroll.objective.lasso import DICTIONARY
from unroll.plan import LayerPlan
from unroll.relax.rules import NORM_BIAS, NORM_WEIGHT, NORMALISED


def _columns(x: torch.Tensor, rows: bool) -> torch.Tensor:
    return (x.mT if rows else x).double()


def _values(step) -> dict[str, torch.Tensor | float]:
    """The step's parameters by attribute (``U``, ``D``), and its constants by name, as trained
    (a learned ``lambda`` included): what a term's ``value`` reads."""
    values: dict[str, torch.Tensor | float] = {attr: getattr(step, attr).detach().double() for attr in step.specs}
    for name in step.constant_names:
        values[name] = float(getattr(step, name).detach())
    return values


def _term_value(term: Term, step, update, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
    if not term.measured:
        return None
    values = _values(step)
    if isinstance(term, Lasso):
        data, norm = inputs, update.binding(NORMALISED.name)
        if isinstance(norm, LayerNorm):  # the code explains the pre-normalised tokens
            data = F.layer_norm(inputs.mT, (inputs.shape[-2],), values[NORM_WEIGHT.attr], values[NORM_BIAS.attr],
                                float(norm.eps)).mT
        D = values.get(DICTIONARY.attr)
        if D is None or output.shape[-2] != D.shape[-1]:
            return None  # the step outputs the decoded signal, not the code
        return term.value(output, values, data)
    return term.value(output, values)


def measure(model: torch.nn.Module, inputs: torch.Tensor, eps: float | None = None) -> list[dict[str, float]]:
    """On ``inputs`` (images, or token ids (B, T) for a language model), one row per encoder layer
    (numbered from 1 across groups): ``layer``, then
    ``<step>: <term>`` values, ``zeros`` (fraction of exact zeros in the layer output), ``l1``
    (mean |z|), ``R`` and, for a layer with a compression term, ``sparse rate reduction``."""
    bad = nonfinite_names({**dict(model.named_parameters()), **dict(model.named_buffers())})
    if bad:  # every value measured would be NaN, with no hint why
        raise UnrollError(f"the model's weights are not finite (NaN or infinity) in {name_list(bad)}; "
                          "nothing can be measured")
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module, args, output):  # the input as it came (a decoded step's code is evaluated on it)
        calls.append((args[0].mT if module.rows else args[0], _columns(output, module.rows)))

    # steps run in layer order, and in step order within a layer (a tied module runs repeatedly)
    hooks = [step.register_forward_hook(record) for layer in model.encoder.layers for step in layer.steps.values()]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for h in hooks:
            h.remove()
    rows, start = [], 0
    for layer in model.plan.encoder.layers:
        outputs = calls[start:start + len(layer.steps)]
        start += len(layer.steps)
        rows.append(_row(model, layer, outputs, eps))
    return rows


def _row(model, layer: LayerPlan, outputs: list[tuple[torch.Tensor, torch.Tensor]], eps: float | None) -> dict[str, float]:
    row: dict[str, float] = {"layer": layer.number}
    rc, lam, compression_eps = None, 0.0, 0.5
    last = outputs[-1][1]
    sparse = last  # what the l1 penalty of the sparse rate reduction weighs
    module = model.encoder.layers[layer.module]
    for derived, (raw, output) in zip(layer.steps, outputs):
        step = module.steps[derived.name]
        inputs = raw.double()
        if is_sparse_step(derived) and decodes(derived.final):  # its terms are of the code, not of D X
            with torch.no_grad():
                output = step.evaluate(code_expression(derived.final), raw)[:, 0].double()
            row[f"{derived.name}: code zeros"] = (output == 0).double().mean().item()
            row[f"{derived.name}: code l1"] = output.abs().mean().item()
        for w in derived.parts:
            term = w.term
            value = _term_value(term, step, derived.final, inputs, output)
            if value is not None:
                row[f"{derived.name}: {term.label}"] = value.mean().item()
            if isinstance(term, Compression):
                rc, compression_eps = value.mean().item(), term.eps
            if isinstance(term, L1):
                lam, sparse = term.threshold(_values(step)), output
    row["zeros"] = (last == 0).double().mean().item()
    row["l1"] = last.abs().mean().item()
    R = CodingRate(eps=eps or compression_eps).value(last, {}).mean().item()
    row["R"] = R
    if rc is not None:
        tokens = last.shape[-1]
        row["sparse rate reduction"] = R - rc - lam * sparse.abs().sum((-2, -1)).mean().item() / tokens
    return row


def columns(rows: list[dict[str, float]]) -> list[str]:
    """Every quantity any layer has, in first-seen order (layers of different groups measure
    different terms; a layer lacks the others)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def write(rows: list[dict[str, float]], folder: Path, title: str) -> tuple[Path, Path]:
    """``measure.csv`` and ``measure.png`` (each quantity against depth) in ``folder``, both or
    neither."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = columns(rows)
    keys = fields[1:]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0), squeeze=False)
    depth = [r["layer"] for r in rows]
    for ax, key in zip(axes[0], keys):
        ax.plot(depth, [r.get(key, float("nan")) for r in rows], marker="o")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = png_bytes(fig, dpi=110)
    csv_path, png_path = write_files(folder, {"measure.csv": text_writer(csv_text(rows, fields)), "measure.png": bytes_writer(png)})
    return csv_path, png_path
