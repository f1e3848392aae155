"""How each kind trains (`train_spec.KIND_TRAINING`) matches the dictionary classes it names."""

from __future__ import annotations

import pytest

from sae_circuits.dictionary import Dictionary, DictionaryConfig
from sae_circuits.errors import UserInputError
from sae_circuits.train_spec import KIND_TRAINING, SPARSITIES, TrainSpec


@pytest.mark.parametrize("kind", KIND_TRAINING)
def test_kind_training_names_registered_parameters(kind: str) -> None:
    how = KIND_TRAINING[kind]
    assert kind in Dictionary.registry
    assert how.sparsities and set(how.sparsities) <= set(SPARSITIES)
    config = DictionaryConfig(kind, 8, 16, site="resid.0", k=2, d_out=8)
    dictionary = Dictionary.from_config(config)
    parameters = dict(dictionary.named_parameters())
    if how.decoder_bias is None:
        assert "b_dec" not in parameters
    else:
        assert parameters[how.decoder_bias].shape == (8,)


def test_report_recipe_needs_a_decoder_bias() -> None:
    assert TrainSpec("x", kind="untied", recipe="report").recipe == "report"
    with pytest.raises(UserInputError, match="decoder bias"):
        TrainSpec("x", kind="tied", recipe="report")
