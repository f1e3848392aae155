"""Reading and writing the files dictionaries are stored in: JSON configs and safetensors
weights, read with one-line errors and written atomically (a temporary file, then a rename)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_circuits.errors import UserInputError


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path` (a one-line error if it is not valid JSON)."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserInputError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno})"
        ) from None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` as indented JSON, atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `tensors` to `path` as safetensors, atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors in a safetensors file (a one-line error if it cannot be read)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserInputError(f"cannot read {path}: {error}") from None


__all__ = ["read_json", "read_safetensors", "save_safetensors_atomic", "write_json_atomic"]
