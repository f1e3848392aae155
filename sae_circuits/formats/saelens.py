"""SAELens: a folder with `cfg.json` and `sae_weights.safetensors`, read and written.

SAELens stores `W_enc` [d_in, d_sae], `b_enc` [d_sae], `W_dec` [d_sae, d_out], `b_dec` [d_out],
and by architecture `threshold` (jumprelu), `b_gate`, `b_mag`, `r_mag` instead of `b_enc` (gated),
`W_skip` [d_out, d_in] (skip transcoders). Version 6 keeps the hook and model names under
`metadata` and a top-k's `k` at the top level; older files have them at the top level
(`hook_point`, `activation_fn_kwargs.k`). Everything SAELens does at run time is reproduced here or
folded into the weights so that features and reconstructions are SAELens' own:

- `apply_b_dec_to_input=false`: `b_dec @ W_enc` is added to the encoder bias (and, scaled by
  `exp(r_mag)`, to a gated SAE's magnitude bias), since our kinds subtract `b_dec` first;
- `rescale_acts_by_decoder_norm` (topk, abstopk): encoder columns and bias are multiplied by the
  decoder row norms and the decoder rows divided by them;
- JumpReLU thresholds are clamped at 0: SAELens computes `ReLU(z) · H(z − θ)`, our kinds
  `z · H(z − θ)`, which agree for θ ≥ 0;
- `normalize_activations="expected_average_only_in"` is, as in `SAE.load_from_disk`, no run-time
  transformation (the factor is not in the file);
- `normalize_activations` "constant_norm_rescale" and "layer_norm" become the dictionary's
  `normalization`, applied per token as SAELens does (the input normalised before `b_dec` is
  subtracted; an SAE's reconstruction mapped back with the input's statistics, a transcoder's
  not, its skip term reading the raw input); the writer writes it back.

Options that change the numbers in ways not reproduced (`covariance_whitening`, hook_z reshaping, head indices, fine-tuning scales, other architectures, a
model loaded with `center_writing_weights`) and unknown keys are refused by name.
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
from sae_circuits.files import (
    read_json,
    read_safetensors,
    save_safetensors_atomic,
    write_json_atomic,
)
from sae_circuits.formats import Format
from sae_circuits.formats.checks import (
    check_shape,
    check_tensor_names,
    positive_int,
    refuse_option,
    refuse_unknown_options,
)
from sae_circuits.formats.hook_names import foreign_sites, hook_from_site, model_type_from_name
from sae_circuits.sites import Site

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# the cfg layout written here: SAELens reads files without this version as older ones
FORMAT_VERSION = "6.0.0"
# metadata keys of our own, so that a file written here reads back at the sites it was saved at
IN_SITE_KEY, OUT_SITE_KEY = "sae_circuits_in_site", "sae_circuits_out_site"

# SAELens architecture -> our kind
_KINDS = {
    "standard": "untied",
    "topk": "topk",
    "abstopk": "abstopk",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "transcoder": "transcoder",
    "skip_transcoder": "transcoder",
    "jumprelu_transcoder": "jumprelu_transcoder",
    "jumprelu_skip_transcoder": "jumprelu_transcoder",
}
_TOPK = {"topk", "abstopk"}
_JUMPRELU = {"jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"}
_SKIP = {"skip_transcoder", "jumprelu_skip_transcoder"}
_TRANSCODERS = {"transcoder", *_SKIP, "jumprelu_transcoder"}
# normalize_activations -> our normalization (expected_average_only_in: no run-time
# transformation in SAE.load_from_disk)
_NORMALIZATIONS = {
    "none": "none",
    "expected_average_only_in": "none",
    "constant_norm_rescale": "constant_norm_rescale",
    "layer_norm": "layer_norm",
}

# Keys whose values are read and checked (top level; older files have the metadata ones there).
_UNDERSTOOD = {
    "architecture",
    "d_in",
    "d_sae",
    "d_out",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
    "k",
    "rescale_acts_by_decoder_norm",
    "activation_fn",
    "activation_fn_str",
    "activation_fn_kwargs",
    "finetuning_scaling_factor",
    "metadata",
    "hook_name",
    "hook_point",
    "hook_name_out",
    "hook_head_index",
    "hook_point_head_index",
    "hook_head_index_out",
    "model_name",
}
# Bookkeeping and training-only keys, ignored on purpose: they do not change what the file computes
# (of `model_from_pretrained_kwargs`, `center_writing_weights` is checked).
_IGNORED = {
    "dtype",
    "device",
    "sae_lens_version",
    "sae_lens_training_version",
    "model_class_name",
    "model_from_pretrained_kwargs",
    "hook_layer",
    "hook_point_layer",
    "hook_layer_out",
    "hf_hook_name",
    "hf_hook_name_out",
    "neuronpedia_id",
    "prepend_bos",
    "exclude_special_tokens",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "dataset_trust_remote_code",
    "is_dataset_tokenized",
    "streaming",
    "training_tokens",
    "finetuning_tokens",
    "store_batch_size_prompts",
    "train_batch_size_tokens",
    "n_batches_in_buffer",
    "use_cached_activations",
    "cached_activations_path",
    "expansion_factor",
    "b_dec_init_method",
    "lr",
    "lr_scheduler_name",
    "lr_warm_up_steps",
    "lr_end",
    "lr_decay_steps",
    "l1_coefficient",
    "l1_warm_up_steps",
    "lp_norm",
    "adam_beta1",
    "adam_beta2",
    "mse_loss_normalization",
    "scale_sparsity_penalty_by_decoder_norm",
    "normalize_sae_decoder",
    "decoder_orthogonal_init",
    "decoder_heuristic_init",
    "init_encoder_as_decoder_transpose",
    "noise_scale",
    "use_ghost_grads",
    "feature_sampling_window",
    "dead_feature_window",
    "dead_feature_threshold",
    "jumprelu_init_threshold",
    "jumprelu_bandwidth",
    "seed",
    "run_name",
    "wandb_project",
    "wandb_entity",
    "wandb_id",
    "wandb_log_frequency",
    "eval_every_n_wandb_logs",
    "log_to_wandb",
    "checkpoint_path",
    "n_checkpoints",
    "verbose",
    "autocast",
    "autocast_lm",
    "compile_llm",
    "compile_sae",
    "act_store_device",
}


def detect(directory: Path) -> bool:
    return (directory / WEIGHTS_FILE).is_file()


def read(directory: Path, site: Site | None = None) -> Dictionary:
    """A SAELens SAE or transcoder as the dictionary kind that computes its numbers."""
    cfg_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    raw = read_json(cfg_path) if cfg_path.is_file() else {}
    refuse_unknown_options(raw, _UNDERSTOOD | _IGNORED, cfg_path)
    cfg = _normalised_cfg(raw, cfg_path)
    architecture = cfg["architecture"]
    tensors = read_safetensors(weights_path)
    transcoder = architecture in _TRANSCODERS
    state, d_in, d_sae, d_out = _checked_state(tensors, architecture, cfg, weights_path)
    if architecture in _TOPK and cfg["rescale_acts_by_decoder_norm"]:
        _fold_decoder_norms(state)
    if not cfg["apply_b_dec_to_input"] and not transcoder:
        _fold_input_bias(state, architecture)
    if architecture in _JUMPRELU:
        state["threshold"] = state["threshold"].clamp(min=0)

    sites = _sites(cfg, transcoder, site, cfg_path)
    config = DictionaryConfig(
        kind=_KINDS[architecture],
        d_in=d_in,
        d_dict=d_sae,
        d_out=d_out if d_out != d_in else None,
        k=cfg["k"] if architecture in _TOPK else None,
        skip=architecture in _SKIP,
        normalization=_NORMALIZATIONS[cfg["normalize_activations"]],
        model=cfg["model_name"],
        hyperparameters={"source_format": "saelens", **raw},
        **sites,
    )
    dictionary = Dictionary.from_config(config)
    load_weights(dictionary, state, weights_path)
    return dictionary


def _sites(
    cfg: dict[str, Any], transcoder: bool, site: Site | None, source: Path
) -> dict[str, Site | str | None]:
    """`in_site` / `out_site`: ours where this module wrote the file, else from the hook names
    (with the user's `site` for the one spliced at); a transcoder needs both."""
    metadata = cfg["metadata"]
    if metadata.get(OUT_SITE_KEY) and site is None:
        return {"in_site": metadata.get(IN_SITE_KEY), "out_site": metadata[OUT_SITE_KEY]}
    sites = foreign_sites(
        cfg["hook_name"],
        cfg["hook_name_out"] if transcoder else None,
        model_type_from_name(cfg["model_name"]),
        site,
    )
    if transcoder and sites["in_site"] is None:
        raise UserInputError(
            f"{source}: the transcoder reads hook {cfg['hook_name']!r}, which holds the values "
            "of none of our sites (e.g. ln2.hook_normalized is the LayerNorm's output before its "
            "weight and bias, unlike the MLP's input)"
        )
    if transcoder and sites["out_site"] is None:
        raise UserInputError(
            f"{source}: hook_name_out {cfg['hook_name_out']!r} names no site of ours; give the "
            "site the transcoder reconstructs (--site)"
        )
    return sites


def _normalised_cfg(raw: dict[str, Any], source: Path) -> dict[str, Any]:
    """The options that matter, from a version-6 or an older cfg, after checking their values."""
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise refuse_option(source, "metadata", metadata)

    def get(key: str, *older: str) -> Any:
        for name in (key, *older):
            if metadata.get(name) is not None:
                return metadata[name]
            if raw.get(name) is not None:
                return raw[name]
        return None

    activation = raw.get("activation_fn", raw.get("activation_fn_str", "relu"))
    kwargs = raw.get("activation_fn_kwargs") or {}
    architecture = raw.get("architecture") or "standard"
    if activation == "topk" and kwargs.get("k") is not None:  # older files, as SAELens reads them
        architecture = "topk"
    elif activation != "relu":
        raise refuse_option(source, "activation_fn", activation)
    if architecture not in _KINDS:
        raise refuse_option(source, "architecture", architecture)
    if set(kwargs) - {"k"}:
        raise refuse_option(source, "activation_fn_kwargs", kwargs)
    normalisation = raw.get("normalize_activations", "none")
    if isinstance(normalisation, bool) or normalisation is None:  # older files: a flag
        normalisation = "expected_average_only_in" if normalisation else "none"
    if normalisation not in _NORMALIZATIONS:
        raise refuse_option(source, "normalize_activations", normalisation)
    hook_name = get("hook_name", "hook_point")
    reshape = raw.get("reshape_activations", "none")
    if reshape != "none" or (hook_name or "").endswith("hook_z"):
        raise refuse_option(source, "reshape_activations", "hook_z")
    for key in ("hook_head_index", "hook_point_head_index", "hook_head_index_out"):
        if get(key) is not None:
            raise refuse_option(source, key, get(key))
    if (get("model_from_pretrained_kwargs") or {}).get("center_writing_weights"):
        # TransformerLens then removes each residual's mean over dimensions: not our values
        raise refuse_option(source, "model_from_pretrained_kwargs.center_writing_weights", True)
    if raw.get("finetuning_scaling_factor"):
        raise refuse_option(source, "finetuning_scaling_factor", raw["finetuning_scaling_factor"])
    rescale = bool(raw.get("rescale_acts_by_decoder_norm", False))
    if rescale and architecture not in _TOPK:
        raise refuse_option(source, f"rescale_acts_by_decoder_norm (with {architecture})", True)
    apply_b_dec = raw.get("apply_b_dec_to_input", architecture not in _TRANSCODERS)
    if apply_b_dec and architecture in _TRANSCODERS:
        raise refuse_option(source, "apply_b_dec_to_input (of a transcoder)", True)
    k = raw.get("k", kwargs.get("k"))
    return {
        "architecture": architecture,
        "k": positive_int(k, "k", source) if architecture in _TOPK else None,
        "rescale_acts_by_decoder_norm": rescale,
        "apply_b_dec_to_input": bool(apply_b_dec),
        "normalize_activations": normalisation,
        "hook_name": hook_name,
        "hook_name_out": get("hook_name_out"),
        "model_name": get("model_name"),
        "metadata": metadata,
        "d_in": raw.get("d_in"),
        "d_sae": raw.get("d_sae"),
        "d_out": raw.get("d_out"),
    }


def _checked_state(
    tensors: dict[str, torch.Tensor], architecture: str, cfg: dict[str, Any], source: Path
) -> tuple[dict[str, torch.Tensor], int, int, int]:
    """Our state dict from SAELens' tensors, with every shape checked; and (d_in, d_sae, d_out)."""
    gated = architecture == "gated"
    names = ["W_enc", "W_dec", "b_dec", *(["b_gate", "b_mag", "r_mag"] if gated else ["b_enc"])]
    names += ["threshold"] if architecture in _JUMPRELU else []
    names += ["W_skip"] if architecture in _SKIP else []
    check_tensor_names(tensors, names, source)
    if tensors["W_enc"].dim() != 2 or tensors["W_dec"].dim() != 2:
        raise UserInputError(f"{source}: W_enc and W_dec must be matrices")
    d_in = cfg["d_in"] or tensors["W_enc"].shape[0]
    d_sae = cfg["d_sae"] or tensors["W_enc"].shape[1]
    transcoder = architecture in _TRANSCODERS
    d_out = (cfg["d_out"] or tensors["W_dec"].shape[1]) if transcoder else d_in
    shapes = {
        "W_enc": ((d_in, d_sae), "[d_in, d_sae]"),
        "W_dec": ((d_sae, d_out), "[d_sae, d_out]"),
        "b_dec": ((d_out,), "[d_out]"),
        "b_enc": ((d_sae,), "[d_sae]"),
        "b_gate": ((d_sae,), "[d_sae]"),
        "b_mag": ((d_sae,), "[d_sae]"),
        "r_mag": ((d_sae,), "[d_sae]"),
        "threshold": ((d_sae,), "[d_sae]"),
        "W_skip": ((d_out, d_in), "[d_out, d_in]"),
    }
    state = {name: check_shape(tensors, name, *shapes[name], source).double() for name in names}
    if gated:
        state["b_enc"] = state.pop("b_gate")
    if architecture in _SKIP:
        state["W_skip"] = state["W_skip"].T
    if architecture in _TRANSCODERS:
        state["b_in"] = torch.zeros(d_in, dtype=torch.float64)
    return state, d_in, d_sae, d_out


def _fold_decoder_norms(state: dict[str, torch.Tensor]) -> None:
    """`rescale_acts_by_decoder_norm`: pre-activations times ‖W_dec rows‖, decoding by unit rows."""
    norms = state["W_dec"].norm(dim=1)
    state["W_enc"] = state["W_enc"] * norms
    state["b_enc"] = state["b_enc"] * norms
    state["W_dec"] = state["W_dec"] / norms[:, None]


def _fold_input_bias(state: dict[str, torch.Tensor], architecture: str) -> None:
    """`apply_b_dec_to_input=false`: our kinds encode `x − b_dec`, so add back `b_dec W_enc`."""
    shift = state["b_dec"] @ state["W_enc"]
    state["b_enc"] = state["b_enc"] + shift
    if architecture == "gated":
        state["b_mag"] = state["b_mag"] + shift * state["r_mag"].exp()


# ------------------------------------------------------------------------------------- writer
def write(dictionary: Dictionary, directory: Path) -> Path:
    """Write `dictionary` as SAELens files that `sae_lens.SAE.load_from_disk` reads, computing the
    same features and reconstructions; kinds SAELens cannot represent are refused."""
    architecture, state, options = _saelens_form(dictionary)
    config = dictionary.config
    metadata = {
        "sae_lens_version": FORMAT_VERSION,
        "hook_name": hook_from_site(config.in_site),
        "model_name": config.model,
        IN_SITE_KEY: None if config.in_site is None else str(config.in_site),
        OUT_SITE_KEY: None if config.out_site is None else str(config.out_site),
    }
    if architecture in _TRANSCODERS:
        metadata["hook_name_out"] = hook_from_site(config.out_site)
    cfg = {
        "d_in": config.d_in,
        "d_sae": config.d_dict,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": architecture not in _TRANSCODERS,
        "normalize_activations": config.normalization,
        "reshape_activations": "none",
        "metadata": metadata,
        "architecture": architecture,
        **options,
    }
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in state.items()}
    save_safetensors_atomic(tensors, directory / WEIGHTS_FILE)
    write_json_atomic(directory / CONFIG_FILE, cfg)
    return directory


