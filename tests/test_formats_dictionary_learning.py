"""dictionary_learning files, written by the library (scripts/make_dictionary_learning_fixtures.py),
read with the library's own numbers, stored beside them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_circuits.dictionary import Dictionary
from sae_circuits.errors import UserInputError
from sae_circuits.formats import detect_format
from sae_circuits.formats import dictionary_learning as reader
from sae_circuits.sites import Site

FIXTURES = Path(__file__).parent / "fixtures" / "dictionary_learning"
KINDS = {
    "AutoEncoder": "untied",
    "AutoEncoderTopK": "topk",
    "BatchTopKSAE": "batchtopk",
    "MatryoshkaBatchTopKSAE": "batchtopk",
    "JumpReluAutoEncoder": "jumprelu",
    "GatedAutoEncoder": "gated",
}


def _needs_kind(kind: str) -> None:
    if kind not in Dictionary.registry:
        pytest.skip(f"no {kind!r} dictionary kind yet")


@pytest.mark.parametrize("dict_class", KINDS)
def test_reads_every_class_with_the_librarys_numbers(dict_class):
    _needs_kind(KINDS[dict_class])
    folder = FIXTURES / dict_class
    assert detect_format(folder).name == "dictionary_learning"
    dictionary = Dictionary.load(folder)
    assert dictionary.kind == KINDS[dict_class]
    assert dictionary.config.site == Site("resid", 1)
    assert dictionary.config.model == "EleutherAI/pythia-70m-deduped"

    expected = load_file(str(folder / "expected.safetensors"))
    with torch.no_grad():
        features = dictionary.encode(expected["x"])
        x_hat = dictionary.decode(features)
    assert (expected["features"] > 0).any()
    assert (features - expected["features"]).abs().max().item() <= 1e-5
    assert (x_hat - expected["x_hat"]).abs().max().item() <= 1e-5


def _copy(tmp_path: Path, dict_class: str) -> Path:
    folder = tmp_path / dict_class
    shutil.copytree(FIXTURES / dict_class, folder)
    return folder


def _edit(folder: Path, section: str, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.setdefault(section, {}).update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("section", "changes", "message"),
    [
        ("trainer", {"dict_class": "AutoEncoderNew"}, "dict_class='AutoEncoderNew' is not supp"),
        ("trainer", {"use_ghost_grads": True}, r"option use_ghost_grads not supported"),
        ("trainer", {"k": 7}, "trainer.k=7 but the saved k is 4"),
        ("trainer", {"dict_size": 64}, "trainer.dict_size=64 but ae.pt has 32"),
        ("buffer", {"io": "in_and_out"}, "buffer.io='in_and_out' is not supported"),
        ("dictionary", {"x": 1}, "option dictionary not supported"),
    ],
)
def test_options_it_does_not_implement_are_refused_by_name(tmp_path, section, changes, message):
    folder = _copy(tmp_path, "AutoEncoderTopK")
    _edit(folder, section, **changes)
    with pytest.raises(UserInputError, match=message):
        reader.read(folder)


def test_an_unknown_submodule_keeps_it_loadable_and_takes_a_site(tmp_path):
    folder = _copy(tmp_path, "AutoEncoder")
    _edit(folder, "trainer", submodule_name="my_probe")
    assert reader.read(folder).config.site is None
    assert reader.read(folder, Site.parse("mlp.0")).config.site == Site("mlp", 0)


def test_an_autoencoder_needs_no_config(tmp_path):
    folder = _copy(tmp_path, "AutoEncoder")
    (folder / "config.json").unlink()
    assert reader.read(folder).kind == "untied"


def test_negative_jumprelu_thresholds_are_refused(tmp_path):
    folder = _copy(tmp_path, "JumpReluAutoEncoder")
    state = torch.load(folder / "ae.pt", weights_only=True)
    state["threshold"][0] = -0.1
    torch.save(state, folder / "ae.pt")
    with pytest.raises(UserInputError, match="negative JumpReLU thresholds"):
        reader.read(folder)


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    folder = _copy(tmp_path, "AutoEncoder")
    torch.save({"encoder": torch.nn.Linear(2, 2)}, folder / "ae.pt")
    with pytest.raises(UserInputError, match="cannot read .*ae.pt"):
        reader.read(folder)


def test_a_dictionary_of_a_submodules_input_leaves_the_site_to_the_user(tmp_path):
    folder = _copy(tmp_path, "AutoEncoder")
    _edit(folder, "buffer", io="in")
    assert reader.read(folder).config.site is None
