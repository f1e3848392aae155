"""Sparse dictionaries (SAEs) and baseline bases behind one interface, with save/load.

Every dictionary maps an activation `x` (last dimension `d_in`) to features `f` (last dimension
`d_dict`) and back: `encode(x) -> f`, `decode(f) -> x_hat`, `forward(x) -> (x_hat, f)`. Row `i` of
`decoder_directions` is the direction `d_i` that feature `i` writes (the patching formula uses it).

A dictionary may normalise each input token first (`DictionaryConfig.normalization`, as SAELens'
`normalize_activations`): `encode(x)` still takes the raw activation, `decode(f)` is then the
reconstruction of the normalised input, and `reconstruct(f, x)` maps it back to the raw space with
`x`'s statistics, so that feature `i` writes `d_i` times a per-token scale.

On disk a dictionary is a folder with `config.json` and `weights.safetensors`. `Dictionary.load`
also reads the formats of other libraries, and `Dictionary.save(..., format=...)` writes some of
them (`sae_circuits.formats`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from sae_circuits.errors import UserInputError
from sae_circuits.files import (
    read_json,
    read_safetensors,
    save_safetensors_atomic,
    write_json_atomic,
)
from sae_circuits.resources import asset_dir
from sae_circuits.sites import Site, SiteMap
from sae_circuits.sparse_codes import (
    SparseCodes,
    gather_linear,
    select_batch_topk,
    select_topk,
    sparse_decode,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
# per-token input normalisations (SAELens' run-time `normalize_activations`)
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
LAYER_NORM_EPS = 1e-5  # SAELens': added to the standard deviation
# the formats whose files can say that a dictionary normalises its input
_NORMALIZING_FORMATS = ("native", "saelens")


@dataclass(init=False)
class DictionaryConfig:
    """What a dictionary is and where it came from; saved as `config.json`.

    `in_site` is the site a dictionary reads and `out_site` the site it reconstructs (they differ
    for transcoders); `DictionaryConfig(..., site=s)` sets both. Sites are parsed once here and
    written as text. `normalization` (one of `NORMALIZATIONS`) is applied to each input token
    before encoding: "constant_norm_rescale" scales it to norm `sqrt(d_in)`, "layer_norm" takes
    `(x − mean) / (std + 1e-5)` (std with Bessel's correction); a dictionary that reconstructs
    its input maps the reconstruction back (÷ the scale; × std + mean), a transcoder does not.
    """

    kind: str
    d_in: int
    d_dict: int
    in_site: Site | None
    out_site: Site | None
    model: str | None
    d_out: int | None  # width of `out_site` when it differs from `d_in`
    k: int | None  # top-k dictionaries
    skip: bool  # transcoders: a linear skip connection from input to output
    normalization: str  # per-token input normalisation, one of NORMALIZATIONS
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any]

    def __init__(
        self,
        kind: str,
        d_in: int,
        d_dict: int,
        *,
        site: str | Site | None = None,
        in_site: str | Site | None = None,
        out_site: str | Site | None = None,
        model: str | None = None,
        d_out: int | None = None,
        k: int | None = None,
        skip: bool = False,
        normalization: str = "none",
        hyperparameters: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise UserInputError(
                f"unknown input normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}"
            )
        if site is not None:
            if in_site is not None or out_site is not None:
                raise UserInputError("give a dictionary either site or in_site/out_site")
            in_site = out_site = site
        self.kind, self.d_in, self.d_dict = kind, d_in, d_dict
        self.in_site, self.out_site = _parse_site(in_site), _parse_site(out_site)
        self.model, self.d_out, self.k, self.skip = model, d_out, k, skip
        self.normalization = normalization
        self.hyperparameters = {} if hyperparameters is None else hyperparameters
        self.metrics = {} if metrics is None else metrics

    @property
    def site(self) -> Site | None:
        """The site the dictionary is spliced at: the one it reconstructs."""
        return self.out_site

    @property
    def output_dim(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(in_site=_site_text(self.in_site), out_site=_site_text(self.out_site))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DictionaryConfig:
        """Read `to_dict`'s form, or the older one (`site`, the site read; `out_site` if another)."""
        missing = {"kind", "d_in", "d_dict"} - set(data)
        if missing:
            raise UserInputError(f"dictionary config lacks {', '.join(sorted(missing))}")
        data = dict(data)
        if "in_site" not in data and "site" in data:
            data["in_site"] = data["site"]
            data["out_site"] = data.get("out_site") or data["site"]
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def _parse_site(site: str | Site | None) -> Site | None:
    return None if site is None else Site.parse(site)


def _site_text(site: Site | None) -> str | None:
    return None if site is None else str(site)


class LatentSlot(NamedTuple):
    """A parameter that holds one slice per latent along `axis`, and what resampling writes there."""

    parameter: nn.Parameter
    axis: int
    value: torch.Tensor | float  # one slice per re-initialised latent, or one number for all


class TrainingForward(NamedTuple):
    """What a training step needs from a dictionary's forward pass."""

    x_hat: torch.Tensor
    features: torch.Tensor | SparseCodes  # dense (n, d_dict), or the active entries only
    pre: torch.Tensor | None = None  # detached pre-activations, where AuxK picks dead latents
    l0: torch.Tensor | None = None  # differentiable L0 per input (JumpReLU's straight-through)


class Dictionary(nn.Module):
    """Base class: subclasses set `kind`, create their parameters and implement encode/decode.

    A kind also owns what training does differently by kind: the class attributes below, the
    forward pass of a training step (`training_forward`), the decoder constraint
    (`project_decoder_gradient`, `normalize_decoder`), the slots resampling rewrites
    (`resample_slots`), the folding of an activation scale (`fold_activation_scale`) and the
    report recipe's `orthogonal_init`.
    """

    kind: ClassVar[str] = ""
    # whether the kind applies `config.normalization` (to `centered`'s input)
    normalizable: ClassVar[bool] = False
    # whether a normalised input's reconstruction is mapped back (False: another site's output)
    maps_back: ClassVar[bool] = True
    learning_rate_scales: ClassVar[
        dict[str, float]
    ] = {}  # parameters trained at a multiple of the LR
    registry: ClassVar[dict[str, type[Dictionary]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Dictionary.registry[cls.kind] = cls

    def __init__(self, config: DictionaryConfig) -> None:
        if config.normalization != "none" and not self.normalizable:
            raise UserInputError(
                f"a {self.kind} dictionary cannot normalise its input "
                f"(normalization {config.normalization!r})"
            )
        super().__init__()
        self.config = config

    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def d_dict(self) -> int:
        return self.config.d_dict

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def decoder_directions(self) -> torch.Tensor:
        """(d_dict, d_out): the direction each feature adds to the reconstruction."""
        raise NotImplementedError

    def skip_term(self, x: torch.Tensor) -> torch.Tensor | float:
        """What a skip connection adds to the reconstruction of input `x` (0: none)."""
        return 0.0

    @property
    def scales_per_token(self) -> bool:
        """Whether a feature writes its decoder direction times a per-token scale (the input
        normalisation's, mapped back), rather than the direction itself."""
        return self.config.normalization != "none" and self.maps_back

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """The raw input `x` as the encoder sees it (`config.normalization`, per token)."""
        if self.config.normalization == "constant_norm_rescale":
            return x * _norm_coefficient(x, self.d_in)
        if self.config.normalization == "layer_norm":
            mean, std = _layer_norm_statistics(x)
            return (x - mean) / (std + LAYER_NORM_EPS)
        return x

    def reconstruct(self, f: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Features `f` back in the raw space of the output, given the raw input `source` they
        belong to (its normalisation statistics, its skip term): `decode(f) + skip_term(source)`
        for dictionaries without a normalisation mapped back."""
        x_hat = self.decode(f)
        if self.scales_per_token and self.config.normalization == "constant_norm_rescale":
            x_hat = x_hat / _norm_coefficient(source, self.d_in)
        elif self.scales_per_token:  # layer_norm: SAELens multiplies by std, not std + eps
            mean, std = _layer_norm_statistics(source)
            x_hat = x_hat * std + mean
        return x_hat + self.skip_term(source)

    def fixed_directions(self, use: str) -> torch.Tensor:
        """`decoder_directions` for a computation (`use`) that takes them as what each feature
        writes, whatever the token; refused where features write them scaled per token."""
        if self.scales_per_token:
            raise UserInputError(
                f"{use} need decoder directions that do not depend on the token, but this "
                f"dictionary normalises its input ({self.config.normalization}): each feature "
                "writes its direction times a per-token scale"
            )
        return self.decoder_directions

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.reconstruct(f, x), f

    def extra_repr(self) -> str:
        config = self.config
        sites = (
            f"site={config.site}"
            if config.in_site == config.out_site
            else f"in_site={config.in_site}, out_site={config.out_site}"
        )
        normalization = (
            "" if config.normalization == "none" else f", normalization={config.normalization}"
        )
        return f"kind={self.kind}, d_in={self.d_in}, d_dict={self.d_dict}, {sites}{normalization}"

    # -------------------------------------------------------------------------------- training
    def training_forward(self, x: torch.Tensor) -> TrainingForward:
        """The forward pass of a training step on a batch `x` (n, d_in)."""
        f = self.encode(x)
        return TrainingForward(self.decode(f) + self.skip_term(x), f)

    def auxiliary_reconstruction(
        self, x: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, k_aux: int
    ) -> torch.Tensor | None:
        """AuxK's reconstruction of the residual by dead latents; None for kinds without AuxK."""
        return None

    def project_decoder_gradient(self) -> None:
        """Before an optimizer step: keep a constrained decoder on its constraint (here: none)."""

    def normalize_decoder(self) -> None:
        """After an optimizer step: restore the decoder constraint (here: none)."""

    def resample_slots(
        self, directions: torch.Tensor, alive: torch.Tensor, match_live: bool
    ) -> list[LatentSlot]:
        """What re-initialising latents writes: one slot per parameter with a slice per latent.

        `directions` (n, d) are the unit directions of the n re-initialised latents, `alive` (a
        bool mask over latents) marks those that are kept. With `match_live`, encoder norms and
        biases are like the live latents'; otherwise they take the kind's initial values.
        """
        raise NotImplementedError(f"{self.kind} dictionaries have no latents to resample")

    def fold_activation_scale(self, scale: float) -> None:
        """Make a dictionary trained on `scale · x` work on raw `x` (its features become f/scale)."""
        raise NotImplementedError(f"{self.kind} dictionaries cannot fold an activation scale")

    def orthogonal_init(self) -> None:
        """The report recipe's initialisation."""
        raise NotImplementedError(f"{self.kind} dictionaries have no orthogonal initialisation")

    # ----------------------------------------------------------------------------- persistence
    def save(
        self, directory: str | Path, dtype: torch.dtype | None = None, format: str = "native"
    ) -> Path:
        """Write `config.json` and `weights.safetensors` (optionally stored in `dtype`, e.g. fp16),
        or with `format` another library's files (`sae_circuits.formats`: "saelens", "sparsify")."""
        directory = Path(directory)
        if self.config.normalization != "none" and format not in _NORMALIZING_FORMATS:
            raise UserInputError(
                f"the {format} format cannot say that a dictionary normalises its input "
                f"({self.config.normalization}); save it as {' or '.join(_NORMALIZING_FORMATS)}"
            )
        if format != "native":
            from sae_circuits.formats import write_dictionary

            if dtype is not None:
                raise UserInputError(f"the {format} writer stores float32; give no dtype")
            return write_dictionary(self, directory, format)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: (t.detach().to(dtype) if dtype is not None else t.detach()).cpu().contiguous()
            for name, t in self.state_dict().items()
        }
        save_safetensors_atomic(tensors, directory / WEIGHTS_FILE)
        write_json_atomic(directory / CONFIG_FILE, self.config.to_dict())
        return directory

    @classmethod
    def from_config(cls, config: DictionaryConfig) -> Dictionary:
        """A freshly initialised dictionary of the kind named in `config`."""
        if config.kind not in Dictionary.registry:
            valid = ", ".join(sorted(Dictionary.registry))
            raise UserInputError(f"unknown dictionary kind {config.kind!r}; valid: {valid}")
        return Dictionary.registry[config.kind](config)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        site: str | Site | None = None,
    ) -> Dictionary:
        """Load a dictionary folder in our format or another library's (`sae_circuits.formats`).

        `site`, for another library's files, is the site the dictionary is spliced at, replacing
        the one the file names (needed where that name maps to none of our sites).
        """
        directory = Path(directory)
        if (directory / WEIGHTS_FILE).is_file() and (directory / CONFIG_FILE).is_file():
            config = DictionaryConfig.from_dict(read_json(directory / CONFIG_FILE))
            dictionary = cls.from_config(config)
            load_weights(dictionary, read_safetensors(directory / WEIGHTS_FILE), directory)
        else:
            from sae_circuits.formats import read_dictionary

            dictionary = read_dictionary(directory, site)
        return dictionary.to(device)


# --------------------------------------------------------------------------------- SAE variants
class TiedDictionary(Dictionary):
    """Cunningham et al.: `x_hat = Wᵀ ReLU(W x + b)`; one weight matrix, encoder bias only."""

    kind = "tied"

    def __init__(self, config: DictionaryConfig) -> None:
        super().__init__(config)
        self.W = nn.Parameter(_unit_rows(torch.randn(config.d_dict, config.d_in)))
        self.b = nn.Parameter(torch.zeros(config.d_dict))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W.T + self.b)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W

    @property
    def decoder_directions(self) -> torch.Tensor:
        return self.W

    @torch.no_grad()
    def resample_slots(
        self, directions: torch.Tensor, alive: torch.Tensor, match_live: bool
    ) -> list[LatentSlot]:
        """The one matrix gets unit `directions` and the bias 0, or with `match_live` rows of the
        median live norm and the median live bias."""
        if match_live and alive.any():
            norm, bias = self.W[alive].norm(dim=1).median(), float(self.b[alive].median())
            return [LatentSlot(self.W, 0, norm * directions), LatentSlot(self.b, 0, bias)]
        return [LatentSlot(self.W, 0, directions), LatentSlot(self.b, 0, 0.0)]

    @torch.no_grad()
    def fold_activation_scale(self, scale: float) -> None:
        """Divides the bias by `scale`."""
        self.b.div_(scale)


class UntiedDictionary(Dictionary):
    """Anthropic: `f = ReLU(W_e (x − b_d) + b_e)`, `x_hat = W_d f + b_d`, unit-norm decoder rows."""

    kind = "untied"
    normalizable = True

    def __init__(self, config: DictionaryConfig) -> None:
        super().__init__(config)
        W_dec = _unit_rows(torch.randn(config.d_dict, config.output_dim))
        self.W_dec = nn.Parameter(W_dec)
        if config.output_dim == config.d_in:
            self.W_enc = nn.Parameter(W_dec.T.clone())
        else:
            self.W_enc = nn.Parameter(_unit_rows(torch.randn(config.d_dict, config.d_in)).T.clone())
        self.b_enc = nn.Parameter(torch.zeros(config.d_dict))
        self.b_dec = nn.Parameter(torch.zeros(config.output_dim))

    def centered(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder's weights multiply: `pre_activations(x) = centered(x) W_enc + b_enc`."""
        return self.normalized(x) - self.b_dec

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return self.centered(x) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_activations(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    @property
    def decoder_directions(self) -> torch.Tensor:
        return self.W_dec

    @torch.no_grad()
    def project_decoder_gradient(self) -> None:
        """Drop each decoder row's gradient component along the row (steps keep unit rows)."""
        grad = self.W_dec.grad
        grad.sub_((grad * self.W_dec).sum(1, keepdim=True) * self.W_dec)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (the constraint the trainer maintains)."""
        self.W_dec.copy_(_unit_rows(self.W_dec))

    @torch.no_grad()
    def resample_slots(
        self, directions: torch.Tensor, alive: torch.Tensor, match_live: bool
    ) -> list[LatentSlot]:
        """Decoder rows `directions`; encoder columns along them with 0.2 × the mean live norm
        and bias 0 (Anthropic 2023), or with `match_live` the median live norm and bias."""
        if match_live and alive.any():
            enc, bias = self.W_enc[:, alive].norm(dim=0).median(), float(self.b_enc[alive].median())
        else:
            enc = self.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
            enc, bias = 0.2 * enc, 0.0
        return [
            LatentSlot(self.W_dec, 0, directions),
            LatentSlot(self.W_enc, 1, enc * directions.T),
            LatentSlot(self.b_enc, 0, bias),
        ]

    @torch.no_grad()
    def fold_activation_scale(self, scale: float) -> None:
        """Divides the encoder and decoder biases by `scale`."""
        for bias in (self.b_enc, self.b_dec):
            bias.div_(scale)

    @torch.no_grad()
    def orthogonal_init(self) -> None:
        """Orthogonal decoder (unit rows), encoder its transpose, zero biases."""
        nn.init.orthogonal_(self.W_dec)
        self.normalize_decoder()
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()


class TopKDictionary(UntiedDictionary):
    """Untied dictionary that keeps the `k` largest pre-activations of each input (Gao et al. 2024).

    Training decodes only the active latents, and the AuxK loss (`auxiliary_reconstruction`) lets
    dead latents learn the residual.
    """

    kind = "topk"

    def __init__(self, config: DictionaryConfig) -> None:
        if not config.k or config.k < 1:
            raise UserInputError(f"a {self.kind} dictionary needs k >= 1 in its config")
        super().__init__(config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return _topk_encode(self, x)

    def training_forward(self, x: torch.Tensor) -> TrainingForward:
        return _topk_training_forward(self, x, select_topk)

    def auxiliary_reconstruction(
        self, x: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, k_aux: int
    ) -> torch.Tensor | None:
        return _auxiliary_reconstruction(self, x, pre, dead, k_aux)


def _topk_encode(d: UntiedDictionary, x: torch.Tensor) -> torch.Tensor:
    """The `config.k` largest ReLU pre-activations of each input, the others 0."""
    pre = torch.relu(d.pre_activations(x))
    top = pre.topk(min(d.config.k, d.d_dict), dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values)


def _topk_training_forward(
    d: UntiedDictionary,
    x: torch.Tensor,
    select: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
) -> TrainingForward:
    """One dense encoder product picks the active latents (`select(pre, k)`); their values, the
    decoding and every gradient then touch only those latents (`sae_circuits.sparse_codes`)."""
    centered = d.centered(x)
    with torch.no_grad():
        pre = (centered @ d.W_enc).add_(d.b_enc)  # = pre_activations(x), without a second buffer
    rows, latents = select(pre, min(d.config.k, d.d_dict))
    values = torch.relu(gather_linear(centered, d.W_enc, d.b_enc, rows, latents, pre=pre))
    codes = SparseCodes(rows, latents, values, len(x), d.d_dict)
    x_hat = sparse_decode(values, rows, latents, d.W_dec, len(x)) + d.b_dec
    return TrainingForward(x_hat, codes, pre)


def _auxiliary_reconstruction(
    d: UntiedDictionary, x: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, k_aux: int
) -> torch.Tensor | None:
    """AuxK (Gao et al. 2024): the decoding, without bias, of the `k_aux` largest pre-activations
    among the `dead` latents of each input; None when no latent is dead."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return None
    rows, latents = select_topk(pre.masked_fill(~dead, -torch.inf), min(k_aux, n_dead))
    values = torch.relu(gather_linear(d.centered(x), d.W_enc, d.b_enc, rows, latents, pre=pre))
    return sparse_decode(values, rows, latents, d.W_dec, len(x))


class BatchTopKDictionary(TopKDictionary):
    """BatchTopK (Bussmann et al. 2024): training keeps the `k · n` largest pre-activations of a
    batch of n inputs; encoding uses a threshold estimated in training (a running mean of the
    smallest kept activation), so that an input's features do not depend on its batch."""

    kind = "batchtopk"
    # of the running mean (the first batch sets it): a window of about 100 steps, so that the
    # estimate follows the end of training rather than the first, untrained batches
    threshold_decay: ClassVar[float] = 0.99

    def __init__(self, config: DictionaryConfig) -> None:
        super().__init__(config)
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.pre_activations(x))
        return pre * (pre > self.threshold)

    def training_forward(self, x: torch.Tensor) -> TrainingForward:
        out = _topk_training_forward(self, x, select_batch_topk)
        if self.training:
            self._update_threshold(out.features.values)
        return out

    @torch.no_grad()
    def _update_threshold(self, values: torch.Tensor) -> None:
        positive = values[values > 0]
        if not len(positive):
            return
        smallest = positive.min()
        if self.threshold < 0:
            self.threshold.copy_(smallest)
        else:
            self.threshold.lerp_(smallest, 1 - self.threshold_decay)

    @torch.no_grad()
    def fold_activation_scale(self, scale: float) -> None:
        """Divides the biases and the threshold by `scale`."""
        super().fold_activation_scale(scale)
        if self.threshold > 0:
            self.threshold.div_(scale)


class GroupMaxDictionary(UntiedDictionary):
    """sparsify's `groupmax` activation: the latents form `k` equal, contiguous groups and each
    keeps only its largest ReLU pre-activation. Read from sparsify files; not trained here."""

    kind = "groupmax"

    def __init__(self, config: DictionaryConfig) -> None:
        if not config.k or config.k < 1 or config.d_dict % config.k:
            raise UserInputError(
                f"a groupmax dictionary needs k >= 1 dividing its {config.d_dict} latents "
                f"(k={config.k})"
            )
        super().__init__(config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.pre_activations(x))
        values, indices = pre.unflatten(-1, (self.config.k, -1)).max(dim=-1)
        group_starts = torch.arange(0, self.d_dict, self.d_dict // self.config.k, device=pre.device)
        return torch.zeros_like(pre).scatter(-1, indices + group_starts, values)


class _ThresholdFunction(torch.autograd.Function):
    """A function of pre-activations `z` and per-latent thresholds θ whose pseudo-derivative in θ
    uses the rectangle kernel window K((z − θ)/ε), K(u) = 1{|u| < 1/2} (Rajamanoharan et al.)."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        z, threshold, bandwidth = inputs
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth

    @staticmethod
    def window(ctx: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, θ, K((z − θ)/ε)) of the forward pass."""
        z, threshold = ctx.saved_tensors
        return z, threshold, ((z - threshold) / ctx.bandwidth).abs().lt(0.5).to(z.dtype)


class _JumpReLU(_ThresholdFunction):
    """`z · H(z − θ)`, pseudo-derivative in θ: −(θ/ε) K((z − θ)/ε)."""

    @staticmethod
    def forward(z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        return z * (z > threshold)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        z, threshold, window = _ThresholdFunction.window(ctx)
        grad_threshold = -(threshold / ctx.bandwidth) * window * grad
        return (z > threshold) * grad, _sum_to(grad_threshold, threshold), None


class _Step(_ThresholdFunction):
    """`H(z − θ)`, pseudo-derivative in θ: −(1/ε) K((z − θ)/ε); none in z."""

    @staticmethod
    def forward(z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        _, threshold, window = _ThresholdFunction.window(ctx)
        return None, _sum_to(-(1 / ctx.bandwidth) * window * grad, threshold), None


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return grad.reshape(-1, like.shape[-1]).sum(0)


class JumpReLUDictionary(UntiedDictionary):
    """JumpReLU (Rajamanoharan et al. 2024): `f = z · H(z − θ)` with a learned threshold θ ≥ 0 per
    latent, trained with straight-through estimators of kernel width `bandwidth` and an L0
    penalty."""

    kind = "jumprelu"
    initial_threshold: ClassVar[float] = 1e-3
    bandwidth: ClassVar[float] = 1e-3
    # Adam moves a threshold by about the LR per step: at 1e-3 it could not reach the thresholds
    # of unit-scale pre-activations (~1) in the thousand steps of a typical run here
    learning_rate_scales = {"threshold": 10.0}

    def __init__(self, config: DictionaryConfig) -> None:
        super().__init__(config)
        self.threshold = nn.Parameter(torch.full((config.d_dict,), self.initial_threshold))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return _JumpReLU.apply(self.pre_activations(x), self.threshold, self.bandwidth)

    def training_forward(self, x: torch.Tensor) -> TrainingForward:
        pre = self.pre_activations(x)
        f = _JumpReLU.apply(pre, self.threshold, self.bandwidth)
        l0 = _Step.apply(pre, self.threshold, self.bandwidth).sum(-1)
        return TrainingForward(self.decode(f), f, None, l0)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit decoder rows, and thresholds kept >= 0."""
        super().normalize_decoder()
        self.threshold.clamp_(min=0)

    @torch.no_grad()
    def resample_slots(
        self, directions: torch.Tensor, alive: torch.Tensor, match_live: bool
    ) -> list[LatentSlot]:
        """As untied, and the threshold back to its initial value (or the live median)."""
        slots = super().resample_slots(directions, alive, match_live)
        live = match_live and alive.any()
        threshold = float(self.threshold[alive].median()) if live else self.initial_threshold
        return [*slots, LatentSlot(self.threshold, 0, threshold)]

    @torch.no_grad()
    def fold_activation_scale(self, scale: float) -> None:
        """Divides the biases and the thresholds by `scale`."""
        super().fold_activation_scale(scale)
        self.threshold.div_(scale)


class Transcoder(UntiedDictionary):
    """Reads one site (`in_site`, e.g. the MLP input) and reconstructs another (`out_site`).

    Unlike the other kinds, the pre-decoder bias is not subtracted from the input, since input and
    output live in different spaces (`b_in` centres the input instead). With `config.k` it keeps
    the k largest pre-activations (a top-k transcoder, trained without penalty, with AuxK); with
    `config.skip` it adds a linear skip connection `x W_skip` (skip transcoders), initialised to 0.
    """

    kind = "transcoder"
    maps_back = False  # the output is another site's: SAELens normalises the input only

    def __init__(self, config: DictionaryConfig) -> None:
        if config.in_site is None or config.out_site is None:
            raise UserInputError(
                "a transcoder needs in_site and out_site (the sites it reads and reconstructs)"
            )
        super().__init__(config)
        self.b_in = nn.Parameter(torch.zeros(config.d_in))
        if config.skip:
            self.W_skip = nn.Parameter(torch.zeros(config.d_in, config.output_dim))

    def centered(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalized(x) - self.b_in

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return _topk_encode(self, x) if self.config.k else super().encode(x)

    def skip_term(self, x: torch.Tensor) -> torch.Tensor | float:
        return x @ self.W_skip if self.config.skip else 0.0

    def training_forward(self, x: torch.Tensor) -> TrainingForward:
        if not self.config.k:
            return super().training_forward(x)
        out = _topk_training_forward(self, x, select_topk)
        return out._replace(x_hat=out.x_hat + self.skip_term(x))

    def auxiliary_reconstruction(
        self, x: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, k_aux: int
    ) -> torch.Tensor | None:
        return _auxiliary_reconstruction(self, x, pre, dead, k_aux) if self.config.k else None

    @torch.no_grad()
    def fold_activation_scale(self, scale: float) -> None:
        """Divides every bias by `scale` (input and output both scaled by it)."""
        super().fold_activation_scale(scale)
        self.b_in.div_(scale)


# --------------------------------------------------- kinds read from other libraries' files
class GatedDictionary(UntiedDictionary):
    """Gated SAE (Rajamanoharan et al. 2024) as SAELens computes it: the gate `(x − b_dec) W_enc +
    b_enc > 0` (`b_enc` is the gate bias) picks the active latents, whose values are
    `ReLU((x − b_dec) (W_enc · exp(r_mag)) + b_mag)`. Read from other libraries; not trained here."""

    kind = "gated"

    def __init__(self, config: DictionaryConfig) -> None:
        super().__init__(config)
        self.r_mag = nn.Parameter(torch.zeros(config.d_dict))
        self.b_mag = nn.Parameter(torch.zeros(config.d_dict))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        centered = self.centered(x)
        gate = centered @ self.W_enc + self.b_enc > 0
        return torch.relu(centered @ (self.W_enc * self.r_mag.exp()) + self.b_mag) * gate

    @torch.no_grad()
    def fold_activation_scale(self, scale: float) -> None:
        """Divides the gate, magnitude and decoder biases by `scale`."""
        super().fold_activation_scale(scale)
        self.b_mag.div_(scale)


class AbsTopKDictionary(TopKDictionary):
    """SAELens' AbsTopK: keeps the `k` pre-activations largest in absolute value, with their signs
    (no ReLU), so a feature fires in either direction. Read from SAELens files; not trained here."""

    kind = "abstopk"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        top = pre.abs().topk(min(self.config.k, self.d_dict), dim=-1).indices
        return torch.zeros_like(pre).scatter(-1, top, pre.gather(-1, top))


class JumpReLUTranscoder(Transcoder):
    """A transcoder with JumpReLU latents, `f = z · H(z − θ)` (as the `jumprelu` kind), and
    optionally a skip connection (`config.skip`). Read from SAELens files; not trained here."""

    kind = "jumprelu_transcoder"

    def __init__(self, config: DictionaryConfig) -> None:
        if config.k:
            raise UserInputError("a jumprelu_transcoder has thresholds, not k")
        super().__init__(config)
        self.threshold = nn.Parameter(torch.zeros(config.d_dict))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        return pre * (pre > self.threshold)

    @torch.no_grad()
    def fold_activation_scale(self, scale: float) -> None:
        """Divides every bias and the thresholds by `scale`."""
        super().fold_activation_scale(scale)
        self.threshold.div_(scale)


# ----------------------------------------------------------------------------- baseline bases
class LinearBasis(Dictionary):
    """An orthonormal basis as a (non-sparse) dictionary: `f = (x − offset) Cᵀ`, `x_hat = f C + offset`.

    Reconstruction is exact, so spliced in it changes nothing; patching with its directions gives the
    neuron, PCA and random-direction baselines. Build one with `neurons`, `pca` or `random`.
    """

    kind = "basis"

    def __init__(self, config: DictionaryConfig) -> None:
        super().__init__(config)
        self.register_buffer("components", torch.eye(config.d_dict, config.d_in))
        self.register_buffer("offset", torch.zeros(config.d_in))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.offset) @ self.components.T

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.components + self.offset

    @property
    def decoder_directions(self) -> torch.Tensor:
        return self.components

    @classmethod
    def neurons(cls, d_in: int, site: str | Site | None = None) -> LinearBasis:
        """The standard basis: feature i is coordinate i of the activation."""
        return cls(_basis_config("neurons", d_in, site))

    @classmethod
    def pca(cls, activations: torch.Tensor, site: str | Site | None = None) -> LinearBasis:
        """Principal directions of `activations` (n, d), in order of decreasing variance."""
        activations = activations.reshape(-1, activations.shape[-1]).float()
        if activations.shape[0] < 2:
            raise UserInputError("PCA needs at least two activation vectors")
        basis = cls(_basis_config("pca", activations.shape[-1], site))
        mean = activations.mean(0)
        n, d = activations.shape  # a full U would be (n, n): only needed for vh when n < d
        _, _, vh = torch.linalg.svd(activations - mean, full_matrices=n < d)
        basis.components.copy_(vh)
        basis.offset.copy_(mean)
        return basis

    @classmethod
    def random(cls, d_in: int, seed: int = 0, site: str | Site | None = None) -> LinearBasis:
        """A random orthonormal basis (a fixed rotation drawn from `seed`)."""
        generator = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=generator))
        basis = cls(_basis_config("random", d_in, site))
        basis.components.copy_(q.T)
        return basis


def _basis_config(name: str, d_in: int, site: str | Site | None) -> DictionaryConfig:
    return DictionaryConfig(
        kind=LinearBasis.kind, d_in=d_in, d_dict=d_in, site=site, hyperparameters={"basis": name}
    )


# ------------------------------------------------------------------------- shipped dictionaries
def shipped_sets(model: str | None = None) -> list[str]:
    """Names of the dictionary sets shipped for `model` (default: the embedded model)."""
    folder = _shipped_model_dir(model)
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def load_dictionaries(
    set: str,
    sites: list[str | Site] | None = None,
    model: str | None = None,
    device: str = "cpu",
) -> SiteMap:
    """Load a shipped set (`dictionaries/<model>/<set>/<site>/`), by site; all sites by default."""
    folder = _shipped_model_dir(model) / set
    if not folder.is_dir():
        available = ", ".join(shipped_sets(model)) or "none"
        raise UserInputError(f"no dictionary set {set!r}; shipped sets: {available}")
    present = SiteMap((p.name, p) for p in folder.iterdir() if (p / CONFIG_FILE).is_file())
    wanted = list(present) if sites is None else [Site.parse(site) for site in sites]
    missing = [str(site) for site in wanted if site not in present]
    if missing:
        raise UserInputError(
            f"set {set!r} has no dictionary at {', '.join(missing)}; "
            f"it has: {', '.join(present.text_keys())}"
        )
    return SiteMap((site, Dictionary.load(present[site], device=device)) for site in wanted)


def _shipped_model_dir(model: str | None) -> Path:
    if model is None:
        from sae_circuits.models import EMBEDDED_MODEL_NAME

        model = EMBEDDED_MODEL_NAME
    return asset_dir("dictionaries") / model


# --------------------------------------------------------------------------------- helpers
def _norm_coefficient(x: torch.Tensor, d_in: int) -> torch.Tensor:
    """constant_norm_rescale's per-token factor `sqrt(d_in) / ‖x‖`."""
    return (d_in**0.5) / x.norm(dim=-1, keepdim=True)


def _layer_norm_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """layer_norm's per-token mean and standard deviation (with Bessel's correction)."""
    mean = x.mean(dim=-1, keepdim=True)
    return mean, (x - mean).std(dim=-1, keepdim=True)


def _unit_rows(weight: torch.Tensor) -> torch.Tensor:
    return weight / weight.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def load_weights(
    dictionary: Dictionary,
    state: dict[str, torch.Tensor],
    source: str | Path,
    subset: bool = False,
) -> None:
    """Copy `state` into `dictionary` (as float32) after checking its names and shapes; with
    `subset`, `state` may lack weights the dictionary has (e.g. untied weights into a topk one)."""
    expected = dictionary.state_dict()
    names_ok = set(state) <= set(expected) if subset else set(state) == set(expected)
    if not names_ok:
        raise UserInputError(
            f"{source}: weights {sorted(state)} do not match a {dictionary.kind} dictionary "
            f"({sorted(expected)})"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise UserInputError(
                f"{source}: weight {name} has shape {tuple(tensor.shape)}, the dictionary "
                f"{tuple(expected[name].shape)} (d_in, dictionary size and output width must match)"
            )
    dictionary.load_state_dict({name: t.float() for name, t in state.items()}, strict=not subset)


__all__ = [
    "AbsTopKDictionary",
    "Dictionary",
    "DictionaryConfig",
    "GatedDictionary",
    "GroupMaxDictionary",
    "JumpReLUTranscoder",
    "LatentSlot",
    "LinearBasis",
    "NORMALIZATIONS",
    "TiedDictionary",
    "TopKDictionary",
    "Transcoder",
    "UntiedDictionary",
    "load_dictionaries",
    "load_weights",
    "shipped_sets",
]
