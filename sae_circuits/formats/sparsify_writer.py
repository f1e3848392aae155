"""Writing EleutherAI sparsify files: `<folder>/<hookpoint>/cfg.json` + `sae.safetensors`, the
layout of `SparseCoder.save_to_disk` (read back by `sae_circuits.formats.sparsify`).

sparsify stores top-k and groupmax coders: `encoder.weight` [d_sae, d_in], `encoder.bias`,
`W_dec` [d_sae, d_in], `b_dec`, and `W_skip` [d_in, d_in] with a skip connection. The hookpoint,
the folder's name, is the module path relative to the base model (`layers.3.mlp`), found from the
dictionary's site and the architecture its model's name implies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_circuits.dictionary import (
    Dictionary,
)
from sae_circuits.errors import UserInputError
from sae_circuits.files import save_safetensors_atomic, write_json_atomic
from sae_circuits.formats.hook_names import model_type_from_name, module_from_site

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def write(dictionary: Dictionary, directory: Path) -> Path:
    """Write `dictionary` under `directory/<hookpoint>/`; returns that folder. Kinds sparsify
    cannot represent (anything but top-k and groupmax coders) are refused."""
    config, kind = dictionary.config, dictionary.kind
    params = {name: t.detach().double().cpu() for name, t in dictionary.state_dict().items()}
    transcode = kind == "transcoder" and config.in_site != config.out_site
    if kind in ("topk", "groupmax"):
        bias = params["b_enc"]
    elif kind == "transcoder" and config.k:
        if config.output_dim != config.d_in:
            raise UserInputError(
                f"sparsify transcoders reconstruct d_in={config.d_in} values, this one "
                f"{config.output_dim}"
            )
        # sparsify centres an autoencoder's input by b_dec and a transcoder's not at all; ours
        # centre it by b_in: fold the difference into the encoder bias
        centre = torch.zeros_like(params["b_in"]) if transcode else params["b_dec"]
        bias = params["b_enc"] + (centre - params["b_in"]) @ params["W_enc"]
    else:
        raise UserInputError(
            f"sparsify stores top-k and groupmax coders only, not {kind} dictionaries"
            + (" without k" if kind == "transcoder" else "")
        )
    hookpoint = _hookpoint(dictionary, transcode)
    tensors = {
        "encoder.weight": params["W_enc"].T,
        "encoder.bias": bias,
        "W_dec": params["W_dec"],
        "b_dec": params["b_dec"],
    }
    if config.skip:
        tensors["W_skip"] = params["W_skip"].T
    cfg: dict[str, Any] = {
        "activation": "groupmax" if kind == "groupmax" else "topk",
        "expansion_factor": max(1, config.d_dict // config.d_in),
        "normalize_decoder": bool((params["W_dec"].norm(dim=1) - 1).abs().max() < 1e-5),
        "num_latents": config.d_dict,
        "k": config.k,
        "multi_topk": False,
        "skip_connection": bool(config.skip),
        "transcode": transcode,
        "d_in": config.d_in,
    }
    folder = directory / hookpoint
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(
        {name: t.float().contiguous() for name, t in tensors.items()}, folder / WEIGHTS_FILE
    )
    write_json_atomic(folder / CONFIG_FILE, cfg)
    return folder


def _hookpoint(dictionary: Dictionary, transcode: bool) -> str:
    """The module path sparsify hooks: the one whose output is the reconstructed site (and, for
    a transcoder, whose input is the site it reads)."""
    config = dictionary.config
    if config.out_site is None:
        raise UserInputError("the dictionary names no site: sparsify needs one for its hookpoint")
    model_type = model_type_from_name(config.model)
    hookpoint = module_from_site(config.out_site, model_type)
    if hookpoint is None:
        raise UserInputError(
            f"cannot name the sparsify hookpoint of site {config.out_site} for model "
            f"{config.model!r} (a GPT-NeoX, GPT-2 or Llama-family name is needed)"
        )
    if transcode and module_from_site(config.in_site, model_type, io="input") != hookpoint:
        raise UserInputError(
            f"a sparsify transcoder reads the input of the module whose output it reconstructs; "
            f"{config.in_site} is not the input of {hookpoint}"
        )
    return hookpoint
