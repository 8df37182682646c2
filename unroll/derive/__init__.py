"""From an objective and a way to optimise it to exact update expressions."""

from unroll.derive.init import Init
from unroll.derive.inverse import invert, invert_groups, invert_layer
from unroll.derive.steps import GradientStep, ProximalStep, Step, SynthesisStep, derive
from unroll.derive.update import Update

__all__ = ["GradientStep", "Init", "ProximalStep", "Step", "SynthesisStep", "Update", "derive", "invert", "invert_groups", "invert_layer"]
