"""Tasks: equal-length corrupted prompts, dropping of unusable pairs, the metric, user JSON tasks."""

import json

import pytest
import torch

from sae_circuits import UserInputError, load_model
from sae_circuits.models import embedded_model_path, is_embedded
from sae_circuits.tasks import Task, load_task

GOOD = {
    "clean": "When Mary and John went to the store, John gave a drink to",
    "corrupt": "When Mary and John went to the store, Mary gave a drink to",
    "answer": " Mary",
    "distractor": " John",
    "split": "train",
}


@pytest.fixture(scope="module")
def tiny(models):
    return models["gpt_neox"]  # its tokenizer makes " Mary" and " John" single tokens, not " Alice"


@pytest.fixture(scope="module")
def embedded():
    assert (embedded_model_path() / "config.json").is_file(), "embedded model missing"
    return load_model()


def test_is_embedded(embedded, tiny, model_dirs):
    assert is_embedded(embedded)
    assert is_embedded(load_model(embedded_model_path()))  # named by its folder: the same model
    assert not is_embedded(tiny)
    assert not is_embedded(load_model(model_dirs["gpt2"]))


def write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_user_json_task_drops_and_counts(tiny, tmp_path):
    pairs = [
        GOOD,
        {**GOOD, "answer": " John", "distractor": " Mary", "split": "test"},
        {**GOOD, "answer": " Alice"},  # not a single token
        {**GOOD, "corrupt": GOOD["corrupt"] + " them"},  # another token length
    ]
    with pytest.warns(UserWarning, match=r"dropped 2 of 4 .*1 with an answer.*1 whose corrupted"):
        task = Task.from_json(write(tmp_path / "mine.json", {"name": "mine", "pairs": pairs}), tiny)
    assert (task.name, len(task), task.dropped) == ("mine", 2, 2)
    mary, john = (tiny.tokenizer.encode(w)[0] for w in (" Mary", " John"))
    assert task.answers.tolist() == [mary, john] and task.distractors.tolist() == [john, mary]
    logits = torch.randn(2, 5, len(tiny.tokenizer))
    expected = torch.stack(
        [logits[0, -1, mary] - logits[0, -1, john], logits[1, -1, john] - logits[1, -1, mary]]
    )
    torch.testing.assert_close(task.metric(logits), expected)
    torch.testing.assert_close(task.metric(logits[:, -1]), expected)
    # a plain list of pairs, filtered by split
    only_test = Task.from_json(write(tmp_path / "list.json", pairs[:2]), tiny, split="test")
    assert (only_test.name, only_test.clean, only_test.split) == ("list", [GOOD["clean"]], "test")


def test_user_json_errors(tiny, tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        Task.from_json(tmp_path / "missing.json", tiny)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserInputError, match="not valid JSON"):
        Task.from_json(tmp_path / "bad.json", tiny)
    with pytest.raises(UserInputError, match="needs string fields"):
        Task.from_json(write(tmp_path / "x.json", [{"clean": "a"}]), tiny)
    with pytest.raises(UserInputError, match="no pair has split"):
        Task.from_json(write(tmp_path / "y.json", [GOOD]), tiny, split="heldout")
    with (
        pytest.warns(UserWarning, match="dropped 1 of 1"),
        pytest.raises(UserInputError, match="no usable prompt pair"),
    ):
        Task.from_json(write(tmp_path / "z.json", [{**GOOD, "answer": " Alice"}]), tiny)


def test_builtin_task_without_single_token_names_is_an_error(tiny):
    with (
        pytest.warns(UserWarning, match="dropped 10 of 10"),
        pytest.raises(UserInputError, match="no usable prompt pair"),
    ):
        load_task("ioi", tiny, n=10)
    with pytest.raises(UserInputError, match="corruption"):
        load_task("ioi", tiny, corruption="number")
    with pytest.raises(UserInputError, match="unknown task"):
        load_task("greater-than", tiny)
    with pytest.raises(UserInputError, match="split"):
        load_task("sva", tiny, split="test")


def test_subset_and_train_test(tiny):
    pairs = [GOOD, {**GOOD, "answer": " John", "distractor": " Mary"}] * 3
    task = Task.from_pairs("six", tiny, pairs)
    train, test = task.train_test(test_fraction=0.5, seed=1)
    assert (len(train), len(test), train.split, test.split) == (3, 3, "train", "test")
    assert sorted(train.answers.tolist() + test.answers.tolist()) == sorted(task.answers.tolist())
    assert task.subset(slice(1, 3)).answers.tolist() == task.answers[1:3].tolist()
    assert task.groups is None
    grouped = Task.from_pairs(
        "six", tiny, [{**p, "group": str(i % 2)} for i, p in enumerate(pairs)]
    )
    assert grouped.subset([1, 2, 5]).groups == ["1", "0", "1"]


@pytest.mark.parametrize("name,corruption", [("ioi", "abc"), ("ioi", "swap"), ("sva", None)])
def test_builtin_tasks_on_embedded_model(embedded, name, corruption):
    task = load_task(name, embedded, corruption, n=40, seed=3, split="heldout")
    assert len(task) == 40 and task.dropped == 0 and task.split == "heldout"
    tokenizer = embedded.tokenizer
    for clean, corrupt in zip(task.clean, task.corrupt, strict=True):
        assert clean != corrupt
        assert len(tokenizer(clean)["input_ids"]) == len(tokenizer(corrupt)["input_ids"])
    assert (task.answers != task.distractors).all()
    # one group per template: prompts of a template have the same token length (aligned positions)
    lengths = {}
    for clean, group in zip(task.clean, task.groups, strict=True):
        lengths.setdefault(group, set()).add(len(tokenizer(clean)["input_ids"]))
    assert len(lengths) > 1 and all(len(v) == 1 for v in lengths.values())
    if name == "ioi":
        train = load_task(name, embedded, corruption, n=40, seed=3, split="train")
        assert not set(train.clean) & set(task.clean)
