"""The command line as read in a log: full tables on stdout, progress lines and warnings on
stderr, fast help. Output here is never a terminal (pytest captures it)."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.table import Table

from sae_circuits import METRIC_KEYS
from sae_circuits.cli import main
from sae_circuits.cli.common import print_result
from sae_circuits.progress import INTERVAL_VARIABLE, progress_bar
from sae_circuits.training import TrainSpec, train_dictionaries

TRAIN_ARGS = ["--ctx-len", "32", "--n-ctxs", "32", "--batch-size", "128", "--eval-tokens", "1024"]


def test_wide_table_is_printed_whole_when_not_a_terminal(capsys):
    values = [f"{0.0123456789 * i:.10f}" for i in range(12)]
    table = Table(title="wide")
    for i in range(12):
        table.add_column(f"a_long_column_name_{i}")
    table.add_row(*values)
    print_result(table)
    out, err = capsys.readouterr()
    assert err == ""
    assert "…" not in out
    for i, value in enumerate(values):
        assert f"a_long_column_name_{i}" in out and value in out


def test_wide_table_in_an_80_column_terminal_is_transposed_or_wrapped(capsys, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: stdout counts as a terminal
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("NO_COLOR", "1")
    names = [f"metric_{i}" for i in range(14)]
    table = Table(title="quality")
    for name in ["site", *names]:
        table.add_column(name)
    table.add_row("resid.1", *(f"{0.0123456 * i:.6f}" for i in range(14)))
    table.add_row("mlp.1", *(f"{1.5 * i:.6f}" for i in range(14)))
    print_result(table)
    lines = _plain(capsys.readouterr().out)
    assert max(len(line) for line in lines) <= 80 and "…" not in "".join(lines)
    assert any("resid.1" in line and "mlp.1" in line for line in lines)  # now the header
    for i, name in enumerate(names):
        assert any(name in line and f"{0.0123456 * i:.6f}" in line for line in lines)
    table.add_column("a_column_far_too_long_to_fit_in_any_transposed_layout_" * 2)
    table.columns[-1]._cells += ["x" * 100, "y" * 100]
    print_result(table)  # transposed it does not fit either: cells wrap, nothing is cut
    lines = _plain(capsys.readouterr().out)
    assert "".join(lines).count("x") >= 100 and "".join(lines).count("y") >= 100
    assert max(len(line) for line in lines) <= 80 and "…" not in "".join(lines)


def _plain(text: str) -> list[str]:
    return re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()


def test_eval_table_goes_whole_to_stdout(capsys):
    argv = ["eval", "--dictionaries", "main", "--site", "resid.1", "--tokens", "256"]
    assert main([*argv, "--ctx-len", "32", "--batch-size", "8", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert main([*argv, "--ctx-len", "32", "--batch-size", "8"]) == 0
    out, err = capsys.readouterr()
    header, row = (line for line in out.splitlines() if "┃ site" in line or "│ resid.1" in line)
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    names = [cell.strip() for cell in header.strip("┃ ").split("┃")]
    assert names == ["site", *METRIC_KEYS]
    assert cells == ["resid.1", *(f"{metrics[key]:.4g}" for key in METRIC_KEYS)]
    assert "evaluating: 2/2 (100%)" in err


def test_progress_prints_plain_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setenv(INTERVAL_VARIABLE, "0")
    with progress_bar("harvesting", 3) as bar:
        for _ in range(3):
            bar.advance(0)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("harvesting: 1/3 (33%)")
    assert any(line.startswith("harvesting: 3/3 (100%)") for line in err)
    assert all("elapsed" in line for line in err)


def _stream(steps: int, d: int = 8):
    generator = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(32, d, generator=generator)} for _ in range(steps)]


def test_training_progress_line_names_rate_mse_loss_l0(capsys, monkeypatch):
    monkeypatch.setenv(INTERVAL_VARIABLE, "0")
    spec = TrainSpec("x", d_dict=16, warmup_steps=1)
    (d,) = train_dictionaries(_stream(4), [spec], 4, log_every=1)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("training")]
    assert lines and lines[-1].startswith("training: 4/4 (100%)")
    for field in ("tok/s", "mse", "loss", "L0", "dead"):
        assert field in lines[-1]
    metrics = d.config.metrics
    assert metrics["train_mse"] == pytest.approx(metrics["train_sse"] / 8)
    shown = float(lines[-1].split("mse ")[1].split()[0])
    assert shown == pytest.approx(metrics["train_mse"], rel=1e-3)


def test_short_run_clips_the_warm_up_with_a_warning():
    spec = TrainSpec("x", d_dict=16, warmup_steps=200, decay_start=500)
    with pytest.warns(UserWarning, match="warm-up of 200 steps .* 10 steps: clipped to 1") as seen:
        (d,) = train_dictionaries(_stream(10), [spec], 10, progress=False)
    assert any("no decay" in str(w.message) for w in seen)
    assert d.config.hyperparameters["warmup_steps"] == 1
    assert d.config.hyperparameters["decay_start"] is None


def test_train_results_on_stdout_warning_on_stderr_checkpoint_removed(model_dirs, tmp_path, capsys):
    argv = ["train", "--model", str(model_dirs["gpt2"]), "--site", "attn.1", "--dict-size", "48"]
    argv += ["--tokens", "512", *TRAIN_ARGS, "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert str(tmp_path / "a" / "attn.1") in out  # the path cell, whole
    assert "…" not in out
    assert "sae-circuits train: warning: TrainSpec('attn.1'): the warm-up of 200 steps" in err
    assert not (tmp_path / "a" / ".checkpoint").exists()
    assert main([*argv[:-1], str(tmp_path / "b"), "--keep-checkpoint", "--json"]) == 0
    json.loads(capsys.readouterr().out)
    assert any((tmp_path / "b" / ".checkpoint").iterdir())


def _seconds(*argv: str) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "sae_circuits.cli", *argv],
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - start, done


@pytest.mark.parametrize(
    "argv, rc",
    [(["--help"], 0), (["no-such-command"], 2), ([], 0)],
)
def test_help_and_argument_errors_take_under_a_second(argv, rc):
    seconds, done = _seconds(*argv)
    assert done.returncode == rc, done.stderr
    assert "train" in done.stdout + done.stderr
    assert seconds < 1.0, f"{seconds:.2f} s"


@pytest.mark.slow
def test_demo_log_reads_whole_and_lists_every_file(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--prompts", "8"]) == 0
    out, err = capsys.readouterr()
    assert "…" not in out
    assert "== 2. Dictionary quality (set main) ==" in out
    assert "│ resid.1 │" in out and "│ mlp.1   │" in out  # site cells whole
    document = json.loads((tmp_path / "demo.json").read_text())
    files = document["files"]
    assert str(tmp_path / "demo.json") in files and len(files) == 10
    assert all(Path(f).is_file() for f in files)
    assert [line for line in err.splitlines() if line.startswith("wrote ")] == [
        f"wrote {f}" for f in files
    ]
