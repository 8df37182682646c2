"""Reading recipes: YAML (never evaluated), ``--set`` overrides, and errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from unroll.files import write_text
from unroll.errors import UnrollError
from unroll.recipe.schema import Recipe


def _describe(err: dict) -> str:
    loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-"))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif "input" in err and err["type"] not in ("value_error",):
        msg += f" (found {err['input']!r})"
    return f"field {loc}: {msg}" if loc else msg


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate a mapping (as loaded from YAML) into a :class:`Recipe`."""
    if not isinstance(data, dict):
        raise UnrollError(f"expected a mapping at the top level, found {type(data).__name__}", where=source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()[:5]]
        raise UnrollError("\n  ".join(["invalid recipe", *lines]), where=source) from None


def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    """``key.sub=value`` (list items by index, ``layer.0.step_size=0.2``); values are YAML scalars."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UnrollError(f"--set expects key=value, found {item!r}", where=source)
        node: Any = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        last = parts[-1]
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise UnrollError(f"--set {key}: the value {raw!r} is not a YAML scalar or list", where=source) from None
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe file; ``overrides`` are ``key=value`` strings."""
    path = Path(path)
    if not path.is_file():
        raise UnrollError("no such recipe file", where=str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise UnrollError(f"YAML syntax error{at}: {problem}", where=str(path)) from None
    if isinstance(data, dict) and overrides:
        try:
            data = apply_overrides(data, overrides, str(path))
        except (IndexError, ValueError, TypeError, AttributeError) as e:
            raise UnrollError(f"cannot apply --set: {e}", where=str(path)) from None
    return parse_recipe(data, str(path))


def write_recipe(recipe: Recipe, path: Path) -> None:
    """The resolved recipe as YAML (every default spelled out), written atomically."""
    write_text(path, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
