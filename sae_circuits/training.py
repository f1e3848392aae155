"""Train sparse dictionaries on a stream of activation batches.

A *stream* is any iterable of batches, each a `dict[str, Tensor]` mapping a key (a site name such as
`"resid.2"`, or any label) to a `(batch, d)` float tensor. Every dictionary whose `TrainSpec.key`
names an entry trains on that tensor, so a grid of dictionaries (L1 values × sizes, or several
sites) shares one pass over the stream. A stream with `state_dict()` / `load_state_dict(state)` is
checkpointed with the trainer, so a resumed run continues bit for bit like an uninterrupted one.

Per step and dictionary: forward, loss (reconstruction + sparsity), backward, Adam step, with the
kind's decoder constraint around it (untied kinds: the decoder gradient's component along each row
is removed before the step, the rows are renormalised after it). Dead features (no activation in
the last `dead_window` steps) are resampled every `resample_every` steps towards inputs the
dictionary reconstructs worst. Optionally, latents that are wasted without being dead are resampled
too: duplicates of a more active latent (`resample_duplicates`) and latents that fired fewer than
`resample_min_fires` times since the last resampling; `resample_target="residual"` re-initialises
towards least-squares residuals of recent inputs instead of the inputs themselves (see
`sae_circuits.resampling`). What differs by dictionary kind is a method of its class.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from sae_circuits.batches import TokenBatch
from sae_circuits.dictionary import Dictionary, DictionaryConfig, TrainingForward, load_weights
from sae_circuits.errors import UserInputError
from sae_circuits.models import model_name
from sae_circuits.objectives import CleanRun, clean_run, downstream_sites, spliced_loss
from sae_circuits.progress import new_progress
from sae_circuits.protocols import Model
from sae_circuits.resampling import RESAMPLE_TARGETS, Resampler
from sae_circuits.sites import Site
from sae_circuits.sparse_codes import SparseCodes
from sae_circuits.splice import replace_dictionary, temporarily_attached

Batch = dict[str, torch.Tensor]

KINDS = tuple(kind for kind, cls in Dictionary.registry.items() if cls.trainable)
TOP_K_KINDS = tuple(kind for kind in KINDS if Dictionary.registry[kind].sparsities == ("topk",))
REPORT_KINDS = tuple(kind for kind in KINDS if Dictionary.registry[kind].decoder_bias)  # held at 0
SPARSITIES = ("l1", "entropy", "l0", "topk")
RECIPES = ("standard", "report")
LOSSES = ("mse", "kl", "e2e-ds")
CHECKPOINT_FILE = "checkpoint.pt"
_EPS = 1e-9
# the running means a member keeps; sse: the squared error summed over dimensions
_STATS = ("sse", "sparsity", "l0", "loss")


@dataclass
class TrainSpec:
    """One dictionary to train.

    Losses per input `x` with reconstruction `x̂` (of `x`, or for a transcoder of the entry
    `target_key`) and features `f`:
    - recipe "standard": `‖x − x̂‖² + l1 · S(f)`;
    - recipe "report" (Sharkey et al.): `(1/d)‖x − x̂‖² + (l1/d_dict) · S(f)`, no decoder bias,
      orthogonal initialisation;
    where `S` is the L1 norm (`sparsity="l1"`), the entropy of `f / Σf` (`"entropy"`), a
    straight-through L0 (`"l0"`, kind jumprelu), or nothing for top-k kinds (`"topk"`: topk,
    batchtopk, and transcoders given `k`), which keep `k` features per input and add the AuxK loss
    `aux_coefficient · ‖e − ê‖²` (e the residual `x − x̂`, ê its reconstruction by the `aux_k` largest
    dead latents). `loss="kl"` replaces `‖x − x̂‖²` by KL(clean ‖ spliced) of the next-token
    distributions with the dictionary spliced into the model, `"e2e-ds"` adds
    `downstream_coefficient` × the mean normalized MSE of the later residual-stream sites
    (Braun et al. 2024).
    """

    key: str = field(metadata={"help": "the entry of the stream's batches to train on"})
    kind: str = field(default="untied", metadata={"help": "dictionary kind", "choices": KINDS})
    loss: str = field(
        default="mse",
        metadata={
            "help": "reconstruction objective: squared error (mse), KL of the next-token "
            "distributions through the spliced model (kl), or KL plus downstream squared errors "
            "(e2e-ds)",
            "choices": LOSSES,
        },
    )
    d_dict: int = field(default=4096, metadata={"help": "dictionary size: number of features"})
    l1: float = field(default=1e-3, metadata={"help": "sparsity coefficient"})
    sparsity: str = field(
        default="l1",
        metadata={
            "help": "sparsity penalty: L1 norm or entropy of the features, L0 (jumprelu), none "
            "(topk kinds: topk)",
            "choices": SPARSITIES,
        },
    )
    k: int | None = field(
        default=None, metadata={"help": "active features per input of a top-k dictionary"}
    )
    aux_k: int | None = field(
        default=None,
        metadata={
            "help": "AuxK: dead latents that reconstruct the residual (top-k kinds; default: half "
            "the output width; 0: off)"
        },
    )
    aux_coefficient: float = field(default=1 / 32, metadata={"help": "weight of the AuxK loss"})
    downstream_coefficient: float = field(
        default=1.0, metadata={"help": "e2e-ds: weight of the downstream normalized MSE"}
    )
    target_key: str | None = field(
        default=None, metadata={"help": "transcoders: the stream entry to reconstruct"}
    )
    skip: bool = field(
        default=False, metadata={"help": "transcoders: add a linear skip connection"}
    )
    init: str | None = field(
        default=None,
        metadata={"help": "start from the weights of this dictionary folder", "metavar": "DIR"},
    )
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    warmup_steps: int = field(default=1000, metadata={"help": "steps of linear LR warm-up"})
    decay_start: float | None = field(
        default=None,
        metadata={"help": "linear LR decay to 0 from this step (< 1: a fraction of the steps)"},
    )
    resample_every: int | None = field(
        default=None, metadata={"help": "re-initialise dead latents every N steps", "metavar": "N"}
    )
    dead_window: int = field(
        default=1000, metadata={"help": "a latent is dead if it did not fire in this many steps"}
    )
    # ties between duplicates: the lower index is kept
    resample_duplicates: float | None = field(
        default=None,
        metadata={
            "help": "at each resampling, also re-initialise latents whose decoder direction has "
            "cosine >= COS with a latent that fired more since the previous one",
            "metavar": "COS",
        },
    )
    resample_min_fires: int = field(
        default=0,
        metadata={
            "help": "at each resampling, also re-initialise latents that fired fewer than N times "
            "since the previous one; 0: off",
            "metavar": "N",
        },
    )
    # "input": unit inputs drawn ∝ squared reconstruction error from the current batch, encoder
    # 0.2 × the mean live norm, bias 0, Adam moments 0 (Anthropic 2023); "residual": the largest
    # least-squares residuals of the last RESAMPLE_POOL inputs, encoder at the median live norm and
    # bias, Adam second moments at the live mean (see `sae_circuits.resampling`)
    resample_target: str = field(
        default="input",
        metadata={
            "help": "re-initialise towards badly reconstructed inputs (input) or towards "
            "least-squares residuals of recent inputs (residual)",
            "choices": RESAMPLE_TARGETS,
        },
    )
    noise_std: float = field(
        default=0.0,
        metadata={"help": "denoising: std of Gaussian noise added to the input, not the target"},
    )
    normalize: bool = field(
        default=False,
        metadata={"help": "scale activations to mean squared norm d (folded into the weights)"},
    )
    recipe: str = field(
        default="standard",
        metadata={
            "help": "losses and initialisation: standard, or as in Sharkey et al. (report)",
            "choices": RECIPES,
        },
    )
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserInputError(f"TrainSpec({self.key!r}): kind must be one of {', '.join(KINDS)}")
        sparsities = Dictionary.registry[self.kind].sparsities
        if self.sparsity == "l1" and (self.k or "l1" not in sparsities):
            # the default names the kind's own penalty: topk given k, else the kind's first
            self.sparsity = "topk" if self.k and "topk" in sparsities else sparsities[0]
        top_k = self.sparsity == "topk"
        transcoder = self.kind == "transcoder"
        checks = [
            (
                self.sparsity in sparsities,
                f"a {self.kind} dictionary trains with sparsity {' or '.join(sparsities)}",
            ),
            (not top_k or (self.k or 0) >= 1, f"a {self.kind} dictionary needs k >= 1"),
            (top_k or self.k is None, f"k is for top-k dictionaries, not sparsity {self.sparsity}"),
            (self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}"),
            (self.recipe in RECIPES, f"recipe must be one of {', '.join(RECIPES)}"),
            (
                self.recipe != "report" or self.kind in REPORT_KINDS,
                f"the report recipe needs a kind with a decoder bias ({', '.join(REPORT_KINDS)})",
            ),
            (
                self.d_dict >= 1 and self.lr > 0 and self.l1 >= 0,
                "need d_dict >= 1, lr > 0, l1 >= 0",
            ),
            (self.warmup_steps >= 0 and self.noise_std >= 0, "need warmup_steps, noise_std >= 0"),
            (self.dead_window >= 1, "dead_window must be >= 1"),
            (
                self.resample_every is None or self.resample_every >= 1,
                "resample_every must be >= 1",
            ),
            (self.decay_start is None or self.decay_start >= 0, "decay_start must be >= 0"),
            (
                self.resample_duplicates is None or 0 < self.resample_duplicates <= 1,
                "resample_duplicates must be a cosine in (0, 1]",
            ),
            (self.resample_min_fires >= 0, "resample_min_fires must be >= 0"),
            (
                self.resample_target in RESAMPLE_TARGETS,
                f"resample_target must be one of {', '.join(RESAMPLE_TARGETS)}",
            ),
            (self.aux_k is None or self.aux_k >= 0, "aux_k must be >= 0"),
            (
                self.aux_coefficient >= 0 and self.downstream_coefficient >= 0,
                "aux_coefficient and downstream_coefficient must be >= 0",
            ),
            (
                transcoder == (self.target_key is not None),
                "a transcoder needs target_key (the entry it reconstructs); other kinds "
                "reconstruct their input",
            ),
            (transcoder or not self.skip, "skip connections are for transcoders"),
            (
                not transcoder or not self.resample_every,
                "transcoders are not resampled (input and output differ); top-k transcoders "
                "revive dead latents with AuxK",
            ),
            (
                not transcoder or self.loss == "mse",
                "transcoders train with loss mse",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserInputError(f"TrainSpec({self.key!r}): {message}")

    @property
    def through_model(self) -> bool:
        """Whether the loss needs the spliced model (not only activations)."""
        return self.loss != "mse"


def _fit_schedules(specs: list[TrainSpec], steps: int) -> list[TrainSpec]:
    """The specs with a warm-up that does not end within `steps` clipped to a tenth of the run,
    and a decay that would start after the run dropped, each with a one-line warning."""
    fitted = []
    for spec in specs:
        changes: dict[str, Any] = {}
        if spec.warmup_steps >= steps:
            changes["warmup_steps"] = max(1, steps // 10)
            warnings.warn(
                f"TrainSpec({spec.key!r}): the warm-up of {spec.warmup_steps} steps does not end "
                f"within the run's {steps} steps: clipped to {changes['warmup_steps']}",
                stacklevel=3,
            )
        if spec.decay_start is not None and spec.decay_start >= max(steps, 1):
            changes["decay_start"] = None
            warnings.warn(
                f"TrainSpec({spec.key!r}): the decay starts at step {spec.decay_start:g}, after "
                f"the run's {steps} steps: no decay",
                stacklevel=3,
            )
        fitted.append(replace(spec, **changes) if changes else spec)
    return fitted


def learning_rate(spec: TrainSpec, step: int, steps: int) -> float:
    """The LR at 0-based `step` of `steps`: linear warm-up, constant, optional linear decay to 0."""
    scale = min(1.0, (step + 1) / spec.warmup_steps) if spec.warmup_steps else 1.0
    if spec.decay_start is not None:
        start = spec.decay_start * steps if spec.decay_start < 1 else spec.decay_start
        if step >= start:
            scale *= max(0.0, (steps - step) / max(steps - start, 1.0))
    return spec.lr * scale


def train_dictionaries(
    source: Iterable[Batch] | Iterable[TokenBatch],
    specs: list[TrainSpec],
    steps: int,
    *,
    d_in: dict[str, int] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1000,
    resume: bool = True,
    progress: bool = True,
    site_names: Mapping[str, str | Site] | None = None,
    model: str | Model | None = None,
    normalize_batches: int = 8,
    log_every: int = 10,
    device: str | torch.device = "cpu",
) -> list[Dictionary]:
    """Train one dictionary per spec for `steps` batches of `source`, all in the same pass.

    `source` yields activation batches, or, when `model` is the language model itself (needed by
    the `kl` and `e2e-ds` losses), token batches (`ids` or `(ids, attention_mask)`): each is run
    clean once, and every dictionary trains on the activations of its site (stream keys are then
    site names) or through the spliced model (`sae_circuits.objectives`). `model` as a string is
    only the name written into the configs.

    `d_in` (widths per key) is read from the first batch when not given. With `checkpoint_dir`,
    the full state (dictionaries, Adam, resampling counters, RNGs, the stream's state) is written
    atomically every `checkpoint_every` steps and at the end; with `resume`, an existing checkpoint
    is continued. Normalised keys get a scale estimated from the first `normalize_batches` batches;
    it is folded into the returned weights, so they work on raw activations, and recorded as
    `hyperparameters["activation_scale"]`. `site_names` maps keys to the sites written into the
    configs (default: the key, if it names a site). Each dictionary's config records its spec,
    `steps` and `tokens`, and `metrics` gets `train_mse` (per dimension), `train_sse` (summed over
    dimensions), `train_sparsity`, `train_l0`, `train_loss` (means over the last `log_every`
    steps), `train_dead` and `train_dead_fraction`.
    """
    if not specs:
        raise UserInputError("no dictionaries to train")
    if steps < 1 or checkpoint_every < 1 or log_every < 1 or normalize_batches < 1:
        raise UserInputError("steps, checkpoint_every, log_every, normalize_batches must be >= 1")
    language_model = None if model is None or isinstance(model, str) else model
    _check_objectives(specs, language_model)
    specs = _fit_schedules(specs, steps)
    device = torch.device(device)
    path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    state = _load_checkpoint(path, specs, source) if path and resume and path.is_file() else None

    stream = _Stream(source, state["stream"]["pending"] if state else [])
    reader = _BatchReader(language_model, specs)
    if state:
        widths, scales, start = state["d_in"], state["scales"], state["step"]
    else:
        normalized = sorted({spec.key for spec in specs if spec.normalize})
        first = [reader.read(raw) for raw in stream.peek(normalize_batches if normalized else 1)]
        widths = _input_widths(first[0], specs, d_in)
        scales = {key: _activation_scale(first, key) for key in normalized}
        start = 0
    names = site_names or {}
    keys = {spec.key for spec in specs} | {spec.target_key for spec in specs if spec.target_key}
    sites = {key: _config_site(key, names) for key in keys}
    indicators = _Indicators()
    members = [
        _Member(
            spec,
            widths[spec.key],
            widths.get(spec.target_key),
            sites,
            model_name(language_model) if language_model is not None else model,
            device,
            scales.get(spec.key) if spec.normalize else None,
            indicators,
        )
        for spec in specs
    ]
    if state:
        for member, member_state in zip(members, state["members"], strict=True):
            member.load_state(member_state)

    done = start
    with _ProgressBar(progress, steps, start) as bar, reader.splices(members):
        for step in range(start, steps):
            raw = stream.next()
            if raw is None:
                warnings.warn(f"the stream ended after {step} of {steps} steps", stacklevel=2)
                break
            batch = reader.read(raw)
            inputs: dict[tuple[str, bool], torch.Tensor] = {}
            for member in members:
                spec = member.spec
                if (spec.key, spec.normalize) not in inputs:
                    x = batch[spec.key].to(device, torch.float32)
                    inputs[spec.key, spec.normalize] = x * scales[spec.key] if spec.normalize else x
                x = inputs[spec.key, spec.normalize]
                target = batch[spec.target_key].to(device, torch.float32) if spec.target_key else x
                member.step(x, target, learning_rate(spec, step, steps), reader.objective(member))
                if (
                    spec.resample_every
                    and (step + 1) % spec.resample_every == 0
                    and step + 1 < steps
                ):
                    member.resampler.resample(x)
            done = step + 1
            if done % log_every == 0 or done == steps:
                for member in members:
                    member.flush_stats()
                bar.update(done, members)
            if path is not None and (done % checkpoint_every == 0 or done == steps):
                _save_checkpoint(path, done, specs, widths, scales, stream, members)
    return [
        member.finish(done, scales[member.spec.key] if member.spec.normalize else None)
        for member in members
    ]


def _check_objectives(specs: list[TrainSpec], language_model: Model | None) -> None:
    through = [spec for spec in specs if spec.through_model]
    if through and language_model is None:
        raise UserInputError(
            f"loss {through[0].loss} trains through the model: pass the language model as model="
        )
    for spec in through:
        if spec.normalize:
            raise UserInputError(
                f"TrainSpec({spec.key!r}): loss {spec.loss} trains on raw activations; "
                "normalize is for mse (an --init dictionary trained normalized has its scale folded)"
            )
    if language_model is not None:
        for spec in specs:
            for key in filter(None, (spec.key, spec.target_key)):
                try:
                    Site.parse(key).resolve(language_model)
                except UserInputError as error:
                    raise UserInputError(
                        f"training on token batches: stream key {key!r} must be a site ({error})"
                    ) from None


class _BatchReader:
    """Turns what the source yields into activation batches: as is, or (with a language model)
    by a clean run of a token batch, which the kl and e2e-ds members then train against."""

    def __init__(self, language_model: Model | None, specs: list[TrainSpec]) -> None:
        self.model = language_model
        self.sites: list[Site] = []  # read by each clean run
        self.downstream: dict[Site, list[Site]] = {}  # of the e2e-ds members' sites
        if language_model is not None:
            for spec in specs:
                if spec.loss == "e2e-ds":
                    site = Site.parse(spec.key)
                    self.downstream[site] = downstream_sites(language_model, site)
            keys = {k for spec in specs for k in (spec.key, spec.target_key) if k}
            later = (s for sites in self.downstream.values() for s in sites)
            self.sites = sorted({*(Site.parse(key) for key in keys), *later})
        self.clean: CleanRun | None = None
        self.slots: dict[Site, Dictionary] = {}  # the dictionary each splice holds between steps

    def read(self, raw: Batch | TokenBatch) -> Batch:
        if self.model is None:
            return raw
        for site, dictionary in self.slots.items():  # the clean run passes the same splices
            replace_dictionary(self.model, site, dictionary)
        self.clean = clean_run(self.model, raw, self.sites)
        return {str(site): self.clean.scored_activations(site) for site in self.sites}

    @contextmanager
    def splices(self, members: list[_Member]) -> Iterator[None]:
        """One splice per site trained through the model, its dictionary swapped per member; the
        model's own weights frozen meanwhile."""
        through = {}
        for member in members:
            if member.spec.through_model:
                through.setdefault(Site.parse(member.spec.key), member.dictionary)
        if not through:
            yield
            return
        self.slots = through
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            with temporarily_attached(self.model, through):
                yield
        finally:
            self.slots = {}
            for p in frozen:
                p.requires_grad_(True)

    def objective(self, member: _Member) -> Callable[[], torch.Tensor] | None:
        """The loss of a kl or e2e-ds member on the current batch (None: mse)."""
        spec = member.spec
        if not spec.through_model:
            return None
        site = Site.parse(spec.key)

        def loss() -> torch.Tensor:
            replace_dictionary(self.model, site, member.dictionary)
            downstream = self.downstream.get(site) if spec.loss == "e2e-ds" else None
            return spliced_loss(
                self.model, site, self.clean, downstream, spec.downstream_coefficient
            )

        return loss


class _Indicators:
    """`f > 0` as float 0/1 in a buffer reused across steps and dictionaries of the same shape.

    On CPU a fresh (batch, d_dict) tensor per step costs more in page faults than the comparison,
    and reducing a bool tensor is several times slower than reducing a float one.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def of(self, f: torch.Tensor) -> torch.Tensor:
        key = (tuple(f.shape), f.device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(f.shape, device=f.device)
        return torch.gt(f, 0, out=self.buffers[key])


# --------------------------------------------------------------------------------- one dictionary
class _Member:
    """A dictionary in training with its optimizer, resampler, statistics and RNG."""

    def __init__(
        self,
        spec: TrainSpec,
        d_in: int,
        d_out: int | None,
        sites: Mapping[str, Site | None],
        model: str | None,
        device: torch.device,
        scale: float | None = None,
        indicators: _Indicators | None = None,
    ) -> None:
        self.spec = spec
        self.indicators = indicators or _Indicators()
        config = DictionaryConfig(
            kind=spec.kind,
            d_in=d_in,
            d_dict=spec.d_dict,
            in_site=sites[spec.key],
            out_site=sites[spec.target_key or spec.key],
            model=model,
            d_out=d_out if spec.target_key else None,
            k=spec.k,
            skip=spec.skip,
        )
        report = spec.recipe == "report"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            self.dictionary = Dictionary.from_config(config)
            if report:
                self.dictionary.orthogonal_init()
        if spec.init is not None:
            _initialise_from(self.dictionary, spec.init, scale)
        self.dictionary.to(device)
        frozen = self.dictionary.decoder_bias if report else None  # the report recipe: held at 0
        if frozen is not None:
            getattr(self.dictionary, frozen).requires_grad_(False)
        scales = self.dictionary.learning_rate_scales
        groups: dict[float, list[torch.nn.Parameter]] = {}
        for name, p in self.dictionary.named_parameters():
            if name != frozen:
                groups.setdefault(scales.get(name, 1.0), []).append(p)
        self.optimizer = torch.optim.Adam(
            [{"params": ps, "lr_scale": scale} for scale, ps in groups.items()],
            lr=spec.lr,
            fused=True,  # one kernel per parameter: about half the time of the loop on CPU
        )
        self.mse_scale = 1.0 / d_in if report else 1.0
        self.penalty = 0.0 if spec.sparsity == "topk" else spec.l1 / (spec.d_dict if report else 1)
        self.aux_k = (
            (config.output_dim // 2 if spec.aux_k is None else spec.aux_k)
            if (spec.sparsity == "topk")
            else 0
        )
        self.generator = torch.Generator(device).manual_seed(spec.seed)
        self.resampler = Resampler(
            self.dictionary,
            self.optimizer,
            dead_window=spec.dead_window,
            duplicates=spec.resample_duplicates,
            min_fires=spec.resample_min_fires,
            target=spec.resample_target,
            generator=self.generator,
        )
        self.totals = torch.zeros(len(_STATS), device=device)  # sums since the last flush
        self.count = 0
        self.stats = torch.full((len(_STATS),), math.nan)
        self.tokens = 0

    def step(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        lr: float,
        objective: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        """One optimizer step on inputs `x` reconstructing `target` (`x` itself but for
        transcoders); `objective` replaces the squared error in the loss (kl, e2e-ds)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        if self.spec.noise_std:
            noise = torch.randn(x.shape, generator=self.generator, device=x.device)
            out = self.dictionary.training_forward(x + self.spec.noise_std * noise)
        else:
            out = self.dictionary.training_forward(x)
        mse = (out.x_hat - target).pow(2).sum(-1).mean()
        sparsity = self._sparsity(out)
        loss = self.mse_scale * mse if objective is None else objective()
        if self.penalty:
            loss = loss + self.penalty * sparsity
        if self.aux_k:
            aux = self.dictionary.auxiliary_reconstruction(
                x, out.pre, self.resampler.dead, self.aux_k
            )
            if aux is not None:
                residual = (target - out.x_hat).detach()
                aux_loss = (residual - aux).pow(2).sum(-1).mean()
                loss = loss + self.spec.aux_coefficient * self.mse_scale * aux_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.dictionary.project_decoder_gradient()
        self.optimizer.step()
        self.dictionary.normalize_decoder()
        with torch.no_grad():
            fire_counts = self._fire_counts(out.features)
            self.resampler.observe(x, fire_counts)
            l0 = fire_counts.sum() / len(x)
            self.totals += torch.stack([mse.detach(), sparsity.detach(), l0, loss.detach()])
        self.count += 1
        self.tokens += len(x)

    def _sparsity(self, out: TrainingForward) -> torch.Tensor:
        """The penalty's S(f) (for the statistics also when there is no penalty: then L1)."""
        if self.spec.sparsity == "entropy":
            return _entropy(out.features)
        if self.spec.sparsity == "l0":
            return out.l0.mean()
        values = out.features.values if isinstance(out.features, SparseCodes) else out.features
        return values.sum() / out.x_hat.shape[0]

    def _fire_counts(self, features: torch.Tensor | SparseCodes) -> torch.Tensor:
        if isinstance(features, SparseCodes):
            return features.fire_counts()
        return self.indicators.of(features).sum(0)

    def flush_stats(self) -> None:
        if self.count:
            self.stats = (self.totals / self.count).cpu()
            self.totals.zero_()
            self.count = 0

    def state(self) -> dict[str, Any]:
        return {
            "dictionary": self.dictionary.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "totals": self.totals,
            "count": self.count,
            "stats": self.stats,
            "tokens": self.tokens,
            **self.resampler.state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.dictionary.load_state_dict(state["dictionary"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.totals.copy_(state["totals"])
        self.count, self.stats, self.tokens = state["count"], state["stats"], state["tokens"]
        self.resampler.load_state(state)

    @torch.no_grad()
    def finish(self, steps: int, scale: float | None) -> Dictionary:
        """The trained dictionary for raw activations, with its spec and training metrics recorded."""
        d = self.dictionary
        if scale is not None:  # trained on s·x
            d.fold_activation_scale(scale)
        d.requires_grad_(True)
        sse, sparsity, l0, loss = (float(v) for v in self.stats)
        if scale is not None:  # metrics in raw units, like the weights
            sse /= scale**2
            loss = math.nan if self.penalty or self.aux_k else loss / scale**2
            sparsity /= 1.0 if self.spec.sparsity == "entropy" else scale
        dead = int(self.resampler.dead.sum())
        d.config.hyperparameters = {
            **asdict(self.spec),
            "steps": steps,
            "tokens": self.tokens,
            "activation_scale": scale,
        }
        d.config.metrics.update(
            train_mse=sse / d.config.output_dim,
            train_sse=sse,
            train_sparsity=sparsity,
            train_l0=l0,
            train_loss=loss,
            train_dead=dead,
            train_dead_fraction=dead / d.d_dict,
        )
        return d


def _config_site(key: str, site_names: Mapping[str, str | Site]) -> Site | None:
    """The site recorded for `key`'s dictionaries: `site_names[key]`, else the key if it names a
    site (a stream key may be any label)."""
    if key in site_names:
        return Site.parse(site_names[key])
    try:
        return Site.parse(key)
    except UserInputError:
        return None


def _initialise_from(dictionary: Dictionary, folder: str, scale: float | None) -> None:
    """Copy the weights of the dictionary in `folder` into `dictionary` (a kind with the same
    parameters, or more: e.g. untied into topk); with `scale`, moved to scaled activations."""
    start = Dictionary.load(folder)
    if scale is not None:
        start.fold_activation_scale(1 / scale)
    load_weights(dictionary, start.state_dict(), f"--init {folder}", subset=True)


def _entropy(f: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the features normalised to sum 1 per input."""
    p = f / (f.sum(-1, keepdim=True) + _EPS)
    return -(p * torch.log(p + _EPS)).sum(-1).mean()


# --------------------------------------------------------------------------------- stream & state
class _Stream:
    """The source's iterator plus batches read ahead (for normalisation), which checkpoints keep."""

    def __init__(self, source: Iterable[Batch], pending: list[Batch]) -> None:
        self.source = source
        self.pending = deque(pending)
        self.iterator: Iterator[Batch] = iter(source)

    def peek(self, n: int) -> list[Batch]:
        while len(self.pending) < n:
            batch = next(self.iterator, None)
            if batch is None:
                break
            self.pending.append(batch)
        if not self.pending:
            raise UserInputError("the activation stream is empty")
        return list(self.pending)

    def next(self) -> Batch | None:
        return self.pending.popleft() if self.pending else next(self.iterator, None)

    def state(self) -> dict[str, Any]:
        source_state = self.source.state_dict() if hasattr(self.source, "state_dict") else None
        return {"source": source_state, "pending": list(self.pending)}


def _input_widths(
    batch: Batch, specs: list[TrainSpec], given: dict[str, int] | None
) -> dict[str, int]:
    widths = dict(given or {})
    for key in {k for spec in specs for k in (spec.key, spec.target_key) if k}:
        if key not in batch:
            raise UserInputError(
                f"the stream has no entry {key!r}; it has {', '.join(sorted(batch))}"
            )
        tensor = batch[key]
        if tensor.ndim != 2 or widths.setdefault(key, tensor.shape[1]) != tensor.shape[1]:
            raise UserInputError(
                f"stream entry {key!r} has shape {tuple(tensor.shape)}; expected (batch, {widths[key]})"
            )
    return widths


def _activation_scale(batches: list[Batch], key: str) -> float:
    """The factor s that makes the mean squared norm of s·x equal to d."""
    x = torch.cat([batch[key].float() for batch in batches])
    mean_square = x.pow(2).sum(-1).mean().item()
    if not mean_square > 0:
        raise UserInputError(f"cannot normalise {key!r}: its activations are all zero")
    return math.sqrt(x.shape[1] / mean_square)


def _save_checkpoint(
    path: Path,
    step: int,
    specs: list[TrainSpec],
    widths: dict[str, int],
    scales: dict[str, float],
    stream: _Stream,
    members: list[_Member],
) -> None:
    """Write the whole training state to a temporary file and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "version": 1,
        "step": step,
        "specs": [asdict(spec) for spec in specs],
        "d_in": widths,
        "scales": scales,
        "stream": stream.state(),
        "members": [member.state() for member in members],
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, specs: list[TrainSpec], source: Any) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise UserInputError(f"cannot read checkpoint {path}: {error}") from None
    # fields added since a checkpoint was written take their defaults
    defaults = {f.name: f.default for f in fields(TrainSpec) if f.default is not MISSING}
    saved = [{**defaults, **spec} for spec in state.get("specs", [])]
    if saved != [asdict(spec) for spec in specs]:
        raise UserInputError(
            f"checkpoint {path} was written for other TrainSpecs; use another directory"
        )
    if state["stream"]["source"] is not None and hasattr(source, "load_state_dict"):
        source.load_state_dict(state["stream"]["source"])
    else:
        warnings.warn("the stream has no saved state: resuming on a fresh stream", stacklevel=3)
    return state


class _ProgressBar:
    """Progress on stderr with tokens/s and, over the dictionaries, the mean per-dimension MSE,
    loss, L0 and dead fraction."""

    def __init__(self, enabled: bool, steps: int, start: int) -> None:
        self.progress = new_progress("{task.fields[stats]}") if enabled else None
        self.steps, self.start = steps, start

    def __enter__(self) -> _ProgressBar:
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task(
                "training", total=self.steps, completed=self.start, stats=""
            )
            self.clock, self.tokens = time.monotonic(), None
        return self

    def update(self, done: int, members: list[_Member]) -> None:
        if self.progress is None:
            return
        stats = torch.stack([member.stats for member in members]).nanmean(0)
        mse = sum(float(m.stats[0]) / m.dictionary.config.output_dim for m in members)
        dead = sum(float(m.resampler.dead.float().mean()) for m in members) / len(members)
        tokens = members[0].tokens
        if self.tokens is None:  # the rate counts from the first update (after a resume, too)
            self.clock, self.tokens = time.monotonic(), tokens
        seconds = time.monotonic() - self.clock
        rate = f"{(tokens - self.tokens) / seconds:.3g} tok/s  " if tokens > self.tokens else ""
        text = (
            f"{rate}mse {mse / len(members):.4g}  loss {stats[3]:.4g}  L0 {stats[2]:.1f}  "
            f"dead {100 * dead:.1f}%"
        )
        if len(members) > 1:
            text += f" (mean of {len(members)})"
        self.progress.update(self.task, completed=done, stats=text)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


__all__ = ["TrainSpec", "learning_rate", "train_dictionaries"]