def _saelens_form(dictionary: Dictionary) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """(architecture, SAELens tensors, extra cfg options) computing what `dictionary` computes."""
    kind, config = dictionary.kind, dictionary.config
    with torch.no_grad():
        params = {name: t.detach().clone() for name, t in dictionary.state_dict().items()}
    if kind == "tied":
        W = params["W"]
        return "standard", _sae(W.T, params["b"], W, torch.zeros(config.d_in)), {}
    if kind == "untied":
        return "standard", _sae(**_untied(params)), {}
    if kind in ("topk", "abstopk"):
        return kind, _sae(**_untied(params)), {"k": config.k, "rescale_acts_by_decoder_norm": False}
    if kind == "jumprelu":
        return "jumprelu", {**_sae(**_untied(params)), "threshold": _threshold(params, kind)}, {}
    if kind == "batchtopk":
        threshold = float(params["threshold"])
        if threshold < 0:
            raise UserInputError(
                "a batchtopk dictionary without an estimated threshold cannot be saved for SAELens"
            )
        # ReLU(z) · H(ReLU(z) − t) = ReLU(z) · H(z − t) for t ≥ 0: SAELens' JumpReLU
        thresholds = torch.full((config.d_dict,), threshold)
        return "jumprelu", {**_sae(**_untied(params)), "threshold": thresholds}, {}
    if kind == "gated":
        state = _untied(params)
        gate = state.pop("b_enc")
        tensors = {**_sae(**state, b_enc=gate), "b_mag": params["b_mag"], "r_mag": params["r_mag"]}
        tensors["b_gate"] = tensors.pop("b_enc")
        return "gated", tensors, {}
    if kind in ("transcoder", "jumprelu_transcoder"):
        if config.k:
            raise UserInputError(
                "SAELens has no top-k transcoder: a transcoder with k cannot be saved"
            )
        # SAELens transcoders do not centre their input: fold b_in into the encoder bias
        b_enc = params["b_enc"] - params["b_in"] @ params["W_enc"]
        tensors = _sae(params["W_enc"], b_enc, params["W_dec"], params["b_dec"])
        name = "transcoder"
        if kind == "jumprelu_transcoder":
            tensors["threshold"] = _threshold(params, kind)
            name = "jumprelu_transcoder"
        if config.skip:
            tensors["W_skip"] = params["W_skip"].T
            name = {"transcoder": "skip_transcoder"}.get(name, "jumprelu_skip_transcoder")
        return name, tensors, {"d_out": config.output_dim}
    raise UserInputError(f"SAELens has no architecture for a {kind} dictionary")


