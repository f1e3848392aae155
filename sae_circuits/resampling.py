"""Resampling: re-initialise the latents a dictionary wastes, towards directions it misses.

A `Resampler` follows one dictionary in training (`observe` after every step) and, when called,
re-initialises
- which latents: the dead (no activation in the last `dead_window` steps), optionally the
  duplicates of a more active latent (`duplicates`, a cosine) and the near-silent (fewer than
  `min_fires` activations since the last resampling);
- towards which directions: a target, `InputTarget` (badly reconstructed inputs) or
  `ResidualTarget` (least-squares residuals of recent inputs);
- writing the slots the dictionary's kind declares (`Dictionary.resample_slots`) and resetting
  their Adam state.
"""

from __future__ import annotations

from collections import deque
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from sae_circuits.dictionary import Dictionary
from sae_circuits.train_spec import RESAMPLE_TARGETS

RESAMPLE_POOL = 2048  # inputs (rows) kept by ResidualTarget


class InputTarget:
    """Unit inputs of the current batch, drawn ∝ squared reconstruction error (with replacement);
    encoder and Adam state of the new latents start from zero (Anthropic 2023)."""

    match_live: ClassVar[bool] = False  # encoder norm, bias and Adam second moments like the live

    def observe(self, x: torch.Tensor) -> None:
        """Nothing to keep: the directions come from the batch at hand."""

    def directions(
        self, dictionary: Dictionary, x: torch.Tensor, n: int, generator: torch.Generator
    ) -> torch.Tensor | None:
        """(n, d) unit directions, or None when `dictionary` reconstructs `x` exactly."""
        losses = (dictionary(x)[0] - x).pow(2).sum(-1)
        if not losses.sum() > 0:
            return None
        chosen = torch.multinomial(losses, n, replacement=True, generator=generator)
        return F.normalize(x[chosen], dim=-1)

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


