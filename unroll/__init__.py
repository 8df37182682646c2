"""unroll: declare an objective and how to optimise it; get the white-box network it derives.

    import unroll
    model = unroll.build("recipes/crate_base.yaml")
"""

from importlib.metadata import PackageNotFoundError, version

from unroll.api import as_network, build
from unroll.derive import GradientStep, Init, ProximalStep, SynthesisStep, invert_groups, invert_layer
from unroll.errors import UnrollError
from unroll.explain import explain
from unroll.network import ClassifierHead, Group, MaskedAutoencoder, Network, PatchFrontend
from unroll.plan import Plan, plan
from unroll.recipe import load_recipe

try:
    __version__ = version("unroll")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "ClassifierHead",
    "GradientStep",
    "Group",
    "Init",
    "MaskedAutoencoder",
    "Network",
    "PatchFrontend",
    "Plan",
    "ProximalStep",
    "SynthesisStep",
    "UnrollError",
    "as_network",
    "build",
    "explain",
    "invert_groups",
    "invert_layer",
    "load_recipe",
    "plan",
]
