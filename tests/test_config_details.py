"""TrainConfig details beyond test_config.py: every choice field, numeric ranges, YAML edge cases,
flag types, and what the CLI does with a config file and positional DATA."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

import visiontune
from visiontune.cli import build_parser, train_config_from_args
from visiontune.config import CHOICES, ConfigError, TrainConfig


def parse_train(*argv: str) -> TrainConfig:
    return train_config_from_args(build_parser().parse_args(["train", *argv]))


@pytest.mark.parametrize(("typo", "meant"), [("batchsize", "batch_size"), ("img-size", "img_size"),
                                              ("freeze_epoch", "freeze_epochs"), ("val_frac", "val_fraction")])
def test_unknown_key_suggestions(typo, meant):
    with pytest.raises(ConfigError, match=f"did you mean '{meant}'"):
        TrainConfig.from_dict({"data": "x", typo: 1})


def test_unknown_key_without_close_match_lists_options():
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"zzzz": 1})
    assert "epochs" in str(info.value) and "batch_size" in str(info.value)


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_every_choice_field_lists_its_allowed_values(name):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"data": "x", name: "definitely-not-valid"})
    message = str(info.value)
    assert name in message
    assert all(allowed in message for allowed in CHOICES[name])


@pytest.mark.parametrize(("name", "typo", "meant"), [("optimizer", "sgdd", "sgd"), ("schedule", "cosin", "cosine"),
                                                     ("augment", "strog", "strong")])
def test_bad_choice_suggests_closest(name, typo, meant):
    with pytest.raises(ConfigError, match=f"did you mean '{meant}'"):
        TrainConfig.from_dict({"data": "x", name: typo})


@pytest.mark.parametrize("values", [{"val_fraction": 0.0}, {"val_fraction": 1.0}, {"epochs": 0}, {"batch_size": 0},
                                    {"lr_mult": 0}, {"freeze_epochs": -1}, {"img_size": 8}])
def test_numeric_ranges(values):
    with pytest.raises(ConfigError, match=next(iter(values))):
        TrainConfig.from_dict({"data": "x", **values})


@pytest.mark.parametrize("values", [{"lr": -0.1}, {"lr": 0.0}, {"weight_decay": -1.0}, {"label_smoothing": 1.5}],
                         ids=["lr-negative", "lr-zero", "weight-decay", "label-smoothing"])
def test_optimizer_values_validated_up_front(values):
    with pytest.raises(ConfigError, match=next(iter(values))):
        TrainConfig.from_dict({"data": "x", **values})


def test_yaml_round_trip_of_every_kind_of_value(tmp_path):
    cfg = TrainConfig(data="some dir/with space", val="v.csv", epochs=3, lr=0.002, img_size=48,
                      strategy="progressive", limit_train_batches=0.5, limit_val_batches=2, early_stopping=2,
                      progress=False, cache_images=True, workers=0).validate()
    path = tmp_path / "config.yaml"
    cfg.save(path)
    assert yaml.safe_load(path.read_text())["data"] == "some dir/with space"
    loaded = TrainConfig.load(path)
    assert loaded == cfg
    assert isinstance(loaded.limit_val_batches, int) and isinstance(loaded.limit_train_batches, float)


def test_yaml_dashed_keys_bad_shapes_and_missing_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: d\nbatch-size: 4\nval-fraction: 0.3\n")
    cfg = TrainConfig.load(path)
    assert (cfg.batch_size, cfg.val_fraction) == (4, 0.3)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        TrainConfig.load(path)
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.load(tmp_path / "missing.yaml")
    path.write_text("")  # an empty file is an empty mapping: only the defaults
    assert TrainConfig.load(path) == TrainConfig()


def test_cli_precedence_flag_over_file_over_default(tmp_path):
    path = tmp_path / "run config.yaml"
    path.write_text(yaml.safe_dump({"data": "from-file", "epochs": 7, "lr": 0.01, "batch_size": 16,
                                    "augment": "light", "seed": 5}))
    cfg = parse_train("--config", str(path), "--epochs", "2", "--augment", "none")
    assert (cfg.epochs, cfg.augment) == (2, "none")  # flags win
    assert (cfg.lr, cfg.batch_size, cfg.seed, cfg.data) == (0.01, 16, 5, "from-file")  # file kept
    assert cfg.img_size is None and cfg.optimizer == "adamw"  # neither: dataclass defaults
    assert parse_train("other data", "--config", str(path)).data == "other data"  # positional DATA wins


def test_python_api_config_precedence(tmp_path, monkeypatch):
    """visiontune.train(config=FILE, **kw): keyword arguments override the file."""
    import visiontune.training.runner as runner

    seen = {}
    monkeypatch.setattr(runner, "run_training", lambda cfg: seen.setdefault("cfg", cfg))
    path = tmp_path / "c.yaml"
    path.write_text("data: file-data\nepochs: 7\nseed: 3\n")
    visiontune.train(config=str(path), epochs=2)
    assert (seen["cfg"].data, seen["cfg"].epochs, seen["cfg"].seed) == ("file-data", 2, 3)


def test_cli_flag_types_and_untouched_defaults():
    cfg = parse_train("d", "--img-size", "32", "--lr", "0.5", "--limit-train-batches", "3",
                      "--limit-val-batches", "0.5", "--no-progress", "--workers", "0", "--cache-images")
    assert cfg.img_size == 32 and isinstance(cfg.img_size, int)
    assert cfg.lr == 0.5 and cfg.limit_val_batches == 0.5
    assert cfg.limit_train_batches == 3 and isinstance(cfg.limit_train_batches, int)
    assert cfg.progress is False and cfg.workers == 0 and cfg.cache_images is True
    given = {"data", "img_size", "lr", "limit_train_batches", "limit_val_batches", "progress", "workers", "cache_images"}
    defaults = TrainConfig(data="d")
    for f in dataclasses.fields(TrainConfig):
        if f.name not in given:
            assert getattr(cfg, f.name) == getattr(defaults, f.name), f.name


def test_every_config_field_has_a_train_flag():
    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))
    dests = {a.dest for a in train._actions}
    missing = {f.name for f in dataclasses.fields(TrainConfig)} - dests
    assert not missing, f"TrainConfig fields without a CLI flag: {missing}"


def test_cli_requires_data_or_resume_and_rejects_abbreviations(capsys):
    with pytest.raises(ConfigError, match="DATA"):
        parse_train()
    assert parse_train("--resume", "runs/x").resume == "runs/x"
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["train", "d", "--epo", "3"])  # no silent prefix matching
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["train", "d", "--optimizer", "adamx"])
    assert info.value.code == 2 and "adamw" in capsys.readouterr().err


def test_python_api_rejects_unknown_keyword_before_creating_anything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="epochs"):
        visiontune.train(tmp_path / "nowhere", epoch=3)
    assert list(tmp_path.iterdir()) == []
