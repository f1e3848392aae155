"""Gemma Scope (Lieberum et al. 2024): `params.npz`, numpy arrays of a JumpReLU SAE or transcoder.

`W_enc` [d_in, d_sae], `b_enc` [d_sae], `W_dec` [d_sae, d_out], `b_dec` [d_out], `threshold`
[d_sae]; `f = ReLU(z) · H(z − θ)` with `z = x W_enc + b_enc` (the input is not centred: `b_dec` is
folded into the encoder bias of our `jumprelu` kind), `x_hat = f W_dec + b_dec`.

The file names no site: it comes from the path, as Gemma Scope's repositories lay them out
(`gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82/params.npz`). `-res` SAEs read the
residual stream after block L (`resid.L`); `-mlp` SAEs and the outputs of `-transcoders` are
TransformerLens' `hook_mlp_out`, which on Gemma 2 is the output of the block's
`post_feedforward_layernorm`; transcoders read the MLP's input (`mlp_in.L`). `-att` SAEs read
`hook_z`, which no site holds (they load without one, and refuse `--site`). Where the path does not tell, the file is read as an SAE whose site
is unknown (`--site`).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from sae_circuits.dictionary import Dictionary, DictionaryConfig, load_weights
from sae_circuits.errors import UserInputError
from sae_circuits.formats import Format
from sae_circuits.formats.checks import check_shape, check_tensor_names, matrix_shape
from sae_circuits.sites import Site

PARAMS_FILE = "params.npz"
_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
_RELEASE = re.compile(r"gemma-scope-[\w.-]*?-(res|mlp|att|transcoders)(?:-|$)")
_LAYER = re.compile(r"layer_(\d+)")


def detect(directory: Path) -> bool:
    return (directory / PARAMS_FILE).is_file()


def read(directory: Path, site: Site | None = None) -> Dictionary:
    """A Gemma Scope JumpReLU SAE (`jumprelu`) or transcoder (`jumprelu_transcoder`)."""
    path = directory / PARAMS_FILE
    tensors = _load_npz(path)
    check_tensor_names(tensors, _TENSORS, path)
    d_in, d_sae = matrix_shape(tensors, "W_enc", path)
    d_out = matrix_shape(tensors, "W_dec", path)[1]
    state = {
        "W_enc": tensors["W_enc"],
        "b_enc": check_shape(tensors, "b_enc", (d_sae,), "[d_sae]", path),
        "W_dec": check_shape(tensors, "W_dec", (d_sae, d_out), "[d_sae, d_out]", path),
        "b_dec": check_shape(tensors, "b_dec", (d_out,), "[d_out]", path),
        "threshold": check_shape(tensors, "threshold", (d_sae,), "[d_sae]", path),
    }
    if (state["threshold"] < 0).any():  # ReLU(z) · H(z − θ) is our z · H(z − θ) only for θ >= 0
        raise UserInputError(f"{path}: negative JumpReLU thresholds are not supported")

    release, layer = _release_and_layer(directory)
    if release == "att" and site is not None:
        raise UserInputError(
            f"{path}: an -att SAE reads hook_z (the heads' outputs before the output projection), "
            "which no site holds; it loads without a site only"
        )
    hyperparameters = {"source_format": "gemma_scope", "release": release, "layer": layer}
    if release == "transcoders":
        in_site, out_site = Site("mlp_in", layer), site or _mlp_out(layer)
        state["b_in"] = torch.zeros(d_in)
        kind = "jumprelu_transcoder"
    else:
        if d_in != d_out:
            raise UserInputError(f"{path}: an SAE with d_in {d_in} != d_out {d_out}")
        in_site = out_site = site or _sae_site(release, layer)
        # x W_enc + b_enc = (x − b_dec) W_enc + (b_enc + b_dec W_enc)
        state["b_enc"] = state["b_enc"].double() + state["b_dec"].double() @ state["W_enc"].double()
        kind = "jumprelu"
    config = DictionaryConfig(
        kind=kind,
        d_in=d_in,
        d_dict=d_sae,
        d_out=d_out if d_out != d_in else None,
        in_site=in_site,
        out_site=out_site,
        hyperparameters=hyperparameters,
    )
    dictionary = Dictionary.from_config(config)
    load_weights(dictionary, state, path)
    return dictionary


def _load_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {name: torch.from_numpy(np.asarray(arrays[name], np.float32)) for name in arrays}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise UserInputError(f"cannot read {path} as numpy arrays: {error}") from None


def _release_and_layer(directory: Path) -> tuple[str | None, int | None]:
    """The kind of release (res, mlp, att, transcoders) and the layer the path names, or None."""
    parts = directory.resolve().parts
    release = next((m.group(1) for p in reversed(parts) if (m := _RELEASE.search(p))), None)
    layer = next((int(m.group(1)) for p in reversed(parts) if (m := _LAYER.fullmatch(p))), None)
    if layer is None:
        return release if release != "transcoders" else None, None
    return release, layer


def _mlp_out(layer: int) -> Site:
    return Site("module", path=f"model.layers.{layer}.post_feedforward_layernorm")


def _sae_site(release: str | None, layer: int | None) -> Site | None:
    if layer is None:
        return None
    return {"res": Site("resid", layer), "mlp": _mlp_out(layer)}.get(release)


FORMAT = Format(
    name="gemma_scope",
    files="params.npz (site from the path: gemma-scope-*-{res,mlp,transcoders}/layer_L/...)",
    detect=detect,
    read=read,
    variants="JumpReLU SAEs (res, mlp; att without a site), JumpReLU transcoders",
    refused="negative thresholds, arrays other than W_enc, b_enc, W_dec, b_dec, threshold",
)
