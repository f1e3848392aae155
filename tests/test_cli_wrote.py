"""Every file or folder a command writes gets a `wrote PATH` line on stderr."""

from __future__ import annotations

import json

from sae_circuits.cli import main


def _wrote(err: str) -> set[str]:
    return {line.removeprefix("wrote ") for line in err.splitlines() if line.startswith("wrote ")}


def test_train_names_every_dictionary_folder(model_dirs, tmp_path, capsys) -> None:
    argv = ["train", "--model", str(model_dirs["gpt2"]), "--site", "attn.1", "--site", "mlp.0"]
    argv += ["--dict-size", "16", "--dict-size", "24", "--tokens", "256", "--ctx-len", "32"]
    argv += ["--n-ctxs", "16", "--batch-size", "128", "--eval-tokens", "256", "--warmup-steps", "1"]
    assert main([*argv, "--out", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert len(rows) == 4
    assert _wrote(captured.err) == {row["path"] for row in rows}


def test_explain_names_every_cache_file(tmp_path, capsys) -> None:
    argv = ["explain", "resid.2", "--features", "2", "--tokens", "4096", "--top-contexts", "6"]
    assert main([*argv, "--random-contexts", "6", "--out", str(tmp_path)]) == 0
    written = {str(path) for path in tmp_path.rglob("*.json")}
    assert len(written) == 2
    assert _wrote(capsys.readouterr().err) == written
