"""Per-token input normalisation (SAELens' `normalize_activations` constant_norm_rescale and
layer_norm): SAELens' numbers on its own files, the writer's round trip, and the splice property
(nothing edited: the clean model; a feature set: its direction times the token's scale).

The parity tests build SAEs with SAELens' classes and skip when `sae_lens` is not installed
(`pip install -e ".[interop]"`); the rest is plain torch on a tiny random model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_untied

from sae_circuits import Dictionary, DictionaryConfig, UserInputError, attach, detach, spliced
from sae_circuits.batches import scored_positions
from sae_circuits.remote import codec
from sae_circuits.sites import Site, torch_module

D_IN, D_SAE, D_OUT, K = 8, 16, 6, 3
ATOL = 1e-5
NORMALIZATIONS = ("constant_norm_rescale", "layer_norm")


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens", reason="sae_lens is not installed (extra: interop)")


def _peer(sae_lens, architecture: str, normalization: str, **options):
    """A SAELens SAE or transcoder of `architecture` with random weights (d ≤ 32)."""
    cls, config_cls = sae_lens.registry.get_sae_class(architecture)
    transcoder = "transcoder" in architecture
    if transcoder:
        options = {"d_out": D_OUT, "apply_b_dec_to_input": False, **options}
    config = config_cls(d_in=D_IN, d_sae=D_SAE, normalize_activations=normalization, **options)
    config.metadata.model_name = "EleutherAI/pythia-70m"
    config.metadata.hook_name = "blocks.1.hook_mlp_in" if transcoder else "blocks.1.hook_resid_pre"
    if transcoder:
        config.metadata.hook_name_out = "blocks.1.hook_mlp_out"
    sae = cls(config)
    generator = torch.Generator().manual_seed(len(architecture))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.linspace(0.0, 0.6, D_SAE))
    return sae


def _inputs(seed: int = 1) -> torch.Tensor:
    """Tokens of varied norms and means, where the per-token statistics matter."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(32, D_IN, generator=generator)
    return x * torch.linspace(0.2, 5.0, 32)[:, None] + torch.linspace(-2, 2, 32)[:, None]


def _peer_forward(sae, x: torch.Tensor) -> torch.Tensor:
    return sae.forward(x) if hasattr(sae, "W_skip") else sae.decode(sae.encode(x))


PEER_VARIANTS = [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("topk", {"k": K}),
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}),
    ("abstopk", {"k": K}),
    ("jumprelu", {}),
    ("gated", {}),
    ("transcoder", {}),
    ("skip_transcoder", {}),
    ("jumprelu_transcoder", {}),
    ("jumprelu_skip_transcoder", {}),
]


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize(("architecture", "options"), PEER_VARIANTS)
def test_normalising_files_load_with_saelens_numbers(
    sae_lens, tmp_path, architecture, options, normalization
):
    peer = _peer(sae_lens, architecture, normalization, **options)
    peer.save_model(tmp_path)
    ours = Dictionary.load(tmp_path)
    assert ours.config.normalization == normalization
    x = _inputs()
    with torch.no_grad():
        f_peer = peer.encode(x)  # SAELens keeps x's statistics for the decode that follows
        x_hat_peer = peer.decode(f_peer)
        torch.testing.assert_close(ours.encode(x), f_peer, atol=ATOL, rtol=0)
        torch.testing.assert_close(
            ours.reconstruct(f_peer, x) - ours.skip_term(x), x_hat_peer, atol=ATOL, rtol=0
        )
        torch.testing.assert_close(ours(x)[0], _peer_forward(peer, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "skip_transcoder"])
