"""The embedded model: quality bar on the committed weights, tokenizer, corpus, build (grammar and
prompts: test_grammar.py)."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from transformers import AutoTokenizer, GPTNeoXForCausalLM

from sae_circuits.corpus import iter_corpus, stdlib_files, text_files
from sae_circuits.embedded.evaluate import QUALITY_BAR, evaluate_model, quality_checks
from sae_circuits.errors import UserInputError
from sae_circuits.models import EMBEDDED_MODEL_NAME, embedded_model_path
from sae_circuits.task_text import ioi_examples, load_task_data, single_token_words


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


def test_shipped_model_ioi_logit_diff(shipped_metrics):
    metrics = shipped_metrics
    assert metrics["ioi_logit_diff"] >= 3.5, metrics
    assert 0 < metrics["text_loss"] < 10, metrics


@pytest.mark.xfail(
    strict=True,
    reason="goal not reached by neox-ioi-6l (models/neox-ioi-6l/README.md): under the ABC "
    "corruption it still prefers one of the two names per prompt, mean |diff| 2.11 (mean -0.20)",
)
def test_shipped_model_abc_corruption_is_uninformative(shipped_metrics):
    assert shipped_metrics["ioi_abc_abs_logit_diff"] <= 1.0, shipped_metrics


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
    train, heldout = set(text_files("train")), set(text_files("heldout"))
    assert train and heldout and not train & heldout
    assert len(train) > 2 * len(stdlib_files("train"))  # the packages' files come in
    with pytest.raises(UserInputError):
        next(iter_corpus("validation"))


def test_task_data_sizes():
    ioi = load_task_data("ioi")
    assert len(ioi["names"]) >= 60 and len(set(ioi["names"])) == len(ioi["names"])
    assert ioi["places"] and ioi["objects"]
    sva = load_task_data("sva")
    assert sva["nouns"] and sva["verbs"]


def test_bad_split_is_user_error():
    with pytest.raises(UserInputError):
        ioi_examples("test", 3)


def test_quality_checks():
    good = {key: threshold for key, (_, threshold) in QUALITY_BAR.items()}
    assert all(quality_checks(good).values())
    assert not quality_checks({**good, "ioi_abc_abs_logit_diff": 1.5})["ioi_abc_abs_logit_diff"]
    assert not quality_checks({**good, "ioi_accuracy": 0.9})["ioi_accuracy"]


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
    checkpoint_every=2,
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


def test_interrupted_build_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from sae_circuits.embedded import build

    settings = {**SMOKE, "steps": 4, "eval_every": 0}
    build.build_model(tmp_path / "a", seed=2, **settings)
    save = build._save_checkpoint

    def save_then_stop(path, state):
        save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        build.build_model(tmp_path / "b", seed=2, **settings)
    assert (tmp_path / "b" / build.CHECKPOINT).is_file()
    monkeypatch.setattr(build, "_save_checkpoint", save)
    resumed = build.build_model(tmp_path / "b", seed=2, **settings)
    assert not (tmp_path / "b" / build.CHECKPOINT).exists()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()
    assert len((tmp_path / "b" / "train_log.csv").read_text().splitlines()) == 1 + 4
    assert {r["shape"] for r in resumed["shapes"]} >= {"names_first/none/plain/give/a"}
    with pytest.raises(UserInputError):  # a checkpoint of other settings is not mixed in
        monkeypatch.setattr(build, "_save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            build.build_model(tmp_path / "c", seed=2, **settings)
        build.build_model(tmp_path / "c", seed=3, **settings)


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
