"""Checks shared by the readers of published formats: the options a reader understands, the
tensors a file must hold and their shapes. Each failure is a `UserInputError` naming the file and
what is wrong, so that no file is read into something that computes other numbers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sae_circuits.errors import UserInputError


def refuse_unknown_options(
    options: Mapping[str, Any], understood: Iterable[str], source: str | Path
) -> None:
    """Raise naming every key of `options` outside `understood` (or if it is not a mapping)."""
    if not isinstance(options, Mapping):
        raise UserInputError(f"{source}: expected a mapping of options, found {options!r:.80}")
    unknown = sorted(set(options) - set(understood))
    if unknown:
        raise UserInputError(
            f"{source}: option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            "not supported by this reader"
        )


def refuse_option(source: str | Path, name: str, value: Any) -> UserInputError:
    """The error for an option whose value a reader does not implement."""
    return UserInputError(f"{source}: {name}={value!r} is not supported")


def check_tensor_names(
    tensors: Mapping[str, Any],
    required: Iterable[str],
    source: str | Path,
    optional: Iterable[str] = (),
) -> None:
    """Raise unless `tensors` holds every `required` name and nothing outside `optional`."""
    required = set(required)
    missing = sorted(required - set(tensors))
    if missing:
        raise UserInputError(
            f"{source} lacks {', '.join(missing)} (found {', '.join(sorted(tensors))})"
        )
    extra = sorted(set(tensors) - required - set(optional))
    if extra:
        raise UserInputError(
            f"{source}: tensors {', '.join(extra)} are not supported by this reader"
        )


def check_shape(
    tensors: Mapping[str, torch.Tensor],
    name: str,
    shape: tuple[int, ...],
    meaning: str,
    source: str | Path,
) -> torch.Tensor:
    """`tensors[name]` after checking that its shape is `shape` (`meaning` spells it, e.g.
    "[d_sae, d_in]")."""
    tensor = tensors[name]
    if tuple(tensor.shape) != tuple(shape):
        raise UserInputError(
            f"{source}: {name} has shape {list(tensor.shape)}, expected {meaning} = {list(shape)}"
        )
    return tensor


def matrix_shape(
    tensors: Mapping[str, torch.Tensor], name: str, source: str | Path
) -> tuple[int, int]:
    """The (rows, columns) of `tensors[name]`, which must be a matrix: the sizes it defines."""
    shape = tuple(tensors[name].shape)
    if len(shape) != 2:
        raise UserInputError(f"{source}: {name} has shape {list(shape)}, expected a matrix")
    return shape


def positive_int(value: Any, name: str, source: str | Path) -> int:
    """`value` if it is an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserInputError(f"{source}: {name} must be a positive integer, got {value!r}")
    return value
