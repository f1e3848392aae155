"""The trainable kinds of top-k, BatchTopK, JumpReLU and transcoders, AuxK, `init`, and the kl and
e2e-ds objectives, each against a plain-torch formulation or a hand computation."""

from __future__ import annotations

import pytest
import torch

from sae_circuits import attach, detach, load_model
from sae_circuits.dictionary import Dictionary, DictionaryConfig
from sae_circuits.errors import UserInputError
from sae_circuits.objectives import ContextStream, clean_run, spliced_loss
from sae_circuits.sites import Site
from sae_circuits.splice import temporarily_attached
from sae_circuits.training import TrainSpec, train_dictionaries

torch.set_num_threads(1)
D, N = 12, 40


def make(kind: str, d_dict: int = 32, seed: int = 0, **config) -> Dictionary:
    torch.manual_seed(seed)
    site = {"site": "resid.0"} if kind != "transcoder" else {}
    d = Dictionary.from_config(DictionaryConfig(kind, D, d_dict, **site, **config))
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name.startswith("b") or name == "W_skip":
                p.normal_(0, 0.1)
    return d


def dense_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Plain torch: the k largest ReLU pre-activations of each row, scattered into zeros."""
    top = torch.relu(pre).topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values)


def grads(d: Dictionary, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    d.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in d.named_parameters() if p.grad is not None}


def test_topk_training_forward_matches_dense_plain_torch() -> None:
    d, x = make("topk", k=5), torch.randn(N, D)
    out = d.training_forward(x)
    sparse = grads(d, (out.x_hat - x).pow(2).sum(-1).mean())
    f = dense_topk((x - d.b_dec) @ d.W_enc + d.b_enc, 5)
    dense = grads(d, (f @ d.W_dec + d.b_dec - x).pow(2).sum(-1).mean())
    torch.testing.assert_close(out.features.to_dense(), f.detach(), atol=1e-6, rtol=0)
    assert sparse.keys() == dense.keys() == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], atol=1e-5, rtol=1e-5)


def test_auxk_reconstructs_residual_from_dead_latents_only() -> None:
    """By hand: among the dead latents, each row's k_aux largest ReLU pre-activations, decoded."""
    d, x = make("topk", k=3), torch.randn(N, D)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 4, 9, 20, 31]] = True
    pre = ((x - d.b_dec) @ d.W_enc + d.b_enc).detach()
    aux = d.auxiliary_reconstruction(x, pre, dead, 2)
    expected = torch.zeros(N, D)
    for row in range(N):
        candidates = [(float(pre[row, j]), j) for j in torch.nonzero(dead).flatten().tolist()]
        for value, j in sorted(candidates, reverse=True)[:2]:
            expected[row] += max(value, 0.0) * d.W_dec[j].detach()
    torch.testing.assert_close(aux.detach(), expected, atol=1e-5, rtol=1e-5)
    aux.sum().backward()  # gradients reach only the dead latents' encoder columns
    touched = d.W_enc.grad.abs().sum(0) > 0
    assert not touched[~dead].any()
    assert d.auxiliary_reconstruction(x, pre, torch.zeros(32, dtype=torch.bool), 2) is None


def test_auxk_enters_the_loss_once_latents_are_dead() -> None:
    """With every latent dead after one step (dead_window 1 and nothing firing is impossible, so
    compare runs): aux_coefficient changes the weights only through the AuxK term."""

    def source():
        g = torch.Generator().manual_seed(3)
        while True:
            yield {"x": torch.randn(64, D, generator=g)}

    common = dict(kind="topk", k=2, d_dict=48, dead_window=1, warmup_steps=0, lr=1e-2)
    off, on = train_dictionaries(
        source(),
        [TrainSpec("x", aux_k=0, **common), TrainSpec("x", aux_k=8, **common)],
        6,
        progress=False,
    )
    assert not torch.equal(off.W_enc, on.W_enc)


def test_batchtopk_selects_over_the_batch_and_estimates_a_threshold() -> None:
    d, x = make("batchtopk", k=3), torch.randn(N, D)
    pre = ((x - d.b_dec) @ d.W_enc + d.b_enc).detach()
    out = d.training_forward(x)
    flat = torch.relu(pre).flatten()
    kept = flat.topk(3 * N).values
    torch.testing.assert_close(
        out.features.to_dense().flatten().sort().values[-3 * N :], kept.sort().values
    )
    first = kept[kept > 0].min()
    assert float(d.threshold) == pytest.approx(float(first))
    x2 = torch.randn(N, D)
    d.training_forward(x2)
    pre2 = torch.relu(((x2 - d.b_dec) @ d.W_enc + d.b_enc).detach()).flatten().topk(3 * N).values
    second = pre2[pre2 > 0].min()
    decay = d.threshold_decay
    expected = decay * first + (1 - decay) * second
    assert float(d.threshold) == pytest.approx(float(expected), rel=1e-6)
    # inference: the threshold, one row at a time
    f = d.encode(x[:1])
    p = torch.relu(pre[:1])
    torch.testing.assert_close(f.detach(), p * (p > d.threshold))


