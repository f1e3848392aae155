"""Splice dictionaries into a model so every nnsight trace runs through them.

`attach(model, {site: dictionary})` registers each dictionary, wrapped in a `SplicedDictionary`, as a
submodule of the module that holds the site (attribute `sae`, or `sae_input` for sites that are a
module's input) and stores a persistent nnsight edit that replaces the site's activation `x` by

    decode(f) + error,   f = encode(x) (read and writable at `features`),
                         error = x − decode(encode(x)) (read and writable at `error`).

With nothing edited this returns `x` (up to float rounding), so the model's outputs are unchanged.
The error is computed from the *unedited* features, so setting or ablating a feature changes the
output by exactly its decoder direction times the change. Gradients: d(out)/d(features) is the
decoder and d(out)/dx is the identity, so attribution through several spliced sites matches the
unspliced model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import nnsight
import torch
from torch import nn

from sae_circuits.dictionary import Dictionary, Transcoder
from sae_circuits.errors import UserInputError
from sae_circuits.sites import Site, read_site, site_envoy, torch_module, write_site

_REGISTRY = "_sae_circuits_splices"


class SplicedDictionary(nn.Module):
    """A dictionary with identity hook points `features` and `error`, as spliced into a model."""

    def __init__(self, dictionary: Dictionary, site: Site) -> None:
        super().__init__()
        self.dictionary = dictionary
        self.site = site
        self.features = nn.Identity()
        self.error = nn.Identity()

    def forward(self, x: torch.Tensor, x_in: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct `x` (a transcoder reads `x_in` and reconstructs `x`)."""
        encoded = self.dictionary.encode(x if x_in is None else x_in)
        features = self.features(_editable(encoded))
        reconstruction = self.dictionary.decode(encoded)
        error = self.error(_editable(x - reconstruction))
        if not torch.is_grad_enabled() and torch.equal(features, encoded):
            return reconstruction + error  # features untouched: skip the second decode
        return self.dictionary.decode(features) + error


def _editable(value: torch.Tensor) -> torch.Tensor:
    """A copy users may edit in place and differentiate (a non-leaf when gradients are on)."""
    if torch.is_grad_enabled() and not value.requires_grad:
        value = value.detach().requires_grad_(True)
    return value.clone()


def attach(model: Any, dictionaries: Mapping[str | Site, Dictionary]) -> Any:
    """Splice `dictionaries` (keyed by the site each one replaces) into `model`; returns `model`.

    A transcoder is keyed by the site it reconstructs and reads the site named in its config.
    Attaching at a site that already holds a dictionary replaces it. Note: the splice is an nnsight
    edit; `detach` and re-attaching call `model.clear_edits()`, which also drops edits of your own.
    """
    registry = _registry(model)
    new = {Site.parse(site): dictionary for site, dictionary in dictionaries.items()}
    _check_dimensions(model, new)
    for site, dictionary in new.items():
        spliced_module = SplicedDictionary(dictionary, site).to(_model_device(model))
        host, attribute = _host(model, site)
        if str(site) in registry:
            _remove_submodule(host, attribute)
        setattr(host, attribute, spliced_module)  # the envoy registers the module and mirrors it
        registry[str(site)] = spliced_module
    _install_edits(model)
    return model


def detach(model: Any, sites: list[str | Site] | None = None) -> dict[str, Dictionary]:
    """Remove the dictionaries at `sites` (default: all); returns what was removed."""
    registry = _registry(model)
    names = list(registry) if sites is None else [str(Site.parse(site)) for site in sites]
    removed = {}
    for name in names:
        if name not in registry:
            raise UserInputError(f"no dictionary is attached at {name}; attached: {list(registry)}")
        spliced_module = registry.pop(name)
        _remove_submodule(*_host(model, spliced_module.site))
        removed[name] = spliced_module.dictionary
    _install_edits(model)
    return removed


@contextmanager
def temporarily_attached(
    model: Any, dictionaries: Mapping[str | Site, Dictionary]
) -> Iterator[Any]:
    """Attach `dictionaries` for the duration of a `with` block, then restore the previous splices."""
    previous = attached(model)
    attach(model, dictionaries)
    try:
        yield model
    finally:
        new_sites = {str(Site.parse(site)) for site in dictionaries}
        detach(model, sorted(new_sites))
        restore = {site: d for site, d in previous.items() if site in new_sites}
        if restore:
            attach(model, restore)


