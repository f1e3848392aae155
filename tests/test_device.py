"""--device and --dtype: a clear error without CUDA, autocast for model and dictionaries with
float32 weights; the GPU paths themselves run only where a GPU is present."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from sae_circuits import attach, load_model
from sae_circuits.cli import main
from sae_circuits.errors import UserInputError
from sae_circuits.models import checked_device
from sae_circuits.training import TrainSpec, train_dictionaries

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _batches(steps: int = 12, d: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(32, d, generator=generator)
    for _ in range(steps):
        active = torch.rand(128, 32, generator=generator) < 0.1
        yield {"x": (active * torch.rand(128, 32, generator=generator)) @ features}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_user_error(model_dirs, tmp_path, capsys) -> None:
    with pytest.raises(UserInputError, match="no CUDA GPU"):
        checked_device("cuda")
    model = ["--model", str(model_dirs["gpt_neox"]), "--device", "cuda"]
    for argv in (
        ["eval", *model, "--dictionaries", "main"],
        ["train", *model, "--site", "resid.0", "--out", str(tmp_path)],
        ["harvest", *model, "--site", "resid.0", "--tokens", "8", "--out", str(tmp_path)],
    ):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2
        assert "argument --device: device cuda: no CUDA GPU" in capsys.readouterr().err


def test_unknown_device_is_a_user_error() -> None:
    with pytest.raises(UserInputError, match="unknown device"):
        checked_device("gpu0")


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2", "llama"])
def test_autocast_model_runs_spliced_float32_dictionaries(model_dirs, arch) -> None:
    """bfloat16 autocast: the weights stay float32, a float32 dictionary spliced in runs, and the
    logits are within bfloat16 rounding of the float32 model's."""
    from conftest import random_untied

    ids = torch.tensor([[1, 5, 9, 22, 7, 3]])
    reference, fast = (
        load_model(model_dirs[arch]),
        load_model(model_dirs[arch], autocast=torch.bfloat16),
    )
    logits = {}
    for name, model in (("fp32", reference), ("bf16", fast)):
        attach(model, {"resid.0": random_untied(32, 64, site="resid.0")})
        with model.trace(ids):
            out = model.output.logits.save()
        logits[name] = out
    assert logits["bf16"].dtype == torch.bfloat16 and logits["fp32"].dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in fast.parameters())
    scale = logits["fp32"].abs().max()
    assert (logits["bf16"].float() - logits["fp32"]).abs().max() <= 0.05 * scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_keeps_float32_master_weights(dtype) -> None:
    """Dictionaries trained under autocast: float32 weights, within low-precision rounding of
    float32 training (float16: a gradient scaler, which may skip the first steps)."""
    spec = TrainSpec("x", d_dict=48, l1=1e-3, warmup_steps=2)
    run = dict(steps=12, progress=False)
    (plain,) = train_dictionaries(_batches(), [spec], **run)
    (mixed,) = train_dictionaries(_batches(), [spec], autocast=dtype, **run)
    scale = max(value.abs().max() for value in plain.state_dict().values())
    for name, value in plain.state_dict().items():
        assert mixed.state_dict()[name].dtype == torch.float32
        assert (mixed.state_dict()[name] - value).abs().max() <= 0.05 * scale, name
    assert mixed.config.metrics["train_mse"] == pytest.approx(
        plain.config.metrics["train_mse"], rel=0.1
    )


def test_train_cli_takes_dtype(model_dirs, tmp_path, capsys) -> None:
    argv = ["train", "--model", str(model_dirs["gpt_neox"]), "--site", "resid.0", "--dtype",
            "bfloat16", "--tokens", "512", "--batch-size", "64", "--ctx-len", "16", "--n-ctxs",
            "16", "--dict-size", "32", "--eval-tokens", "128", "--out", str(tmp_path), "--json"]  # fmt: skip
    assert main(argv) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["dict_size"] == 32 and row["fve"] == row["fve"]  # a number, not nan


@needs_cuda
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_training_on_cuda_matches_cpu(dtype) -> None:
    spec = TrainSpec("x", d_dict=48, l1=1e-3, warmup_steps=2)
    run = dict(steps=12, progress=False)
    (cpu,) = train_dictionaries(_batches(), [spec], **run)
    (gpu,) = train_dictionaries(_batches(), [spec], device="cuda", autocast=dtype, **run)
    tolerance = 1e-3 if dtype is None else 0.05
    for name, value in cpu.state_dict().items():
        assert gpu.state_dict()[name].is_cuda
        assert (gpu.state_dict()[name].cpu() - value).abs().max() <= tolerance * value.abs().max()


@needs_cuda
def test_train_cli_on_cuda(model_dirs, tmp_path, capsys) -> None:
    argv = ["train", "--model", str(model_dirs["gpt_neox"]), "--site", "resid.0", "--device",
            "cuda", "--dtype", "bfloat16", "--tokens", "512", "--batch-size", "64", "--ctx-len",
            "16", "--n-ctxs", "16", "--dict-size", "32", "--eval-tokens", "128", "--out",
            str(tmp_path), "--json"]  # fmt: skip
    assert main(argv) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["dict_size"] == 32


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_train_with_nccl(tmp_path) -> None:
    import subprocess

    from sae_circuits.testing import save_random_model

    model = save_random_model(tmp_path / "model", "gpt_neox")
    argv = ["train", "--model", str(model), "--site", "resid.0", "--device", "cuda",
            "--tokens", "1024", "--batch-size", "64", "--ctx-len", "16", "--n-ctxs", "16",
            "--dict-size", "32", "--eval-tokens", "128", "--out", str(tmp_path / "out")]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--no-python", "sae-circuits", *argv]  # fmt: skip
    subprocess.run(command, check=True, timeout=600)
    assert (tmp_path / "out" / "resid.0" / "config.json").is_file()
