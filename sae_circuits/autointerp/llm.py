"""Explainer and judge (simulator + classifiers) that ask a chat model through `ChatClient`."""

from __future__ import annotations

from collections.abc import Sequence

from sae_circuits.autointerp.client import ChatClient
from sae_circuits.autointerp.contexts import UnitContexts
from sae_circuits.autointerp.prompts import (
    Example,
    Message,
    ResponseError,
    classifier_messages,
    explainer_messages,
    parse_explanation,
    parse_labels,
    parse_simulation,
    simulator_messages,
)


class LLMExplainer:
    """Explanations written by the chat model behind `client` from the explainer prompt."""

    def __init__(self, client: ChatClient, threshold: float = 0.3) -> None:
        self.client, self.threshold = client, threshold
        self.name = f"llm:{client.model}"

    def messages(self, contexts: UnitContexts) -> list[Message]:
        return explainer_messages(contexts.explanation_set, contexts.max_activation, self.threshold)

    def explain(self, contexts: UnitContexts) -> str:
        return parse_explanation(self.client.complete(self.messages(contexts)))


class LLMJudge:
    """Simulation and classification by the chat model behind `client`; classifiers see
    `examples_per_prompt` examples per request, as in delphi."""

    def __init__(self, client: ChatClient, examples_per_prompt: int = 5) -> None:
        self.client, self.examples_per_prompt = client, examples_per_prompt
        self.name = f"llm:{client.model}"

    def simulate(self, explanation: str, tokens: Sequence[str]) -> list[float]:
        reply = self.client.complete(simulator_messages(explanation, tokens))
        return parse_simulation(reply, tokens)

    def classify(
        self, explanation: str, examples: Sequence[Example], task: str
    ) -> list[int | None]:
        labels: list[int | None] = []
        for start in range(0, len(examples), self.examples_per_prompt):
            batch = examples[start : start + self.examples_per_prompt]
            reply = self.client.complete(classifier_messages(explanation, batch, task))
            try:
                labels.extend(parse_labels(reply, len(batch)))
            except ResponseError:
                labels.extend([None] * len(batch))
        return labels