def test_jumprelu_forward_and_straight_through_gradients() -> None:
    """f = z·H(z − θ); ∂L0/∂θ = −(1/ε) Σ K((z − θ)/ε) and ∂f/∂θ = −(θ/ε) K((z − θ)/ε)."""
    d, x = make("jumprelu"), torch.randn(N, D)
    with torch.no_grad():
        d.threshold.uniform_(0.0, 0.3)
    eps = d.bandwidth
    out = d.training_forward(x)
    z = ((x - d.b_dec) @ d.W_enc + d.b_enc).detach()
    theta = d.threshold.detach()
    torch.testing.assert_close(out.features.detach(), z * (z > theta))
    torch.testing.assert_close(out.l0.detach(), (z > theta).float().sum(-1))
    window = ((z - theta).abs() < eps / 2).float()
    (g_l0,) = torch.autograd.grad(out.l0.sum(), d.threshold, retain_graph=True)
    torch.testing.assert_close(g_l0, -(window / eps).sum(0))
    (g_f,) = torch.autograd.grad(out.features.sum(), d.threshold)
    torch.testing.assert_close(g_f, -(theta / eps * window).sum(0))


def test_transcoder_with_topk_and_skip_matches_plain_torch() -> None:
    d = make("transcoder", k=4, skip=True, d_out=7, in_site="mlp_in.0", out_site="mlp.0")
    x, y = torch.randn(N, D), torch.randn(N, 7)
    out = d.training_forward(x)
    sparse = grads(d, (out.x_hat - y).pow(2).sum(-1).mean())
    f = dense_topk((x - d.b_in) @ d.W_enc + d.b_enc, 4)
    x_hat = f @ d.W_dec + d.b_dec + x @ d.W_skip
    dense = grads(d, (x_hat - y).pow(2).sum(-1).mean())
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d(x)[0], x_hat)  # inference agrees with training


def test_every_kind_trains_saves_loads_and_splices(model_dirs, tmp_path) -> None:
    model = load_model(model_dirs["gpt_neox"])
    width = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    batches = [
        {site: torch.randn(64, width, generator=g) for site in ("resid.0", "mlp_in.0", "mlp.0")}
        for _ in range(5)
    ]
    specs = [
        TrainSpec("resid.0", kind="topk", k=4, d_dict=32),
        TrainSpec("resid.0", kind="batchtopk", k=4, d_dict=32),
        TrainSpec("resid.0", kind="jumprelu", d_dict=32, l1=1e-3),
        TrainSpec("mlp_in.0", kind="transcoder", k=4, d_dict=32, target_key="mlp.0", skip=True),
    ]
    trained = train_dictionaries(iter(batches), specs, 5, progress=False)
    prompt = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad(), model.trace(prompt):
        clean = model.output.logits.save()
    for i, d in enumerate(trained):
        loaded = Dictionary.load(d.save(tmp_path / str(i)))
        assert loaded.kind == d.kind and loaded.config.to_dict() == d.config.to_dict()
        for name, tensor in d.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        attach(model, {loaded.config.site: loaded})
        with torch.no_grad(), model.trace(prompt):
            spliced = model.output.logits.save()
        detach(model)
        torch.testing.assert_close(spliced, clean, atol=1e-4, rtol=1e-4)  # error term added back


def test_init_copies_weights_and_checks_shapes(tmp_path) -> None:
    start = make("untied", d_dict=32)
    start.save(tmp_path / "untied")
    spec = TrainSpec("x", kind="topk", k=3, d_dict=32, init=str(tmp_path / "untied"), lr=1e-9)
    (d,) = train_dictionaries(iter([{"x": torch.randn(8, D)}]), [spec], 1, progress=False)
    torch.testing.assert_close(d.W_enc, start.W_enc, atol=1e-6, rtol=0)
    with pytest.raises(UserInputError, match="shape"):
        bad = TrainSpec("x", kind="topk", k=3, d_dict=16, init=str(tmp_path / "untied"))
        train_dictionaries(iter([{"x": torch.randn(8, D)}]), [bad], 1, progress=False)


