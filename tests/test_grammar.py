"""The IOI/SVA grammar: determinism, held-out shapes kept out of the corpus, equal-length
corruptions, and the per-shape evaluation (on a tiny random model, checked against plain torch)."""

from __future__ import annotations

import itertools
import random
import re

import pytest
import torch

from sae_circuits import grammar
from sae_circuits.corpus import iter_corpus
from sae_circuits.embedded.build import BuildConfig, make_model
from sae_circuits.embedded.evaluate import evaluate_shapes
from sae_circuits.embedded.tokenizer import EOS, to_transformers, train_tokenizer
from sae_circuits.task_text import (
    ioi_examples,
    ioi_templates,
    load_task_data,
    single_token_words,
    sva_examples,
    sva_templates,
)


@pytest.fixture(scope="module")
def tokenizer():
    """A small embedded-style BPE on the corpus head: every name, noun and verb one token."""
    docs = list(itertools.islice(iter_corpus("train", 0), 1500))
    return to_transformers(train_tokenizer(docs, 1024, single_token_words()))


def n_tokens(tokenizer, text):
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_templates_are_deterministic_and_cover_every_shape():
    for split in ("train", "heldout"):
        assert ioi_templates(split) == ioi_templates.__wrapped__(split)
        assert sva_templates(split) == sva_templates.__wrapped__(split)
        for templates, shapes in (
            (ioi_templates(split), grammar.ioi_shapes(split)),
            (sva_templates(split), grammar.sva_shapes(split)),
        ):
            used = {t["shape"] for t in templates}
            assert used <= {grammar.shape_id(s) for s in shapes}
            assert len(used) == min(len(templates), len(shapes))
    assert {t["shape"] for t in ioi_templates("heldout")} == {
        grammar.shape_id(s) for s in grammar.ioi_shapes("heldout")
    }
    shape = grammar.IOI_HELDOUT_SHAPES[0]
    a = [grammar.ioi_template(random.Random(7), shape) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    texts = {grammar.ioi_template(random.Random(seed), shape) for seed in range(30)}
    assert len(texts) > 10  # fillers vary with the seed
    assert ioi_examples("heldout", 50, seed=3) == ioi_examples("heldout", 50, seed=3)
    assert ioi_examples("heldout", 50, seed=3) != ioi_examples("heldout", 50, seed=4)


def test_heldout_shapes_are_never_training_shapes():
    for train, held in (
        (grammar.ioi_shapes("train"), grammar.ioi_shapes("heldout")),
        (grammar.sva_shapes("train"), grammar.sva_shapes("heldout")),
    ):
        assert train and held and not set(train) & set(held)
        assert len(set(train)) == len(train)
    assert not [s for s in grammar.ioi_shapes("train") if s[0] == "met"]
    assert all(grammar._valid_ioi(s) for s in grammar.IOI_HELDOUT_SHAPES)


def test_training_corpus_never_uses_a_heldout_shape(monkeypatch):
    used: list[tuple[str, ...]] = []
    for name in ("ioi_template", "sva_template"):
        render = getattr(grammar, name)

        def recording(rng, shape, render=render):
            used.append(tuple(shape))
            return render(rng, shape)

        monkeypatch.setattr(f"sae_circuits.task_text.{name}", recording)
    docs = list(itertools.islice(iter_corpus("train", 1), 3000))
    held = set(grammar.ioi_shapes("heldout")) | set(grammar.sva_shapes("heldout"))
    assert len(used) > 1000 and not set(used) & held
    # the held-out-only production ("Mary met John at ...") never appears in the text either
    names = "|".join(load_task_data("ioi")["names"])
    meeting = re.compile(rf"\b({names}) (met|was with|ran into|visited) ({names})\b")
    assert not [d for d in docs if meeting.search(d)]


def test_corruptions_keep_the_token_length(tokenizer):
    for split in ("train", "heldout"):
        for e in ioi_examples(split, 600, seed=2):
            n = n_tokens(tokenizer, e.prompt)
            assert n_tokens(tokenizer, e.abc_prompt) == n, e
            assert n_tokens(tokenizer, e.swap_prompt) == n, e
            assert e.text.startswith(e.prompt + " " + e.io)
            assert e.prompt.count(e.s) == 2 and e.prompt.count(e.io) == 1
            assert e.abc_prompt.count(e.s) == 1 and e.abc_prompt.count(e.c) == 1
        for e in sva_examples(split, 400, seed=2):
            assert n_tokens(tokenizer, e.corrupt_prompt) == n_tokens(tokenizer, e.prompt), e
            assert e.text.startswith(e.prompt + e.correct)


def test_every_sva_distractor_has_the_other_number():
    nouns = load_task_data("sva")["nouns"]
    number_of = {n[k]: k for n in nouns for k in ("singular", "plural")}
    for e in sva_examples("heldout", 200, seed=1):
        distractors = [w for w in re.findall(r"[a-z]+", e.prompt) if w in number_of]
        assert distractors[0] == e.subject
        assert distractors[1:] and all(number_of[w] != e.number for w in distractors[1:]), e


def test_evaluate_shapes_matches_plain_torch(tokenizer):
    torch.manual_seed(0)
    cfg = BuildConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64, ctx=64)
    model = make_model(cfg, tokenizer.convert_tokens_to_ids(EOS), len(tokenizer)).eval()
    rows = evaluate_shapes(model, tokenizer, n=48, seed=0)
    ioi_rows = {r["shape"]: r for r in rows if r["task"] == "ioi"}
    sva_rows = {r["shape"]: r for r in rows if r["task"] == "sva"}
    assert set(ioi_rows) == {grammar.shape_id(s) for s in grammar.ioi_shapes("heldout")}
    assert set(sva_rows) == {grammar.shape_id(s) for s in grammar.sva_shapes("heldout")}
    assert sum(r["n"] for r in ioi_rows.values()) == sum(r["n"] for r in sva_rows.values()) == 48

    def diffs(prompts, goods, bads):
        """logit(good) - logit(bad) at each prompt's last position, one prompt at a time."""
        out = []
        for prompt, good, bad in zip(prompts, goods, bads, strict=True):
            ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1]
            good_id, bad_id = (
                tokenizer.encode(w, add_special_tokens=False)[0] for w in (good, bad)
            )
            out.append(logits[good_id] - logits[bad_id])
        return torch.stack(out)

    shape = grammar.shape_id(grammar.IOI_HELDOUT_SHAPES[2])
    examples = [e for e in ioi_examples("heldout", 48, 0) if e.shape == shape]
    answers, distractors = [e.answer for e in examples], [e.distractor for e in examples]
    clean = diffs([e.prompt for e in examples], answers, distractors)
    abc = diffs([e.abc_prompt for e in examples], answers, distractors)
    row = ioi_rows[shape]
    assert row["n"] == len(examples)
    assert row["accuracy"] == pytest.approx((clean > 0).float().mean().item())
    assert row["logit_diff"] == pytest.approx(clean.mean().item(), abs=1e-4)
    assert row["abc_abs_logit_diff"] == pytest.approx(abc.abs().mean().item(), abs=1e-4)
    shape = grammar.shape_id(grammar.SVA_HELDOUT_SHAPES[0])
    examples = [e for e in sva_examples("heldout", 48, 0) if e.shape == shape]
    diff = diffs(
        [e.prompt for e in examples], [e.correct for e in examples], [e.wrong for e in examples]
    )
    assert sva_rows[shape]["logit_diff"] == pytest.approx(diff.mean().item(), abs=1e-4)
    assert sva_rows[shape]["accuracy"] == pytest.approx((diff > 0).float().mean().item())
