"""The one error type users see.

Anything raised as :class:`UnrollError` is a mistake in the user's input (a recipe, a
checkpoint, an objective) and is printed by the CLI as a short message without a traceback.
Any other exception escaping `unroll` is a bug in `unroll`.
"""

from __future__ import annotations


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
