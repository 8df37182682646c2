"""What each layer computes: the exact update derived from the objective, then each named
relaxation and the update it leaves, down to the update the lowered module computes.

The expressions printed here are the ones that are lowered (see :mod:`unroll.lower.interpret`).
"""

from __future__ import annotations

import sympy as sp

from unroll.derive.update import Update
from unroll.expr.printing import to_latex, to_text
from unroll.lower.model import DerivedStep, derive_layer, derive_steps
from unroll.network import Network


def _render(e: sp.Basic, latex: bool) -> str:
    return to_latex(e) if latex else to_text(e)


def update_lines(u: Update, latex: bool = False) -> list[str]:
    """``Z⁺ = ...`` then its ``where`` bindings and constants."""
    arrow = r"Z^{+} = " if latex else "Z⁺ = "
    lines = [arrow + _render(u.out, latex)]
    for s, e in u.where:
        lines.append(f"  where {_render(s, latex)} = {_render(e, latex)}")
    if u.constants:
        consts = ", ".join(
            f"{_render(sp.Symbol(k), latex)} = {v:g}" + (" (learned)" if k in u.learnable else "")
            for k, v in u.constants.items()
        )
        lines.append(f"  with {consts}")
    return lines


def explain_step(index: int, d: DerivedStep, latex: bool = False) -> list[str]:
    lines = [f"step {index} · {d.exact.name} · {d.exact.title}", "  exact (derived from the objective):"]
    lines += ["    " + line for line in update_lines(d.exact, latex)]
    for relaxation, u in d.relaxed:
        lines.append(f"  relaxation {relaxation.name}: {relaxation.rule}")
        lines += ["    " + line for line in update_lines(u, latex)]
    lines.append("  computed:" if d.relaxed else "  computed (no relaxation):")
    lines += ["    " + line for line in update_lines(d.final, latex)]
    return lines


def explain_inverse(index: int, d: DerivedStep, encoder: list[DerivedStep], latex: bool = False) -> list[str]:
    """A decoder step, headed by the encoder step it undoes (its computed update)."""
    lines = explain_step(index, d, latex)
    inverted = getattr(d.step, "inverts", None)
    match = next(((i, e) for i, e in enumerate(encoder, 1) if e.exact.name == inverted), None)
    if match is None:
        return lines
    i, e = match
    side = [f"  undoes encoder step {i} · {e.exact.name}, which computes:"]
    side += ["    " + line for line in update_lines(e.final, latex)]
    return lines[:1] + side + lines[1:]


def explain(network: Network, latex: bool = False) -> str:
    steps = derive_layer(network)
    objective = sum((s.step.on for s in steps), start=0)
    head = [
        f"{network.name}: {network.depth} layers (parameters {'tied' if network.tie_layers else 'untied'} across layers), "
        f"d = {network.width}, K = {network.heads}, p = {network.sizes()['p']}; tokens are the columns of Z (d x N)",
        "objective (minimised): " + (_objective_text(objective) if not latex else objective.latex()),
        "",
    ]
    body = []
    for i, d in enumerate(steps, 1):
        body += explain_step(i, d, latex) + [""]
    if network.decoder is not None:
        task = network.decoder
        body += [
            f"decoder: {task.depth} layers; masked autoencoding, mask ratio {task.mask_ratio:g}, loss on the removed patches"
            + (" (normalised pixels)" if task.norm_pix_loss else ""),
            "",
        ]
        for i, d in enumerate(derive_steps(task.layer, "decoder.layer"), 1):
            body += explain_inverse(i, d, steps, latex) + [""]
    return "\n".join(head + body).rstrip() + "\n"


def _objective_text(objective) -> str:
    out = ""
    for i, w in enumerate(objective.parts):
        weight = "" if w.weight == 1 else f"{w.weight} "
        out += (" + " if i else "") + weight + w.term.label
    return out
