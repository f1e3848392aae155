"""The embedded model: quality bar on the committed weights, tokenizer, corpus, templates, build."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from transformers import AutoTokenizer, GPTNeoXForCausalLM

from sae_circuits.corpus import iter_corpus, stdlib_files
from sae_circuits.embedded.evaluate import evaluate_model
from sae_circuits.errors import UserInputError
from sae_circuits.models import EMBEDDED_MODEL_NAME, embedded_model_path
from sae_circuits.task_text import (
    ioi_examples,
    ioi_templates,
    load_task_data,
    single_token_words,
    sva_examples,
    sva_templates,
)


@pytest.fixture(scope="module")
def shipped():
    folder = embedded_model_path()
    assert (folder / "model.safetensors").is_file(), f"embedded model missing at {folder}"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = GPTNeoXForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return model, tokenizer


# --- the committed weights ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_metrics(shipped):
    model, tokenizer = shipped
    return evaluate_model(model, tokenizer, n=400, seed=0)


def test_shipped_model_ioi_logit_diff_and_abc(shipped_metrics):
    metrics = shipped_metrics
    assert metrics["ioi_logit_diff"] >= 3.0, metrics
    assert abs(metrics["ioi_abc_logit_diff"]) <= 1.0, metrics
    assert 0 < metrics["text_loss"] < 10, metrics


def test_shipped_model_ioi_accuracy(shipped_metrics):
    assert shipped_metrics["ioi_accuracy"] >= 0.95, shipped_metrics


def test_shipped_model_sva_accuracy(shipped_metrics):
    assert shipped_metrics["sva_accuracy"] >= 0.90, shipped_metrics


def test_shipped_folder_layout_and_size():
    folder = embedded_model_path()
    assert folder.name == EMBEDDED_MODEL_NAME
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gpt_neox"
    assert config["use_parallel_residual"] is True
    assert config["num_hidden_layers"] >= 4
    for name in ("tokenizer.json", "tokenizer_config.json", "README.md", "train_log.csv"):
        assert (folder / name).is_file(), name
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert total <= 15e6, f"{total / 1e6:.1f} MB"
    card = (folder / "README.md").read_text()
    info = json.loads((folder / "build_info.json").read_text())
    assert info["corpus"]["sha256"] in card
    assert "sae-circuits build-model --seed" in card


# --- tokenizer ------------------------------------------------------------------------------


def test_names_nouns_and_verbs_are_single_tokens(shipped):
    _, tokenizer = shipped
    bad = [
        w for w in single_token_words() if len(tokenizer.encode(w, add_special_tokens=False)) != 1
    ]
    assert not bad
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 0


@pytest.mark.parametrize(
    "text",
    [
        "plain words, numbers 12345 and punctuation!?",
        "def f(x):\n\treturn {'a': [x ** 2]}  # comment\r\n",
        "ünïcödé — 漢字 カタカナ 🙂🚀 \x00\x07 \u200b",
        "   leading and trailing spaces   ",
        "",
    ],
)
def test_any_text_round_trips(shipped, text):
    _, tokenizer = shipped
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


# --- corpus ---------------------------------------------------------------------------------


def test_corpus_is_deterministic_in_the_seed():
    a = list(itertools.islice(iter_corpus("train", 3), 300))
    b = list(itertools.islice(iter_corpus("train", 3), 300))
    c = list(itertools.islice(iter_corpus("train", 4), 300))
    assert a == b
    assert a != c
    kinds = {"ioi": 0, "text": 0}
    for doc in a:
        kinds["ioi" if " and " in doc and " to " in doc else "text"] += 1
    assert kinds["text"] > 0 and kinds["ioi"] > 0


def test_corpus_splits_are_disjoint():
    train, heldout = set(stdlib_files("train")), set(stdlib_files("heldout"))
    assert train and heldout and not train & heldout
    for name, templates in (("ioi", ioi_templates), ("sva", sva_templates)):
        ids_train = {t["text"] for t in templates("train")}
        ids_held = {t["text"] for t in templates("heldout")}
        assert not ids_train & ids_held, name
    with pytest.raises(UserInputError):
        next(iter_corpus("validation"))


def test_task_data_sizes():
    ioi = load_task_data("ioi")
    assert len(ioi["templates"]["train"]) + len(ioi["templates"]["heldout"]) >= 30
    assert len(ioi["templates"]["heldout"]) >= 6
    assert len(ioi["names"]) >= 60 and len(set(ioi["names"])) == len(ioi["names"])
    assert ioi["places"] and ioi["objects"]
    sva = load_task_data("sva")
    assert sva["templates"]["heldout"] and sva["nouns"] and sva["verbs"]


# --- template fill --------------------------------------------------------------------------


def test_ioi_examples(shipped):
    _, tokenizer = shipped
    examples = ioi_examples("heldout", 120, seed=5)
    assert examples == ioi_examples("heldout", 120, seed=5)
    assert {e.order for e in examples} == {"ABBA", "BABA"}
    assert {e.template_id for e in examples} == {t["id"] for t in ioi_templates("heldout")}
    for e in examples:
        assert len({e.io, e.s, e.c}) == 3
        assert e.text.startswith(e.prompt + " " + e.io)
        assert e.prompt.count(" " + e.s) == 2 and e.prompt.count(" " + e.io) == 1
        assert e.abc_prompt.count(" " + e.s) == 1 and e.abc_prompt.count(" " + e.c) == 1
        n = len(tokenizer.encode(e.prompt, add_special_tokens=False))
        assert len(tokenizer.encode(e.abc_prompt, add_special_tokens=False)) == n
        assert len(tokenizer.encode(e.swap_prompt, add_special_tokens=False)) == n


def test_sva_examples(shipped):
    _, tokenizer = shipped
    examples = sva_examples("heldout", 80, seed=1)
    assert {e.number for e in examples} == {"singular", "plural"}
    verbs = {(v["singular"], v["plural"]) for v in load_task_data("sva")["verbs"]}
    for e in examples:
        assert (e.correct.strip(), e.wrong.strip()) in verbs | {(p, s) for s, p in verbs}
        assert e.text.startswith(e.prompt + e.correct)
        n = len(tokenizer.encode(e.prompt, add_special_tokens=False))
        assert len(tokenizer.encode(e.corrupt_prompt, add_special_tokens=False)) == n


def test_bad_split_is_user_error():
    with pytest.raises(UserInputError):
        ioi_examples("test", 3)


# --- build ----------------------------------------------------------------------------------

SMOKE = dict(
    steps=3,
    n_layers=1,
    d_model=32,
    n_heads=2,
    d_mlp=64,
    ctx=32,
    batch_size=4,
    vocab_size=512,
    tokenizer_chars=30_000,
    eval_n=8,
    eval_every=2,
    log_every=1,
    progress=False,
)


def test_build_model_smoke_and_determinism(tmp_path):
    from sae_circuits.embedded.build import build_model

    a = build_model(tmp_path / "a", seed=1, **SMOKE)
    b = build_model(tmp_path / "b", seed=1, **SMOKE)
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
        "train_log.csv",
    ):
        assert (tmp_path / "a" / name).is_file(), name
    assert a["corpus"]["sha256"] == b["corpus"]["sha256"]
    assert a["metrics"] == b["metrics"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()
    assert len((tmp_path / "a" / "train_log.csv").read_text().splitlines()) == 1 + SMOKE["steps"]
    model = GPTNeoXForCausalLM.from_pretrained(str(tmp_path / "a"), dtype=torch.float32)
    assert model.config.num_hidden_layers == 1
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    for word in random.Random(0).sample(single_token_words(), 10):
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1


def test_build_model_rejects_bad_settings(tmp_path):
    from sae_circuits.cli import main
    from sae_circuits.embedded.build import build_model

    with pytest.raises(UserInputError):
        build_model(tmp_path, seed=0, d_model=30, n_heads=4, progress=False)
    with pytest.raises(UserInputError):
        build_model(tmp_path, seed=0, steps=0, progress=False)
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(UserInputError):
        build_model(file, seed=0, progress=False)
    assert main(["build-model", "--seed", "-1"]) == 2
