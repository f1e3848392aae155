"""Prompts of the explainer, the simulator and the two classifiers, and the parsing of their replies.

The formats follow the published protocols (described here, not copied):

- explainer (EleutherAI delphi): each example is the context's text with the active tokens
  (activation above `threshold` × the unit's maximum) between `<<` and `>>`, followed by the list of
  `("token", activation)` pairs of its non-zero activations on the 0..10 scale of Bills et al.
  (2023). The reply's last line carries the explanation after `[EXPLANATION]:`.
- simulator (Bills et al. 2023, the variant without log-probabilities for chat models): the
  context's tokens one per line, each followed by a tab; the model repeats every line with a
  predicted activation 0..10 after the tab. A reply that does not reproduce the tokens counts as
  all zeros, as in the published simulator.
- detection and fuzzing (delphi): numbered examples (for fuzzing with some tokens between `<<` and
  `>>`); the reply is a list of 0/1, one per example: does the example activate the unit (detection),
  are its marked tokens the ones that activate it (fuzzing).

In texts and token lines, newlines and tabs are escaped (`\\n`, `\\t`) so one token stays on one
line; quoted tokens are JSON strings.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from sae_circuits.autointerp.contexts import Record, normalized

Message = dict[str, str]

EXPLANATION_TAG = "[EXPLANATION]:"

EXPLAINER_SYSTEM = """You study what one unit of a language model responds to.
You will see short text examples. In each, the tokens where the unit is active are marked like \
<<this>>; consecutive active tokens share one pair of marks. After each example, its active tokens \
are listed with the unit's activation on a scale from 0 to 10.
Find what the marked tokens and their surroundings have in common, and describe it in one short \
phrase. Do not mention the << >> marks and do not list alternatives.
End your reply with one line: [EXPLANATION]: <your explanation>"""

SIMULATOR_SYSTEM = """You predict how one unit of a language model activates, from an explanation \
of what it responds to.
You will get the explanation and a text split into tokens, one token per line followed by a tab.
Reply with the same lines in the same order, each token followed by a tab and your predicted \
activation, an integer from 0 (inactive) to 10 (most active). Most activations are 0.
Reply with those lines only."""

DETECTION_SYSTEM = """You check explanations of units of a language model.
You will get an explanation of what one unit responds to, and numbered text examples. For each \
example, answer 1 if the unit would be active somewhere in it according to the explanation, and 0 \
if not.
Reply with a JSON list of 0s and 1s, one per example in order, e.g. [1, 0, 0], and nothing else."""

FUZZING_SYSTEM = """You check explanations of units of a language model.
You will get an explanation of what one unit responds to, and numbered text examples in which some \
tokens are marked like <<this>>. For each example, answer 1 if the marked tokens are the ones the \
unit would be active on according to the explanation, and 0 if they are marked wrongly.
Reply with a JSON list of 0s and 1s, one per example in order, e.g. [1, 0, 0], and nothing else."""


class ResponseError(ValueError):
    """A model's reply that does not follow the format its prompt asked for."""


@dataclass
class Example:
    """A context shown to a classifier: its tokens, and the tokens marked (fuzzing) or None."""

    tokens: list[str]
    marked: list[bool] | None = None

    def text(self) -> str:
        return highlighted(self.tokens, self.marked or [False] * len(self.tokens))


def shown(token: str) -> str:
    """A token as the prompts show it: newlines and tabs escaped."""
    return token.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def highlighted(tokens: Sequence[str], marked: Sequence[bool]) -> str:
    """The text of `tokens` with each run of marked tokens between `<<` and `>>`."""
    out, inside = [], False
    for token, mark in zip(tokens, marked, strict=True):
        if mark and not inside:
            out.append("<<")
        elif inside and not mark:
            out.append(">>")
        inside = mark
        out.append(shown(token))
    if inside:
        out.append(">>")
    return "".join(out)


