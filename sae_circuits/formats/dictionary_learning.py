"""dictionary_learning (Marks et al.): `ae.pt`, a state dict, and `config.json`, whose
`trainer.dict_class` names the class that wrote it.

Each class is read into the kind that computes what the library's `utils.load_dictionary` gives:

- `AutoEncoder`: `untied`. The library's loader rescales a decoder whose columns are not of unit
  norm (`normalize_decoder`), scaling the features by those norms; so does this reader.
- `AutoEncoderTopK`: `topk` (its default encode keeps the k largest; the saved `threshold` is
  only used when asked for, and is kept in the config).
- `BatchTopKSAE`, `MatryoshkaBatchTopKSAE`: `batchtopk` (encode keeps what exceeds `threshold`;
  a Matryoshka dictionary loaded whole uses all its groups).
- `JumpReluAutoEncoder`: `jumprelu`; its encoder does not subtract `b_dec`, which is folded into
  the encoder bias.
- `GatedAutoEncoder`: `gated`.

Only `torch.load(weights_only=True)` reads `ae.pt`: no pickled code runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sae_circuits.dictionary import Dictionary, DictionaryConfig, load_weights
from sae_circuits.errors import UserInputError
from sae_circuits.files import read_json
from sae_circuits.formats import Format
from sae_circuits.formats.checks import (
    check_shape,
    check_tensor_names,
    matrix_shape,
    positive_int,
    refuse_option,
    refuse_unknown_options,
)
from sae_circuits.formats.hook_names import foreign_sites, model_type_from_name
from sae_circuits.sites import Site

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"

# trainer keys that describe the dictionary or where it was trained
_DESCRIBING = (
    "dict_class", "activation_dim", "dict_size", "k", "group_sizes", "layer", "lm_name",
    "submodule_name",
)  # fmt: skip
# trainer keys that only steer training (`norm_factor`: the saved biases are already rescaled)
_TRAINING_ONLY = (
    "trainer_class", "lr", "l1_penalty", "warmup_steps", "resample_steps", "sparsity_warmup_steps",
    "steps", "decay_start", "seed", "device", "wandb_name", "auxk_alpha", "threshold_beta",
    "threshold_start_step", "top_k_aux", "group_fractions", "group_weights", "bandwidth",
    "sparsity_penalty", "target_l0", "sparsity_function", "p_start", "p_end", "anneal_start",
    "sparsity_queue_length", "n_sparsity_updates", "norm_factor",
)  # fmt: skip
# the activation buffer's settings: only `io` (the submodule's "in"put or "out"put) matters here
_BUFFER = (
    "d_submodule", "io", "n_ctxs", "ctx_len", "refresh_batch_size", "out_batch_size", "device",
)  # fmt: skip
_LINEAR = ("encoder.weight", "encoder.bias", "decoder.weight")  # nn.Linear encoder and decoder
_AUTOENCODER_TENSORS = (*_LINEAR, "bias")
_TOPK_TENSORS = (*_LINEAR, "b_dec", "k", "threshold")


def detect(directory: Path) -> bool:
    return (directory / WEIGHTS_FILE).is_file()


def read(directory: Path, site: Site | None = None) -> Dictionary:
    """A dictionary_learning dictionary as the kind that computes the library's numbers."""
    weights_path, config_path = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    state = _load_state(weights_path)
    raw = read_json(config_path) if config_path.is_file() else {}
    refuse_unknown_options(raw, ("trainer", "buffer"), config_path)
    trainer, buffer = raw.get("trainer", {}), raw.get("buffer", {})
    refuse_unknown_options(trainer, _DESCRIBING + _TRAINING_ONLY, f"{config_path} (trainer)")
    refuse_unknown_options(buffer, _BUFFER, f"{config_path} (buffer)")
    dict_class = trainer.get("dict_class")
    if dict_class is None:
        if set(state) != set(_AUTOENCODER_TENSORS):  # an AutoEncoder needs no config
            raise UserInputError(f"{config_path}: trainer.dict_class is missing")
        dict_class = "AutoEncoder"
    if dict_class not in _READERS:
        raise refuse_option(config_path, "trainer.dict_class", dict_class)
    read_class = _READERS[dict_class](state, trainer, weights_path)
    ours = read_class.tensors

    d_in, d_dict = ours["W_enc"].shape
    for name, value in (("activation_dim", d_in), ("dict_size", d_dict)):
        if trainer.get(name, value) != value:
            raise UserInputError(
                f"{config_path}: trainer.{name}={trainer[name]} but {weights_path.name} has {value}"
            )
    io = buffer.get("io", "out")
    if io not in ("in", "out"):
        raise refuse_option(config_path, "buffer.io", io)
    lm_name = trainer.get("lm_name")
    sites = foreign_sites(
        trainer.get("submodule_name"),
        model_type=model_type_from_name(lm_name),
        site=site,
        in_io="input" if io == "in" else "output",
    )
    config = DictionaryConfig(
        kind=read_class.kind,
        d_in=d_in,
        d_dict=d_dict,
        k=read_class.k,
        model=lm_name,
        hyperparameters={"source_format": "dictionary_learning", **read_class.saved, **trainer},
        **sites,
    )
    dictionary = Dictionary.from_config(config)
    load_weights(dictionary, ours, weights_path)
    return dictionary


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as error:
        raise UserInputError(f"cannot read {path} as a state dict of tensors: {error}") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise UserInputError(f"{path} is not a state dict of tensors")
    return state


class _Read(NamedTuple):
    """What one class's file becomes."""

    kind: str
    tensors: dict[str, torch.Tensor]  # our names and layout
    k: int | None = None
    saved: dict[str, Any] = {}  # settings of the file, not weights, kept in the config


