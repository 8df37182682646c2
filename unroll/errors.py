"""The one error type users see.

Anything raised as :class:`UnrollError` is a mistake in the user's input (a recipe, a
checkpoint, an objective) and is printed by the CLI as a short message without a traceback.
Any other exception escaping `unroll` is a bug in `unroll`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: the longest quote of user input an error message carries
EXCERPT_CHARS = 60


class UnrollError(ValueError):
    """A user-facing error: ``where`` names the file or object, ``field`` the offending entry.
    A ``ValueError``: what was given has the right type but a wrong value or shape."""

    def __init__(self, message: str, *, where: str | None = None, field: str | None = None):
        self.message = message
        self.where = where
        self.field = field
        super().__init__(self.render())

    def render(self) -> str:
        head = ": ".join(part for part in (self.where, self.field) if part)
        return f"{head}: {self.message}" if head else self.message


@contextmanager
def located(where: str | None) -> Iterator[None]:
    """Errors raised inside that do not name a file yet name ``where`` (the recipe being built)."""
    try:
        yield
    except UnrollError as e:
        if e.where is not None or where is None:
            raise
        raise UnrollError(e.message, where=where, field=e.field) from None


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error quotes the input, never all of it
    (a YAML alias bomb expands to gigabytes)."""
    text = _bounded_repr(value, limit + 1)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def shorten(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` cut to ``limit`` characters, unquoted: for names the user chose (a key of a
    foreign checkpoint, a dotted ``--set`` key), which may be megabytes long."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bounded_repr(value: Any, limit: int, depth: int = 0) -> str:
    # repr of a huge nested container is itself huge; render containers piecewise
    if depth > limit and isinstance(value, (dict, list, tuple)):
        return "…"
    if isinstance(value, dict):
        parts, size = [], 2
        for k, v in value.items():
            parts.append(f"{_bounded_repr(k, limit, depth + 1)}: {_bounded_repr(v, limit, depth + 1)}"[:limit])
            size += len(parts[-1]) + 2
            if size > limit:
                break
        return "{" + ", ".join(parts) + "}"
    if isinstance(value, (list, tuple)):
        parts, size = [], 2
        for v in value:
            parts.append(_bounded_repr(v, limit, depth + 1)[:limit])
            size += len(parts[-1]) + 2
            if size > limit:
                break
        return "[" + ", ".join(parts) + "]"
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    return repr(value)


def note(message: str, where: str | None = None) -> None:
    """Something the user should know that is not an error (a checkpoint without a digest, a
    dtype converted): one line on stderr, never silent."""
    print(f"note: {where + ': ' if where else ''}{message}", file=sys.stderr)
