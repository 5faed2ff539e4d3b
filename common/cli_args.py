"""Typed config dataclasses into ``argparse`` flags: the help text lives once, on the field.

Every field becomes ``--field-name`` with ``metadata["help"]``. A field's metadata may also say:

=============  ==================================================================================
key            meaning
=============  ==================================================================================
``help``       the flag's help text (may use argparse's ``%(default)s``)
``hidden``     a testing knob: parsed, but left out of ``--help``
``flag``       the flag's name when it is not the field's (``--data`` for ``data_dir``)
``metavar``    the value's name in ``--help``
``choices``    the accepted values
``action``     ``"store_true"`` (a switch without ``--no-``), ``"append"`` (repeatable, a list)
``env``        the default comes from this environment variable (read when the parser is built)
=============  ==================================================================================

The type comes from the annotation: ``bool`` is ``--x/--no-x`` (unless ``action`` says otherwise), a
``list[...]`` takes several values, ``int``/``float``/``Path`` convert, anything else stays a string.
A field without a default is a required flag (unless ``env`` may supply it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any


def _default(f: dataclasses.Field) -> Any:
    if "env" in f.metadata:
        return os.environ.get(f.metadata["env"])
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _kind(f: dataclasses.Field) -> str:
    """The annotation as text without ``| None`` (annotations are strings under ``from __future__``)."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    parts = [p.strip() for p in kind.split("|") if p.strip() != "None"]
    return parts[0] if len(parts) == 1 else kind


_CONVERTERS = {"int": int, "float": float, "Path": Path}


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    skip: Collection[str] = (),
    show_defaults: bool = True,
) -> None:
    """One flag per field of dataclass ``cls`` (except ``skip``), in field order.

    ``show_defaults`` appends `` (default: X)`` to the help of valued flags (switches and lists show
    their own or none); a config whose help texts say their defaults in words passes False."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        default = _default(f)
        hidden = meta.get("hidden", False)
        help_text = argparse.SUPPRESS if hidden else meta.get("help")
        kind = _kind(f)
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        for key in ("metavar", "choices"):
            if key in meta:
                kwargs[key] = meta[key]
        action = meta.get("action")
        if (
            f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and "env" not in meta
        ):
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if action == "store_true":
            parser.add_argument(flag, action="store_true", **kwargs)
        elif action == "append":
            kwargs["default"] = list(default or [])
            parser.add_argument(flag, action="append", **kwargs)
        elif kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif kind.startswith("list"):
            kwargs["default"] = list(default or [])
            parser.add_argument(flag, nargs="*", **kwargs)
        else:
            if kind in _CONVERTERS:
                kwargs["type"] = _CONVERTERS[kind]
            if show_defaults and not hidden and help_text is not None:
                kwargs["help"] = f"{help_text} (default: {default})"
            parser.add_argument(flag, **kwargs)


def from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """An instance of dataclass ``cls`` from the parsed flags that are its fields (others are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return cls(**values)
