"""Command-line options generated from dataclass fields: each default and help text exists once.

A field becomes `--field-name`. Its type comes from the annotation (`int`, `float`, `str` or `bool`,
optionally `| None`), its default from a *template* instance of the dataclass (each command starts
from its own defaults), and its help text, choices and metavar from the field's metadata:
`field(default=..., metadata={"help": ..., "choices": ..., "metavar": ...})`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any


def field_help(cls: type, name: str) -> str:
    """The help text in the metadata of field `name` of the dataclass `cls`."""
    return _fields(cls)[name].metadata.get("help", "")


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    template: Any,
    names: Iterable[str],
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    notes: Mapping[str, str] | None = None,
) -> None:
    """Add `--field-name` for each of `names`, a field of the dataclass instance `template`, with
    the template's value as default. `overrides` maps a field to `add_argument` keyword arguments
    that replace the generated ones (e.g. a `type` that parses special spellings); `notes` maps a
    field to a remark appended to its help (e.g. how the command reads a value)."""
    fields = _fields(type(template))
    hints = typing.get_type_hints(type(template))
    for name in names:
        metadata = fields[name].metadata
        default = getattr(template, name)
        kwargs: dict[str, Any] = {"default": default}
        note = (notes or {}).get(name)
        if _base_type(hints[name]) is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
            kwargs["help"] = metadata.get("help", "") + (f" ({note})" if note else "")
        else:
            kwargs["type"] = _base_type(hints[name])
            shown = f"default: {_shown(default)}" + (f"; {note}" if note else "")
            kwargs["help"] = f"{metadata.get('help', '')} ({shown})".lstrip()
            for key in ("choices", "metavar"):
                if key in metadata:
                    kwargs[key] = metadata[key]
        kwargs.update((overrides or {}).get(name, {}))
        parser.add_argument(f"--{name.replace('_', '-')}", **kwargs)


def option_values(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The parsed values of the options `names`, by field name (for `dataclasses.replace`)."""
    return {name: getattr(args, name) for name in names}


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _base_type(annotation: Any) -> type:
    """`int` for `int` and for `int | None`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = (a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _shown(value: Any) -> str:
    if value is None:
        return "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


__all__ = ["add_options", "field_help", "option_values"]
