r"""Measure, layer by layer, the objective each layer was derived from.

For every step of every layer, the terms that step optimises are evaluated (float64) at the
step's output, with that layer's own parameters: R^c(Z|U) after a compression step, the l1 norm
and the fraction of exact zeros after a sparse-coding step, a user's custom term after the step
that descends it. For every layer output the coding rate R(Z) and the sparse rate reduction

.. math::  R(Z) - R^c(Z \mid U) - \lambda \|Z\|_1 / N

are reported too (the quantity CRATE's layers ascend). Values are means over the samples.

Measurement is a view: forward hooks are attached for the measuring forward and removed
after it, so a model that is not being measured runs exactly as built.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from unroll.errors import UnrollError
from unroll.files import bytes_writer, csv_text, png_bytes, text_writer, write_files
from unroll.finite import name_list, nonfinite_names
from unroll.expr.nodes import LayerNorm
from unroll.objective import L1, CodingRate, Compression, Lasso, NonNegative
from unroll.objective.base import Term


def _columns(x: torch.Tensor, rows: bool) -> torch.Tensor:
    return (x.mT if rows else x).double()


def _params(step) -> dict[str, torch.Tensor]:
    return {attr: getattr(step, attr).detach().double() for attr in step.specs}


def _term_value(term: Term, step, update, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
    params = _params(step)
    if isinstance(term, NonNegative):
        return None  # 0 or +inf: the fraction of zeros says more
    if isinstance(term, L1):  # with the step's λ, which training may have learned
        return _lam(step, term) * output.abs().flatten(1).sum(-1)
    if isinstance(term, Lasso):
        data, norm = inputs, update.binding("Y")
        if isinstance(norm, LayerNorm):  # the code explains the pre-normalised tokens
            data = F.layer_norm(inputs.mT, (inputs.shape[-2],), params["norm_weight"], params["norm_bias"], float(norm.eps)).mT
        if params.get("D") is None or output.shape[-2] != params["D"].shape[-1]:
            return None  # the step outputs the decoded signal, not the code
        return term.value(output, params, data)
    return term.value(output, params)


def measure(model: torch.nn.Module, images: torch.Tensor, eps: float | None = None) -> list[dict[str, float]]:
    """One row per encoder layer: ``layer``, then ``<step>: <term>`` values, ``zeros`` (fraction
    of exact zeros in the layer output), ``l1`` (mean |z|), ``R`` and ``sparse rate reduction``."""
    bad = nonfinite_names({**dict(model.named_parameters()), **dict(model.named_buffers())})
    if bad:  # every value measured would be NaN, with no hint why
        raise UnrollError(f"the model's weights are not finite (NaN or infinity) in {name_list(bad)}; "
                          "nothing can be measured")
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def record(module, args, output):
        calls.setdefault(module.update_name, []).append((_columns(args[0], module.rows), _columns(output, module.rows)))

    # forward order is layer order; tied layers call one module `depth` times
    hooks = [step.register_forward_hook(record) for layer in model.encoder.layers for step in layer.steps.values()]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
    return [_row(model, i, {name: c[i] for name, c in calls.items()}, eps) for i in range(model.encoder.depth)]


def _row(model, i: int, outputs: dict[str, tuple[torch.Tensor, torch.Tensor]], eps: float | None) -> dict[str, float]:
    row: dict[str, float] = {"layer": i + 1}
    rc, lam, compression_eps = None, 0.0, 0.5
    for derived in model.derived:
        name = derived.exact.name
        step = model.layer(i).steps[name]
        inputs, output = outputs[name]
        for w in _parts(derived.step.on):
            term = w.term
            value = _term_value(term, step, derived.final, inputs, output)
            if value is not None:
                row[f"{name}: {term.label}"] = value.mean().item()
            if isinstance(term, Compression):
                rc, compression_eps = value.mean().item(), term.eps
            if isinstance(term, L1):
                lam = _lam(step, term)
    last = outputs[model.derived[-1].exact.name][1]
    row["zeros"] = (last == 0).double().mean().item()
    row["l1"] = last.abs().mean().item()
    R = CodingRate(eps=eps or compression_eps).value(last, {}).mean().item()
    row["R"] = R
    if rc is not None:
        tokens = last.shape[-1]
        row["sparse rate reduction"] = R - rc - lam * last.abs().sum((-2, -1)).mean().item() / tokens
    return row


def _lam(step, term: L1) -> float:
    """The threshold the step uses: its (possibly learned) ``lambda``, else the term's."""
    value = getattr(step, "lambda", None)
    return float(value.detach()) if isinstance(value, torch.Tensor) else term.lam


def _parts(on):
    return on._as_objective().parts if isinstance(on, Term) else on.parts


def write(rows: list[dict[str, float]], folder: Path, title: str) -> tuple[Path, Path]:
    """``measure.csv`` and ``measure.png`` (each quantity against depth) in ``folder``, both or
    neither."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in rows[0] if k != "layer"]
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
    csv_path, png_path = write_files(folder, {"measure.csv": text_writer(csv_text(rows)), "measure.png": bytes_writer(png)})
    return csv_path, png_path
