"""Splice dictionaries into a model so every nnsight trace runs through them.

`attach(model, {site: dictionary})` registers each dictionary, wrapped in a `SplicedDictionary`, as a
submodule of the module that holds the site (attribute `sae`, or `sae_input` for sites that are a
module's input) and stores a persistent nnsight edit that replaces the site's activation `x` by

    reconstruct(f, x) + error,   f = encode(x) (read and writable at `features`),
                                 error = x − reconstruct(encode(x), x) (read and writable at `error`)

(`reconstruct(f, x)` is `decode(f)` plus a transcoder's skip term, mapped back to the raw space
with `x`'s statistics by a dictionary that normalises its input.) With nothing edited this returns
`x` (up to float rounding), so the model's outputs are unchanged. The error is computed from the
*unedited* features, so setting or ablating a feature changes the output by exactly its decoder
direction (times the token's scale, for a normalising dictionary) times the change. Gradients:
d(out)/d(features) is the decoder and d(out)/dx is the identity, so attribution through several
spliced sites matches the unspliced model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import nnsight
import torch
from torch import nn

from sae_circuits.carried import splice
from sae_circuits.dictionary import Dictionary, DictionaryConfig
from sae_circuits.errors import UserInputError
from sae_circuits.protocols import Model
from sae_circuits.sites import Site, SiteMap, envoy_at, read_site, torch_module, write_site

_REGISTRY = "_sae_circuits_splices"


@dataclass(frozen=True)
class Location:
    """Where a site's value lives in a model, and the attribute a spliced dictionary takes there."""

    path: str  # the module whose output (or input) is the value
    io: str  # "output" or "input"

    @property
    def attribute(self) -> str:
        return "sae" if self.io == "output" else "sae_input"


