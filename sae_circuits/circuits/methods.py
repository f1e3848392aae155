"""The names of the task-circuit methods and of the faithfulness ablations, in a module without
heavy imports (the command line reads them to build its parser without loading torch)."""

from __future__ import annotations

METHODS = ("attribution", "ablation")
ABLATIONS = ("mean", "corrupt")  # how faithfulness removes the nodes outside a circuit

__all__ = ["ABLATIONS", "METHODS"]