def test_normalisation_is_written_back_for_saelens_and_kept_natively(
    sae_lens, tmp_path, architecture, normalization
):
    _peer(sae_lens, architecture, normalization).save_model(tmp_path / "peer")
    ours = Dictionary.load(tmp_path / "peer")
    ours.save(tmp_path / "saelens", format="saelens")
    peer = sae_lens.SAE.load_from_disk(tmp_path / "saelens")
    assert peer.cfg.normalize_activations == normalization
    native = Dictionary.load(ours.save(tmp_path / "native"))
    assert native.config.normalization == normalization
    x = _inputs(seed=2)
    with torch.no_grad():
        f = ours.encode(x)
        torch.testing.assert_close(peer.encode(x), f, atol=ATOL, rtol=0)
        torch.testing.assert_close(_peer_forward(peer, x), ours(x)[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(native(x)[0], ours(x)[0], atol=0, rtol=0)


# ------------------------------------------------------------------------ plain torch (no sae_lens)
def _normalising(d_in: int, normalization: str, site: str = "resid.0", seed: int = 0):
    """A random untied dictionary at `site` that normalises its input."""
    dictionary = random_untied(d_in, site=site, seed=seed)
    config = dictionary.config
    config.normalization = normalization
    normalising = Dictionary.from_config(config)
    normalising.load_state_dict(dictionary.state_dict())
    return normalising


def _token_scale(x: torch.Tensor, normalization: str) -> torch.Tensor:
    """The per-token factor a normalised reconstruction is multiplied by (plain torch)."""
    if normalization == "constant_norm_rescale":
        return x.norm(dim=-1, keepdim=True) / x.shape[-1] ** 0.5
    return x.std(dim=-1, keepdim=True)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_encode_and_reconstruct_are_the_formulas_in_plain_torch(normalization):
    dictionary = _normalising(D_IN, normalization)
    x = _inputs()
    mean = x.mean(-1, keepdim=True)
    if normalization == "constant_norm_rescale":
        z, offset = x * D_IN**0.5 / x.norm(dim=-1, keepdim=True), 0.0
    else:
        z, offset = (x - mean) / ((x - mean).std(dim=-1, keepdim=True) + 1e-5), mean
    W_enc, b_enc = dictionary.W_enc.detach(), dictionary.b_enc.detach()
    W_dec, b_dec = dictionary.W_dec.detach(), dictionary.b_dec.detach()
    with torch.no_grad():
        f = torch.relu((z - b_dec) @ W_enc + b_enc)
        torch.testing.assert_close(dictionary.encode(x), f)
        expected = (f @ W_dec + b_dec) * _token_scale(x, normalization) + offset
        torch.testing.assert_close(dictionary.reconstruct(f, x), expected)
        portable = codec(dictionary)  # what a remote request carries
        torch.testing.assert_close(portable.reconstruct(f, x), expected)


def _site_output(lm, site: str, prompts, change=None):
    """Logits of the clean model, with `change(x)` added to the site's value (plain torch hook)."""
    path, io = Site.parse(site).resolve(lm)
    assert io == "output"
    captured = {}

    def hook(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        captured["x"] = x.detach()
        new = x if change is None else x + change(x)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = torch_module(lm).get_submodule(path).register_forward_hook(hook)
    try:
        batch = lm.tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = torch_module(lm)(**batch).logits
    finally:
        handle.remove()
    return logits, captured["x"]


PROMPTS = ["When Mary and John went to the store, John gave a drink to", "The keys are"]


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_spliced_model_is_clean_and_a_feature_writes_its_direction_times_the_scale(
    lm, normalization
):
    site, k, value = "resid.0", 5, 1.5
    dictionary = _normalising(lm.config.hidden_size, normalization, site)
    clean, x = _site_output(lm, site, PROMPTS)
    attach(lm, {site: dictionary})
    try:
        with lm.trace(PROMPTS):
            untouched = lm.output.logits.save()
        with lm.trace(PROMPTS):
            f = spliced(lm, site).features.output
            before = f[:, :, k].clone().save()
            f[:, :, k] = value
            edited = lm.output.logits.save()
    finally:
        detach(lm)
    torch.testing.assert_close(untouched, clean, atol=1e-5, rtol=0)
    direction = dictionary.W_dec[k].detach()

    def change(x: torch.Tensor) -> torch.Tensor:
        return ((value - before) * _token_scale(x, normalization)[..., 0])[..., None] * direction

    reference, _ = _site_output(lm, site, PROMPTS, change)
    torch.testing.assert_close(edited, reference, atol=1e-5, rtol=0)
    assert (edited - clean).abs().max() > 1e-3  # the edit moved the output


def test_evaluation_reconstructs_with_each_tokens_statistics(lm, bare, monkeypatch):
    """Locally and in requests run on a bare server (the dictionaries travel as torch.fx graphs)."""
    from test_remote import BareServer

    from sae_circuits import engine, evaluate

    d = lm.config.hidden_size
    transcoder = Dictionary.from_config(
        DictionaryConfig(
            kind="transcoder",
            d_in=d,
            d_dict=32,
            in_site="mlp_in.1",
            out_site="mlp.1",
            skip=True,
            normalization="layer_norm",
        )
    )
    with torch.no_grad():
        transcoder.W_skip.normal_(0, 0.1)
    dictionaries = {
        "resid.0": _normalising(d, "layer_norm", "resid.0", seed=1),
        "resid.1": _normalising(d, "constant_norm_rescale", "resid.1", seed=2),
        "mlp.1": transcoder,
    }
    tokens = engine.tokenize(lm, PROMPTS)
    batches = [(tokens.input_ids, tokens.attention_mask)]
    here = evaluate(lm, dictionaries, batches, progress=False)
    _, x = _site_output(lm, "resid.0", PROMPTS)
    scored = scored_positions(tokens.attention_mask.bool(), True)
    dictionary = dictionaries["resid.0"]
    with torch.no_grad():
        x_hat = dictionary(x)[0]
    cosine = F.cosine_similarity(x[scored], x_hat[scored], dim=-1).mean()
    assert here["resid.0"]["cosine"] == pytest.approx(float(cosine), abs=1e-5)
    runs = [evaluate(lm, dictionaries, batches, progress=False, remote="local")]
    monkeypatch.setattr(lm, "_remote_backend", lambda *args: BareServer(bare), raising=False)
    runs.append(evaluate(lm, dictionaries, batches, progress=False, remote="local"))
    expected = {
        (site, key): value for site, metrics in here.items() for key, value in metrics.items()
    }
    for run in runs:
        got = {
            (site, key): value for site, metrics in run.items() for key, value in metrics.items()
        }
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6, nan_ok=True)


def test_a_normalising_transcoder_maps_nothing_back():
    config = DictionaryConfig(
        kind="transcoder",
        d_in=D_IN,
        d_dict=D_SAE,
        d_out=D_OUT,
        in_site="mlp_in.1",
        out_site="mlp.1",
        skip=True,
        normalization="layer_norm",
    )
    transcoder = Dictionary.from_config(config)
    with torch.no_grad():
        transcoder.W_skip.normal_()
    x = _inputs()
    f = transcoder.encode(x)
    expected = transcoder.decode(f) + x @ transcoder.W_skip  # the skip term reads the raw x
    torch.testing.assert_close(transcoder.reconstruct(f, x), expected)
    assert not transcoder.scales_per_token
    torch.testing.assert_close(transcoder.fixed_directions("patching"), transcoder.W_dec)


def test_token_independent_uses_and_other_writers_refuse_a_normalising_dictionary(tmp_path):
    dictionary = _normalising(D_IN, "constant_norm_rescale")
    with pytest.raises(UserInputError, match="constant_norm_rescale"):
        dictionary.fixed_directions("patching curves")
    with pytest.raises(UserInputError, match="sparsify format cannot"):
        dictionary.save(tmp_path / "s", format="sparsify")
    with pytest.raises(UserInputError, match="normalization"):
        DictionaryConfig(kind="untied", d_in=D_IN, d_dict=D_SAE, normalization="whitening")
    with pytest.raises(UserInputError, match="tied dictionary cannot normalise"):
        Dictionary.from_config(
            DictionaryConfig(kind="tied", d_in=D_IN, d_dict=D_SAE, normalization="layer_norm")
        )
