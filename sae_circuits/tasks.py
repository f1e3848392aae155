"""Tasks: clean/corrupted prompt pairs, answer and distractor tokens, and a logit-difference metric.

A `Task` holds prompts whose corrupted version has the clean prompt's token length, the token ids of
the right answer on the clean prompt and of the distractor, and `metric(logits)`: per prompt
logit(answer) − logit(distractor) at the last position (prompts are left-padded, so position -1 is
every prompt's last real token). Built-in tasks come from `tasks/` (`load_task("ioi" | "sva", ...)`);
users bring their own prompt pairs as JSON (`Task.from_json`, format in `tasks/README.md`).

Pairs whose answer or distractor is not a single token under the model's tokenizer, or whose clean and
corrupted prompts differ in token length, are dropped with a warning and counted in `task.dropped`;
a task left without any pair is a `UserInputError`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sae_circuits.constants import CORRUPTIONS, TASKS
from sae_circuits.errors import UserInputError
from sae_circuits.protocols import Model
from sae_circuits.task_text import SPLITS, ioi_examples, sva_examples

_PAIR_KEYS = ("clean", "corrupt", "answer", "distractor")


@dataclass(frozen=True)
class Task:
    """Clean and corrupted prompts (same token length per pair) with answer/distractor token ids."""

    name: str
    clean: list[str]
    corrupt: list[str]
    answers: torch.Tensor  # (n,) token ids of the right answer on the clean prompt
    distractors: torch.Tensor  # (n,) token ids it is compared with
    split: str = "all"
    dropped: int = 0  # pairs dropped while building (multi-token answers, length mismatches)
    # template of each pair (None: one template); positions line up only within a template, so
    # mean ablation uses per-template position means
    groups: list[str] | None = None

    def __len__(self) -> int:
        return len(self.clean)

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """Per prompt logit(answer) − logit(distractor) at the last position.

        `logits` is `(n, seq, vocab)` or the last position's `(n, vocab)`, rows in the task's order.
        """
        last = logits[:, -1] if logits.dim() == 3 else logits
        rows = torch.arange(last.shape[0], device=last.device)
        answers, distractors = self.answers.to(last.device), self.distractors.to(last.device)
        return last[rows, answers] - last[rows, distractors]

    def subset(self, index: slice | Sequence[int]) -> Task:
        """The pairs at `index` (a slice or a list of positions), as a task."""
        positions = range(len(self))[index] if isinstance(index, slice) else list(index)
        positions = list(positions)
        return replace(
            self,
            clean=[self.clean[i] for i in positions],
            corrupt=[self.corrupt[i] for i in positions],
            answers=self.answers[positions],
            distractors=self.distractors[positions],
            groups=None if self.groups is None else [self.groups[i] for i in positions],
        )

    def train_test(self, test_fraction: float = 0.5, seed: int = 0) -> tuple[Task, Task]:
        """A random split of the pairs into a train and a test task (e.g. for a user's own file)."""
        if not 0 < test_fraction < 1 or len(self) < 2:
            raise UserInputError("a train/test split needs 0 < test_fraction < 1 and two pairs")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        n_test = min(max(1, round(test_fraction * len(self))), len(self) - 1)
        train = replace(self.subset(sorted(order[n_test:])), split="train")
        return train, replace(self.subset(sorted(order[:n_test])), split="test")

    @classmethod
    def from_pairs(
        cls,
        name: str,
        model: Model,
        pairs: Sequence[dict[str, str]],
        split: str = "all",
    ) -> Task:
        """Build a task from dicts with `clean`, `corrupt`, `answer` and `distractor` (words with
        their leading space, e.g. " Mary") and an optional `group` (the pair's template), dropping
        unusable pairs with a warning."""
        tokenizer = model.tokenizer
        clean, corrupt, answers, distractors, groups = [], [], [], [], []
        multi_token, mismatched = 0, 0
        for pair in pairs:
            ids = [_single_token(tokenizer, pair[key]) for key in ("answer", "distractor")]
            if None in ids:
                multi_token += 1
                continue
            if _n_tokens(tokenizer, pair["clean"]) != _n_tokens(tokenizer, pair["corrupt"]):
                mismatched += 1
                continue
            clean.append(pair["clean"])
            corrupt.append(pair["corrupt"])
            answers.append(ids[0])
            distractors.append(ids[1])
            groups.append(pair.get("group"))
        dropped = multi_token + mismatched
        if dropped:
            warnings.warn(
                f"task {name!r}: dropped {dropped} of {len(pairs)} prompt pairs "
                f"({multi_token} with an answer or distractor that is not a single token, "
                f"{mismatched} whose corrupted prompt has another token length)",
                stacklevel=2,
            )
        if not clean:
            raise UserInputError(
                f"task {name!r} has no usable prompt pair under this model's tokenizer "
                f"({multi_token} multi-token answers, {mismatched} length mismatches)"
            )
        return cls(
            name,
            clean,
            corrupt,
            torch.tensor(answers),
            torch.tensor(distractors),
            split,
            dropped,
            None if all(g is None for g in groups) else [str(g) for g in groups],
        )

    @classmethod
    def from_json(cls, path: str | Path, model: Model, split: str | None = None) -> Task:
        """A task from a JSON file of prompt pairs (format: `tasks/README.md`); `split` keeps only
        the pairs marked with that split."""
        path = Path(path)
        if not path.is_file():
            raise UserInputError(f"task file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise UserInputError(f"{path} is not valid JSON ({error.msg})") from None
        pairs = data.get("pairs") if isinstance(data, dict) else data
        if not isinstance(pairs, list) or not pairs:
            raise UserInputError(
                f"{path}: expected a non-empty list of pairs (or {{'pairs': [...]}})"
            )
        for i, pair in enumerate(pairs):
            if not isinstance(pair, dict) or any(
                not isinstance(pair.get(k), str) for k in _PAIR_KEYS
            ):
                raise UserInputError(
                    f"{path}: pair {i} needs string fields {', '.join(_PAIR_KEYS)}"
                )
        if split is not None:
            pairs = [pair for pair in pairs if pair.get("split") == split]
            if not pairs:
                raise UserInputError(f"{path}: no pair has split {split!r}")
        name = data.get("name", path.stem) if isinstance(data, dict) else path.stem
        return cls.from_pairs(name, model, pairs, split or "all")


def load_task(
    name: str,
    model: Model,
    corruption: str | None = None,
    n: int = 100,
    seed: int = 0,
    split: str = "heldout",
) -> Task:
    """A built-in task on `n` prompts from the templates of `split` ("train" or "heldout").

    `ioi`: clean "When Mary and John ..., John gave a drink to" → " Mary" vs " John"; corruption
    `abc` (default: the second subject mention becomes a third name) or `swap` (IO and S exchanged).
    `sva`: "The key to the cabinets" → " is" vs " are"; corruption `number` flips the subject.
    """
    if name not in TASKS:
        raise UserInputError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    corruption = corruption or CORRUPTIONS[name][0]
    if corruption not in CORRUPTIONS[name]:
        raise UserInputError(
            f"unknown corruption {corruption!r} for {name}; valid: {', '.join(CORRUPTIONS[name])}"
        )
    if split not in SPLITS:
        raise UserInputError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if n < 1:
        raise UserInputError(f"n must be at least 1, got {n}")
    if name == "ioi":
        pairs = [
            {
                "clean": e.prompt,
                "corrupt": e.abc_prompt if corruption == "abc" else e.swap_prompt,
                "answer": e.answer,
                "distractor": e.distractor,
                "group": e.template_id,
            }
            for e in ioi_examples(split, n, seed)
        ]
    else:
        pairs = [
            {
                "clean": e.prompt,
                "corrupt": e.corrupt_prompt,
                "answer": e.correct,
                "distractor": e.wrong,
                "group": e.template_id,
            }
            for e in sva_examples(split, n, seed)
        ]
    return Task.from_pairs(f"{name}-{corruption}", model, pairs, split)


def _single_token(tokenizer: Any, word: str) -> int | None:
    ids = tokenizer.encode(word, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def _n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


__all__ = ["CORRUPTIONS", "TASKS", "Task", "load_task"]
