"""Reading recipes: bounded, strict YAML (never evaluated), ``--set`` overrides, and errors that
name the file and the field, quoting at most a short excerpt of the input."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from unroll.errors import UnrollError, excerpt, shorten
from unroll.files import write_text
from unroll.recipe.schema import UNION_TAG, Recipe
from unroll.recipe.strict_yaml import MAX_BYTES, MAX_DEPTH, check_depth, read_yaml

#: validation problems listed in one error; the rest are counted
MAX_PROBLEMS = 5


def _describe(err: dict) -> str:
    # validator and union-branch names (function-..., a discriminated union's tags) are not the user's keys
    loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("function-", UNION_TAG)))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif "input" in err and err["type"] not in ("value_error",):
        msg += f" (found {excerpt(err['input'])})"
    return f"field {loc}: {msg}" if loc else msg


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate a mapping (as loaded from YAML) into a :class:`Recipe`."""
    if not isinstance(data, dict):
        raise UnrollError(f"expected a mapping at the top level, found {type(data).__name__}", where=source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        lines = [_describe(err)[:300] for err in errors[:MAX_PROBLEMS]]
        if len(errors) > MAX_PROBLEMS:
            lines.append(f"... and {len(errors) - MAX_PROBLEMS} more")
        raise UnrollError("\n  ".join(["invalid recipe", *lines]), where=source) from None


def split_override(item: str) -> tuple[list[str], str]:
    """``a.b.0.c=value`` -> (["a", "b", "0", "c"], "value"); the CLI checks the syntax with this
    before anything runs."""
    key, sep, raw = item.partition("=")
    parts = key.split(".")
    if not sep or not all(part.strip() for part in parts):
        raise ValueError(f"expected key.sub=value (e.g. architecture.depth=4), found {excerpt(item)}")
    if len(parts) > MAX_DEPTH:
        raise ValueError(f"a key of at most {MAX_DEPTH} parts, found {len(parts)}")
    return parts, raw


def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    """``key.sub=value`` (list items by index, ``layer.0.step_size=0.2``); values are YAML, read as
    strictly as the recipe."""
    for item in overrides:
        try:
            parts, raw = split_override(item)
        except ValueError as e:
            raise UnrollError(f"--set: {e}", where=source) from None
        key = ".".join(parts)
        try:
            value = read_yaml(raw, "--set")
        except UnrollError as e:
            raise UnrollError(f"--set {shorten(key)}: the value {excerpt(raw)} is not valid YAML "
                              f"({e.message})", where=source) from None
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = shorten(".".join(parts[: depth + 1]))
            if isinstance(node, list):
                if not (re.fullmatch(r"-?[0-9]{1,9}", part) and -len(node) <= int(part) < len(node)):
                    raise UnrollError(f"--set {shorten(key)}: {here} is not an item of a list of {len(node)}", where=source)
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise UnrollError(f"--set {shorten(key)}: {shorten('.'.join(parts[:depth]))} is a value, not a mapping or list",
                                  where=source)
    return data


def _missing_file_hint(path: Path) -> str:
    """'did you mean' for a recipe path that does not exist: the same name with ``.yaml``, or the
    closest recipe name in the folder."""
    for candidate in (path.with_name(path.name + ".yaml"), path.with_suffix(".yaml"),
                      Path("recipes") / path.with_suffix(".yaml").name):
        if candidate != path and candidate.is_file():
            return f"; did you mean {candidate}?"
    folder = path.parent if path.parent.is_dir() else None
    if folder is not None:
        names = [p.name for p in folder.glob("*.yaml")]
        close = difflib.get_close_matches(path.name, names, n=1)
        if close:
            return f"; did you mean {folder / close[0]}?"
    return ""


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe file; ``overrides`` are ``key=value`` strings."""
    path = Path(path)
    try:
        if path.is_dir():
            raise UnrollError("expected a recipe file, found a folder", where=str(path))
        if not path.is_file():
            raise UnrollError("no such recipe file" + _missing_file_hint(path), where=str(path))
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise UnrollError(f"{size:,} bytes; a recipe may have at most {MAX_BYTES:,}", where=str(path))
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)  # a file that grew meanwhile is still read no further
    except OSError as e:
        raise UnrollError(f"cannot read the recipe ({e.strerror or e})", where=str(path)) from None
    data = read_yaml(raw, str(path))
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides, str(path))
        check_depth(data, str(path))  # a value nests inside its dotted key
    return parse_recipe(data, str(path))


def recipe_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every default spelled out: what was built, to rebuild it."""
    return yaml.safe_dump(recipe.resolved(), sort_keys=False)


def write_recipe(recipe: Recipe, path: Path) -> None:
    """:func:`recipe_yaml`, written atomically."""
    write_text(path, recipe_yaml(recipe))
