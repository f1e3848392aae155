"""Write the circuit-tracer and Gemma Scope fixtures of `tests/fixtures/`.

circuit-tracer pins a transformers older than ours, so this runs once, in the venv of
`make_dictionary_learning_fixtures.py` with circuit-tracer added without its dependencies (only its
transcoder modules are used):

    /work/venv-dl/bin/pip install --no-deps circuit-tracer==0.5.0
    /work/venv-dl/bin/python scripts/make_circuit_tracer_fixtures.py

`circuit_tracer/<variant>/` is a transcoder set as circuit-tracer's cache holds one
(`config.yaml` + `layer_{i}.safetensors`, written by `TranscoderSet.to_safetensors`), with random
weights; `gemma_scope/params.npz` is a Gemma Scope JumpReLU file (numpy arrays). Beside each,
`expected.safetensors` holds fixed inputs and the library's own numbers on them, from the files
loaded back by circuit-tracer's loaders (`load_transcoders_from_cache`,
`load_gemma_scope_transcoder`): `x.{layer}`, `features.{layer}` (encode) and `x_hat.{layer}`
(decode of those features, with the skip connection).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import torch
import yaml
from safetensors.torch import save_file

# circuit-tracer 0.5 imports a constant that huggingface_hub 1.x dropped; only its download code
# (unused here) reads it
huggingface_hub.constants.HF_HUB_ENABLE_HF_TRANSFER = False

from circuit_tracer.transcoder.activation_functions import JumpReLU  # noqa: E402
from circuit_tracer.transcoder.single_layer_transcoder import (  # noqa: E402
    SingleLayerTranscoder,
    TranscoderSet,
    load_gemma_scope_transcoder,
)
from circuit_tracer.utils.caching import load_transcoders_from_cache  # noqa: E402

D_MODEL, D_TRANSCODER, N_LAYERS, N_INPUTS, SEED = 16, 32, 2, 24, 0
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
MODEL_NAME = "meta-llama/Llama-3.2-1B"
VARIANTS = {
    "relu_skip": {"jumprelu": False, "skip": True, "output_hook": "mlp.hook_out"},
    "jumprelu": {"jumprelu": True, "skip": False, "output_hook": "hook_mlp_out"},
}


def random_transcoder(layer: int, jumprelu: bool, skip: bool, g: torch.Generator):
    activation = JumpReLU(torch.rand(D_TRANSCODER, generator=g) * 0.5 + 0.05, 0.1)
    transcoder = SingleLayerTranscoder(
        D_MODEL,
        D_TRANSCODER,
        activation if jumprelu else torch.relu,
        layer,
        skip_connection=skip,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    with torch.no_grad():
        for name, parameter in transcoder.named_parameters():
            if not name.startswith("activation_function"):
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.5)
    return transcoder


def expected_numbers(transcoders, g: torch.Generator) -> dict[str, torch.Tensor]:
    numbers = {}
    for layer, transcoder in enumerate(transcoders):
        x = torch.randn(N_INPUTS, D_MODEL, generator=g)
        with torch.no_grad():
            features = transcoder.encode(x)
            x_hat = transcoder.decode(features, x)
        assert (features > 0).any(), "no feature fires on the fixed input"
        numbers.update({f"x.{layer}": x, f"features.{layer}": features, f"x_hat.{layer}": x_hat})
    return {name: t.contiguous() for name, t in numbers.items()}


def write_transcoder_set(name: str, jumprelu: bool, skip: bool, output_hook: str, g) -> None:
    folder = FIXTURES / "circuit_tracer" / name
    if folder.exists():
        shutil.rmtree(folder)
    transcoders = {i: random_transcoder(i, jumprelu, skip, g) for i in range(N_LAYERS)}
    TranscoderSet(transcoders, "mlp.hook_in", output_hook).to_safetensors(str(folder))
    config = {
        "model_name": MODEL_NAME,
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": output_hook,
        "scan": f"fixtures/{name}",
    }
    (folder / "config.yaml").write_text(yaml.dump(config))  # as save_transcoders_to_cache
    loaded, _ = load_transcoders_from_cache(
        name, cache_dir=folder.parent, lazy_encoder=False, lazy_decoder=False
    )
    save_file(expected_numbers(loaded, g), str(folder / "expected.safetensors"))
    print(f"circuit_tracer/{name}: {N_LAYERS} layers")


def write_gemma_scope(g: torch.Generator) -> None:
    folder = FIXTURES / "gemma_scope"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    def randn(*shape: int) -> np.ndarray:
        return (torch.randn(shape, generator=g) * 0.5).numpy()

    params = {
        "W_enc": randn(D_MODEL, D_TRANSCODER),
        "b_enc": randn(D_TRANSCODER),
        "W_dec": randn(D_TRANSCODER, D_MODEL),
        "b_dec": randn(D_MODEL),
        "threshold": (torch.rand(D_TRANSCODER, generator=g) * 0.5 + 0.05).numpy(),
    }
    np.savez(folder / "params.npz", **params)
    loaded = load_gemma_scope_transcoder(str(folder / "params.npz"), 0, torch.device("cpu"))
    numbers = expected_numbers([loaded], g)
    save_file(
        {name.removesuffix(".0"): t for name, t in numbers.items()},
        str(folder / "expected.safetensors"),
    )
    print("gemma_scope: params.npz")


def main() -> None:
    g = torch.Generator().manual_seed(SEED)
    for name, options in VARIANTS.items():
        write_transcoder_set(name, g=g, **options)
    write_gemma_scope(g)


if __name__ == "__main__":
    main()