def test_spec_checks() -> None:
    assert TrainSpec("x", kind="jumprelu").sparsity == "l0"
    assert TrainSpec("x", kind="transcoder", target_key="y").sparsity == "l1"
    assert TrainSpec("x", kind="transcoder", target_key="y", k=2).sparsity == "topk"
    for bad in (
        dict(kind="untied", k=4),
        dict(kind="jumprelu", sparsity="entropy"),
        dict(kind="transcoder"),
        dict(kind="untied", target_key="y"),
        dict(skip=True),
        dict(loss="mse2"),
        dict(kind="transcoder", target_key="y", loss="kl"),
        dict(kind="transcoder", target_key="y", resample_every=5),
    ):
        with pytest.raises(UserInputError):
            TrainSpec("x", **bad)
    with pytest.raises(UserInputError, match="language model"):
        train_dictionaries(iter([]), [TrainSpec("x", loss="kl")], 1, progress=False)


# ------------------------------------------------------------------------------ objectives
def plain_kl_and_downstream(hf, layers, d, ids, keep_first=True):
    """Plain torch with forward hooks: KL(clean ‖ spliced) over real pairs and the normalized
    squared error of later residual sites, the dictionary replacing resid.0 but at position 0."""
    outputs = {}

    def record(i):
        return lambda module, inputs, output: outputs.__setitem__(
            i, output[0] if isinstance(output, tuple) else output
        )

    with torch.no_grad():
        handles = [layers[i].register_forward_hook(record(i)) for i in range(len(layers))]
        clean_logits = hf(ids).logits
        clean = dict(outputs)
        for h in handles:
            h.remove()

    def splice(module, inputs, output):
        x = output[0] if isinstance(output, tuple) else output
        x_hat = d(x)[0]
        x_hat = torch.cat([x[:, :1], x_hat[:, 1:]], 1) if keep_first else x_hat
        return (x_hat, *output[1:]) if isinstance(output, tuple) else x_hat

    handles = [layers[0].register_forward_hook(splice)]
    handles += [layers[i].register_forward_hook(record(i)) for i in range(1, len(layers))]
    logits = hf(ids).logits
    for h in handles:
        h.remove()
    p = clean_logits[:, :-1].reshape(-1, clean_logits.shape[-1]).log_softmax(-1)
    q = logits[:, :-1].reshape(-1, logits.shape[-1]).log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    errors = [
        (outputs[i][:, 1:] - clean[i][:, 1:]).pow(2).sum(-1).mean()
        / clean[i][:, 1:].pow(2).sum(-1).mean()
        for i in range(1, len(layers))
    ]
    return kl, torch.stack(errors).mean()


def model_and_resid0_dictionary(model_dirs) -> tuple:
    """The tiny GPT-NeoX model and a random untied dictionary for its resid.0 (biased so that
    features fire)."""
    model = load_model(model_dirs["gpt_neox"])
    torch.manual_seed(0)
    d = Dictionary.from_config(
        DictionaryConfig("untied", model.config.hidden_size, 32, site="resid.0")
    )
    with torch.no_grad():
        d.b_enc.normal_(0, 0.5)
    return model, d


def test_kl_and_downstream_gradients_match_plain_torch(model_dirs) -> None:
    model, d = model_and_resid0_dictionary(model_dirs)
    hf = model._module
    layers = hf.gpt_neox.layers
    ids = torch.randint(1, model.config.vocab_size, (3, 9))
    site = Site.parse("resid.0")
    later = [Site.parse(f"resid.{i}") for i in range(1, model.config.num_hidden_layers)]
    with temporarily_attached(model, {site: d}):
        clean = clean_run(model, ids, [site, *later])
        ours = spliced_loss(model, site, clean, later, downstream_coefficient=0.7)
        ours_grads = grads(d, ours)
    kl, downstream = plain_kl_and_downstream(hf, layers, d, ids)
    plain = kl + 0.7 * downstream
    plain_grads = grads(d, plain)
    assert float(ours) == pytest.approx(float(plain), rel=1e-5)
    for name in plain_grads:
        torch.testing.assert_close(ours_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)


def plain_swapped_kl(hf, layer, d, ids):
    """Plain torch: KL(clean ‖ x̂ + e') at every pair, e' the error term of the position
    (rows × (ctx − 1)) // 2 further on among the non-first positions, row-major."""
    with torch.no_grad():
        clean_logits = hf(ids).logits

    def splice(module, inputs, output):
        x = output[0] if isinstance(output, tuple) else output
        x_hat = d(x)[0]
        error = (x - x_hat)[:, 1:].reshape(-1, x.shape[-1])
        shift = len(error) // 2
        swapped = torch.cat([error[-shift:], error[:-shift]]).view_as(x[:, 1:])
        value = torch.cat([x[:, :1], x_hat[:, 1:] + swapped], 1)
        return (value, *output[1:]) if isinstance(output, tuple) else value

    handle = layer.register_forward_hook(splice)
    logits = hf(ids).logits
    handle.remove()
    p = clean_logits[:, :-1].reshape(-1, clean_logits.shape[-1]).log_softmax(-1)
    q = logits[:, :-1].reshape(-1, logits.shape[-1]).log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean()


