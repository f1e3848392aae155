"""Options generated from dataclass fields, the TrainSpec options of train and toy, JSON output."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, fields, replace

import pytest

from sae_circuits.cli import build_parser
from sae_circuits.cli.common import print_json
from sae_circuits.cli.toy_cmd import SPEC_OPTIONS as TOY_OPTIONS
from sae_circuits.cli.train_cmd import SPEC_OPTIONS as TRAIN_OPTIONS
from sae_circuits.cli.train_cmd import TRAIN_DEFAULTS
from sae_circuits.nodes import Node
from sae_circuits.options import add_options, field_help, option_values
from sae_circuits.sites import Site, SiteMap
from sae_circuits.toy import TOY_SPEC
from sae_circuits.training import TrainSpec


@dataclass
class Settings:
    width: int = field(default=4, metadata={"help": "how wide"})
    rate: float | None = field(default=None, metadata={"help": "how fast", "metavar": "R"})
    mode: str = field(default="a", metadata={"help": "which", "choices": ("a", "b")})
    loud: bool = field(default=False, metadata={"help": "shout"})


def parser_for(template: Settings, **kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_options(parser, template, [f.name for f in fields(Settings)], **kwargs)
    return parser


def test_options_take_type_default_choices_and_help_from_the_fields():
    template = Settings(width=7)
    parser = parser_for(template, notes={"mode": "b is faster"})
    names = [f.name for f in fields(Settings)]
    assert replace(template, **option_values(parser.parse_args([]), names)) == template
    args = parser.parse_args(["--width", "3", "--rate", "0.5", "--mode", "b", "--loud"])
    assert option_values(args, names) == {"width": 3, "rate": 0.5, "mode": "b", "loud": True}
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    text = parser.format_help()
    assert "how wide (default: 7)" in text and "--rate R" in text and "(default: off)" in text
    assert "(default: a; b is faster)" in text and "--loud" in text
    assert field_help(Settings, "rate") == "how fast"


def test_overrides_replace_generated_arguments():
    parser = parser_for(Settings(), overrides={"width": {"type": lambda text: len(text)}})
    assert parser.parse_args(["--width", "abc"]).width == 3


def test_every_trainspec_field_has_help():
    assert all(f.metadata.get("help") for f in fields(TrainSpec))


@pytest.mark.parametrize(
    "argv,template,names",
    [
        (["train", "--site", "resid.0", "--out", "x"], TRAIN_DEFAULTS, TRAIN_OPTIONS),
        (["toy"], TOY_SPEC, TOY_OPTIONS),
    ],
)
def test_command_defaults_are_their_templates(argv, template, names):
    args = build_parser().parse_args(argv)
    assert replace(template, **option_values(args, names)) == template


def test_train_and_toy_keep_their_own_defaults():
    differ = {"warmup_steps": (200, 1000), "dead_window": (500, 1000)}
    for name, (train, spec) in differ.items():
        assert getattr(TRAIN_DEFAULTS, name) == train and getattr(TrainSpec("x"), name) == spec
    assert (TOY_SPEC.recipe, TOY_SPEC.warmup_steps, TOY_SPEC.resample_every) == ("report", 0, 500)


@pytest.mark.parametrize("text,value", [("off", None), ("none", None), ("0", None), ("0.8", 0.8)])
def test_resample_duplicates_spellings(text, value):
    for argv in (["train", "--site", "resid.0", "--out", "x"], ["toy"]):
        args = build_parser().parse_args([*argv, "--resample-duplicates", text])
        assert args.resample_duplicates == value


def test_json_writes_sites_and_nodes_as_text(capsys):
    site = Site.parse("resid.2")
    print_json({"sites": SiteMap({site: 1.0}), "node": Node(site, 3), "list": [site]})
    assert json.loads(capsys.readouterr().out) == {
        "sites": {"resid.2": 1.0},
        "node": "resid.2/3",
        "list": ["resid.2"],
    }
