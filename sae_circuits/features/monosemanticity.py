"""Features vs. neurons: how concentrated each unit's top activations are on one token.

A unit's *token concentration* is the share of the mass of its top-k (positive) activations that
falls on its single most common token (by mass): 1.0 means every top activation is the same token.
The *word concentration* does the same after mapping tokens to a class: the token's text stripped
of surrounding whitespace and lower-cased (" The", "the" and "The" are one class). Both are averaged
over alive units (at least one positive top activation). The neuron basis is the standard basis
of the same site (`LinearBasis.neurons`): its units are the activation's coordinates, ranked by
their positive side like the dictionary's features.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from sae_circuits.batches import TokenBatch
from sae_circuits.dictionary import Dictionary, LinearBasis
from sae_circuits.features.collect import collect
from sae_circuits.protocols import Model
from sae_circuits.remote import Remote
from sae_circuits.sites import Site


def concentration(values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(F,) share of each unit's positive top-k mass on its most common token (by mass); NaN for
    units without a positive value. `values`, `tokens`: (F, k) (token ids or token classes)."""
    mass = values.clamp_min(0).nan_to_num(0.0, posinf=0.0, neginf=0.0).double()
    same = tokens[:, :, None] == tokens[:, None, :]  # (F, k, k)
    on_token = (same * mass[:, None, :]).sum(-1)  # mass on the token of each entry
    total = mass.sum(1)
    share = on_token.max(1).values / total
    return torch.where(total > 0, share, torch.full_like(share, float("nan")))


def word_classes(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """(V,) class id per token: tokens whose stripped, lower-cased text is equal share a class."""
    names: dict[str, int] = {}
    classes = [
        names.setdefault(tokenizer.decode([t]).strip().lower(), len(names))
        for t in range(vocab_size)
    ]
    return torch.tensor(classes)


def compare_with_neurons(
    model: Model,
    site: str | Site,
    dictionary: Dictionary,
    batches: Iterable[TokenBatch],
    top_k: int = 20,
    progress: bool = True,
    total_batches: int | None = None,
    remote: Remote = False,
) -> dict[str, dict[str, float]]:
    """Token and word concentration of the dictionary's features and of the site's neurons, on the
    same text: `{"features": {...}, "neurons": {...}}` with mean/median over alive units.
    `remote` as for `collect`."""
    site = Site.parse(site)
    batches = list(batches)
    neurons = LinearBasis.neurons(dictionary.config.output_dim, site=site)
    classes = word_classes(model.tokenizer, int(model.config.vocab_size))
    result = {}
    for name, basis in (("features", dictionary), ("neurons", neurons)):
        stats = collect(
            model,
            site,
            basis,
            batches,
            top_k=top_k,
            progress=progress,
            total_batches=total_batches,
            remote=remote,
        )
        token = concentration(stats.top_values, stats.top_tokens)
        word = concentration(stats.top_values, classes[stats.top_tokens.clamp_min(0)])
        alive = ~token.isnan()
        result[name] = {
            "units": len(token),
            "alive": int(alive.sum()),
            "token_concentration_mean": token[alive].mean().item(),
            "token_concentration_median": token[alive].median().item(),
            "word_concentration_mean": word[alive].mean().item(),
            "share_units_above_0.9": (token[alive] >= 0.9).double().mean().item(),
        }
    return result
