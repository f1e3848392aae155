"""EleutherAI sparsify: a folder named after its hookpoint (a module path such as `layers.3.mlp`)
holding `cfg.json` and `sae.safetensors`.

The tensors are `encoder.weight` [d_sae, d_in], `encoder.bias` [d_sae], `W_dec` [d_sae, d_in],
`b_dec` [d_in] and, with `skip_connection`, `W_skip` [d_in, d_in] (added as `x W_skipᵀ`). An
autoencoder subtracts `b_dec` from its input; a transcoder (`transcode`) does not, and
reconstructs the hookpoint module's output from its input. Activation `topk` keeps the k largest
ReLU pre-activations, `groupmax` the largest of each of k equal, contiguous groups of latents.

Files written before `transcode` was saved (e.g. EleutherAI's skip transcoders) have a skip
connection and no `transcode`: sparsify computes them as autoencoders (centring by `b_dec`), and
this reader too, but splices them as the transcoders they are (reading the hookpoint's input).
Older files' `signed` is read only when false.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_circuits.dictionary import (
    Dictionary,
    DictionaryConfig,
    load_weights,
)
from sae_circuits.errors import UserInputError
from sae_circuits.files import read_json, read_safetensors
from sae_circuits.formats import Format
from sae_circuits.formats.checks import (
    check_shape,
    check_tensor_names,
    positive_int,
    refuse_option,
    refuse_unknown_options,
)
from sae_circuits.formats.hook_names import foreign_sites
from sae_circuits.sites import Site

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"

# sparsify's `SparseCoderConfig` defaults, for keys a cfg.json leaves out
_DEFAULTS: dict[str, Any] = {
    "activation": "topk",
    "expansion_factor": 32,
    "num_latents": 0,
    "k": 32,
    "skip_connection": False,
    "transcode": False,
}
# keys that only steer training, so that what is read computes the same numbers whatever they say
_TRAINING_ONLY = ("normalize_decoder", "multi_topk")
# keys of older versions, read only when false (what is computed without them)
_OLDER_FALSE_ONLY = ("signed",)
_UNDERSTOOD = ("d_in", *_DEFAULTS, *_TRAINING_ONLY, *_OLDER_FALSE_ONLY)
_ACTIVATIONS = {"topk": "topk", "groupmax": "groupmax"}  # sparsify's activation -> our kind


def detect(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()


def read(directory: Path, site: Site | None = None) -> Dictionary:
    """A sparsify sparse coder as a `topk`, `groupmax` or `transcoder` dictionary."""
    cfg_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    raw = read_json(cfg_path)
    refuse_unknown_options(raw, _UNDERSTOOD, cfg_path)
    cfg = {**_DEFAULTS, **raw}
    for name in _OLDER_FALSE_ONLY:
        if cfg.get(name, False) is not False:
            raise refuse_option(cfg_path, name, cfg[name])
    d_in = positive_int(cfg.get("d_in"), "d_in", cfg_path)
    k = positive_int(cfg["k"], "k", cfg_path)
    if cfg["activation"] not in _ACTIVATIONS:
        raise refuse_option(cfg_path, "activation", cfg["activation"])
    transcode, skip = bool(cfg["transcode"]), bool(cfg["skip_connection"])
    # files from before `transcode` was saved: a skip connection was a skip transcoder's, which
    # centred its input by b_dec (as sparsify still computes them)
    reads_input = bool(raw.get("transcode", skip))
    if cfg["activation"] == "groupmax" and (transcode or skip):
        raise UserInputError(
            f"{cfg_path}: activation=groupmax with transcode or skip_connection is not supported"
        )

    tensors = read_safetensors(weights_path)
    skip_names = ("W_skip",) if skip else ()
    check_tensor_names(
        tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec", *skip_names), weights_path
    )
    d_sae = cfg["num_latents"] or d_in * positive_int(
        cfg["expansion_factor"], "expansion_factor", cfg_path
    )
    encoder = check_shape(tensors, "encoder.weight", (d_sae, d_in), "[d_sae, d_in]", weights_path)
    state = {
        "W_enc": encoder.T,
        "b_enc": check_shape(tensors, "encoder.bias", (d_sae,), "[d_sae]", weights_path),
        "W_dec": check_shape(tensors, "W_dec", (d_sae, d_in), "[d_sae, d_in]", weights_path),
        "b_dec": check_shape(tensors, "b_dec", (d_in,), "[d_in]", weights_path),
    }
    if k > d_sae:
        raise UserInputError(f"{cfg_path}: k={k} exceeds the number of latents ({d_sae})")

    hookpoint = directory.name
    hyperparameters = {"source_format": "sparsify", "hookpoint": hookpoint, **raw}
    if transcode or skip:
        # sparsify centres the input by b_dec unless `transcode`
        state["b_in"] = torch.zeros(d_in) if transcode else state["b_dec"]
        if skip:
            state["W_skip"] = check_shape(
                tensors, "W_skip", (d_in, d_in), "[d_in, d_in]", weights_path
            ).T
        sites = foreign_sites(
            hookpoint,
            hookpoint if reads_input else None,
            site=site,
            in_io="input" if reads_input else "output",
        )
        _require_sites(sites, hookpoint, directory, reads_input)
        config = DictionaryConfig(
            kind="transcoder",
            d_in=d_in,
            d_dict=d_sae,
            k=k,
            skip=skip,
            hyperparameters=hyperparameters,
            **sites,
        )
    else:
        config = DictionaryConfig(
            kind=_ACTIVATIONS[cfg["activation"]],
            d_in=d_in,
            d_dict=d_sae,
            k=k,
            hyperparameters=hyperparameters,
            **foreign_sites(hookpoint, site=site),
        )
    dictionary = Dictionary.from_config(config)
    load_weights(dictionary, state, weights_path)
    return dictionary


def _require_sites(
    sites: dict[str, Site | None], hookpoint: str, directory: Path, reads_input: bool
) -> None:
    """Our transcoder kind needs both sites (an autoencoder with a skip connection is one)."""
    if reads_input and sites["in_site"] is None:
        raise UserInputError(
            f"{directory}: a transcoder reads the input of its hookpoint, and {hookpoint!r} names "
            "no module whose input is a site here; name the folder by the module path it hooks "
            "(e.g. layers.3.mlp)"
        )
    if sites["out_site"] is None:
        raise UserInputError(
            f"{directory}: hookpoint {hookpoint!r} names no known site; give the site it "
            "reconstructs (--site)"
        )


FORMAT = Format(
    name="sparsify",
    files="cfg.json + sae.safetensors (folder named by hookpoint)",
    detect=detect,
    read=read,
    variants="topk, groupmax; transcoders (transcode), skip connections (skip_connection)",
    refused="groupmax with transcode or skip_connection; other activations; unknown cfg keys",
)
