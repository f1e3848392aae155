import json

import torch

from sae_circuits import METRIC_KEYS, Dictionary, load_model
from sae_circuits.cli import main
from sae_circuits.pipeline import checkpoint_dir, model_fingerprint
from sae_circuits.sites import Site
from sae_circuits.training import TrainSpec

ARGS = [
    "--ctx-len",
    "32",
    "--n-ctxs",
    "32",
    "--batch-size",
    "128",
    "--eval-tokens",
    "1024",
    "--warmup-steps",
    "10",
    "--checkpoint-every",
    "20",
]


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_train_grid_then_eval_improves_loss_recovered(tmp_path, capsys):
    """On the embedded model (a random tiny model has almost no loss to recover)."""
    args = [
        "--ctx-len",
        "64",
        "--n-ctxs",
        "64",
        "--batch-size",
        "256",
        "--eval-tokens",
        "4096",
        "--warmup-steps",
        "20",
        "--checkpoint-every",
        "50",
        "--normalize",
    ]
    common = [
        "train",
        "--site",
        "resid.1",
        "--site",
        "mlp.2",
        "--dict-size",
        "256",
        "--l1",
        "1e-3",
        "--l1",
        "1e-2",
        *args,
        "--json",
    ]
    short = run_json(capsys, [*common, "--tokens", "256", "--out", str(tmp_path / "short")])
    long = run_json(capsys, [*common, "--tokens", "60000", "--out", str(tmp_path / "long")])
    assert len(long) == 4
    assert {"path", "site", "kind", "dict_size", "l1", "l1_norm"} <= set(long[0])
    assert set(METRIC_KEYS) - {"l1"} <= set(long[0])
    for before, after in zip(short, long, strict=True):
        assert after["loss_recovered"] > before["loss_recovered"], after["path"]
        assert after["mse"] < before["mse"], after["path"]
    # the saved folders load and `eval` reproduces the stored metrics
    first = long[0]
    loaded = Dictionary.load(first["path"])
    assert loaded.config.metrics["loss_recovered"] == first["loss_recovered"]
    evaluated = run_json(
        capsys,
        ["eval", "--dictionary", first["path"], "--ctx-len", "64", "--tokens", "4096", "--json"],
    )
    assert abs(evaluated["loss_recovered"] - first["loss_recovered"]) < 1e-6


def test_single_dictionary_per_site_goes_to_site_folder(model_dirs, tmp_path, capsys):
    rows = run_json(
        capsys,
        [
            "train",
            "--model",
            str(model_dirs["gpt2"]),
            "--site",
            "attn.1",
            "--dict-size",
            "48",
            "--tokens",
            "512",
            *ARGS,
            "--out",
            str(tmp_path),
            "--json",
        ],
    )
    assert rows[0]["path"] == str(tmp_path / "attn.1")
    assert Dictionary.load(tmp_path / "attn.1").config.site == Site.parse("attn.1")


def test_train_bad_site_exits_2(model_dirs, tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--model",
                str(model_dirs["llama"]),
                "--site",
                "resid.5",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "out of range" in capsys.readouterr().err


def test_checkpoint_key_changes_with_model_weights_and_run(model_dirs, tmp_path):
    """A resume must never continue a run of other weights or other data settings."""
    model = load_model(str(model_dirs["gpt2"]))
    specs = [TrainSpec("resid.0", d_dict=16)]
    before = model_fingerprint(model)
    run = {"model": before, "tokens": 512}
    assert checkpoint_dir(tmp_path, specs, run) == checkpoint_dir(tmp_path, specs, dict(run))
    assert checkpoint_dir(tmp_path, specs, run) != checkpoint_dir(
        tmp_path, specs, {**run, "tokens": 1024}
    )
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert model_fingerprint(model) != before


def test_resampling_options_reach_the_trainer(model_dirs, tmp_path, capsys):
    argv = ["train", "--model", str(model_dirs["gpt2"]), "--site", "resid.0", "--dict-size", "32"]
    argv += ["--tokens", "1024", *ARGS, "--out", str(tmp_path), "--json"]
    rules = ["--resample-duplicates", "0.8", "--resample-min-fires", "2"]
    rules += ["--resample-target", "residual"]
    assert main([*argv, *rules]) == 2
    assert "give --resample-every too" in capsys.readouterr().err
    rows = run_json(capsys, [*argv, *rules, "--resample-every", "4", "--dead-window", "2"])
    hyperparameters = Dictionary.load(rows[0]["path"]).config.hyperparameters
    assert hyperparameters["resample_every"] == 4
    assert hyperparameters["resample_duplicates"] == 0.8
    assert hyperparameters["resample_min_fires"] == 2
    assert hyperparameters["resample_target"] == "residual"


def test_transcoder_and_kl_finetune_from_the_command_line(model_dirs, tmp_path, capsys):
    """A skip top-k transcoder mlp_in.0 -> mlp.0, then a top-k dictionary fine-tuned with the KL
    objective from an MSE one (--init): each saved, loadable, with its objective recorded."""
    model = str(model_dirs["gpt_neox"])
    common = ["--model", model, "--tokens", "512", *ARGS, "--json"]
    (row,) = run_json(
        capsys,
        [
            "train",
            "--site",
            "mlp_in.0",
            "--target-site",
            "mlp.0",
            "--kind",
            "transcoder",
            "--k",
            "4",
            "--skip",
            "--dict-size",
            "32",
            "--out",
            str(tmp_path / "tc"),
            *common,
        ],
    )
    transcoder = Dictionary.load(row["path"])
    assert row["path"] == str(tmp_path / "tc" / "mlp.0")
    assert (transcoder.config.in_site, transcoder.config.out_site) == (
        Site.parse("mlp_in.0"),
        Site.parse("mlp.0"),
    )
    assert transcoder.config.skip and transcoder.W_skip.abs().sum() > 0
    base = ["train", "--site", "resid.0", "--kind", "topk", "--k", "4", *common]
    (mse,) = run_json(capsys, [*base, "--dict-size", "32", "--out", str(tmp_path / "mse")])
    (kl,) = run_json(
        capsys, [*base, "--loss", "kl", "--init", mse["path"], "--out", str(tmp_path / "kl")]
    )
    tuned = Dictionary.load(kl["path"])
    assert tuned.d_dict == 32 and tuned.config.hyperparameters["loss"] == "kl"
    assert tuned.config.hyperparameters["init"] == mse["path"]
    assert not torch.equal(tuned.W_enc, Dictionary.load(mse["path"]).W_enc)
    assert kl["ce_delta"] == tuned.config.metrics["ce_delta"]


def test_train_option_conflicts_exit_2(model_dirs, tmp_path, capsys):
    model = str(model_dirs["gpt_neox"])
    for extra, message in (
        (["--kind", "transcoder"], "one --target-site per --site"),
        (["--target-site", "mlp.0"], "for --kind transcoder"),
        (["--kind", "topk"], "needs k >= 1"),
        (["--k", "4"], "k is for top-k"),
        (["--loss", "kl", "--normalize"], "raw activations"),
    ):
        argv = ["train", "--model", model, "--site", "resid.0", "--out", str(tmp_path), *extra]
        assert main(argv) == 2, extra
        assert message in capsys.readouterr().err, extra