def active(record: Record, max_activation: float, threshold: float) -> list[bool]:
    """Which tokens of `record` are active: above `threshold` × `max_activation` (and above 0)."""
    level = threshold * max_activation
    return [a > level and a > 0 for a in record.activations]


def explainer_messages(
    records: Sequence[Record], max_activation: float, threshold: float
) -> list[Message]:
    """The explainer's chat messages for the explanation set `records`."""
    blocks = []
    for number, record in enumerate(records, 1):
        scaled = normalized(record.activations, max_activation)
        pairs = ", ".join(
            f"({json.dumps(t, ensure_ascii=False)}, {v})"
            for t, v in zip(record.tokens, scaled, strict=True)
            if v > 0
        )
        text = highlighted(record.tokens, active(record, max_activation, threshold))
        blocks.append(f"Example {number}: {text}\nActivations: {pairs or 'none'}")
    return [
        {"role": "system", "content": EXPLAINER_SYSTEM},
        {"role": "user", "content": "\n".join(blocks)},
    ]


def parse_explanation(reply: str) -> str:
    """The explanation in an explainer's reply: the text after the last `[EXPLANATION]:`."""
    _, tag, after = reply.rpartition(EXPLANATION_TAG)
    lines = [line.strip() for line in (after if tag else reply).splitlines() if line.strip()]
    if not lines:
        raise ResponseError(f"the explainer's reply holds no explanation: {reply[:200]!r}")
    return lines[0] if tag else lines[-1]


def simulator_messages(explanation: str, tokens: Sequence[str]) -> list[Message]:
    """The simulator's chat messages: predict the activation of each of `tokens`."""
    lines = "\n".join(f"{shown(t)}\t" for t in tokens)
    return [
        {"role": "system", "content": SIMULATOR_SYSTEM},
        {"role": "user", "content": f"Explanation: {explanation}\n\nTokens:\n{lines}"},
    ]


def parse_simulation(reply: str, tokens: Sequence[str]) -> list[float]:
    """Predicted activations (0..10) from a simulator's reply; all zeros when the reply does not
    reproduce `tokens` line by line (leading/trailing spaces of a token may be dropped)."""
    zeros = [0.0] * len(tokens)
    lines = [line for line in reply.strip("\n").split("\n") if "\t" in line]
    if len(lines) != len(tokens):
        return zeros
    values = []
    for line, token in zip(lines, tokens, strict=True):
        text, _, value = line.rpartition("\t")
        if text.strip() != shown(token).strip():
            return zeros
        try:
            number = float(value.strip())
        except ValueError:
            number = 0.0
        values.append(number if 0 <= number <= 10 else 0.0)
    return values


def classifier_messages(explanation: str, examples: Sequence[Example], task: str) -> list[Message]:
    """The chat messages of the `detection` or `fuzzing` classifier for `examples`."""
    system = {"detection": DETECTION_SYSTEM, "fuzzing": FUZZING_SYSTEM}[task]
    body = "\n".join(f"Example {i}: {e.text()}" for i, e in enumerate(examples, 1))
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Explanation: {explanation}\n\n{body}"},
    ]


def parse_labels(reply: str, n: int) -> list[int]:
    """The list of `n` 0/1 labels in a classifier's reply (its first `[...]`)."""
    match = re.search(r"\[[^\[\]]*\]", reply)
    if match is None:
        raise ResponseError(f"no list of labels in the reply: {reply[:200]!r}")
    try:
        labels = json.loads(match.group(0))
    except json.JSONDecodeError:
        raise ResponseError(f"the labels are not a JSON list: {match.group(0)[:200]!r}") from None
    if len(labels) != n or any(label not in (0, 1) for label in labels):
        raise ResponseError(f"expected {n} labels 0 or 1, got {match.group(0)[:200]!r}")
    return [int(label) for label in labels]


def prompt_hash(messages: Sequence[Message]) -> str:
    """A short stable hash of chat messages (sha256 of their canonical JSON)."""
    canonical = json.dumps(list(messages), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
