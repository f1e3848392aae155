"""`Dictionary.save(..., format="sparsify")` and `sae-circuits export`: files the peers' loaders
read with our numbers (sparsify parity skips when `sparsify` is not installed: extra interop)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_circuits.cli import main
from sae_circuits.dictionary import Dictionary, DictionaryConfig
from sae_circuits.errors import UserInputError
from sae_circuits.formats import format_table
from sae_circuits.sites import Site

D_IN, D_SAE, K = 8, 16, 3
ATOL = 1e-5
PYTHIA = "EleutherAI/pythia-70m"


@pytest.fixture(scope="module")
def sparsify():
    return pytest.importorskip("sparsify", reason="sparsify is not installed (extra: interop)")


def _dictionary(kind: str, model: str = PYTHIA, **options) -> Dictionary:
    sites = {"in_site": "mlp_in.1", "out_site": "mlp.1"} if kind == "transcoder" else {}
    config = DictionaryConfig(
        kind=kind,
        d_in=D_IN,
        d_dict=D_SAE,
        model=model,
        **(sites or {"site": "resid.1"}),
        **{"k": K, **options},
    )
    dictionary = Dictionary.from_config(config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in dictionary.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return dictionary


def _inputs() -> torch.Tensor:
    return torch.randn(32, D_IN, generator=torch.Generator().manual_seed(2))


def _dense(top_acts: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(top_acts), D_SAE).scatter(-1, top_indices, top_acts)


@pytest.mark.parametrize(
    ("kind", "options", "hookpoint"),
    [
        ("topk", {}, "layers.1"),
        ("groupmax", {"k": 4}, "layers.1"),
        ("transcoder", {}, "layers.1.mlp"),
        ("transcoder", {"skip": True}, "layers.1.mlp"),
    ],
)
def test_sparsify_reads_what_we_write_with_our_numbers(
    sparsify, tmp_path, kind, options, hookpoint
):
    ours = _dictionary(kind, **options)
    folder = ours.save(tmp_path, format="sparsify")
    assert folder == tmp_path / hookpoint
    peer = sparsify.SparseCoder.load_from_disk(folder)
    x = _inputs()
    with torch.no_grad():
        encoded = peer.encode(x)
        f = _dense(encoded.top_acts, encoded.top_indices)
        torch.testing.assert_close(f, ours.encode(x), atol=ATOL, rtol=0)
        x_hat = peer.decode(encoded.top_acts, encoded.top_indices)
        if peer.W_skip is not None:
            x_hat = x_hat + x @ peer.W_skip.mT
        torch.testing.assert_close(x_hat, ours(x)[0], atol=ATOL, rtol=0)
    back = Dictionary.load(folder)
    assert (back.config.in_site, back.config.out_site) == (
        ours.config.in_site,
        ours.config.out_site,
    )


def test_gpt2_hookpoints_follow_its_module_names(tmp_path):
    folder = _dictionary("topk", model="gpt2").save(tmp_path, format="sparsify")
    assert folder.name == "h.1"


@pytest.mark.parametrize(
    ("dictionary", "named"),
    [
        (_dictionary("untied"), "top-k and groupmax coders only"),
        (_dictionary("topk", model="my-model"), "cannot name the sparsify hookpoint"),
        (_dictionary("transcoder", d_out=4), "reconstruct d_in=8 values"),
    ],
)
def test_what_sparsify_cannot_represent_is_refused(tmp_path, dictionary, named):
    with pytest.raises(UserInputError, match=named):
        dictionary.save(tmp_path / "out", format="sparsify")
    assert not (tmp_path / "out").exists()


def test_export_command_writes_saelens_files(tmp_path, capsys):
    ours = _dictionary("topk")
    ours.save(tmp_path / "ours")
    code = main(
        ["export", str(tmp_path / "ours"), "--to", "saelens", str(tmp_path / "sl"), "--json"]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "topk" and result["out_site"] == "resid.1"
    assert sorted(p.rsplit("/", 1)[-1] for p in result["files"]) == [
        "cfg.json",
        "sae_weights.safetensors",
    ]
    back = Dictionary.load(tmp_path / "sl")
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], ours(x)[0], atol=ATOL, rtol=0)


def test_export_takes_a_site_for_files_that_name_none(tmp_path, capsys):
    ours = _dictionary("topk")
    ours.save(tmp_path / "sl", format="saelens")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    cfg["metadata"] = {"hook_name": "blocks.1.hook_resid_mid"}  # as written by SAELens: no site
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(cfg))
    args = ["export", str(tmp_path / "sl"), "--to", "saelens", str(tmp_path / "out"), "--json"]
    assert main([*args, "--site", "resid.1"]) == 0
    assert json.loads(capsys.readouterr().out)["out_site"] == "resid.1"
    assert Dictionary.load(tmp_path / "out").config.site == Site("resid", 1)


def test_export_refusals_exit_2_naming_the_reason(tmp_path, capsys):
    _dictionary("untied").save(tmp_path / "ours")
    code = main(["export", str(tmp_path / "ours"), "--to", "sparsify", str(tmp_path / "out")])
    assert code == 2
    assert "top-k and groupmax coders only" in capsys.readouterr().err


def test_readme_lists_every_format_as_the_code_describes_it():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert format_table() in readme, "regenerate the README's table with formats.format_table()"


def test_unknown_formats_are_named(tmp_path):
    with pytest.raises(UserInputError, match="writable formats: saelens, sparsify"):
        _dictionary("topk").save(tmp_path, format="neuronpedia")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="cfg.json \\+ sae_weights.safetensors \\(saelens\\)"):
        Dictionary.load(tmp_path / "empty")