def _linear_layout(
    state: dict[str, torch.Tensor], bias: str, path: Path
) -> dict[str, torch.Tensor]:
    """Our tensors from `encoder` / `decoder` `nn.Linear`s ([d_dict, d_in], [d_in, d_dict])."""
    d_dict, d_in = matrix_shape(state, "encoder.weight", path)
    return {
        "W_enc": check_shape(state, "encoder.weight", (d_dict, d_in), "[dict_size, d]", path).T,
        "b_enc": check_shape(state, "encoder.bias", (d_dict,), "[dict_size]", path),
        "W_dec": check_shape(state, "decoder.weight", (d_in, d_dict), "[d, dict_size]", path).T,
        "b_dec": check_shape(state, bias, (d_in,), "[d]", path),
    }


def _parameter_layout(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Our tensors from `W_enc` [d_in, d_dict], `b_enc`, `W_dec` [d_dict, d_in], `b_dec`."""
    d_in, d_dict = matrix_shape(state, "W_enc", path)
    return {
        "W_enc": state["W_enc"],
        "b_enc": check_shape(state, "b_enc", (d_dict,), "[dict_size]", path),
        "W_dec": check_shape(state, "W_dec", (d_dict, d_in), "[dict_size, d]", path),
        "b_dec": check_shape(state, "b_dec", (d_in,), "[d]", path),
    }


def _k(state: dict[str, torch.Tensor], trainer: dict[str, Any], path: Path) -> int:
    """k as the library's loader takes it: the config's, which must agree with the saved one."""
    saved = int(state["k"])
    k = positive_int(trainer.get("k", saved), "trainer.k", path)
    if k != saved:
        raise UserInputError(f"{path}: trainer.k={k} but the saved k is {saved}")
    return k


def _autoencoder(state: dict, trainer: dict, path: Path) -> _Read:
    check_tensor_names(state, _AUTOENCODER_TENSORS, path)
    ours = _linear_layout(state, "bias", path)
    norms = ours["W_dec"].norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms)):  # as `AutoEncoder.from_pretrained`
        ours.update(
            W_dec=ours["W_dec"] / norms[:, None],
            W_enc=ours["W_enc"] * norms,
            b_enc=ours["b_enc"] * norms,
        )
    return _Read("untied", ours)


def _topk(state: dict, trainer: dict, path: Path) -> _Read:
    check_tensor_names(state, _TOPK_TENSORS, path)
    ours = _linear_layout(state, "b_dec", path)
    return _Read("topk", ours, _k(state, trainer, path), {"threshold": float(state["threshold"])})


def _batch_topk(state: dict, trainer: dict, path: Path) -> _Read:
    check_tensor_names(state, _TOPK_TENSORS, path)
    ours = {**_linear_layout(state, "b_dec", path), "threshold": state["threshold"]}
    return _Read("batchtopk", ours, _k(state, trainer, path))


def _matryoshka(state: dict, trainer: dict, path: Path) -> _Read:
    names = ("W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes")
    check_tensor_names(state, names, path)
    ours = _parameter_layout(state, path)
    group_sizes = [int(size) for size in state["group_sizes"]]
    if sum(group_sizes) != ours["W_enc"].shape[1] or min(group_sizes) < 1:
        raise UserInputError(f"{path}: group_sizes {group_sizes} do not split the dictionary")
    ours["threshold"] = state["threshold"]
    return _Read("batchtopk", ours, _k(state, trainer, path), {"group_sizes": group_sizes})


def _jumprelu(state: dict, trainer: dict, path: Path) -> _Read:
    check_tensor_names(state, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), path)
    ours = _parameter_layout(state, path)
    threshold = check_shape(state, "threshold", ours["b_enc"].shape, "[dict_size]", path)
    if (threshold < 0).any():  # the library's ReLU after the jump differs from ours only then
        raise UserInputError(f"{path}: negative JumpReLU thresholds are not supported")
    # the library encodes x W_enc + b_enc: our (x - b_dec) W_enc + b_enc' with b_enc' folded
    ours["b_enc"] = ours["b_enc"].double() + ours["b_dec"].double() @ ours["W_enc"].double()
    return _Read("jumprelu", {**ours, "threshold": threshold})


def _gated(state: dict, trainer: dict, path: Path) -> _Read:
    names = ("encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias", "mag_bias")
    check_tensor_names(state, names, path)
    d_dict, d_in = matrix_shape(state, "encoder.weight", path)
    per_latent = {
        name: check_shape(state, name, (d_dict,), "[dict_size]", path)
        for name in ("r_mag", "gate_bias", "mag_bias")
    }
    ours = {
        "W_enc": state["encoder.weight"].T,
        "W_dec": check_shape(state, "decoder.weight", (d_in, d_dict), "[d, dict_size]", path).T,
        "b_dec": check_shape(state, "decoder_bias", (d_in,), "[d]", path),
        "b_enc": per_latent["gate_bias"],  # our gated kind's gate bias
        "b_mag": per_latent["mag_bias"],
        "r_mag": per_latent["r_mag"],
    }
    return _Read("gated", ours)


_READERS = {
    "AutoEncoder": _autoencoder,
    "AutoEncoderTopK": _topk,
    "BatchTopKSAE": _batch_topk,
    "MatryoshkaBatchTopKSAE": _matryoshka,
    "JumpReluAutoEncoder": _jumprelu,
    "GatedAutoEncoder": _gated,
}

FORMAT = Format(
    name="dictionary_learning",
    files="ae.pt + config.json",
    detect=detect,
    read=read,
    variants=", ".join(_READERS),
    refused="other dict_class values, buffer.io other than in/out, negative JumpReLU thresholds, "
    "unknown config keys",
)
