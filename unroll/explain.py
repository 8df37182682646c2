"""What each layer computes: the exact update derived from the objective, then each named
relaxation and the update it leaves, down to the update the lowered module computes.

The expressions printed here are the ones that are lowered (see :mod:`unroll.lower.interpret`).
"""

from __future__ import annotations

import sympy as sp

from unroll.derive.update import Update
from unroll.errors import UnrollError
from unroll.expr.printing import to_latex, to_text
from unroll.expr.symbols import size_value
from unroll.lower.stream import NotStreamable, stream_update
from unroll.network import CAUSAL_LM, LanguageHead, Network
from unroll.objective.base import objective_text
from unroll.plan import DerivedStep, GroupPlan, Plan, StackPlan, plan


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


def parameter_lines(u: Update, sizes: dict[str, int]) -> list[str]:
    """Each learned tensor of a layer's step: its symbol, stored name and shape, what it is."""
    sizes = {**sizes, "m": u.expansion * sizes["d"]}
    lines = []
    for spec in u.params:
        rows, cols = size_value(spec.rows, sizes), size_value(spec.cols, sizes)
        shape = ((sizes["K"],) if spec.per_head else ()) + ((rows,) if spec.is_vector else (rows, cols))
        stored = "" if spec.attr == spec.name else f" (stored as {spec.attr})"
        data = " (computed from data: a buffer filled by unroll construct, not trained)" if spec.from_data else ""
        lines.append(f"    {spec.name}{stored}: {' x '.join(map(str, shape))}" + (f", {spec.note}" if spec.note else "")
                     + data)
    for name in sorted(u.learnable):
        lines.append(f"    {name}: a learned scalar")
    return ["  parameters (per layer):", *lines] if lines else []


def explain_step(index: int, d: DerivedStep, latex: bool = False, sizes: dict[str, int] | None = None,
                 causal: bool = False) -> list[str]:
    """``causal``: the step is a causal language model's, and says what generation caches."""
    lines = [f"step {index} · {d.exact.name} · {d.exact.title}", "  exact (derived from the objective):"]
    lines += ["    " + line for line in update_lines(d.exact, latex)]
    for relaxation, u in d.relaxed:
        lines.append(f"  relaxation {relaxation.name}: {relaxation.rule}")
        lines += ["    " + line for line in update_lines(u, latex)]
    lines.append("  computed:" if d.relaxed else "  computed (no relaxation):")
    lines += ["    " + line for line in update_lines(d.final, latex)]
    lines += [f"  note: {u.describe()}" for u in d.unused]
    if sizes is not None:
        lines += parameter_lines(d.final, sizes)
    if causal:
        lines.append("  generation: " + cache_line(d.final))
    return lines


def cache_line(u: Update) -> str:
    """What a causal step keeps of the earlier tokens when a language model generates (the
    streaming form of :mod:`unroll.lower.stream`), or why it keeps nothing and recomputes."""
    try:
        kept = stream_update(u.out, u.where).cached
    except NotStreamable as e:
        return f"no cache, every token recomputes the window ({e})"
    if not kept:
        return "token by token, keeps nothing of the earlier tokens"
    return "token by token, keeps " + ", ".join(kept) + " of the earlier tokens"


def explain_inverse(index: int, d: DerivedStep, encoder: StackPlan, group: int, latex: bool = False,
                    sizes: dict[str, int] | None = None) -> list[str]:
    """A decoder step, headed by the encoder step it undoes (its computed update): decoder group
    ``group`` undoes the encoder's groups in reverse order (``invert_groups``)."""
    lines = explain_step(index, d, latex, sizes)
    inverted = getattr(d.step, "inverts", None)
    mirrored = len(encoder.groups) - 1 - group
    candidates = [mirrored] if 0 <= mirrored < len(encoder.groups) else []
    candidates += [g for g in range(len(encoder.groups)) if g not in candidates]
    match = next(((g + 1, i, e) for g in candidates for i, e in enumerate(encoder.groups[g].steps, 1)
                  if e.name == inverted), None)
    if match is None:
        return lines
    g, i, e = match
    which = f"step {i}" if len(encoder.groups) == 1 else f"group {g}, step {i}"
    side = [f"  undoes encoder {which} · {e.name}, which computes:"]
    side += ["    " + line for line in update_lines(e.final, latex)]
    return lines[:1] + side + lines[1:]


def _objective(group: GroupPlan, latex: bool) -> str:
    parts = tuple(w for d in group.steps for w in d.parts)
    if latex:
        return sum((d.step.on for d in group.steps), start=0).latex()
    return objective_text(parts)


def _group_head(stack: StackPlan, g: int, what: str) -> str:
    """``layers 3-4 (group 2 of 2: this layer 2 times, one set of parameters)``."""
    group = stack.groups[g].group
    times = "once" if group.repeat == 1 else f"{group.repeat} times"
    tie = "one set of parameters" if group.tie or group.repeat == 1 else "parameters untied"
    return f"{stack.spans(what)[g]} (group {g + 1} of {len(stack.groups)}: this layer {times}, {tie})"


def explain(network: Network | Plan, latex: bool = False) -> str:
    """What every layer of ``network`` computes, from the same plan ``build`` lowers."""
    p = network if isinstance(network, Plan) else plan(network)
    net, sizes = p.network, dict(p.sizes)
    groups = p.encoder.groups
    depth = p.encoder.depth
    causal = isinstance(net.head, LanguageHead) and net.head.task == CAUSAL_LM
    if len(groups) == 1:
        layout = (f"{depth} layer{'s' if depth != 1 else ''} "
                  f"(parameters {'tied' if groups[0].group.tie else 'untied'} across layers)")
    else:
        layout = f"{depth} layers in {len(groups)} groups"
    head = [f"{net.name}: {layout}, d = {net.width}, K = {net.heads}, p = {sizes['p']}; "
            "tokens are the columns of Z (d x N)"]
    body: list[str] = []
    for g, group in enumerate(groups):
        objective = "objective (minimised): " + _objective(group, latex)
        if len(groups) == 1:
            head += [objective, ""]
        else:
            body += [_group_head(p.encoder, g, "layer"), objective, ""]
        for i, d in enumerate(group.steps, 1):
            body += explain_step(i, d, latex, sizes, causal) + [""]
    if p.decoder is not None:
        task = net.decoder
        body += [
            f"decoder: {p.decoder.depth} layers; masked autoencoding, mask ratio {task.mask_ratio:g}, loss on the removed patches"
            + (" (normalised pixels)" if task.norm_pix_loss else ""),
            "",
        ]
        for g, group in enumerate(p.decoder.groups):
            if len(p.decoder.groups) > 1:
                body += [_group_head(p.decoder, g, "decoder layer"), ""]
            for i, d in enumerate(group.steps, 1):
                body += explain_inverse(i, d, p.encoder, g, latex, sizes) + [""]
    return "\n".join(head + body).rstrip() + "\n"
