"""Shared fixtures: tiny random models of each supported architecture, saved and loaded by path."""

from __future__ import annotations

import pytest
import torch

from sae_circuits import load_model
from sae_circuits.testing import save_random_model

ARCHS = ("gpt_neox", "gpt2", "llama")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: save_random_model(root / arch, arch) for arch in (*ARCHS, "qwen2")}


@pytest.fixture(scope="session")
def models(model_dirs):
    return {arch: load_model(model_dirs[arch]) for arch in ARCHS}


@pytest.fixture(scope="module")
def lm(model_dirs):
    """A tiny GPT-NeoX of its own per test module (remote tests attach and detach on it)."""
    return load_model(model_dirs["gpt_neox"])


@pytest.fixture(scope="module")
def bare(model_dirs):
    """A second copy of `lm`'s model: the bare server a remote request runs on."""
    return load_model(model_dirs["gpt_neox"])


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def model(models, arch):
    from sae_circuits import detach

    lm = models[arch]
    detach(lm)
    yield lm
    detach(lm)


@pytest.fixture
def prompts():
    return ["When Mary and John went to the store, John gave a drink to", "The keys are"]


def random_untied(d_in: int, d_dict: int = 64, site: str | None = None, seed: int = 0):
    """An untied dictionary with random encoder biases, so that features fire."""
    from sae_circuits import Dictionary, DictionaryConfig

    torch.manual_seed(seed)
    dictionary = Dictionary.from_config(
        DictionaryConfig(kind="untied", d_in=d_in, d_dict=d_dict, site=site)
    )
    with torch.no_grad():
        dictionary.b_enc.normal_(0, 0.5)
        dictionary.b_dec.normal_(0, 0.1)
    return dictionary
