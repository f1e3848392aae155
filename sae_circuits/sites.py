"""Sites: named places in a model where activations are read, written and spliced.

Text forms: `embed`, `resid.L`, `attn.L`, `mlp.L`, `mlp_in.L`, `mlp_hidden.L` and `module:<path>`.
A site resolves, per architecture, to a module path and whether its value is that module's output or
input. Inside an nnsight trace `read_site` / `write_site` get and set the activation, unwrapping the
tuple outputs of attention modules.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from sae_circuits.errors import UserInputError
from sae_circuits.protocols import Model

SITE_KINDS = ("embed", "resid", "attn", "mlp", "mlp_in", "mlp_hidden", "module")
# Position of each kind within a layer in forward order (embed comes before layer 0).
_KIND_RANK = {"attn": 0, "mlp_in": 1, "mlp_hidden": 2, "mlp": 3, "module": 4, "resid": 5}


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where the standard sites live in one family of models (paths relative to the top module)."""

    name: str
    layers: str  # the ModuleList of transformer blocks
    embed: tuple[str, str]  # (module path, "output" or "input")
    attn: str  # attention module inside a block
    mlp: str  # MLP module inside a block
    mlp_hidden: tuple[str, str]  # inside a block: (module path, "output" or "input")
    final_norm: str
    unembed: str


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "gpt_neox": ArchitectureSpec(
        name="gpt_neox",
        layers="gpt_neox.layers",
        embed=("gpt_neox.embed_in", "output"),
        attn="attention",
        mlp="mlp",
        mlp_hidden=("mlp.act", "output"),
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
    ),
    "gpt2": ArchitectureSpec(
        name="gpt2",
        layers="transformer.h",
        embed=("transformer.drop", "output"),  # token + position embeddings (dropout is off)
        attn="attn",
        mlp="mlp",
        mlp_hidden=("mlp.act", "output"),
        final_norm="transformer.ln_f",
        unembed="lm_head",
    ),
    "llama": ArchitectureSpec(
        name="llama",
        layers="model.layers",
        embed=("model.embed_tokens", "output"),
        attn="self_attn",
        mlp="mlp",
        mlp_hidden=("mlp.down_proj", "input"),  # act(gate) * up
        final_norm="model.norm",
        unembed="lm_head",
    ),
}

# Hugging Face `model_type` values and the family whose module layout they share.
MODEL_TYPES = {
    "gpt_neox": "gpt_neox",
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
}


