"""What a dictionary to train is: `TrainSpec`, and how each dictionary kind trains.

Light at import (no torch), so that command-line parsers take their options, defaults and
choices from here; `sae_circuits.training` trains what a `TrainSpec` describes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sae_circuits.errors import UserInputError


@dataclass(frozen=True)
class KindTraining:
    """How `train_dictionaries` trains a dictionary kind: the sparsity penalties it trains with,
    the default first ("l1", "entropy" of f / Σf, "l0" a straight-through L0, or "topk": no
    penalty, `k` features per input), and the parameter added to every reconstruction (held at 0
    by the report recipe), if any."""

    sparsities: tuple[str, ...]
    decoder_bias: str | None = "b_dec"


# The kinds `train_dictionaries` can train (kinds of `Dictionary.registry`), in this order.
KIND_TRAINING = {
    "tied": KindTraining(("l1", "entropy"), decoder_bias=None),
    "untied": KindTraining(("l1", "entropy")),
    "topk": KindTraining(("topk",)),
    "batchtopk": KindTraining(("topk",)),
    "jumprelu": KindTraining(("l0",)),
    "transcoder": KindTraining(("l1", "topk")),
}
KINDS = tuple(KIND_TRAINING)
TOP_K_KINDS = tuple(kind for kind, how in KIND_TRAINING.items() if how.sparsities == ("topk",))
REPORT_KINDS = tuple(kind for kind, how in KIND_TRAINING.items() if how.decoder_bias)
SPARSITIES = ("l1", "entropy", "l0", "topk")
RECIPES = ("standard", "report")
LOSSES = ("mse", "kl", "e2e-ds")
RESAMPLE_TARGETS = ("input", "residual")


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
    (Braun et al. 2024). `error_swap` = s takes s of the KL with another context's error term
    added to the reconstruction instead of none (`objectives.spliced_loss`).
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
    error_swap: float = field(
        default=0.0,
        metadata={
            "help": "kl, e2e-ds: share of the KL taken with another context's error term added to "
            "the reconstruction (x_hat + e') instead of none, so that the model stops reading "
            "what the error terms hold",
            "metavar": "SHARE",
        },
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
        sparsities = KIND_TRAINING[self.kind].sparsities
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
            (0 <= self.error_swap <= 1, "error_swap must be between 0 and 1"),
            (
                self.error_swap == 0 or self.loss != "mse",
                "error_swap is a share of the KL: it needs loss kl or e2e-ds",
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
