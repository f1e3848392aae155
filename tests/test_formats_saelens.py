"""SAELens files: read what SAELens writes and write what it reads, with SAELens' own numbers.

The parity tests build SAEs with SAELens' classes, save them with `save_model`, and compare our
encode/decode with SAELens' on the same inputs (and the reverse through `SAE.load_from_disk`);
they skip when `sae_lens` is not installed (`pip install -e ".[interop]"`). The refusals run
without it, on hand-written files.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sae_circuits.dictionary import Dictionary, DictionaryConfig, LinearBasis
from sae_circuits.errors import UserInputError
from sae_circuits.sites import Site

D_IN, D_SAE, D_OUT, K = 8, 16, 6, 3
ATOL = 1e-5


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens", reason="sae_lens is not installed (extra: interop)")


def _randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))


def _inputs(d: int = D_IN, seed: int = 1) -> torch.Tensor:
    return torch.randn(32, d, generator=torch.Generator().manual_seed(seed))


def _peer(sae_lens, architecture: str, **options):
    """A SAELens SAE or transcoder of `architecture` with random weights."""
    cls, config_cls = sae_lens.registry.get_sae_class(architecture)
    transcoder = "transcoder" in architecture
    if transcoder:
        options = {"d_out": D_OUT, "apply_b_dec_to_input": False, **options}
    config = config_cls(d_in=D_IN, d_sae=D_SAE, **options)
    config.metadata.model_name = "EleutherAI/pythia-70m"
    config.metadata.hook_name = "blocks.1.hook_mlp_in" if transcoder else "blocks.1.hook_resid_pre"
    if transcoder:
        config.metadata.hook_name_out = "blocks.1.hook_mlp_out"
    sae = cls(config)
    _randomise(sae, seed=len(architecture))
    if hasattr(sae, "threshold"):  # some thresholds below 0, where ReLU and JumpReLU differ
        with torch.no_grad():
            sae.threshold.copy_(torch.linspace(-0.3, 0.6, D_SAE))
    return sae


def _peer_forward(sae, x: torch.Tensor) -> torch.Tensor:
    """SAELens' reconstruction, with the skip term of skip transcoders."""
    return sae.forward(x) if hasattr(sae, "W_skip") else sae.decode(sae.encode(x))


PEER_VARIANTS = [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("standard", {"normalize_activations": "expected_average_only_in"}),
    ("topk", {"k": K}),
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}),
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False}),
    ("abstopk", {"k": K}),
    ("abstopk", {"k": K, "rescale_acts_by_decoder_norm": True}),
    ("jumprelu", {}),
    ("jumprelu", {"apply_b_dec_to_input": False}),
    ("gated", {}),
    ("gated", {"apply_b_dec_to_input": False}),
    ("transcoder", {}),
    ("transcoder", {"normalize_activations": "expected_average_only_in"}),
    ("skip_transcoder", {}),
    ("jumprelu_transcoder", {}),
    ("jumprelu_skip_transcoder", {}),
]


@pytest.mark.parametrize(("architecture", "options"), PEER_VARIANTS)
def test_files_saelens_writes_load_with_its_numbers(sae_lens, tmp_path, architecture, options):
    peer = _peer(sae_lens, architecture, **options)
    peer.save_model(tmp_path)
    ours = Dictionary.load(tmp_path)
    x = _inputs()
    with torch.no_grad():
        f_peer = peer.encode(x)
        torch.testing.assert_close(ours.encode(x), f_peer, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.decode(f_peer), peer.decode(f_peer), atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(x)[0], _peer_forward(peer, x), atol=ATOL, rtol=0)
    assert ours.config.model == "EleutherAI/pythia-70m"
    if "transcoder" in architecture:  # Pythia's parallel block: hook_mlp_in is the block's input
        assert (ours.config.in_site, ours.config.out_site) == (Site("resid", 0), Site("mlp", 1))
    else:
        assert ours.config.in_site == ours.config.out_site == Site("resid", 0)


def test_older_cfg_json_loads_as_saelens_reads_it(sae_lens, tmp_path):
    peer = _peer(sae_lens, "topk", k=K)
    peer.save_model(tmp_path)
    older = {  # a pre-6 cfg: top-level hook and model, k in activation_fn_kwargs, no version
        "d_in": D_IN,
        "d_sae": D_SAE,
        "hook_point": "blocks.2.hook_resid_post",
        "hook_point_layer": 2,
        "model_name": "gpt2",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "normalize_activations": False,
        "apply_b_dec_to_input": True,
        "context_size": 128,
        "dataset_path": "Skylion007/openwebtext",
        "lr": 4e-4,
        "dtype": "float32",
        "device": "cpu",
    }
    (tmp_path / "cfg.json").write_text(json.dumps(older))
    peer = sae_lens.SAE.load_from_disk(tmp_path)
    ours = Dictionary.load(tmp_path)
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), peer.encode(x), atol=ATOL, rtol=0)
    assert ours.kind == "topk" and ours.config.k == K
    assert ours.config.site == Site("resid", 2) and ours.config.model == "gpt2"


