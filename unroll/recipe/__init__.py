"""Recipes: YAML files validated by pydantic, turned into a :class:`~unroll.network.Network`."""

from unroll.recipe.load import load_recipe, parse_recipe, recipe_yaml, write_recipe
from unroll.recipe.schema import Recipe, to_network

__all__ = ["Recipe", "load_recipe", "parse_recipe", "recipe_yaml", "to_network", "write_recipe"]
