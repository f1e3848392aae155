"""Locate the files shipped with the project (embedded model, dictionaries, task data).

In a checkout they live at the top of the repository (`models/`, `dictionaries/`, `tasks/`); an
installed wheel carries them as `sae_circuits/assets/<name>/`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

ASSET_KINDS = ("models", "dictionaries", "tasks")


def asset_dir(kind: str) -> Path:
    """Return the folder holding the shipped assets of `kind` ("models", "dictionaries" or "tasks")."""
    if kind not in ASSET_KINDS:
        raise ValueError(f"unknown asset kind {kind!r}; valid: {', '.join(ASSET_KINDS)}")
    try:
        installed = Path(str(resources.files(f"sae_circuits.assets.{kind}")))
        if installed.is_dir():
            return installed
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / kind
