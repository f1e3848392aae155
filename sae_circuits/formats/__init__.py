"""Dictionaries in other libraries' formats: detect a folder's format, read it, write one.

Each format is a module of this package holding a `FORMAT` (`Format`): how to recognise its folder
and its reader. `read_dictionary` tries them in the order of `FORMAT_MODULES`; `write_dictionary`
writes a format by name with the `write(dictionary, folder)` of its module in `WRITER_MODULES`. Readers refuse, naming it, every option of a file they do not
implement, so that a dictionary never loads with other numbers than its library computes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sae_circuits.errors import UserInputError
from sae_circuits.sites import Site

if TYPE_CHECKING:
    from sae_circuits.dictionary import Dictionary

# Modules of this package with a `FORMAT`, in the order folders are tested against them.
FORMAT_MODULES = (
    "saelens",
    "sparsify",
    "dictionary_learning",
    "circuit_tracer",
    "gemma_scope",
)
# Format name -> module of this package with its `write(dictionary, directory) -> Path`.
WRITER_MODULES = {"saelens": "saelens", "sparsify": "sparsify_writer"}


@dataclass(frozen=True)
class Format:
    """One published format: `detect(folder)` and `read(folder, site)`.

    `read`'s `site`, when given, is the site the dictionary is spliced at (it replaces the one the
    file names, or names one where the file's is unknown). `files`, `variants` and `refused`
    describe the format for the README's table and error messages.
    """

    name: str
    files: str
    detect: Callable[[Path], bool]
    read: Callable[[Path, Site | None], Dictionary]
    variants: str
    refused: str = ""


def formats() -> list[Format]:
    """Every published format, in detection order."""
    return [importlib.import_module(f"{__name__}.{name}").FORMAT for name in FORMAT_MODULES]


def format_named(name: str) -> Format:
    for fmt in formats():
        if fmt.name == name:
            return fmt
    raise UserInputError(
        f"unknown dictionary format {name!r}; valid: {', '.join(f.name for f in formats())}"
    )


def detect_format(directory: str | Path) -> Format | None:
    """The published format of `directory`, or None."""
    directory = Path(directory)
    return next((fmt for fmt in formats() if fmt.detect(directory)), None)


def read_dictionary(directory: str | Path, site: str | Site | None = None) -> Dictionary:
    """Read a dictionary folder written by another library (its format detected from its files)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserInputError(f"dictionary folder not found: {directory}")
    fmt = detect_format(directory)
    if fmt is None:
        expected = "; ".join(f"{f.files} ({f.name})" for f in formats())
        raise UserInputError(f"{directory} holds no dictionary in a known format: {expected}")
    return fmt.read(directory, None if site is None else Site.parse(site))


def write_dictionary(dictionary: Dictionary, directory: str | Path, format: str) -> Path:
    """Write `dictionary` to `directory` in the named format (`WRITER_MODULES`); returns the folder.

    A dictionary the format cannot represent exactly is refused, naming what it lacks."""
    if format not in WRITER_MODULES:
        raise UserInputError(
            f"cannot write the {format!r} format; writable formats: {', '.join(WRITER_MODULES)}"
        )
    module = importlib.import_module(f"{__name__}.{WRITER_MODULES[format]}")
    return module.write(dictionary, Path(directory))


def format_table() -> str:
    """The formats as a Markdown table (the README's "Dictionary formats")."""
    rows = [
        "| format | files | read | write | variants | refused |",
        "|---|---|---|---|---|---|",
    ]
    for fmt in formats():
        write = "yes" if fmt.name in WRITER_MODULES else "no"
        rows.append(
            f"| {fmt.name} | {fmt.files} | yes | {write} | {fmt.variants} | {fmt.refused or '—'} |"
        )
    return "\n".join(rows)


__all__ = [
    "FORMAT_MODULES",
    "WRITER_MODULES",
    "Format",
    "detect_format",
    "format_named",
    "format_table",
    "formats",
    "read_dictionary",
    "write_dictionary",
]
