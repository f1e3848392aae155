"""Write the dictionary_learning fixtures of `tests/fixtures/dictionary_learning/`.

dictionary_learning pins an nnsight older than ours, so this runs once, in a venv of its own:

    python -m venv /work/venv-dl
    /work/venv-dl/bin/pip install torch==2.13.0 dictionary-learning==0.1.0
    /work/venv-dl/bin/pip uninstall -y torchvision   # its wheel does not match torch 2.13
    /work/venv-dl/bin/python scripts/make_dictionary_learning_fixtures.py

For each dictionary class, the library's `trainSAE` writes `config.json` and `ae.pt` (with 0 steps:
the initial weights); the weights are then made random (biases, thresholds and decoder norms
included, so that every term of encode/decode matters) and saved again as `trainSAE` saves them.
`expected.safetensors` holds a fixed input `x` and the library's own numbers on it, from the
folder loaded by the library's `utils.load_dictionary`: `features` (encode) and `x_hat` (decode
of those features). The tests compare our reader with these without the library.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder
from dictionary_learning.trainers import (
    BatchTopKTrainer,
    GatedSAETrainer,
    JumpReluTrainer,
    StandardTrainer,
    TopKTrainer,
)
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
from dictionary_learning.trainers.matryoshka_batch_top_k import (
    MatryoshkaBatchTopKSAE,
    MatryoshkaBatchTopKTrainer,
)
from dictionary_learning.trainers.top_k import AutoEncoderTopK
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary
from safetensors.torch import save_file

D_IN, D_DICT, K, N_INPUTS, SEED = 16, 32, 4, 24, 0
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "dictionary_learning"

COMMON = {
    "steps": 10,  # the schedules need steps > warmup; trainSAE itself runs 0
    "warmup_steps": 1,
    "activation_dim": D_IN,
    "dict_size": D_DICT,
    "layer": 1,
    "lm_name": "EleutherAI/pythia-70m-deduped",
    "submodule_name": "resid_post_layer_1",
    "device": "cpu",
    "seed": SEED,
}
SPARSITY_WARMUP = {"sparsity_warmup_steps": 1}
CLASSES = {
    AutoEncoder: {"trainer": StandardTrainer, "dict_class": AutoEncoder, **SPARSITY_WARMUP},
    AutoEncoderTopK: {"trainer": TopKTrainer, "dict_class": AutoEncoderTopK, "k": K},
    BatchTopKSAE: {"trainer": BatchTopKTrainer, "dict_class": BatchTopKSAE, "k": K},
    MatryoshkaBatchTopKSAE: {
        "trainer": MatryoshkaBatchTopKTrainer,
        "dict_class": MatryoshkaBatchTopKSAE,
        "k": K,
        "group_fractions": [0.25, 0.75],
    },
    JumpReluAutoEncoder: {
        "trainer": JumpReluTrainer,
        "dict_class": JumpReluAutoEncoder,
        **SPARSITY_WARMUP,
    },
    GatedAutoEncoder: {
        "trainer": GatedSAETrainer,
        "dict_class": GatedAutoEncoder,
        **SPARSITY_WARMUP,
    },
}


def randomize(
    state: dict[str, torch.Tensor], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random values for every floating-point tensor; thresholds positive (as trained ones are),
    decoders of non-unit norm; integer buffers (`k`, `group_sizes`) kept."""
    out = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor
        elif name == "threshold":
            out[name] = torch.rand(tensor.shape, generator=generator) * 0.5 + 0.05
        else:
            out[name] = torch.randn(tensor.shape, generator=generator) * 0.5
    return out


def write(cls: type, options: dict, generator: torch.Generator) -> None:
    folder = OUT / cls.__name__
    with tempfile.TemporaryDirectory() as tmp:
        trainSAE(
            data=iter([torch.zeros(2, D_IN)]),
            trainer_configs=[{**COMMON, **options}],
            steps=0,
            save_dir=tmp,
            device="cpu",
        )
        written = Path(tmp) / "trainer_0"
        state = torch.load(written / "ae.pt", weights_only=True)
        torch.save(randomize(state, generator), written / "ae.pt")  # as trainSAE saves it
        dictionary, _ = load_dictionary(str(written), device="cpu")
        x = torch.randn(N_INPUTS, D_IN, generator=generator)
        with torch.no_grad():
            features = dictionary.encode(x)
            x_hat = dictionary.decode(features)
        if not (features > 0).any():
            sys.exit(f"{cls.__name__}: no feature fires on the fixed input")
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for name in ("ae.pt", "config.json"):
            shutil.copy(written / name, folder / name)
        save_file(
            {"x": x, "features": features.contiguous(), "x_hat": x_hat.contiguous()},
            str(folder / "expected.safetensors"),
        )
    config = json.loads((folder / "config.json").read_text())
    print(f"{cls.__name__}: {config['trainer']['trainer_class']}, {len(features)} inputs")


def main() -> None:
    generator = torch.Generator().manual_seed(SEED)
    for cls, options in CLASSES.items():
        write(cls, options, generator)


if __name__ == "__main__":
    main()
