"""The names of the task-circuit methods, in a module without heavy imports (the command line
reads them to build its parser without loading torch)."""

from __future__ import annotations

METHODS = ("attribution", "ablation")

__all__ = ["METHODS"]
