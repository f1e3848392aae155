"""circuit-tracer transcoder sets: `config.yaml` + `layer_{i}.safetensors`, one per-layer
transcoder (PLT) per file, as circuit-tracer's cache holds them (`save_transcoders_to_cache`).

A layer file holds `W_enc` [d_transcoder, d_model], `b_enc`, `W_dec` [d_transcoder, d_model],
`b_dec` [d_model], optionally `W_skip` [d_model, d_model] (added as `x W_skipᵀ`) and
`activation_function.threshold` [d_transcoder]: JumpReLU latents `z · H(z − θ)`, ReLU without it.
The input is not centred. `feature_input_hook` / `feature_output_hook` name the TransformerLens
hooks (relative to `blocks.{i}`) it reads and writes: `mlp.hook_in` / `mlp.hook_out` (the MLP
module's input and output) and the hooks `hook_names` knows.

A folder holds one transcoder per layer: `read` picks the layer of `site` (needed when there are
several), `read_transcoder_set` reads them all.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml

from sae_circuits.dictionary import Dictionary, DictionaryConfig, load_weights
from sae_circuits.errors import UserInputError
from sae_circuits.files import read_safetensors
from sae_circuits.formats import Format
from sae_circuits.formats.checks import (
    check_shape,
    check_tensor_names,
    matrix_shape,
    refuse_option,
    refuse_unknown_options,
)
from sae_circuits.formats.hook_names import model_type_from_name, site_from_hook
from sae_circuits.sites import Site, SiteMap

CONFIG_FILE = "config.yaml"
LAYER_FILE = re.compile(r"layer_(\d+)\.safetensors")
THRESHOLD = "activation_function.threshold"

# keys of a cached config.yaml that name where it came from
_BOOKKEEPING = ("model_name", "scan", "revision")
_UNDERSTOOD = ("model_kind", "feature_input_hook", "feature_output_hook", *_BOOKKEEPING)
# hooks of circuit-tracer's own wrapper around each MLP: its input and output
_MLP_HOOKS = {"mlp.hook_in": "mlp_in", "mlp.hook_out": "mlp"}


def detect(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file() and bool(_layer_files(directory))


def read(directory: Path, site: Site | None = None) -> Dictionary:
    """The transcoder of one layer: the layer of `site` (the site it reconstructs), or the only one."""
    layers = _layer_files(directory)
    if site is None:
        if len(layers) > 1:
            raise UserInputError(
                f"{directory} holds transcoders for layers {', '.join(map(str, layers))}; "
                "choose one with the site it reconstructs (--site, e.g. mlp.0)"
            )
        layer = next(iter(layers))
    else:
        layer = site.layer
        if layer not in layers:
            raise UserInputError(
                f"{directory} has no transcoder for the layer of site {site} (layers: "
                f"{', '.join(map(str, layers))})"
            )
    return _read_layer(directory, _read_config(directory), layer, layers[layer], site)


def read_transcoder_set(directory: str | Path) -> SiteMap:
    """Every layer's transcoder, keyed by the site it reconstructs."""
    directory = Path(directory)
    config, layers = _read_config(directory), _layer_files(directory)
    transcoders = [_read_layer(directory, config, i, path, None) for i, path in layers.items()]
    return SiteMap((t.config.out_site, t) for t in transcoders)


def _layer_files(directory: Path) -> dict[int, Path]:
    found = (LAYER_FILE.fullmatch(path.name) for path in directory.iterdir())
    return dict(sorted((int(m.group(1)), directory / m.group(0)) for m in found if m))


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserInputError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(config, dict):
        raise UserInputError(f"{path} is not a mapping of settings")
    if "transcoders" in config:
        raise UserInputError(
            f"{path} lists transcoder files to download (transcoders); read the folder "
            "circuit-tracer's save_transcoders_to_cache writes (layer_{i}.safetensors) instead"
        )
    refuse_unknown_options(config, _UNDERSTOOD, path)
    if config.get("model_kind") != "transcoder_set":
        raise refuse_option(path, "model_kind", config.get("model_kind"))
    for hook in ("feature_input_hook", "feature_output_hook"):
        if not isinstance(config.get(hook), str):
            raise UserInputError(f"{path} lacks {hook}")
    return config


def _hook_site(hook: str, layer: int, model_type: str | None) -> Site | None:
    if hook in _MLP_HOOKS:
        return Site(_MLP_HOOKS[hook], layer)
    return site_from_hook(f"blocks.{layer}.{hook}", model_type)


def _read_layer(
    directory: Path, config: dict[str, Any], layer: int, path: Path, site: Site | None
) -> Dictionary:
    tensors = read_safetensors(path)
    check_tensor_names(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), path, (THRESHOLD, "W_skip"))
    d_transcoder, d_model = matrix_shape(tensors, "W_enc", path)
    state = {
        "W_enc": tensors["W_enc"].T,
        "b_enc": check_shape(tensors, "b_enc", (d_transcoder,), "[d_transcoder]", path),
        "W_dec": check_shape(
            tensors, "W_dec", (d_transcoder, d_model), "[d_transcoder, d_model]", path
        ),
        "b_dec": check_shape(tensors, "b_dec", (d_model,), "[d_model]", path),
        "b_in": torch.zeros(d_model),
    }
    skip = "W_skip" in tensors
    if skip:
        state["W_skip"] = check_shape(
            tensors, "W_skip", (d_model, d_model), "[d_model, d_model]", path
        ).T
    kind = "transcoder"
    if THRESHOLD in tensors:
        kind = "jumprelu_transcoder"
        state["threshold"] = check_shape(
            tensors, THRESHOLD, (d_transcoder,), "[d_transcoder]", path
        )

    model_type = model_type_from_name(config.get("model_name"))
    in_site = _hook_site(config["feature_input_hook"], layer, model_type)
    out_site = (
        site if site is not None else _hook_site(config["feature_output_hook"], layer, model_type)
    )
    if in_site is None:
        raise UserInputError(
            f"{directory}: feature_input_hook {config['feature_input_hook']!r} names no site "
            "here, so what the transcoders read is unknown"
        )
    if out_site is None:
        raise UserInputError(
            f"{directory}: feature_output_hook {config['feature_output_hook']!r} names no site "
            "here; give the site a transcoder reconstructs (--site)"
        )
    dictionary_config = DictionaryConfig(
        kind=kind,
        d_in=d_model,
        d_dict=d_transcoder,
        in_site=in_site,
        out_site=out_site,
        model=config.get("model_name"),
        skip=skip,
        hyperparameters={"source_format": "circuit_tracer", "layer": layer, **config},
    )
    dictionary = Dictionary.from_config(dictionary_config)
    load_weights(dictionary, state, path)
    return dictionary


FORMAT = Format(
    name="circuit_tracer",
    files="config.yaml + layer_{i}.safetensors",
    detect=detect,
    read=read,
    variants="per-layer transcoders, ReLU or JumpReLU (activation_function.threshold), "
    "with or without W_skip",
    refused="cross-layer transcoders (model_kind), configs that list files to download "
    "(transcoders), unknown config keys",
)