def architecture_of(model: Any) -> ArchitectureSpec:
    """The architecture of an nnsight-wrapped (or plain) Hugging Face model; raises if unsupported."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise UserInputError(
            f"unsupported architecture {model_type!r} (supported: {', '.join(MODEL_TYPES)}); "
            "name sites by module path instead, e.g. module:model.layers.3.mlp"
        )
    return ARCHITECTURES[MODEL_TYPES[model_type]]


def num_layers(model: Any) -> int:
    return int(model.config.num_hidden_layers)


@functools.total_ordering
@dataclass(frozen=True)
class Site:
    """A place in a model: `kind` in SITE_KINDS, `layer` for per-block kinds, `path` for `module:`.

    Parsed once from text at the package's boundaries (`Site.parse`), then used as the key
    everywhere inside: hashable, and sorted in forward-execution order.
    """

    kind: str
    layer: int | None = None
    path: str | None = None

    @classmethod
    def parse(cls, text: str | Site) -> Site:
        if isinstance(text, Site):
            return text
        text = text.strip()
        if text.startswith("module:"):
            path = text[len("module:") :]
            if not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", path):
                raise UserInputError(f"bad module path in site {text!r}")
            return cls("module", None, path)
        if text == "embed":
            return cls("embed")
        match = re.fullmatch(r"([a-z_]+)\.(\d+)", text)
        if not match or match.group(1) not in SITE_KINDS or match.group(1) in ("embed", "module"):
            raise UserInputError(
                f"unknown site {text!r}; valid forms: embed, resid.L, attn.L, mlp.L, mlp_in.L, "
                "mlp_hidden.L, module:<dotted.module.path>"
            )
        return cls(match.group(1), int(match.group(2)))

    def __str__(self) -> str:
        if self.kind == "module":
            return f"module:{self.path}"
        if self.kind == "embed":
            return "embed"
        return f"{self.kind}.{self.layer}"

    def __repr__(self) -> str:
        return f"Site({str(self)!r})"

    @property
    def order(self) -> tuple[int, int]:
        """A sort key in forward-execution order (module sites: by the first layer index in the path)."""
        if self.kind == "embed":
            return (-1, 0)
        if self.kind == "module":
            numbers = re.findall(r"\.(\d+)(?:\.|$)", self.path or "")
            return (int(numbers[0]) if numbers else 10**6, _KIND_RANK["module"])
        return (self.layer, _KIND_RANK[self.kind])

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Site):
            return NotImplemented
        return (self.order, str(self)) < (other.order, str(other))

    def resolve(self, model: Any) -> tuple[str, str]:
        """(module path, "output" or "input") for this site on `model`; validates the layer."""
        if self.kind == "module":
            _check_module_path(model, self.path)
            return self.path, "output"
        spec = architecture_of(model)
        if self.kind == "embed":
            return spec.embed
        n = num_layers(model)
        if not 0 <= self.layer < n:
            raise UserInputError(f"site {self} is out of range: the model has layers 0..{n - 1}")
        block = f"{spec.layers}.{self.layer}"
        if self.kind == "resid":
            return block, "output"
        if self.kind == "attn":
            return f"{block}.{spec.attn}", "output"
        if self.kind == "mlp":
            return f"{block}.{spec.mlp}", "output"
        if self.kind == "mlp_in":
            return f"{block}.{spec.mlp}", "input"
        path, io = spec.mlp_hidden
        return f"{block}.{path}", io


class SiteMap(dict):
    """A dict keyed by `Site`, built in forward order, that also accepts a site's text form as a key.

    Results keyed by site (`attached`, `load_dictionaries`, `evaluate`, ...) are SiteMaps, so
    `result["resid.2"]` and `result[Site.parse("resid.2")]` are the same entry.
    """

    def __init__(self, items: Any = ()) -> None:
        pairs = items.items() if hasattr(items, "items") else items
        parsed = [(Site.parse(key), value) for key, value in pairs]
        super().__init__(sorted(parsed, key=lambda pair: pair[0]))

    def __getitem__(self, key: str | Site) -> Any:
        return super().__getitem__(Site.parse(key))

    def __setitem__(self, key: str | Site, value: Any) -> None:
        super().__setitem__(Site.parse(key), value)

    def __contains__(self, key: object) -> bool:
        try:
            return isinstance(key, str | Site) and super().__contains__(Site.parse(key))
        except UserInputError:
            return False

    def get(self, key: str | Site, default: Any = None) -> Any:
        return super().get(Site.parse(key), default)

    def text_keys(self) -> dict[str, Any]:
        """The same entries keyed by the sites' text forms (for JSON)."""
        return {str(site): value for site, value in self.items()}


def valid_sites(model: Model) -> list[str]:
    """All standard sites of `model` in forward order."""
    kinds = ("attn", "mlp_in", "mlp_hidden", "mlp", "resid")
    return ["embed"] + [f"{k}.{layer}" for layer in range(num_layers(model)) for k in kinds]


def _check_module_path(model: Any, path: str) -> None:
    try:
        torch_module(model).get_submodule(path)
    except AttributeError:
        raise UserInputError(f"the model has no module {path!r}") from None


def torch_module(model: Any) -> Any:
    """The underlying torch module of an nnsight model (or the module itself)."""
    return getattr(model, "_module", model)


def envoy_at(model: Model, path: str) -> Any:
    """The nnsight envoy of the module at a dotted `path` (numbers index module lists)."""
    envoy = model
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def site_envoy(model: Model, site: str | Site) -> tuple[Any, str]:
    """(envoy of the module holding the site's value, "output" or "input")."""
    path, io = Site.parse(site).resolve(model)
    return envoy_at(model, path), io


def read_site(model: Model, site: str | Site) -> Any:
    """Inside a trace: the site's activation (first element of a tuple output)."""
    envoy, io = site_envoy(model, site)
    value = getattr(envoy, io)
    return value[0] if isinstance(value, tuple) else value


def write_site(model: Model, site: str | Site, value: Any) -> None:
    """Inside a trace: replace the site's activation, keeping the rest of a tuple output."""
    envoy, io = site_envoy(model, site)
    current = getattr(envoy, io)
    setattr(envoy, io, (value, *current[1:]) if isinstance(current, tuple) else value)