def _ours(kind: str, seed: int, **options) -> Dictionary:
    transcoder = "transcoder" in kind
    sites = {"in_site": "mlp_in.1", "out_site": "mlp.1"} if transcoder else {"site": "resid.1"}
    config = DictionaryConfig(
        kind=kind, d_in=D_IN, d_dict=D_SAE, model="EleutherAI/pythia-70m", **sites, **options
    )
    dictionary = Dictionary.from_config(config)
    _randomise(dictionary, seed)
    if isinstance(getattr(dictionary, "threshold", None), torch.nn.Parameter):
        with torch.no_grad():
            dictionary.threshold.copy_(torch.linspace(0.0, 0.6, D_SAE))
    return dictionary


OUR_VARIANTS = [
    ("tied", {}),
    ("untied", {}),
    ("topk", {"k": K}),
    ("abstopk", {"k": K}),
    ("jumprelu", {}),
    ("gated", {}),
    ("transcoder", {"d_out": D_OUT}),
    ("transcoder", {"d_out": D_OUT, "skip": True}),
    ("jumprelu_transcoder", {"d_out": D_OUT}),
    ("jumprelu_transcoder", {"d_out": D_OUT, "skip": True}),
]


@pytest.mark.parametrize(("kind", "options"), OUR_VARIANTS)
def test_saelens_reads_what_we_write_with_our_numbers(sae_lens, tmp_path, kind, options):
    ours = _ours(kind, seed=7, **options)
    ours.save(tmp_path, format="saelens")
    peer = sae_lens.SAE.load_from_disk(tmp_path)
    x = _inputs()
    with torch.no_grad():
        f = ours.encode(x)
        torch.testing.assert_close(peer.encode(x), f, atol=ATOL, rtol=0)
        torch.testing.assert_close(peer.decode(f), ours.decode(f), atol=ATOL, rtol=0)
        torch.testing.assert_close(_peer_forward(peer, x), ours(x)[0], atol=ATOL, rtol=0)
    back = Dictionary.load(tmp_path)
    assert (back.config.in_site, back.config.out_site) == (
        ours.config.in_site,
        ours.config.out_site,
    )
    if "transcoder" not in kind:
        assert peer.cfg.metadata.hook_name == "blocks.1.hook_resid_post"


def test_batchtopk_is_written_as_saelens_jumprelu(sae_lens, tmp_path):
    ours = _ours("batchtopk", seed=3, k=K)
    with torch.no_grad():
        ours.threshold.fill_(0.2)
    ours.save(tmp_path, format="saelens")
    peer = sae_lens.SAE.load_from_disk(tmp_path)
    assert peer.cfg.architecture() == "jumprelu"
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(peer.encode(x), ours.encode(x), atol=ATOL, rtol=0)


# ------------------------------------------------------------------- refusals (no sae_lens)
def _write_file(folder, cfg: dict, tensors: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = tensors or {
        "W_enc": torch.randn(D_IN, D_SAE),
        "b_enc": torch.randn(D_SAE),
        "W_dec": torch.randn(D_SAE, D_IN),
        "b_dec": torch.randn(D_IN),
    }
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))


BASE_CFG = {"d_in": D_IN, "d_sae": D_SAE, "architecture": "standard", "metadata": {}}


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"normalize_activations": "covariance_whitening"}, "covariance_whitening"),
        ({"reshape_activations": "hook_z"}, "reshape_activations"),
        ({"metadata": {"hook_name": "blocks.1.attn.hook_z"}}, "reshape_activations"),
        ({"metadata": {"hook_head_index": 2}}, "hook_head_index"),
        ({"finetuning_scaling_factor": True}, "finetuning_scaling_factor"),
        ({"architecture": "matching_pursuit"}, "architecture='matching_pursuit'"),
        ({"activation_fn": "tanh-relu"}, "activation_fn='tanh-relu'"),
        ({"rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm"),
        ({"a_new_option": 1}, "a_new_option"),
        (
            {"metadata": {"model_from_pretrained_kwargs": {"center_writing_weights": True}}},
            "center_writing_weights",
        ),
    ],
)
def test_unsupported_options_are_refused_by_name(tmp_path, changes, named):
    _write_file(tmp_path / "sae", {**BASE_CFG, **changes})
    with pytest.raises(UserInputError, match=named.replace("(", r"\(").replace(")", r"\)")):
        Dictionary.load(tmp_path / "sae")