class ResidualTarget:
    """The largest least-squares residuals of the last RESAMPLE_POOL inputs (see
    `least_squares_residuals`): what the active latents cannot express at any activation, e.g. a
    feature no latent covers. Encoder norm, bias and Adam second moments of the new latents are
    like the live latents' (zero second moments would make their first updates tens of times
    larger than the LR)."""

    match_live: ClassVar[bool] = True

    def __init__(self) -> None:
        self.pool: deque[torch.Tensor] = deque()  # the last batches, at least RESAMPLE_POOL rows

    def observe(self, x: torch.Tensor) -> None:
        self.pool.append(x.detach())
        while len(self.pool) > 1 and sum(map(len, self.pool)) - len(self.pool[0]) >= RESAMPLE_POOL:
            self.pool.popleft()

    def directions(
        self, dictionary: Dictionary, x: torch.Tensor, n: int, generator: torch.Generator
    ) -> torch.Tensor | None:
        """(n, d) unit residuals, largest first, cycled if there are fewer inputs than `n`; the
        pool (or `x` when the pool is empty); None when every residual is zero."""
        pool = torch.cat(list(self.pool)) if self.pool else x
        errors = least_squares_residuals(dictionary, pool)
        norms = errors.pow(2).sum(-1)
        if not norms.sum() > 0:
            return None
        order = norms.argsort(descending=True)
        chosen = order[torch.arange(n, device=order.device) % len(order)]
        return F.normalize(errors[chosen], dim=-1)

    def state(self) -> dict[str, Any]:
        return {"pool": list(self.pool)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.pool = deque(state["pool"])


TARGETS: dict[str, type[InputTarget] | type[ResidualTarget]] = dict(
    zip(RESAMPLE_TARGETS, (InputTarget, ResidualTarget), strict=True)
)


class Resampler:
    """Tracks the activity of a dictionary's latents and re-initialises the wasted ones.

    The steps since each latent last fired are always tracked (`dead` also feeds the training
    metrics); activation counts since the last resampling only when `duplicates` or `min_fires`
    need them. `generator` draws the input target's samples.
    """

    def __init__(
        self,
        dictionary: Dictionary,
        optimizer: torch.optim.Optimizer,
        *,
        dead_window: int,
        duplicates: float | None = None,
        min_fires: int = 0,
        target: str = "input",
        generator: torch.Generator | None = None,
    ) -> None:
        self.dictionary, self.optimizer = dictionary, optimizer
        self.dead_window, self.duplicate_cosine, self.min_fires = dead_window, duplicates, min_fires
        self.target = TARGETS[target]()
        self.generator = generator
        n, device = dictionary.d_dict, dictionary.decoder_directions.device
        self.since_fired = torch.zeros(n, dtype=torch.long, device=device)
        self.fired = (
            torch.zeros(n, dtype=torch.long, device=device)
            if duplicates is not None or min_fires
            else None
        )

    @torch.no_grad()
    def observe(self, x: torch.Tensor, fire_counts: torch.Tensor) -> None:
        """Record one training step: its inputs `x` and how many of them each latent fired on."""
        self.since_fired.add_(1).masked_fill_(fire_counts > 0, 0)
        if self.fired is not None:
            self.fired += fire_counts.long()
        self.target.observe(x)

    @property
    def dead(self) -> torch.Tensor:
        return self.since_fired >= self.dead_window

    @torch.no_grad()
    def wasted(self) -> torch.Tensor:
        """(d_dict,) bool: the latents to re-initialise; restarts the activation counts."""
        targets = self.dead
        if self.fired is not None:
            if self.duplicate_cosine is not None:
                targets = targets | self.duplicates()
            if self.min_fires:
                targets = targets | (self.fired < self.min_fires)
            self.fired.zero_()
        return targets

    @torch.no_grad()
    def duplicates(self, max_block: int = 1 << 24) -> torch.Tensor:
        """(d_dict,) bool: latents whose unit decoder direction has cosine >= `duplicates` with a
        higher-ranked latent (more activations since the last resampling, then lower index).

        Each group of near-identical latents thus keeps its top-ranked member. The Gram matrix is
        computed in row blocks of at most `max_block` entries.
        """
        threshold, n = self.duplicate_cosine, self.dictionary.d_dict
        directions = F.normalize(self.dictionary.decoder_directions.detach().float(), dim=-1)
        index = torch.arange(n, device=directions.device)
        fired = self.fired if self.fired is not None else torch.zeros_like(index)
        # rank: more activations first, then the lower index (unique, so exactly one is on top)
        rank = fired.double() * n + (n - 1 - index).double()
        chunk = max(1, max_block // n)
        duplicate = torch.zeros(n, dtype=torch.bool, device=directions.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            cosines = directions[rows] @ directions.T
            higher = rank[None, :] > rank[rows, None]  # excludes the latent itself
            duplicate[rows] = ((cosines >= threshold) & higher).any(1)
        return duplicate

    @torch.no_grad()
    def resample(self, x: torch.Tensor) -> int:
        """Re-initialise the wasted latents towards the target's directions (for the batch `x`);
        returns how many."""
        targets = self.wasted()
        latents = targets.nonzero().squeeze(1)
        if len(latents) == 0:
            return 0
        directions = self.target.directions(self.dictionary, x, len(latents), self.generator)
        if directions is None:
            return 0
        alive = ~targets
        live = alive.nonzero().squeeze(1)
        match_live = self.target.match_live
        for param, axis, value in self.dictionary.resample_slots(directions, alive, match_live):
            if isinstance(value, float):
                param.index_fill_(axis, latents, value)
            else:
                param.index_copy_(axis, latents, value)
            reset_adam_state(self.optimizer, param, axis, latents, live if match_live else None)
        self.since_fired[latents] = 0
        return len(latents)

    def state(self) -> dict[str, Any]:
        return {
            "since_fired": self.since_fired,
            **({"fired": self.fired} if self.fired is not None else {}),
            **self.target.state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.since_fired.copy_(state["since_fired"])
        if self.fired is not None:
            self.fired.copy_(state["fired"])
        self.target.load_state(state)


@torch.no_grad()
def reset_adam_state(
    optimizer: torch.optim.Optimizer,
    param: torch.nn.Parameter,
    axis: int,
    latents: torch.Tensor,
    live: torch.Tensor | None = None,
) -> None:
    """Zero the Adam moments of `latents` (indices along `axis` of `param`); with `live` indices,
    set their second moments to the mean of the live latents' instead."""
    state = optimizer.state.get(param, {})
    for name in ("exp_avg", "exp_avg_sq"):
        if name not in state:
            continue
        if live is not None and name == "exp_avg_sq" and len(live):
            mean = state[name].index_select(axis, live).mean(axis, keepdim=True)
            shape = list(state[name].shape)
            shape[axis] = len(latents)
            state[name].index_copy_(axis, latents, mean.expand(shape).contiguous())
        else:
            state[name].index_fill_(axis, latents, 0.0)


@torch.no_grad()
def least_squares_residuals(
    dictionary: Dictionary, x: torch.Tensor, max_block: int = 1 << 24
) -> torch.Tensor:
    """(n, d) residuals of `x` after a least-squares fit on the decoder directions of the latents
    each input activates (at most d of them, the most active), plus the decoder bias.

    Unlike `x − x̂`, the residual does not contain the shrinkage of the active latents' activations
    (the L1 penalty's), so large residuals point at directions that no active latent covers.
    Works in blocks of at most `max_block` floats.
    """
    f = dictionary.encode(x)
    base = dictionary.decode(torch.zeros_like(f[:1]))
    target = x - base
    directions = dictionary.decoder_directions
    width = max(1, min(int((f > 0).sum(1).max()), directions.shape[1]))
    values, indices = f.topk(width, dim=1)
    residuals = torch.empty_like(target)
    chunk = max(1, max_block // (width * max(width, directions.shape[1])))
    eye = torch.eye(width, device=x.device, dtype=x.dtype)
    for start in range(0, len(x), chunk):
        rows = slice(start, start + chunk)
        basis = directions[indices[rows]] * (values[rows] > 0)[..., None]  # (m, width, d)
        gram = basis @ basis.transpose(1, 2) + 1e-4 * eye  # the ridge pins unused slots to 0
        coefficients = torch.linalg.solve(gram, basis @ target[rows, :, None])
        residuals[rows] = target[rows] - (coefficients.transpose(1, 2) @ basis).squeeze(1)
    return residuals


__all__ = [
    "RESAMPLE_POOL",
    "RESAMPLE_TARGETS",
    "InputTarget",
    "Resampler",
    "ResidualTarget",
    "least_squares_residuals",
    "reset_adam_state",
]
