r"""Decoders by running an encoder layer backwards ("structured diffusion", reference section 4).

An encoder layer compresses (a gradient step *down* R^c) and then sparsifies (a proximal step that
replaces the tokens by a code A with Z ≈ D A). Its inverse undoes the steps in reverse order:

* the sparse step is undone by a :class:`~unroll.derive.steps.SynthesisStep` ``Z⁺ = D̃ Z``,
  re-synthesising the signal from the code with a dictionary of its own;
* a gradient step on f is undone by a gradient step on ``-f``: *ascent* on R^c, derived like the
  encoder's descent and relaxed by the same named relaxations.

Each inverse step records the encoder step it undoes, so ``unroll explain`` can print them side
by side.
"""

from __future__ import annotations

from dataclasses import replace

from unroll.derive.steps import GradientStep, ProximalStep, Step, SynthesisStep, _parts
from unroll.errors import UnrollError
from unroll.objective.base import Term
from unroll.objective.lasso import Lasso


def inverse_name(name: str) -> str:
    return f"inverse_{name}"


def invert(step: Step) -> Step:
    """The step that undoes ``step``, with the same relaxations; not its ``init`` (the inverse's
    parameters are new ones: a decoder written out as ``decoder.layer`` sets their own)."""
    if isinstance(step, GradientStep):
        on = -(step.on._as_objective() if isinstance(step.on, Term) else step.on)
        # its parameters are its own: they start as declared (an explicit decoder layer may say otherwise)
        return replace(step, on=on, name=inverse_name(step.name), inverts=step.name, init=())
    if isinstance(step, ProximalStep):
        if step.decode != "none":
            raise UnrollError(
                f"the step already decodes its code back to the signal (decode: {step.decode}); "
                "only a step that outputs the code itself can be undone by synthesis",
                field=f"step {step.name}",
            )
        if not any(isinstance(w.term, Lasso) for w in _parts(step.on)):
            raise UnrollError(
                "the step has no dictionary (lasso) term, so there is no code to synthesise from",
                field=f"step {step.name}",
            )
        return SynthesisStep(step.on, inverse_name(step.name), step.relax, inverts=step.name)
    raise UnrollError(f"no inverse known for step {getattr(step, 'name', step)!r}")


def invert_layer(steps: tuple[Step, ...]) -> tuple[Step, ...]:
    """The decoder layer that undoes an encoder layer: each step inverted, in reverse order."""
    return tuple(invert(s) for s in reversed(steps))


def invert_groups(groups: tuple) -> tuple:
    """The decoder of an encoder of several groups of layers: the groups in reverse order, each
    layer inverted, each group repeated (and tied) as in the encoder."""
    from unroll.network import Group  # late: the network module builds on the derivation

    return tuple(Group(invert_layer(g.layer), g.repeat, g.tie) for g in reversed(groups))