@pytest.mark.parametrize("share", [0.3, 1.0])
def test_error_swap_loss_matches_plain_torch(model_dirs, share) -> None:
    """`error_swap` = s: (1 − s) KL with the error dropped + s KL with each position's error term
    replaced by that of the position half a batch away (another row), value and gradients."""
    model, d = model_and_resid0_dictionary(model_dirs)
    hf = model._module
    layers = hf.gpt_neox.layers
    ids = torch.randint(1, model.config.vocab_size, (4, 9))
    site = Site.parse("resid.0")
    with temporarily_attached(model, {site: d}):
        clean = clean_run(model, ids, [site])
        ours = spliced_loss(model, site, clean, error_swap=share)
        ours_grads = grads(d, ours)
    dropped, _ = plain_kl_and_downstream(hf, layers, d, ids)
    swapped = plain_swapped_kl(hf, layers[0], d, ids)
    assert abs(float(swapped) - float(dropped)) > 0.1 * float(dropped)  # the two terms differ
    plain = (1 - share) * dropped + share * swapped
    plain_grads = grads(d, plain)
    assert float(ours) == pytest.approx(float(plain), rel=1e-5)
    for name in plain_grads:
        torch.testing.assert_close(ours_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)


def test_error_swap_needs_a_kl_loss() -> None:
    with pytest.raises(UserInputError, match="error_swap"):
        TrainSpec("resid.0", error_swap=0.5)
    with pytest.raises(UserInputError, match="error_swap"):
        TrainSpec("resid.0", loss="kl", error_swap=1.5)


@pytest.mark.parametrize("loss", ["kl", "e2e-ds"])
def test_objective_training_resumes_identically(model_dirs, tmp_path, loss) -> None:
    model = load_model(model_dirs["gpt_neox"])

    def contexts(crash_at=None):
        g = torch.Generator().manual_seed(1)
        for i in range(12):
            if i == crash_at:
                raise RuntimeError("simulated crash")
            yield torch.randint(1, model.config.vocab_size, (2, 8), generator=g)

    specs = [
        TrainSpec("resid.0", kind="topk", k=3, d_dict=16, loss=loss, warmup_steps=2),
        TrainSpec("resid.0", kind="jumprelu", d_dict=16, l1=1e-3, loss=loss, seed=1),
        TrainSpec("resid.0", kind="untied", d_dict=16),  # mse on the clean run's activations
    ]
    run = dict(progress=False, checkpoint_every=3, model=model)
    reference = train_dictionaries(ContextStream(contexts()), specs, 10, **run)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_dictionaries(ContextStream(contexts(7)), specs, 10, checkpoint_dir=tmp_path, **run)
    resumed = train_dictionaries(
        ContextStream(contexts()), specs, 10, checkpoint_dir=tmp_path, **run
    )
    for a, b in zip(reference, resumed, strict=True):
        for name, tensor in a.state_dict().items():
            assert torch.equal(tensor, b.state_dict()[name]), name
    assert all(p.requires_grad is False for p in model.parameters())  # as load_model left it
    assert not any("sae" in name for name, _ in model._module.named_modules())  # detached
    assert reference[0].config.metrics["train_loss"] >= 0


def test_evaluation_counts_the_skip_connection(model_dirs) -> None:
    """A skip transcoder's reconstruction includes `x_in W_skip`: eval's MSE equals plain torch."""
    from sae_circuits.buffer import harvest
    from sae_circuits.evaluation import evaluate

    model = load_model(model_dirs["gpt_neox"])
    width = model.config.hidden_size
    torch.manual_seed(0)
    config = DictionaryConfig(
        "transcoder", width, 16, in_site="mlp_in.0", out_site="mlp.0", skip=True, k=4
    )
    d = Dictionary.from_config(config)
    with torch.no_grad():
        d.W_skip.normal_(0, 0.2)
    ids = torch.randint(1, model.config.vocab_size, (2, 7))
    (metrics,) = evaluate(model, {"mlp.0": d}, [ids], progress=False).values()
    acts = harvest(model, [Site.parse("mlp_in.0"), Site.parse("mlp.0")], ids, torch.ones_like(ids))
    with torch.no_grad():
        expected = (d(acts["mlp_in.0"])[0] - acts["mlp.0"]).pow(2).mean()
    assert metrics["mse"] == pytest.approx(float(expected), rel=1e-4)
