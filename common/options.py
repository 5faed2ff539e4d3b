"""Options mappings (round options, merge options, JSON a person typed) into typed config dataclasses.

A key that names no field is refused, never ignored: a typo (``stpes``) silently dropped would run the
default and look like it worked. The refusal names the closest field ("did you mean") and every field.
Pure standard library, so ``fusion/`` uses it too.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Collection, Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def field_names(cls: type) -> frozenset[str]:
    """The field names of dataclass ``cls``."""
    return frozenset(f.name for f in dataclasses.fields(cls))


def unknown_keys_message(unknown: Iterable[str], known: Collection[str], what: str) -> str:
    """``unknown <what> ['stpes'] (did you mean 'steps'?); known: [...]``."""
    unknown = sorted(unknown)
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if close:
            hints.append(f"{close[0]!r} for {name!r}" if len(unknown) > 1 else repr(close[0]))
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    return f"unknown {what} {unknown}{hint}; known: {sorted(known) or 'none'}"


def refuse_unknown(
    options: Mapping[str, Any], known: Collection[str], what: str, error: type[Exception] = ValueError
) -> None:
    """Raise ``error`` when ``options`` has a key not in ``known``; ``what`` names the keys in the message
    (e.g. ``"fusion hyperparameter(s)"``)."""
    unknown = set(options) - set(known)
    if unknown:
        raise error(unknown_keys_message(unknown, known, what))


def build(
    cls: type[T], options: Mapping[str, Any] | None, what: str, error: type[Exception] = ValueError
) -> T:
    """``cls(**options)`` for dataclass ``cls``, refusing unknown keys and a missing required field with
    ``error`` (a ``ValueError`` raised by the dataclass's own checks passes through as it is)."""
    options = dict(options or {})
    refuse_unknown(options, field_names(cls), what, error)
    try:
        return cls(**options)
    except TypeError as exc:  # a required field missing (unknown keys were refused above)
        raise error(f"{what}: {exc}") from None


def split_known(options: Mapping[str, Any], cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` split into (the keys that are fields of dataclass ``cls``, the rest)."""
    names = field_names(cls)
    own = {k: v for k, v in options.items() if k in names}
    rest = {k: v for k, v in options.items() if k not in names}
    return own, rest
