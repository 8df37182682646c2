"""The bounds a dataclass's fields declare, enforced when it is made in Python too.

Terms, relaxations and the network's parts state their limits once, as pydantic ``Field``
annotations beside each field (``lam: Annotated[float, Field(ge=0)]``). The recipe schema
validates recipes against them; :func:`check_fields` holds objects made through the Python API
to the same limits, so ``L1(lam=-1)`` fails where it is written, not steps later.
"""

from __future__ import annotations

import dataclasses
import functools
import typing

from pydantic import TypeAdapter, ValidationError

from unroll.errors import UnrollError, excerpt


@functools.lru_cache(maxsize=None)
def _adapters(cls: type) -> tuple[tuple[str, TypeAdapter], ...]:
    """One validator per field whose annotation carries constraints (``Annotated``, ``Literal``)."""
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception:  # an annotation naming what only a type checker sees: check what resolves
        hints = {}
        for klass in reversed(cls.__mro__):
            try:
                hints.update(typing.get_type_hints(klass, include_extras=True))
            except Exception:
                continue
    out = []
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name)
        if hint is not None and _constrained(hint):
            out.append((f.name, TypeAdapter(hint)))
    return tuple(out)


def _constrained(hint) -> bool:
    """Fields worth a check: bounded (``Annotated``), a choice (``Literal``) or a plain number or
    flag, which a caller can pass as a string."""
    if hint in (bool, int, float):
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Annotated or origin is typing.Literal:
        return True
    return any(_constrained(a) for a in typing.get_args(hint))


def check_fields(obj, what: str) -> None:
    """Raise :class:`UnrollError` naming the first field of ``obj`` outside its declared bounds."""
    for name, adapter in _adapters(type(obj)):
        value = getattr(obj, name)
        try:  # strict: "0.1" is not a number and 4.0 not a group size; an int is a float
            checked = adapter.validate_python(value, strict=True)
        except ValidationError as e:
            raise UnrollError(f"{what}: {name}: {e.errors()[0]['msg']} (found {excerpt(value)})") from None
        if checked is not value and type(checked) is not type(value):  # int given for a float
            object.__setattr__(obj, name, checked)
