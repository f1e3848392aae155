"""Other libraries' names of the places dictionaries read, translated to our sites, per architecture.

Three conventions: TransformerLens hook names (SAELens, circuit-tracer: `blocks.3.hook_resid_post`),
Hugging Face module paths (sparsify, relative to the base model: `layers.3`, `h.3.mlp`; or from the
top: `gpt_neox.layers.3`), and dictionary_learning's names (`resid_post_layer_3`).

Our `resid.L` is the output of block L, so `blocks.L.hook_resid_pre` is `resid.(L-1)` and
`blocks.0.hook_resid_pre` is `embed`. A name is mapped only where our site holds exactly the same
values; otherwise (`hook_resid_mid`, `hook_mlp_in` of a sequential block: the residual before the
MLP's norm; `attn.hook_z`, the input of the output projection, which no site reads; `ln2.hook_*`)
the answer is None, and a dictionary read from such a file asks for `--site`. Where the answer
depends on the architecture (`hook_embed` is our `embed` on rotary models but only the token
embedding on GPT-2, whose `embed` adds the position embedding), it needs `model_type`.
"""

from __future__ import annotations

import re

from sae_circuits.sites import ARCHITECTURES, MODEL_TYPES, Site

# Families whose attention and MLP read the same residual (GPT-NeoX's parallel residual), so
# TransformerLens' `hook_mlp_in` is the block's input.
_PARALLEL = {"gpt_neox"}
# A model's name (hub id or folder) -> its Hugging Face model_type, for files that name the model
# but not its architecture.
_MODEL_NAME_TYPES = (
    (re.compile(r"pythia|gpt-?neox|neox", re.IGNORECASE), "gpt_neox"),
    (re.compile(r"gpt2|gpt-2", re.IGNORECASE), "gpt2"),
    (re.compile(r"llama", re.IGNORECASE), "llama"),
    (re.compile(r"mistral", re.IGNORECASE), "mistral"),
    (re.compile(r"qwen3", re.IGNORECASE), "qwen3"),
    (re.compile(r"qwen2", re.IGNORECASE), "qwen2"),
)
_DICTIONARY_LEARNING = (
    (re.compile(r"resid(?:_post)?_layer_?(\d+)"), "resid"),
    (re.compile(r"mlp(?:_out)?_layer_?(\d+)"), "mlp"),
    (re.compile(r"attn(?:_out)?_layer_?(\d+)"), "attn"),
)
_TL_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def model_type_from_name(name: str | None) -> str | None:
    """The Hugging Face `model_type` of a model named like `EleutherAI/pythia-70m`, or None."""
    if not name:
        return None
    return next((t for pattern, t in _MODEL_NAME_TYPES if pattern.search(name)), None)


def site_from_hook(
    name: str | None, model_type: str | None = None, io: str = "output"
) -> Site | None:
    """Our site for a TransformerLens hook, a module path or a dictionary_learning name; or None.

    `io="input"` asks for the input of the module at a module path (what a transcoder that
    hooks a module reads): an MLP's input is `mlp_in.L`, a block's the previous residual.
    """
    if not name:
        return None
    family = MODEL_TYPES.get(model_type or "")
    if io == "input":
        return _module_input_site(name, family)
    return _transformer_lens_site(name, family) or _module_site(name, family) or _dl_site(name)


def _previous_residual(layer: int) -> Site:
    return Site("embed") if layer == 0 else Site("resid", layer - 1)


def _transformer_lens_site(name: str, family: str | None) -> Site | None:
    if name == "hook_embed":
        if family == "gpt2":
            return Site("module", path="transformer.wte")
        return Site("embed") if family is not None else None
    if name == "hook_pos_embed":
        return Site("module", path="transformer.wpe") if family == "gpt2" else None
    match = _TL_BLOCK.fullmatch(name)
    if not match:
        return None
    layer, hook = int(match.group(1)), match.group(2)
    simple = {
        "hook_resid_post": Site("resid", layer),
        "hook_mlp_out": Site("mlp", layer),
        "hook_attn_out": Site("attn", layer),
        "mlp.hook_post": Site("mlp_hidden", layer),
    }
    if hook in simple:
        return simple[hook]
    if hook == "hook_resid_pre":
        return _previous_residual(layer)
    if hook == "hook_mlp_in" and family in _PARALLEL:
        return _previous_residual(layer)
    if hook == "mlp.hook_pre" and family is not None:
        spec = ARCHITECTURES[family]
        pre = {"gpt2": "c_fc", "gpt_neox": "dense_h_to_4h", "llama": "gate_proj"}[family]
        return Site("module", path=f"{spec.layers}.{layer}.{spec.mlp}.{pre}")
    return None


