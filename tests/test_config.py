"""One config dataclass: unknown keys suggest the closest, choices list allowed values."""

from __future__ import annotations

import pytest

from visiontune.cli import build_parser, train_config_from_args
from visiontune.config import ConfigError, TrainConfig


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        TrainConfig.from_dict({"data": "x", "epoch": 3})


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match="finetune, linear-probe, progressive, scratch"):
        TrainConfig.from_dict({"data": "x", "strategy": "fine-tune-all"})
    with pytest.raises(ConfigError, match="did you mean 'linear-probe'"):
        TrainConfig.from_dict({"data": "x", "strategy": "linear_probe"})


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig(data="d", epochs=4, lr=0.01, strategy="progressive").validate()
    cfg.save(tmp_path / "c.yaml")
    assert TrainConfig.load(tmp_path / "c.yaml") == cfg


def test_cli_flags_override_config_file(tmp_path):
    (tmp_path / "c.yaml").write_text("data: folder\nepochs: 7\nbatch-size: 16\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--epochs", "2"])
    cfg = train_config_from_args(args)
    assert (cfg.data, cfg.epochs, cfg.batch_size) == ("folder", 2, 16)


def test_config_file_unknown_key(tmp_path):
    (tmp_path / "c.yaml").write_text("data: folder\nlearning_rate: 0.1\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml")])
    with pytest.raises(ConfigError, match="learning_rate"):
        train_config_from_args(args)
