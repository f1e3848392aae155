"""Running traces on NDIF (nnsight's remote execution) with the dictionaries inside each request.

A local splice is a submodule plus a persistent nnsight edit: a server, which loads the bare model,
never sees either (a request that refers to the spliced submodule fails there with an unknown
`Module:...sae` id). So a remote run (`remote=True`: NDIF; `remote="local"`: nnsight's local
simulation, which serialises the request and deserialises it with local modules hidden before
running it here) unmounts the splices for the duration (`splice.unmounted`) and carries each
dictionary in the request as pure-torch graphs (`torch.fx`) applied by the trace body
(`carried.CarriedSite`); `sae_circuits.carried` is shipped by value (`nnsight.register`).

NDIF needs an API key in nnsight's config (`NDIF_API_KEY`, or
`nnsight.CONFIG.set_default_api_key(...)`) and runs only the models it hosts, named by their hub id.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nnsight
import torch
from torch import fx, nn
from torch.fx.experimental import meta_tracer

from sae_circuits import carried
from sae_circuits.carried import CarriedSite, Codec
from sae_circuits.dictionary import Dictionary
from sae_circuits.errors import UserInputError
from sae_circuits.protocols import Model
from sae_circuits.sites import Site, SiteMap, envoy_at, torch_module
from sae_circuits.splice import spliced, unmounted

Remote = bool | str
"""False: run here (the default); True: run on NDIF; "local": nnsight's local simulation."""

CHOICES = {"ndif": True, "local": "local"}

_CODECS: weakref.WeakKeyDictionary[Dictionary, Codec] = weakref.WeakKeyDictionary()


def parse_remote(text: str | bool | None) -> Remote:
    """`--remote` as given on the command line: absent → False, "ndif" → True, "local"."""
    if text is None or text is False:
        return False
    if text is True or text == "local":
        return text
    if text not in CHOICES:
        raise UserInputError(f"--remote takes {' or '.join(CHOICES)}, not {text!r}")
    return CHOICES[text]


def check_remote(model: Model, remote: Remote) -> None:
    """Raise a one-line `UserInputError` when `model` cannot run with `remote`."""
    if remote not in (False, True, "local"):
        raise UserInputError(f"remote must be False, True or 'local', not {remote!r}")
    if remote is not True:
        return
    if not nnsight.CONFIG.API.APIKEY:
        raise UserInputError(
            "--remote runs on NDIF and needs an API key: set NDIF_API_KEY, or run "
            "python -c \"import nnsight; nnsight.CONFIG.set_default_api_key('KEY')\" "
            "(a key from https://login.ndif.us); --remote local simulates a request here"
        )
    repo = getattr(model, "repo_id", None)
    if repo is None or Path(str(repo)).exists():
        raise UserInputError(
            f"NDIF runs only the models it hosts, named by their hub id; {repo} is a local "
            "folder (use --remote local to check a request here)"
        )


class _Encode(nn.Module):
    """A dictionary's `encode` as a module, for `torch.fx` to trace."""

    def __init__(self, dictionary: Dictionary) -> None:
        super().__init__()
        self.dictionary = dictionary

    def forward(self, x):  # no annotations: torch.fx would write them into the graph's code
        return self.dictionary.encode(x)


class _Reconstruct(_Encode):
    """A dictionary's `reconstruct` as a module, for `torch.fx` to trace."""

    def forward(self, f, source):  # no annotations, as in _Encode
        return self.dictionary.reconstruct(f, source)


def codec(dictionary: Dictionary) -> Codec:
    """`dictionary`'s encode and reconstruct as pure-torch graphs sharing its parameters
    (traced once per dictionary); a kind whose code branches on data cannot travel."""
    if dictionary not in _CODECS:
        try:
            parts = [fx.symbolic_trace(part(dictionary)) for part in (_Encode, _Reconstruct)]
        except Exception as error:  # torch.fx raises several types for untraceable code
            raise UserInputError(
                f"a {dictionary.kind} dictionary cannot run remotely: torch.fx cannot trace "
                f"its code ({error})"
            ) from error
        _CODECS[dictionary] = Codec(*parts)
    return _CODECS[dictionary]