def _split_module_path(name: str, family: str | None) -> tuple[str | None, int, str] | None:
    """(family, layer, path inside the block) of a path to a block or below, or None."""
    candidates = [family] if family is not None else list(ARCHITECTURES)
    for candidate in candidates:
        layers = ARCHITECTURES[candidate].layers  # e.g. "gpt_neox.layers"
        relative = layers.split(".", 1)[1]  # relative to the base model: "layers"
        match = re.fullmatch(
            rf"(?:{re.escape(layers)}|{re.escape(relative)})\.(\d+)(?:\.(.+))?", name
        )
        if match:
            inside = match.group(2) or ""
            # llama and gpt_neox both call their blocks `layers`: the family stays unknown
            ambiguous = family is None and relative == "layers" and not name.startswith(layers)
            return (None if ambiguous else candidate), int(match.group(1)), inside
    return None


def _module_site(name: str, family: str | None) -> Site | None:
    embed = _embed_site(name, family)
    if embed is not None:
        return embed
    split = _split_module_path(name, family)
    if split is None:
        return None
    found, layer, inside = split
    if inside == "":
        return Site("resid", layer)
    if found is None:  # `layers.L.<x>` of an unknown family: mlp is mlp on both
        return Site("mlp", layer) if inside == "mlp" else None
    spec = ARCHITECTURES[found]
    if inside == spec.mlp:
        return Site("mlp", layer)
    if inside == spec.attn:
        return Site("attn", layer)
    if (inside, "output") == spec.mlp_hidden:
        return Site("mlp_hidden", layer)
    return Site("module", path=f"{spec.layers}.{layer}.{inside}")


def _embed_site(name: str, family: str | None) -> Site | None:
    candidates = [family] if family is not None else list(ARCHITECTURES)
    for candidate in candidates:
        spec = ARCHITECTURES[candidate]
        base = spec.layers.split(".", 1)[0]
        for path in {spec.embed[0], spec.embed[0].split(".", 1)[1]}:
            if name == path:
                return Site("embed")
        if candidate == "gpt2" and name in ("wte", f"{base}.wte", "wpe", f"{base}.wpe"):
            return Site("module", path=f"{base}.{name.rsplit('.', 1)[-1]}")
    return None


def _module_input_site(name: str, family: str | None) -> Site | None:
    split = _split_module_path(name, family)
    if split is None:
        return None
    found, layer, inside = split
    if inside == "":
        return _previous_residual(layer)
    if inside == "mlp":  # the MLP module is `mlp` in every family we know
        return Site("mlp_in", layer)
    return None


def _dl_site(name: str) -> Site | None:
    if name == "embed":
        return Site("embed")
    for pattern, kind in _DICTIONARY_LEARNING:
        match = pattern.fullmatch(name)
        if match:
            return Site(kind, int(match.group(1)))
    return None


def foreign_sites(
    in_name: str | None,
    out_name: str | None = None,
    model_type: str | None = None,
    site: Site | None = None,
    in_io: str = "output",
) -> dict[str, Site | None]:
    """`in_site` / `out_site` for a DictionaryConfig from a file's names (`out_name`: transcoders,
    None for an SAE) and the user's `site`, which replaces the site the dictionary is spliced at
    (both sites of an SAE, the output site of a transcoder)."""
    in_site = site_from_hook(in_name, model_type, io=in_io)
    if out_name is None:
        chosen = site if site is not None else in_site
        return {"in_site": chosen, "out_site": chosen}
    out_site = site if site is not None else site_from_hook(out_name, model_type)
    return {"in_site": in_site, "out_site": out_site}


_TL_HOOKS = {
    "resid": "hook_resid_post",
    "attn": "hook_attn_out",
    "mlp": "hook_mlp_out",
    "mlp_hidden": "mlp.hook_post",
}


def hook_from_site(site: Site | None) -> str | None:
    """The TransformerLens hook holding our site's values, or None (`mlp_in.L`, the MLP's
    normalised input, and module sites have none)."""
    if site is None:
        return None
    if site.kind == "embed":
        return "blocks.0.hook_resid_pre"
    hook = _TL_HOOKS.get(site.kind)
    return None if hook is None else f"blocks.{site.layer}.{hook}"


def module_from_site(site: Site, model_type: str | None, io: str = "output") -> str | None:
    """The module path, relative to the base model (sparsify's hookpoints: `layers.3.mlp`), whose
    output (or with `io="input"`, input) is our site's value; None where there is none."""
    family = MODEL_TYPES.get(model_type or "")
    if family is None:
        return None
    spec = ARCHITECTURES[family]
    base, layers = spec.layers.split(".", 1)
    if site.kind == "module":
        path = site.path or ""
        return path[len(base) + 1 :] if path.startswith(base + ".") else None
    if site.kind == "embed":
        return spec.embed[0].split(".", 1)[1] if io == "output" else None
    block = f"{layers}.{site.layer}"
    inside = {
        ("resid", "output"): "",
        ("attn", "output"): spec.attn,
        ("mlp", "output"): spec.mlp,
        ("mlp_in", "input"): spec.mlp,
        ("mlp_hidden", spec.mlp_hidden[1]): spec.mlp_hidden[0],
    }.get((site.kind, io))
    if inside is None:
        return None
    return f"{block}.{inside}" if inside else block


__all__ = [
    "foreign_sites",
    "hook_from_site",
    "model_type_from_name",
    "module_from_site",
    "site_from_hook",
]
