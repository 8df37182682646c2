"""What each layer computes: the exact update derived from the objective, then each named
relaxation and the update it leaves, down to the update the lowered module computes.

The expressions printed here are the ones that are lowered (see :mod:`unroll.lower.interpret`).
"""

from __future__ import annotations

import sympy as sp

from unroll.derive.update import Update
from unroll.expr.printing import to_latex, to_text
from unroll.lower.model import DerivedStep, derive_layer
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
    return "\n".join(head + body).rstrip() + "\n"


def _objective_text(objective) -> str:
    out = ""
    for i, w in enumerate(objective.parts):
        weight = "" if w.weight == 1 else f"{w.weight} "
        out += (" + " if i else "") + weight + w.term.label
    return out
