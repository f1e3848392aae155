"""Sparse dictionaries (SAEs) and baseline bases behind one interface, with save/load.

Every dictionary maps an activation `x` (last dimension `d_in`) to features `f` (last dimension
`d_dict`) and back: `encode(x) -> f`, `decode(f) -> x_hat`, `forward(x) -> (x_hat, f)`. Row `i` of
`decoder_directions` is the direction `d_i` that feature `i` writes (the patching formula uses it).

On disk a dictionary is a folder with `config.json` and `weights.safetensors`. `Dictionary.load`
also reads two published formats: `ae.pt` + `config.json` (a state dict with `encoder.weight`,
`encoder.bias`, `decoder.weight`, `bias`) and `cfg.json` + `sae_weights.safetensors`
(`W_enc`, `b_enc`, `W_dec`, `b_dec`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sae_circuits.errors import UserInputError
from sae_circuits.resources import asset_dir

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


@dataclass
class DictionaryConfig:
    """What a dictionary is and where it came from; saved as `config.json`."""

    kind: str
    d_in: int
    d_dict: int
    site: str | None = None
    model: str | None = None
    d_out: int | None = None  # transcoders reconstruct another site, possibly of another width
    out_site: str | None = None
    k: int | None = None  # top-k dictionaries
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def output_dim(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DictionaryConfig:
        known = {name for name in cls.__dataclass_fields__}
        missing = {"kind", "d_in", "d_dict"} - set(data)
        if missing:
            raise UserInputError(f"dictionary config lacks {', '.join(sorted(missing))}")
        return cls(**{key: value for key, value in data.items() if key in known})


class Dictionary(nn.Module):
    """Base class: subclasses set `kind`, create their parameters and implement encode/decode."""

    kind: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Dictionary]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Dictionary.registry[cls.kind] = cls

    def __init__(self, config: DictionaryConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def d_dict(self) -> int:
        return self.config.d_dict

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def decoder_directions(self) -> torch.Tensor:
        """(d_dict, d_out): the direction each feature adds to the reconstruction."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    def extra_repr(self) -> str:
        return f"kind={self.kind}, d_in={self.d_in}, d_dict={self.d_dict}, site={self.config.site}"

    # ----------------------------------------------------------------------------- persistence
    def save(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write `config.json` and `weights.safetensors` (optionally stored in `dtype`, e.g. fp16)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: (t.detach().to(dtype) if dtype is not None else t.detach()).cpu().contiguous()
            for name, t in self.state_dict().items()
        }
        save_file(tensors, str(directory / WEIGHTS_FILE))
        _write_json_atomic(directory / CONFIG_FILE, self.config.to_dict())
        return directory

    @classmethod
    def from_config(cls, config: DictionaryConfig) -> Dictionary:
        """A freshly initialised dictionary of the kind named in `config`."""
        if config.kind not in Dictionary.registry:
            valid = ", ".join(sorted(Dictionary.registry))
            raise UserInputError(f"unknown dictionary kind {config.kind!r}; valid: {valid}")
        return Dictionary.registry[config.kind](config)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> Dictionary:
        """Load a dictionary folder in our format or one of the two published formats."""
        directory = Path(directory)
        if not directory.is_dir():
            raise UserInputError(f"dictionary folder not found: {directory}")
        if (directory / WEIGHTS_FILE).is_file() and (directory / CONFIG_FILE).is_file():
            config = DictionaryConfig.from_dict(_read_json(directory / CONFIG_FILE))
            dictionary = cls.from_config(config)
            _load_state(dictionary, _read_safetensors(directory / WEIGHTS_FILE), directory)
        elif (directory / "ae.pt").is_file():
            dictionary = _load_dictionary_learning(directory)
        elif (directory / "sae_weights.safetensors").is_file():
            dictionary = _load_saelens(directory)
        else:
            raise UserInputError(
                f"{directory} holds no dictionary: expected {CONFIG_FILE} + {WEIGHTS_FILE}, "
                "ae.pt + config.json, or cfg.json + sae_weights.safetensors"
            )
        return dictionary.to(device)


