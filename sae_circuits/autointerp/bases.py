"""The bases compared by automatic interpretation at one site: a dictionary's features (`sae`), the
site's neurons (the standard basis) and its principal directions (`pca`, fitted on at most
`PCA_TOKENS` activations of the scanned text, drawn at random)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sae_circuits.autointerp_settings import BASES
from sae_circuits.batches import TokenBatch, split_batch
from sae_circuits.buffer import harvest
from sae_circuits.dictionary import Dictionary, LinearBasis
from sae_circuits.errors import UserInputError
from sae_circuits.protocols import Model
from sae_circuits.sites import Site

PCA_TOKENS = 8192


def build_basis(
    name: str,
    model: Model,
    site: str | Site,
    dictionary: Dictionary,
    batches: Sequence[TokenBatch],
    seed: int = 0,
) -> Dictionary:
    """The basis `name` (one of `BASES`) at `site`; `dictionary` is the `sae` basis and gives the
    width of the others."""
    site = Site.parse(site)
    if name == "sae":
        return dictionary
    if name == "neurons":
        return LinearBasis.neurons(dictionary.config.output_dim, site=site)
    if name == "pca":
        activations = []
        for batch in batches:
            ids, mask = split_batch(batch)
            activations.append(harvest(model, [site], ids, mask)[str(site)])
        activations = torch.cat(activations)
        generator = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(activations), generator=generator)[:PCA_TOKENS]
        return LinearBasis.pca(activations[pick], site=site)
    raise UserInputError(f"unknown basis {name!r}; valid: {', '.join(BASES)}")
