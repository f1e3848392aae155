"""Pieces shared by the CLI commands: rich console on stderr, JSON on stdout, common arguments."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console

from sae_circuits.training import RESAMPLE_TARGETS

# Progress and tables go to stderr so that `--json` output on stdout stays machine-readable.
console = Console(stderr=True)


def print_json(obj: Any) -> None:
    """Write one JSON document to stdout."""
    json.dump(obj, sys.stdout, indent=2, default=_json_default)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="local model folder or hub name (default: the embedded model shipped with the package)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print a machine-readable JSON result on stdout"
    )


def add_resampling_arguments(
    parser: argparse.ArgumentParser,
    *,
    duplicates: float | None = None,
    min_fires: int = 0,
    target: str = "input",
) -> None:
    """`--resample-duplicates`, `--resample-min-fires` and `--resample-target` (what else is
    re-initialised at each dead-feature resampling, and towards what), with these defaults."""
    parser.add_argument(
        "--resample-duplicates",
        type=_cosine_or_none,
        default=duplicates,
        metavar="COS",
        help="at each resampling, also re-initialise latents whose decoder direction has cosine "
        f">= COS with a more active latent (default {duplicates or 'off'}; 0, none or off: off)",
    )
    parser.add_argument(
        "--resample-min-fires",
        type=int,
        default=min_fires,
        metavar="N",
        help="at each resampling, also re-initialise latents that fired fewer than N times since "
        f"the previous one (default {min_fires or 'off'}; 0: off)",
    )
    parser.add_argument(
        "--resample-target",
        choices=RESAMPLE_TARGETS,
        default=target,
        help="re-initialise towards least-squares residuals of recent inputs (residual) or "
        f"towards badly reconstructed inputs (input) (default {target})",
    )


def _cosine_or_none(text: str) -> float | None:
    """`--resample-duplicates`: a cosine in (0, 1], or 0 / none / off for off."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a cosine: {text!r}") from None
    if value == 0:
        return None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"the cosine must be in (0, 1], or 0 / none / off: {text!r}"
        )
    return value
