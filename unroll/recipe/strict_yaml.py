"""YAML for recipes: safe, bounded and strict.

``yaml.safe_load`` never runs code, but it still accepts what no recipe needs and a hostile file
exploits: gigabytes of aliases ("billion laughs"), nesting deep enough to exhaust the stack,
duplicate keys (the last silently wins), recursive aliases. Here the event stream is scanned
first (PyYAML's parser is iterative, so the scan itself cannot overflow), and only a document
within :data:`MAX_DEPTH` levels and :data:`MAX_VALUES` values *after* alias expansion is
constructed, by a loader that refuses duplicate keys.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from unroll.errors import UnrollError, excerpt, shorten

#: the largest recipe file; the bundled ones are about 2 KB
MAX_BYTES = 1 << 20
#: mappings and lists inside each other; the bundled recipes use 5
MAX_DEPTH = 32
#: scalars, mappings and lists, counting every alias as the values it stands for
MAX_VALUES = 100_000


def _at(mark: yaml.Mark | None) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


class _StrictLoader(yaml.SafeLoader):
    """The safe loader, refusing duplicate and unhashable keys (keys a ``<<`` merge brings in may
    be overridden: that is what merging is for)."""

    # plain data only: no timestamps, binary, sets or pairs (a recipe needs none, and PyYAML's own
    # constructors for them raise assorted exceptions on malformed input)
    yaml_constructors = {tag: f for tag, f in yaml.SafeLoader.yaml_constructors.items()
                         if tag is None or tag.rsplit(":", 1)[-1] in ("null", "bool", "int", "float", "str", "seq", "map")}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, found a {type(key).__name__}", key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {excerpt(key)} (first{_at(seen[key].start_mark)})", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads 1e-3 (no dot) as a string; recipes mean the number, as YAML 1.2 does (PyYAML
# copies the resolvers to the subclass before adding: SafeLoader itself is untouched)
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def _scan(text: str, where: str) -> None:
    """Refuse deep nesting, recursive aliases and alias expansion beyond :data:`MAX_VALUES`,
    from the event stream, before anything is built."""
    sizes: dict[str, int] = {}  # anchor -> values it stands for
    stack: list[list] = [[None, 0]]  # [anchor, values so far] per open collection
    total = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            stack.append([event.anchor, 1])
            if len(stack) - 1 > MAX_DEPTH:
                raise UnrollError(f"nested deeper than {MAX_DEPTH} levels{_at(event.start_mark)}", where=where)
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, size = stack.pop()
        elif isinstance(event, yaml.ScalarEvent):
            anchor, size = event.anchor, 1
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in sizes:
                open_anchors = {a for a, _ in stack}
                what = "refers to a mapping or list that contains it" if event.anchor in open_anchors else "is not defined"
                raise UnrollError(f"the alias *{shorten(event.anchor)} {what}{_at(event.start_mark)}", where=where)
            anchor, size = None, sizes[event.anchor]
        else:
            continue
        if anchor is not None:
            sizes[anchor] = size
        stack[-1][1] += size
        total += size if isinstance(event, yaml.AliasEvent) else 1
        if total > MAX_VALUES:
            raise UnrollError(f"more than {MAX_VALUES:,} values once aliases are expanded{_at(event.start_mark)}; "
                              "a recipe needs a few hundred", where=where)


def check_depth(data: Any, where: str) -> None:
    """Refuse a tree nested deeper than :data:`MAX_DEPTH` (walked without recursion)."""
    stack = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise UnrollError(f"nested deeper than {MAX_DEPTH} levels", where=where)
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)


def read_yaml(source: bytes | str, where: str) -> Any:
    """Parse one YAML document of a recipe (or a ``--set`` value): bytes must be UTF-8 and at most
    :data:`MAX_BYTES` long. Every problem is an :class:`UnrollError` naming ``where`` and the
    line; none quotes more than a short excerpt of the input."""
    if len(source) > MAX_BYTES:
        raise UnrollError(f"more than {MAX_BYTES:,} bytes, the most a recipe may have", where=where)
    if isinstance(source, bytes):
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError as e:
            line = source[: e.start].count(b"\n") + 1
            raise UnrollError(f"not UTF-8 text: byte 0x{source[e.start]:02x} at line {line} "
                              "(save the recipe as UTF-8)", where=where) from None
    try:
        _scan(source, where)
        return yaml.load(source, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        kind = "YAML error" if isinstance(e, yaml.constructor.ConstructorError) else "YAML syntax error"
        problem = (e.problem or e.context or "invalid YAML").strip()
        raise UnrollError(f"{kind}{_at(e.problem_mark or e.context_mark)}: {problem[:200]}", where=where) from None
    except yaml.YAMLError as e:
        raise UnrollError(f"YAML error: {str(e)[:200]}", where=where) from None
    except (ValueError, TypeError, OverflowError) as e:  # e.g. `!!int abc`, `!!float [1]`
        raise UnrollError(f"YAML error: a value cannot be read ({str(e).splitlines()[0][:120]})", where=where) from None