# --------------------------------------------------------------------------------- SAE variants
class TiedDictionary(Dictionary):
    """Cunningham et al.: `x_hat = Wᵀ ReLU(W x + b)`; one weight matrix, encoder bias only."""

    kind = "tied"

    def __init__(self, config: DictionaryConfig) -> None:
        super().__init__(config)
        self.W = nn.Parameter(_unit_rows(torch.randn(config.d_dict, config.d_in)))
        self.b = nn.Parameter(torch.zeros(config.d_dict))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W.T + self.b)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W

    @property
    def decoder_directions(self) -> torch.Tensor:
        return self.W


class UntiedDictionary(Dictionary):
    """Anthropic: `f = ReLU(W_e (x − b_d) + b_e)`, `x_hat = W_d f + b_d`, unit-norm decoder rows."""

    kind = "untied"

    def __init__(self, config: DictionaryConfig) -> None:
        super().__init__(config)
        W_dec = _unit_rows(torch.randn(config.d_dict, config.output_dim))
        self.W_dec = nn.Parameter(W_dec)
        if config.output_dim == config.d_in:
            self.W_enc = nn.Parameter(W_dec.T.clone())
        else:
            self.W_enc = nn.Parameter(_unit_rows(torch.randn(config.d_dict, config.d_in)).T.clone())
        self.b_enc = nn.Parameter(torch.zeros(config.d_dict))
        self.b_dec = nn.Parameter(torch.zeros(config.output_dim))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_activations(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    @property
    def decoder_directions(self) -> torch.Tensor:
        return self.W_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (the constraint the trainer maintains)."""
        self.W_dec.copy_(_unit_rows(self.W_dec))


class TopKDictionary(UntiedDictionary):
    """Untied dictionary that keeps the `k` largest pre-activations of each input."""

    kind = "topk"

    def __init__(self, config: DictionaryConfig) -> None:
        if not config.k or config.k < 1:
            raise UserInputError("a topk dictionary needs k >= 1 in its config")
        super().__init__(config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.pre_activations(x))
        top = pre.topk(min(self.config.k, self.d_dict), dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)


class Transcoder(UntiedDictionary):
    """Reads one site (`config.site`, e.g. the MLP input) and reconstructs another (`out_site`).

    Unlike the other kinds, the pre-decoder bias is not subtracted from the input, since input and
    output live in different spaces.
    """

    kind = "transcoder"

    def __init__(self, config: DictionaryConfig) -> None:
        if config.out_site is None:
            raise UserInputError("a transcoder needs out_site (the site it reconstructs)")
        super().__init__(config)
        self.b_in = nn.Parameter(torch.zeros(config.d_in))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_in) @ self.W_enc + self.b_enc


# ----------------------------------------------------------------------------- baseline bases
class LinearBasis(Dictionary):
    """An orthonormal basis as a (non-sparse) dictionary: `f = (x − offset) Cᵀ`, `x_hat = f C + offset`.

    Reconstruction is exact, so spliced in it changes nothing; patching with its directions gives the
    neuron, PCA and random-direction baselines. Build one with `neurons`, `pca` or `random`.
    """

    kind = "basis"

    def __init__(self, config: DictionaryConfig) -> None:
        super().__init__(config)
        self.register_buffer("components", torch.eye(config.d_dict, config.d_in))
        self.register_buffer("offset", torch.zeros(config.d_in))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.offset) @ self.components.T

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.components + self.offset

    @property
    def decoder_directions(self) -> torch.Tensor:
        return self.components

    @classmethod
    def neurons(cls, d_in: int, site: str | None = None) -> LinearBasis:
        """The standard basis: feature i is coordinate i of the activation."""
        return cls(_basis_config("neurons", d_in, site))

    @classmethod
    def pca(cls, activations: torch.Tensor, site: str | None = None) -> LinearBasis:
        """Principal directions of `activations` (n, d), in order of decreasing variance."""
        activations = activations.reshape(-1, activations.shape[-1]).float()
        if activations.shape[0] < 2:
            raise UserInputError("PCA needs at least two activation vectors")
        basis = cls(_basis_config("pca", activations.shape[-1], site))
        mean = activations.mean(0)
        _, _, vh = torch.linalg.svd(activations - mean, full_matrices=True)
        basis.components.copy_(vh)
        basis.offset.copy_(mean)
        return basis

    @classmethod
    def random(cls, d_in: int, seed: int = 0, site: str | None = None) -> LinearBasis:
        """A random orthonormal basis (a fixed rotation drawn from `seed`)."""
        generator = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=generator))
        basis = cls(_basis_config("random", d_in, site))
        basis.components.copy_(q.T)
        return basis


def _basis_config(name: str, d_in: int, site: str | None) -> DictionaryConfig:
    return DictionaryConfig(
        kind=LinearBasis.kind, d_in=d_in, d_dict=d_in, site=site, hyperparameters={"basis": name}
    )


# ------------------------------------------------------------------------- shipped dictionaries
def shipped_sets(model: str | None = None) -> list[str]:
    """Names of the dictionary sets shipped for `model` (default: the embedded model)."""
    folder = _shipped_model_dir(model)
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def load_dictionaries(
    set: str, sites: list[str] | None = None, model: str | None = None, device: str = "cpu"
) -> dict[str, Dictionary]:
    """Load a shipped set (`dictionaries/<model>/<set>/<site>/`), by site; all sites by default."""
    folder = _shipped_model_dir(model) / set
    if not folder.is_dir():
        available = ", ".join(shipped_sets(model)) or "none"
        raise UserInputError(f"no dictionary set {set!r}; shipped sets: {available}")
    present = sorted(p.name for p in folder.iterdir() if (p / CONFIG_FILE).is_file())
    wanted = present if sites is None else [str(site) for site in sites]
    missing = [site for site in wanted if site not in present]
    if missing:
        raise UserInputError(
            f"set {set!r} has no dictionary at {', '.join(missing)}; it has: {', '.join(present)}"
        )
    return {site: Dictionary.load(folder / site, device=device) for site in wanted}


def _shipped_model_dir(model: str | None) -> Path:
    if model is None:
        from sae_circuits.embedded import EMBEDDED_MODEL_NAME

        model = EMBEDDED_MODEL_NAME
    return asset_dir("dictionaries") / model


# --------------------------------------------------------------------------------- helpers
def _unit_rows(weight: torch.Tensor) -> torch.Tensor:
    return weight / weight.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserInputError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno})"
        ) from None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserInputError(f"cannot read {path}: {error}") from None


def _load_state(dictionary: Dictionary, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = dictionary.state_dict()
    if set(state) != set(expected):
        raise UserInputError(
            f"{source}: weights {sorted(state)} do not match a {dictionary.kind} dictionary "
            f"({sorted(expected)})"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise UserInputError(
                f"{source}: weight {name} has shape {tuple(tensor.shape)}, the config implies "
                f"{tuple(expected[name].shape)}"
            )
    dictionary.load_state_dict({name: t.float() for name, t in state.items()})


# Site names used by the published formats, mapped onto our grammar.
_FOREIGN_SITE_PATTERNS = (
    (re.compile(r"blocks\.(\d+)\.hook_resid_post"), "resid.{}"),
    (re.compile(r"blocks\.(\d+)\.hook_mlp_out"), "mlp.{}"),
    (re.compile(r"blocks\.(\d+)\.hook_attn_out"), "attn.{}"),
    (re.compile(r"blocks\.(\d+)\.mlp\.hook_post"), "mlp_hidden.{}"),
    (re.compile(r"resid(?:_post)?_layer_?(\d+)"), "resid.{}"),
    (re.compile(r"mlp(?:_out)?_layer_?(\d+)"), "mlp.{}"),
    (re.compile(r"attn(?:_out)?_layer_?(\d+)"), "attn.{}"),
    (re.compile(r"^hook_embed$|^embed$"), "embed"),
)


def foreign_site_name(name: str | None) -> str | None:
    """Translate a site named in another library's convention to ours, or None if unknown."""
    if not name:
        return None
    for pattern, template in _FOREIGN_SITE_PATTERNS:
        match = pattern.search(name)
        if match:
            return template.format(*match.groups())
    return None


def _load_dictionary_learning(directory: Path) -> Dictionary:
    """`ae.pt` (AutoEncoder state dict) + `config.json` as written by the dictionary_learning library."""
    state = torch.load(directory / "ae.pt", map_location="cpu", weights_only=True)
    needed = {"encoder.weight", "encoder.bias", "decoder.weight", "bias"}
    if not isinstance(state, dict) or not needed <= set(state):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise UserInputError(f"{directory}/ae.pt lacks {sorted(needed)} (found {found})")
    raw = _read_json(directory / "config.json") if (directory / "config.json").is_file() else {}
    trainer = raw.get("trainer", {})
    d_dict, d_in = state["encoder.weight"].shape
    if state["decoder.weight"].shape != (d_in, d_dict) or state["bias"].shape != (d_in,):
        raise UserInputError(f"{directory}/ae.pt: encoder and decoder shapes disagree")
    config = DictionaryConfig(
        kind="untied",
        d_in=d_in,
        d_dict=d_dict,
        site=foreign_site_name(trainer.get("submodule_name")),
        model=trainer.get("lm_name"),
        hyperparameters={"source_format": "dictionary_learning", **trainer},
    )
    dictionary = UntiedDictionary(config)
    with torch.no_grad():
        dictionary.W_enc.copy_(state["encoder.weight"].T)
        dictionary.b_enc.copy_(state["encoder.bias"])
        dictionary.W_dec.copy_(state["decoder.weight"].T)
        dictionary.b_dec.copy_(state["bias"])
    return dictionary


def _load_saelens(directory: Path) -> Dictionary:
    """`cfg.json` + `sae_weights.safetensors` (`W_enc`, `b_enc`, `W_dec`, `b_dec`) as SAELens writes."""
    state = _read_safetensors(directory / "sae_weights.safetensors")
    needed = {"W_enc", "b_enc", "W_dec", "b_dec"}
    if not needed <= set(state):
        raise UserInputError(
            f"{directory}/sae_weights.safetensors lacks {sorted(needed - set(state))}"
        )
    raw = _read_json(directory / "cfg.json") if (directory / "cfg.json").is_file() else {}
    architecture = raw.get("architecture", "standard")
    d_in, d_dict = state["W_enc"].shape
    if state["W_dec"].shape != (d_dict, d_in):
        raise UserInputError(f"{directory}: W_enc and W_dec shapes disagree")
    kind = {"standard": "untied", "topk": "topk"}.get(architecture)
    if kind is None:
        raise UserInputError(f"{directory}: SAE architecture {architecture!r} is not supported")
    if not raw.get("apply_b_dec_to_input", True):
        raise UserInputError(f"{directory}: apply_b_dec_to_input=false is not supported")
    k = (raw.get("activation_fn_kwargs") or {}).get("k") if kind == "topk" else None
    config = DictionaryConfig(
        kind=kind,
        d_in=d_in,
        d_dict=d_dict,
        k=k,
        site=foreign_site_name(raw.get("hook_name")),
        model=raw.get("model_name"),
        hyperparameters={"source_format": "saelens", **raw},
    )
    dictionary = Dictionary.from_config(config)
    with torch.no_grad():
        dictionary.W_enc.copy_(state["W_enc"])
        dictionary.b_enc.copy_(state["b_enc"])
        dictionary.W_dec.copy_(state["W_dec"])
        dictionary.b_dec.copy_(state["b_dec"])
    return dictionary


__all__ = [
    "Dictionary",
    "DictionaryConfig",
    "LinearBasis",
    "TiedDictionary",
    "TopKDictionary",
    "Transcoder",
    "UntiedDictionary",
    "foreign_site_name",
    "load_dictionaries",
    "shipped_sets",
]
