"""Circuit nodes: a feature of the dictionary spliced at a site, or that site's error term.

A `Node` is the one representation of a node everywhere (patching, task graphs, faithfulness,
exports, the command line); its id is `"<site>/<feature>"` or `"<site>/error"`, and the metric node
of a task graph is the id `"metric"`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sae_circuits.errors import UserInputError
from sae_circuits.sites import Site

METRIC = "metric"
ERROR = "error"


@functools.total_ordering
@dataclass(frozen=True)
class Node:
    """Feature `feature` of the dictionary at `site`, or its error term (`feature=None`).

    Sorted in forward order: by site, then feature index, the error term last.
    """

    site: Site
    feature: int | None = None

    @classmethod
    def parse(cls, text: str | Node) -> Node:
        """A node from its id (`resid.3/1234`, `resid.3/error`)."""
        if isinstance(text, Node):
            return text
        site, _, feature = text.strip().rpartition("/")
        if not site or not (feature.isdigit() or feature == ERROR):
            raise UserInputError(
                f"bad node {text!r}: expected <site>/<feature index> or <site>/error, "
                "e.g. resid.3/12"
            )
        return cls(Site.parse(site), None if feature == ERROR else int(feature))

    @property
    def is_error(self) -> bool:
        return self.feature is None

    @property
    def id(self) -> str:
        return f"{self.site}/{ERROR if self.feature is None else self.feature}"

    def __str__(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"Node({self.id!r})"

    def _key(self) -> tuple[Site, float]:
        return (self.site, float("inf") if self.feature is None else self.feature)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Node):
            return NotImplemented
        return self._key() < other._key()


__all__ = ["ERROR", "METRIC", "Node"]
