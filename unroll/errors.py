"""The one error type users see.

Anything raised as :class:`UnrollError` is a mistake in the user's input (a recipe, a
checkpoint, an objective) and is printed by the CLI as a short message without a traceback.
Any other exception escaping `unroll` is a bug in `unroll`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UnrollError(Exception):
    """A user-facing error: ``where`` names the file or object, ``field`` the offending entry."""

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
