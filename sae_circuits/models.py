"""Load language models as nnsight `TransformersModel`s: the embedded model, a local folder or a hub name."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from nnsight.modeling.transformers import TransformersModel
from transformers.utils import logging as hf_logging

from sae_circuits.errors import UserInputError
from sae_circuits.protocols import Model
from sae_circuits.resources import asset_dir

EMBEDDED_MODEL_NAME = "neox-ioi-6l"


def embedded_model_path() -> Path:
    """The folder of the small GPT-NeoX model shipped with the package."""
    return asset_dir("models") / EMBEDDED_MODEL_NAME


def is_embedded(model: Model) -> bool:
    """Whether `model` was loaded from the shipped embedded model's folder."""
    name = getattr(model.config, "_name_or_path", "")
    return bool(name) and Path(name).resolve() == embedded_model_path().resolve()


AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def checked_device(device: str | torch.device) -> torch.device:
    """`device` as a torch device, or a UserInputError for a name torch does not know or a GPU
    this machine does not have."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise UserInputError(f"unknown device {device!r}: {error}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"device {device}: no CUDA GPU is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserInputError(
                f"device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(f"device {device}: MPS is not available on this machine")
    return device


def load_model(
    name_or_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    autocast: torch.dtype | None = None,
) -> TransformersModel:
    """An nnsight model with real weights, in eval mode with frozen parameters.

    `name_or_path` is a local Hugging Face folder or a hub name (needs a machine that reaches the
    hub); None loads the embedded model. Gradients for attribution flow through spliced dictionary
    features, so the model's own parameters need none. `dtype` is the weights' storage type;
    `autocast` (torch.bfloat16 or torch.float16) runs every forward of the model, and of the
    dictionaries spliced into it, under `torch.autocast` in that precision, the weights staying
    in `dtype`.
    """
    device = checked_device(device)
    if autocast is not None and autocast not in AUTOCAST_DTYPES.values():
        raise UserInputError(f"autocast is for {' or '.join(AUTOCAST_DTYPES)}, not {autocast}")
    source = embedded_model_path() if name_or_path is None else name_or_path
    local = Path(source).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise UserInputError(f"{local} is not a Hugging Face model folder (no config.json)")
    location = str(local) if local.exists() else str(source)
    hf_logging.disable_progress_bar()  # keep stderr to our own progress and errors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = TransformersModel(
                location,
                task="text-generation",
                dispatch=True,
                dtype=dtype,
            )
        except (OSError, ValueError) as error:
            raise UserInputError(
                f"cannot load model {location!r}: not a local model folder, and the hub could "
                f"not provide it ({str(error).splitlines()[0]})"
            ) from None
    model._module.to(device)
    model._module.requires_grad_(False)
    model._module.eval()
    if autocast is not None:  # an instance attribute: what nn.Module.__call__ runs
        model._module.forward = torch.autocast(device.type, autocast)(model._module.forward)
    tokenizer = model.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model


def model_name(model: Model) -> str:
    """A short name for configs and reports: the folder name or the hub id."""
    name = getattr(model.config, "_name_or_path", "") or "model"
    return Path(name).name if Path(name).exists() else name
