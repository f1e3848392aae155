import pytest
import torch

from sae_circuits import Site, UserInputError, token_batches
from sae_circuits.buffer import ActivationBuffer, ShardStream, harvest, write_shards
from sae_circuits.sites import torch_module
from sae_circuits.testing import SAMPLE_TEXT, site_hook


def contexts(model, n_batches=40, ctx_len=16, rows=4):
    return list(token_batches(model.tokenizer, [SAMPLE_TEXT] * 200, ctx_len, rows))[:n_batches]


def reference_activations(model, site, ids):
    with torch.no_grad(), site_hook(model, site) as seen:
        torch_module(model)(input_ids=ids)
    return seen["x"]


def test_harvest_drops_pad_and_bos_positions(model):
    ids = contexts(model)[0]
    pad = torch.full((ids.shape[0], 3), model.tokenizer.pad_token_id)
    padded = torch.cat([pad, ids], dim=1)
    mask = torch.cat([torch.zeros_like(pad), torch.ones_like(ids)], dim=1)
    sites = [Site.parse("resid.0"), Site.parse("mlp.1")]
    got = harvest(model, sites, padded, mask)
    reference = reference_activations(model, "resid.0", ids)[:, 1:].reshape(
        -1, model.config.hidden_size
    )
    assert got["resid.0"].shape == (ids.shape[0] * (ids.shape[1] - 1), model.config.hidden_size)
    torch.testing.assert_close(got["resid.0"], reference, atol=1e-5, rtol=1e-4)
    with_bos = harvest(model, sites, padded, mask, keep_bos=True)
    assert with_bos["mlp.1"].shape[0] == ids.numel()


def test_harvest_stops_after_last_needed_layer(model):
    last = torch_module(model).get_submodule(Site.parse("resid.1").resolve(model)[0])
    calls = []
    handle = last.register_forward_hook(lambda *args: calls.append(1))
    try:
        ids = contexts(model)[0]
        harvest(model, [Site.parse("resid.0")], ids, torch.ones_like(ids))
    finally:
        handle.remove()
    assert calls == []


def test_buffer_refills_when_half_empty(model):
    n_ctxs, ctx_len, batch = 16, 16, 30
    batches = contexts(model, n_batches=40, ctx_len=ctx_len)
    buffer = ActivationBuffer(model, ["resid.1", "attn.0"], batches, n_ctxs, ctx_len, batch)
    capacity = n_ctxs * ctx_len
    served = 0
    for out in buffer:
        assert set(out) == {"attn.0", "resid.1"}
        assert out["resid.1"].shape == (batch, model.config.hidden_size)
        served += batch
        # After serving, what is left never drops below half the capacity minus one batch,
        # and a refill only happens once less than half is left.
        assert buffer.available >= capacity // 2 - batch or buffer.exhausted
    rows_per_batch = batches[0].shape[0] * (ctx_len - 1)
    assert served == (len(batches) * rows_per_batch // batch) * batch
    assert buffer.consumed == len(batches)


def test_buffer_state_round_trip(model):
    batches = contexts(model, n_batches=30)
    first = ActivationBuffer(model, ["resid.0"], batches, 16, 16, 20, seed=3)
    for _ in range(7):
        next(first)
    state = first.state_dict()
    expected = [next(first)["resid.0"] for _ in range(10)]
    resumed = ActivationBuffer(model, ["resid.0"], batches, 16, 16, 20, seed=99)
    resumed.load_state_dict(state)
    for want in expected:
        torch.testing.assert_close(next(resumed)["resid.0"], want)


def test_buffer_rejects_batches_larger_than_half(model):
    with pytest.raises(UserInputError, match="half the buffer"):
        ActivationBuffer(model, ["resid.0"], [], n_ctxs=2, ctx_len=8, batch_size=16)


def test_shards_round_trip(model, tmp_path):
    batches = contexts(model, n_batches=10)
    write_shards(
        model, ["resid.0", "mlp.0"], batches, tmp_path, tokens=500, shard_size=128, progress=False
    )
    stream = ShardStream(tmp_path, batch_size=50, seed=1)
    served = list(stream)
    assert len(served) == 3 * (128 // 50) + (500 - 3 * 128) // 50
    all_rows = torch.cat([b["resid.0"] for b in served])
    assert all_rows.shape[1] == model.config.hidden_size
    resumed = ShardStream(tmp_path, batch_size=50, seed=1)
    resumed.load_state_dict({"position": 4})
    torch.testing.assert_close(next(iter(resumed))["mlp.0"], served[4]["mlp.0"])


def test_harvesting_needs_a_site(model, tmp_path):
    with pytest.raises(UserInputError, match="at least one site"):
        ActivationBuffer(model, [], [])
    with pytest.raises(UserInputError, match="at least one site"):
        write_shards(model, [], [], tmp_path, tokens=10, progress=False)