class SplicedDictionary(nn.Module):
    """A dictionary with identity hook points `features` and `error`, as spliced into a model.

    It keeps the `site` it replaces, the site it `reads` (its config's `in_site` when that is
    another site than the one it writes, as for a transcoder; else `site`) and the `location` of
    `site` in the model.
    """

    def __init__(self, dictionary: Dictionary, site: Site, reads: Site, location: Location) -> None:
        super().__init__()
        self.dictionary = dictionary
        self.site, self.reads, self.location = site, reads, location
        self.features = nn.Identity()
        self.error = nn.Identity()

    def forward(self, x: torch.Tensor, x_in: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct `x`, encoding `x_in` when the dictionary reads another site."""
        return splice(self.dictionary, x, x if x_in is None else x_in, self.features, self.error)

    def envoy(self, model: Model) -> Any:
        """This module's envoy in `model`."""
        return getattr(envoy_at(model, self.location.path), self.location.attribute)


def attach(model: Model, dictionaries: Mapping[str | Site, Dictionary]) -> Model:
    """Splice `dictionaries` (keyed by the site each one replaces) into `model`; returns `model`.

    A dictionary whose config reads another site than it writes (a transcoder: `in_site`, e.g.
    `mlp_in.1`, and `out_site`, `mlp.1`) is keyed by the site it writes and reads its `in_site`.
    Attaching at a site that already holds a dictionary replaces it. Note: the splice is an nnsight
    edit; `detach` and re-attaching call `model.clear_edits()`, which also drops edits of your own.
    """
    splices = [
        _splice(model, Site.parse(site), dictionary) for site, dictionary in dictionaries.items()
    ]
    _check_widths(model, splices)
    registry = _registry(model)
    device = _model_device(model)
    for spliced_module in splices:
        spliced_module.to(device)
        host = envoy_at(model, spliced_module.location.path)
        if spliced_module.site in registry:
            _remove_submodule(host, spliced_module.location.attribute)
        setattr(host, spliced_module.location.attribute, spliced_module)  # the envoy mirrors it
        registry[spliced_module.site] = spliced_module
    _install_edits(model)
    return model


def detach(model: Model, sites: list[str | Site] | None = None) -> SiteMap:
    """Remove the dictionaries at `sites` (default: all); returns what was removed, by site."""
    registry = _registry(model)
    chosen = list(registry) if sites is None else [Site.parse(site) for site in sites]
    removed = SiteMap()
    for site in chosen:
        if site not in registry:
            raise UserInputError(f"no dictionary is attached at {site}; attached: {_names(model)}")
        spliced_module = registry.pop(site)
        location = spliced_module.location
        _remove_submodule(envoy_at(model, location.path), location.attribute)
        removed[site] = spliced_module.dictionary
    _install_edits(model)
    return removed


@contextmanager
def temporarily_attached(
    model: Model, dictionaries: Mapping[str | Site, Dictionary]
) -> Iterator[Model]:
    """Attach `dictionaries` for the duration of a `with` block, then restore the previous splices."""
    previous = attached(model)
    dictionaries = SiteMap(dictionaries)
    attach(model, dictionaries)
    try:
        yield model
    finally:
        detach(model, list(dictionaries))
        restore = {site: d for site, d in previous.items() if site in dictionaries}
        if restore:
            attach(model, restore)


@contextmanager
def unmounted(model: Model) -> Iterator[list[SplicedDictionary]]:
    """For the duration of a `with` block, `model` without its splices (the modules and the
    edit), as a server that never saw them holds it; yields the spliced modules in forward order.
    A remote request built inside carries their computation itself (`sae_circuits.remote`)."""
    registry = _registry(model)
    entries = [registry[site] for site in sorted(registry)]
    for entry in entries:
        _remove_submodule(envoy_at(model, entry.location.path), entry.location.attribute)
    model.clear_edits()
    try:
        yield entries
    finally:
        for entry in entries:
            setattr(envoy_at(model, entry.location.path), entry.location.attribute, entry)
        _install_edits(model)


def replace_dictionary(model: Model, site: str | Site, dictionary: Dictionary) -> None:
    """Swap the dictionary of the splice at `site` for one of the same widths, keeping the
    installed edit (cheap enough to do every training step)."""
    entry = _registry(model).get(Site.parse(site))
    if entry is None:
        raise UserInputError(f"no dictionary is attached at {site}; attached: {_names(model)}")
    old, new = entry.dictionary.config, dictionary.config
    if (old.d_in, old.output_dim, old.in_site) != (new.d_in, new.output_dim, new.in_site):
        raise UserInputError(
            f"the dictionary replacing the one at {site} has other widths or sites"
        )
    entry.dictionary = dictionary


def attached(model: Model) -> SiteMap:
    """The dictionaries spliced into `model`, by site, in forward order."""
    return SiteMap((site, entry.dictionary) for site, entry in _registry(model).items())


def spliced(model: Model, site: str | Site) -> Any:
    """The envoy of the spliced dictionary at `site`: use `.features` and `.error` in a trace."""
    site = Site.parse(site)
    entry = _registry(model).get(site)
    if entry is None:
        raise UserInputError(f"no dictionary is attached at {site}; attached: {_names(model)}")
    return entry.envoy(model)


# ------------------------------------------------------------------------------ internals
def _registry(model: Model) -> dict[Site, SplicedDictionary]:
    module = torch_module(model)
    if not hasattr(module, _REGISTRY):
        object.__setattr__(module, _REGISTRY, {})
    return getattr(module, _REGISTRY)


def _names(model: Model) -> str:
    return ", ".join(str(site) for site in sorted(_registry(model))) or "none"


def _splice(model: Model, site: Site, dictionary: Dictionary) -> SplicedDictionary:
    """`dictionary` wrapped for `site`, with the site resolved (which validates it) on `model`."""
    reads = _reads(site, dictionary.config)
    reads.resolve(model)
    return SplicedDictionary(dictionary, site, reads, Location(*site.resolve(model)))


def _reads(site: Site, config: DictionaryConfig) -> Site:
    """The site a dictionary spliced at `site` encodes."""
    if config.in_site is not None and config.in_site != config.out_site:
        return config.in_site
    return site


def _remove_submodule(host: Any, attribute: str) -> None:
    # nnsight 0.8 has no public way to unmount a module: drop it from the torch module and
    # from the envoy tree, so that a later module under the same name gets a fresh envoy.
    delattr(host._module, attribute)
    host._drop_envoy(attribute)


def _model_device(model: Model) -> torch.device:
    return next(torch_module(model).parameters()).device


def _install_edits(model: Model) -> None:
    """Replace all edits by one that splices every registered dictionary, in forward order."""
    registry = _registry(model)
    model.clear_edits()
    if not registry:
        return
    with model.edit(inplace=True):
        for site in sorted(registry):
            spliced_module = registry[site]
            reads = spliced_module.reads
            x_in = read_site(model, reads) if reads != site else None
            x = read_site(model, site)
            write_site(model, site, spliced_module.envoy(model)(x, x_in, hook=True))


def _check_widths(model: Model, splices: list[SplicedDictionary]) -> None:
    """Run one token through the model and check each dictionary's widths against its sites."""
    for spliced_module in splices:
        site, reads = spliced_module.site, spliced_module.reads
        if reads != site and reads.order >= site.order:
            raise UserInputError(
                f"the dictionary at {site} reads {reads}, which does not come before it"
            )
    needed = sorted(
        {s for spliced_module in splices for s in (spliced_module.reads, spliced_module.site)}
    )
    token = model.tokenizer.bos_token_id or model.tokenizer.eos_token_id or 0
    with torch.no_grad(), model.trace(torch.tensor([[token]])):
        widths = {}
        for site in needed:
            widths[site] = read_site(model, site).shape[-1]
        widths = nnsight.save(widths)
    for spliced_module in splices:
        config = spliced_module.dictionary.config
        site, reads = spliced_module.site, spliced_module.reads
        if config.d_in != widths[reads]:
            raise UserInputError(
                f"dictionary for {site} expects width {config.d_in}, but {reads} has width "
                f"{widths[reads]} in this model"
            )
        if config.output_dim != widths[site]:
            raise UserInputError(
                f"dictionary for {site} reconstructs width {config.output_dim}, the site has "
                f"{widths[site]}"
            )


__all__ = [
    "Location",
    "SplicedDictionary",
    "attach",
    "attached",
    "detach",
    "replace_dictionary",
    "spliced",
    "temporarily_attached",
    "unmounted",
]
