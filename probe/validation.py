"""Field validation for the library's parameter dataclasses (probes, recipes), by pydantic.

Each field's annotation -- with constraints such as ``Annotated[int, Field(ge=1)]`` -- is
checked when the object is built, from Python, a ``--probe name:key=value`` spec or a
``--set key=value`` override alike; lax conversions (a JSON list for a tuple, 1 for 1.0) are kept.
A violation is a :class:`~probe.errors.ProbeError` naming the field, the value given and what is
allowed.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Opts:
    ...     n: PositiveInt = 1
    ...     def __post_init__(self):
    ...         validate_fields(self)
    >>> Opts(n=0)
    Traceback (most recent call last):
    probe.errors.ProbeError: Invalid Opts.n = 0: Input should be greater than 0.
"""

from __future__ import annotations

import dataclasses
import functools
import typing

from pydantic import NonNegativeInt, PositiveFloat, PositiveInt, TypeAdapter, ValidationError

from probe.errors import ProbeError

__all__ = ["validate_fields", "PositiveInt", "NonNegativeInt", "PositiveFloat"]


@functools.cache
def _adapters(cls: type) -> dict[str, TypeAdapter]:
    """One validator per init field; fields whose annotation cannot be resolved or validated (a
    user's local class, an arbitrary type) are left to the class itself."""
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception:  # names that only exist where the class was defined
        return {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.init and f.name in hints:
            try:
                out[f.name] = TypeAdapter(hints[f.name])
            except Exception:  # pydantic has no schema for this type
                continue
    return out


def validate_fields(obj: object) -> None:
    """Check (and normalise) every init field of the dataclass ``obj`` against its annotation."""
    for name, adapter in _adapters(type(obj)).items():
        value = getattr(obj, name)
        try:
            checked = adapter.validate_python(value)
        except ValidationError as e:
            msg = e.errors()[0]["msg"]
            raise ProbeError(f"Invalid {type(obj).__name__}.{name} = {value!r}: {msg}.") from None
        if checked is not value:
            object.__setattr__(obj, name, checked)  # frozen dataclasses too