def _untied(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: params[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}


def _sae(
    W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor
) -> dict[str, torch.Tensor]:
    return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}


def _threshold(params: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Thresholds for SAELens' `ReLU(z) · H(z − θ)`, which is our `z · H(z − θ)` only for θ ≥ 0."""
    threshold = params["threshold"]
    if (threshold < 0).any():
        raise UserInputError(
            f"this {kind} dictionary has negative thresholds, where SAELens' JumpReLU (a ReLU "
            "first) computes other features"
        )
    return threshold


FORMAT = Format(
    name="saelens",
    files="cfg.json + sae_weights.safetensors",
    detect=detect,
    read=read,
    variants=(
        "SAELens 6 and older cfg.json; standard, topk (incl. rescale_acts_by_decoder_norm), "
        "abstopk, jumprelu, gated; transcoder, skip_transcoder, jumprelu_transcoder, "
        "jumprelu_skip_transcoder; apply_b_dec_to_input false; normalize_activations none, "
        "expected_average_only_in (no run-time scaling, as SAE.load_from_disk), "
        "constant_norm_rescale and layer_norm (per token, as SAELens)"
    ),
    refused=(
        "normalize_activations covariance_whitening; "
        "hook_z reshaping; head indices; finetuning_scaling_factor; other architectures; "
        "unknown cfg keys"
    ),
)