def test_shapes_are_checked_in_saelens_orientation(tmp_path):
    tensors = {  # W_enc stored [d_sae, d_in], as sparsify would: refused, not transposed
        "W_enc": torch.randn(D_SAE, D_IN),
        "b_enc": torch.randn(D_SAE),
        "W_dec": torch.randn(D_SAE, D_IN),
        "b_dec": torch.randn(D_IN),
    }
    _write_file(tmp_path / "sae", BASE_CFG, tensors)
    with pytest.raises(
        UserInputError, match=r"W_enc has shape \[16, 8\], expected \[d_in, d_sae\]"
    ):
        Dictionary.load(tmp_path / "sae")


def test_unknown_hook_loads_without_a_site_and_takes_one(tmp_path):
    _write_file(
        tmp_path / "sae", {**BASE_CFG, "metadata": {"hook_name": "blocks.1.hook_resid_mid"}}
    )
    assert Dictionary.load(tmp_path / "sae").config.site is None
    assert Dictionary.load(tmp_path / "sae", site="resid.1").config.site == Site("resid", 1)


def test_transcoder_reading_an_unmapped_hook_is_refused(tmp_path):
    tensors = {
        "W_enc": torch.randn(D_IN, D_SAE),
        "b_enc": torch.randn(D_SAE),
        "W_dec": torch.randn(D_SAE, D_OUT),
        "b_dec": torch.randn(D_OUT),
    }
    metadata = {
        "hook_name": "blocks.1.ln2.hook_normalized",
        "hook_name_out": "blocks.1.hook_mlp_out",
    }
    cfg = {**BASE_CFG, "architecture": "transcoder", "apply_b_dec_to_input": False}
    _write_file(tmp_path / "tc", {**cfg, "d_out": D_OUT, "metadata": metadata}, tensors)
    with pytest.raises(UserInputError, match="ln2.hook_normalized"):
        Dictionary.load(tmp_path / "tc")


@pytest.mark.parametrize(
    ("dictionary", "named"),
    [
        (LinearBasis.neurons(D_IN, site="resid.1"), "basis"),
        (_ours("transcoder", seed=1, k=K), "top-k transcoder"),
    ],
)
def test_what_saelens_cannot_represent_is_not_written(tmp_path, dictionary, named):
    with pytest.raises(UserInputError, match=named):
        dictionary.save(tmp_path / "out", format="saelens")
    assert not (tmp_path / "out" / "cfg.json").exists()


def test_negative_jumprelu_thresholds_are_not_written(tmp_path):
    ours = _ours("jumprelu", seed=2)
    with torch.no_grad():
        ours.threshold[0] = -0.1
    with pytest.raises(UserInputError, match="negative thresholds"):
        ours.save(tmp_path, format="saelens")


# ------------------------------------------- the kinds added for the peers' architectures
def test_new_kinds_compute_their_formulas_in_plain_torch(tmp_path):
    x = _inputs()
    gated = _ours("gated", seed=4)
    centered = x - gated.b_dec
    gate = (centered @ gated.W_enc + gated.b_enc > 0).float()
    magnitude = torch.relu(centered @ (gated.W_enc * gated.r_mag.exp()) + gated.b_mag)
    abstopk = _ours("abstopk", seed=5, k=K)
    pre = (x - abstopk.b_dec) @ abstopk.W_enc + abstopk.b_enc
    keep = pre.abs() >= pre.abs().sort(dim=-1, descending=True).values[:, K - 1 : K]
    jumprelu = _ours("jumprelu_transcoder", seed=6, d_out=D_OUT, skip=True)
    z = (x - jumprelu.b_in) @ jumprelu.W_enc + jumprelu.b_enc
    f = z * (z > jumprelu.threshold)
    expected = {
        gated: gate * magnitude,
        abstopk: pre * keep,
        jumprelu: f,
    }
    with torch.no_grad():
        for dictionary, features in expected.items():
            torch.testing.assert_close(dictionary.encode(x), features, atol=ATOL, rtol=0)
            loaded = Dictionary.load(dictionary.save(tmp_path / dictionary.kind))
            torch.testing.assert_close(loaded(x)[0], dictionary(x)[0], atol=0, rtol=0)
        skip = x @ jumprelu.W_skip
        x_hat = f @ jumprelu.W_dec + jumprelu.b_dec + skip
        torch.testing.assert_close(jumprelu(x)[0], x_hat, atol=ATOL, rtol=0)
    assert (abstopk.encode(x) != 0).sum(-1).eq(K).all()
