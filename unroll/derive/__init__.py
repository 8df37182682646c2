"""From an objective and a way to optimise it to exact update expressions."""

from unroll.derive.steps import GradientStep, ProximalStep, Step, derive
from unroll.derive.update import Update

__all__ = ["GradientStep", "ProximalStep", "Step", "Update", "derive"]