def attached(model: Any) -> dict[str, Dictionary]:
    """The dictionaries spliced into `model`, by site, in forward order."""
    registry = _registry(model)
    return {name: registry[name].dictionary for name in _forward_order(registry)}


def spliced(model: Any, site: str | Site) -> Any:
    """The envoy of the spliced dictionary at `site`: use `.features` and `.error` in a trace."""
    site = Site.parse(site)
    if str(site) not in _registry(model):
        raise UserInputError(
            f"no dictionary is attached at {site}; attached: {list(attached(model))}"
        )
    envoy, io = site_envoy(model, site)
    return getattr(envoy, _attribute(io))


# ------------------------------------------------------------------------------ internals
def _registry(model: Any) -> dict[str, SplicedDictionary]:
    module = torch_module(model)
    if not hasattr(module, _REGISTRY):
        object.__setattr__(module, _REGISTRY, {})
    return getattr(module, _REGISTRY)


def _forward_order(registry: Mapping[str, SplicedDictionary]) -> list[str]:
    return sorted(registry, key=lambda name: registry[name].site.order)


def _attribute(io: str) -> str:
    return "sae" if io == "output" else "sae_input"


def _host(model: Any, site: Site) -> tuple[Any, str]:
    """(envoy of the module that holds the site, attribute name of the spliced dictionary)."""
    envoy, io = site_envoy(model, site)
    return envoy, _attribute(io)


def _remove_submodule(host: Any, attribute: str) -> None:
    # nnsight 0.8 has no public way to unmount a module: drop it from the torch module and
    # from the envoy tree, so that a later module under the same name gets a fresh envoy.
    delattr(host._module, attribute)
    host._drop_envoy(attribute)


def _model_device(model: Any) -> torch.device:
    return next(torch_module(model).parameters()).device


def _install_edits(model: Any) -> None:
    """Replace all edits by one that splices every registered dictionary, in forward order."""
    registry = _registry(model)
    model.clear_edits()
    if not registry:
        return
    with model.edit(inplace=True):
        for name in _forward_order(registry):
            spliced_module = registry[name]
            site = spliced_module.site
            dictionary = spliced_module.dictionary
            x_in = (
                read_site(model, dictionary.config.site)
                if isinstance(dictionary, Transcoder)
                else None
            )
            x = read_site(model, site)
            envoy, io = site_envoy(model, site)
            hook = getattr(envoy, _attribute(io))
            write_site(model, site, hook(x, x_in, hook=True))


def _check_dimensions(model: Any, new: Mapping[Site, Dictionary]) -> None:
    """Run one token through the model and check each dictionary's sizes against its sites."""
    needed: dict[str, Site] = {}
    for site, dictionary in new.items():
        site.resolve(model)
        needed[str(site)] = site
        if isinstance(dictionary, Transcoder):
            source = Site.parse(dictionary.config.site)
            if source.order >= site.order:
                raise UserInputError(
                    f"transcoder at {site} reads {source}, which does not come before it"
                )
            needed[str(source)] = source
    token = model.tokenizer.bos_token_id or model.tokenizer.eos_token_id or 0
    with torch.no_grad(), model.trace(torch.tensor([[token]])):
        widths = {}
        for name in sorted(needed, key=lambda n: needed[n].order):
            widths[name] = read_site(model, needed[name]).shape[-1]
        widths = nnsight.save(widths)
    for site, dictionary in new.items():
        config = dictionary.config
        reads = config.site if isinstance(dictionary, Transcoder) else str(site)
        if config.d_in != widths[str(Site.parse(reads))]:
            raise UserInputError(
                f"dictionary for {site} expects width {config.d_in}, but {reads} has width "
                f"{widths[str(Site.parse(reads))]} in this model"
            )
        if config.output_dim != widths[str(site)]:
            raise UserInputError(
                f"dictionary for {site} reconstructs width {config.output_dim}, the site has "
                f"{widths[str(site)]}"
            )


__all__ = ["SplicedDictionary", "attach", "attached", "detach", "spliced", "temporarily_attached"]
