"""Every command's `--help` and argument errors answer without importing torch.

Each check runs in a fresh interpreter (a subprocess), since this test session has long imported
torch. The import check is the robust part; the time bound is generous (about 0.05 s on an idle
machine, so 1 s leaves room for a loaded one), and measured inside the subprocess, from before
`sae_circuits.cli` is imported, so that the interpreter's own start-up does not count.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sae_circuits.cli import COMMANDS

HELP_SECONDS = 1.0

_PROBE = """
import contextlib, io, json, sys, time
start = time.perf_counter()
from sae_circuits.cli import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exit:
        code = exit.code
print(json.dumps({
    "code": code,
    "seconds": time.perf_counter() - start,
    "torch": "torch" in sys.modules,
    "nnsight": "nnsight" in sys.modules,
    "stdout": out.getvalue(),
    "stderr": err.getvalue(),
}))
"""


def _probe(*argv: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_is_fast_and_light(command: str) -> None:
    result = _probe(command, "--help")
    assert result["code"] == 0
    assert f"sae-circuits {command}" in result["stdout"] and "--json" in result["stdout"]
    assert not result["torch"] and not result["nnsight"]
    assert result["seconds"] < HELP_SECONDS, result["seconds"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_argument_errors_are_fast_and_light(command: str) -> None:
    result = _probe(command, "--no-such-option")
    assert result["code"] == 2
    assert "error:" in result["stderr"]  # argparse's: the command's, or "unrecognized arguments"
    assert not result["torch"] and not result["nnsight"]
    assert result["seconds"] < HELP_SECONDS, result["seconds"]


def test_top_level_help_lists_every_command() -> None:
    result = _probe("--help")
    assert result["code"] == 0 and not result["torch"]
    assert all(name in result["stdout"] for name in COMMANDS)