class _Function(nn.Module):
    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.function = function

    def forward(self, logits):  # no annotations, as in _Method
        return self.function(logits)


def portable_metric(
    metric: Callable[[torch.Tensor], torch.Tensor] | None, shape: tuple[int, ...]
) -> nn.Module | None:
    """`metric` (a function of logits of `shape`) as a pure-torch graph that a request can carry,
    specialised to that shape (torch.fx, with shapes from meta tensors, so code that branches
    on shapes traces), or None when there is no metric or it branches on values (then the
    caller brings the logits back and computes it here)."""
    if metric is None:
        return None
    example = {"logits": torch.empty(shape, device="meta")}
    try:
        return meta_tracer.symbolic_trace(_Function(metric), meta_args=example)
    except Exception:  # torch.fx raises several types for untraceable code
        return None


def vocabulary_size(model: Model) -> int:
    """The width of the model's logits."""
    return int(torch_module(model).get_output_embeddings().weight.shape[0])


@contextmanager
def request(model: Model, remote: Remote) -> Iterator[SiteMap]:
    """For the duration of a `with` block in which a trace runs with `remote=`: the model
    without its local splices and, by site in forward order, the `CarriedSite` each trace body
    applies (every one of them, in order, so that the request splices what the model did).
    With `remote` False it changes nothing and yields no sites."""
    check_remote(model, remote)
    if not remote:
        yield SiteMap()
        return
    nnsight.register(carried)
    with unmounted(model) as entries:
        sites = SiteMap()
        for entry in entries:
            host = envoy_at(model, entry.location.path)
            reads = None
            if entry.reads != entry.site:
                path, io = entry.reads.resolve(model)
                reads = (envoy_at(model, path), io)
            sites[entry.site] = CarriedSite(codec(entry.dictionary), host, entry.location.io, reads)
        yield sites


class HookSite:
    """A locally spliced site behind `CarriedSite`'s interface, so that one trace body serves
    local and remote runs: `apply` reads (and, given edits, replaces) the splice's `features` and
    `error` hook points; it does not read the site's activation (None in its place)."""

    def __init__(self, hook: Any) -> None:
        self.hook = hook

    def apply(
        self,
        features: Callable[[torch.Tensor], torch.Tensor] | None = None,
        error: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        f = self.hook.features.output
        if features is not None:
            self.hook.features.output = features(f)
        e = self.hook.error.output
        if error is not None:
            self.hook.error.output = error(e)
        return f, e, None


@contextmanager
def spliced_sites(
    model: Model, sites: Sequence[str | Site], remote: Remote, through_last: bool = False
) -> Iterator[tuple[list, list[int]]]:
    """For a trace body written once for local and remote runs, in a `with` block around the
    trace: the sites whose `apply()` the body calls, in forward order, and the position of each
    of `sites` among them. Locally, the hook points of `sites` (`HookSite`); remotely (`request`),
    every carried site, or with `through_last` those up to the last of `sites` (for a body that
    stops there)."""
    wanted = [Site.parse(site) for site in sites]
    hooks = {site: spliced(model, site) for site in sorted(set(wanted))}
    with request(model, remote) as carried:
        if remote:
            keys, order = list(carried), list(carried.values())
        else:
            keys, order = list(hooks), [HookSite(hook) for hook in hooks.values()]
        places = [keys.index(site) for site in wanted]
        if remote and through_last:
            order = order[: max(places, default=-1) + 1]
        yield order, places


__all__ = [
    "CHOICES",
    "HookSite",
    "Remote",
    "check_remote",
    "codec",
    "parse_remote",
    "portable_metric",
    "request",
    "spliced_sites",
    "vocabulary_size",
]
