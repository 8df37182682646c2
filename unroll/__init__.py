"""unroll: declare an objective and how to optimise it; get the white-box network it derives.

    import unroll
    model = unroll.build("recipes/crate_base.yaml")
"""

from unroll.api import build
from unroll.derive import GradientStep, ProximalStep
from unroll.errors import UnrollError
from unroll.network import ClassifierHead, Network, PatchFrontend
from unroll.recipe import load_recipe

__all__ = [
    "ClassifierHead",
    "GradientStep",
    "Network",
    "PatchFrontend",
    "ProximalStep",
    "UnrollError",
    "build",
    "load_recipe",
]
