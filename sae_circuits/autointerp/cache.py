"""Per-unit JSON results of automatic interpretation: `<root>/<basis>/<site>/<unit>.json`.

Each file holds the explanation, the hash of the explainer prompt it answers, and the scores with the
key of what produced them; it is written whole (to a temporary file, then renamed), after each
unit, so an interrupted run keeps every finished unit and a rerun resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from sae_circuits.errors import UserInputError
from sae_circuits.sites import Site


class ResultCache:
    """Unit results under `root`; with `root=None` nothing is read or written."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None

    def path(self, basis: str, site: Site, unit: int) -> Path | None:
        return None if self.root is None else self.root / basis / str(site) / f"{unit}.json"

    def load(self, basis: str, site: Site, unit: int) -> dict[str, Any]:
        """The stored result of a unit, or `{}`."""
        path = self.path(basis, site, unit)
        if path is None or not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserInputError(f"{path} is not a result file; remove it to recompute") from None

    def save(self, basis: str, site: Site, unit: int, result: dict[str, Any]) -> None:
        path = self.path(basis, site, unit)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump(result, stream, indent=2, ensure_ascii=False)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
