"""The splice computation as it travels inside a remote nnsight request.

This module imports only torch, so nnsight ships it by value (`nnsight.register`) and a server
that has never installed sae-circuits can run it. `splice` is the one definition of a spliced
site's value, used by the local splice (`sae_circuits.splice`) and by remote requests alike.
A `CarriedSite` holds what a request needs at one site: the envoys of the model modules it reads
and writes, and its dictionary as pure-torch graphs (`torch.fx`), built by `sae_circuits.remote`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def editable(value: torch.Tensor) -> torch.Tensor:
    """A copy users may edit in place and differentiate (a non-leaf when gradients are on)."""
    if torch.is_grad_enabled() and not value.requires_grad:
        value = value.detach().requires_grad_(True)
    return value.clone()


def splice(
    codec: Any,
    x: torch.Tensor,
    source: torch.Tensor,
    features_hook: Callable[[torch.Tensor], torch.Tensor],
    error_hook: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """`reconstruct(f, source) + error` for the activation `x`, encoding `source` (`x`, or the
    site a transcoder reads); `codec` has `encode` and `reconstruct` (the features back in `x`'s
    space, with `source`'s skip term and normalisation statistics). The hooks see (and may
    replace) the features and the error, computed from the unedited features."""
    encoded = codec.encode(source)
    features = features_hook(editable(encoded))
    reconstruction = codec.reconstruct(encoded, source)
    error = error_hook(editable(x - reconstruction))
    if not torch.is_grad_enabled() and torch.equal(features, encoded):
        return reconstruction + error  # features untouched: skip the second decode
    return codec.reconstruct(features, source) + error


class Codec(nn.Module):
    """A dictionary's `encode` and `reconstruct` as pure-torch graph modules."""

    def __init__(self, encode: nn.Module, reconstruct: nn.Module) -> None:
        super().__init__()
        self.encoder, self.reconstructor = encode, reconstruct

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def reconstruct(self, f: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return self.reconstructor(f, source)


def site_value(envoy: Any, io: str) -> torch.Tensor:
    """Inside a trace: the value at a site, given the envoy of the module that holds it and
    "output" or "input" (the first element of a tuple)."""
    value = getattr(envoy, io)
    return value[0] if isinstance(value, tuple) else value


def set_site_value(envoy: Any, io: str, value: torch.Tensor) -> None:
    """Inside a trace: replace the value at a site (`site_value`), keeping the rest of a tuple."""
    current = getattr(envoy, io)
    setattr(envoy, io, (value, *current[1:]) if isinstance(current, tuple) else value)


def where_per_copy(
    value: torch.Tensor, edits: list[tuple[torch.Tensor, Any] | None], rows: int
) -> torch.Tensor:
    """`value` holds copies of a batch of `rows` rows stacked along dim 0; copy c takes the new
    value `edits[c][1]` where the mask `edits[c][0]` is set (None: copy c unedited)."""
    chunks = []
    for c, edit in enumerate(edits):
        chunk = value[c * rows : (c + 1) * rows]
        if edit is not None:
            mask, new = edit
            new = new.to(chunk.device) if isinstance(new, torch.Tensor) else new
            chunk = torch.where(mask.to(chunk.device), new, chunk)
        chunks.append(chunk)
    return torch.cat(chunks)


def per_copy(
    edits: list[tuple[torch.Tensor, Any] | None] | None, rows: int
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`where_per_copy` with these edits as a function of the value (None: no edit)."""
    if edits is None:
        return None
    return lambda value: where_per_copy(value, edits, rows)


def replaced(value: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """An edit of a hook point that puts `value` in its place (e.g. a leaf to differentiate)."""
    return lambda _: value


def assigned(index: Any, value: torch.Tensor | float) -> Callable[[torch.Tensor], torch.Tensor]:
    """An edit of a hook point: a copy of its value with `value` written at `index`."""

    def edit(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        tensor[index] = value
        return tensor

    return edit


def summed(features: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """`(F + 1,)`: `(B, T, F)` per-feature numbers and `(B, T, D)` error numbers summed over rows
    and positions (and the error's width), features first."""
    return torch.cat([features.sum((0, 1)), error.sum().reshape(1)])


class CarriedSite:
    """One spliced site inside a request: `apply()` (in a trace body, sites in forward order)
    replaces the site's value by the splice and returns the features and error it saw and the
    site's value before the splice. `features` and `error` (functions of the value, e.g.
    `per_copy(...)`) give the new features and error first, as an edit of the local splice's hook
    points would."""

    def __init__(
        self, codec: Codec, host: Any, io: str, reads: tuple[Any, str] | None = None
    ) -> None:
        self.codec, self.host, self.io, self.reads = codec, host, io, reads

    def apply(
        self,
        features: Callable[[torch.Tensor], torch.Tensor] | None = None,
        error: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        source = None if self.reads is None else site_value(*self.reads)
        x = site_value(self.host, self.io)
        seen: list[torch.Tensor] = []

        def hook(edit: Callable | None) -> Callable[[torch.Tensor], torch.Tensor]:
            def observe(value: torch.Tensor) -> torch.Tensor:
                seen.append(value)
                return value if edit is None else edit(value)

            return observe

        out = splice(self.codec, x, x if source is None else source, hook(features), hook(error))
        set_site_value(self.host, self.io, out)
        return seen[0], seen[1], x


__all__ = [
    "CarriedSite",
    "Codec",
    "assigned",
    "editable",
    "per_copy",
    "replaced",
    "set_site_value",
    "site_value",
    "splice",
    "summed",
    "where_per_copy",
]
