"""TrainConfig and each command's options: sections with flat keys, validation with close-match
suggestions, YAML round trips and precedence, and every command taking only its own flags."""

from __future__ import annotations

import pytest
import yaml
from conftest import FAST, make_folder, vt_main

import visiontune
from visiontune.cli import build_parser
from visiontune.cli.common import config_from_args
from visiontune.core.errors import ConfigError
from visiontune.training.config import OPTIONS, TrainConfig


def parse(command: str, *argv: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args([command, *argv]))


def choice_options() -> list[str]:
    return [k for k, info in OPTIONS.items() if info.choices is not None]


# ----------------------------------------------------------------------------- keys and values
@pytest.mark.parametrize(("typo", "meant"), [("epoch", "epochs"), ("batchsize", "batch_size"),
                                             ("freeze_epoch", "freeze_epochs"), ("val_frac", "val_fraction")])
def test_unknown_key_suggests_close_match(typo, meant):
    with pytest.raises(ConfigError, match=f"did you mean '{meant}'"):
        TrainConfig.from_dict({"data": "x", typo: 1})


def test_unknown_key_without_close_match_lists_options():
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"zzzz": 1})
    assert "epochs" in str(info.value) and "batch_size" in str(info.value)


@pytest.mark.parametrize("name", choice_options())
def test_every_choice_option_lists_its_allowed_values(name):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"data": "x", name: "definitely-not-valid"})
    message = str(info.value)
    assert name in message
    assert all(allowed in message for allowed in OPTIONS[name].choices.names())


@pytest.mark.parametrize(("name", "typo", "meant"), [("optimizer", "sgdd", "sgd"), ("schedule", "cosin", "cosine"),
                                                     ("augment", "strog", "strong"),
                                                     ("strategy", "linear_probe", "linear-probe")])
def test_bad_choice_suggests_closest(name, typo, meant):
    with pytest.raises(ConfigError, match=f"did you mean '{meant}'"):
        TrainConfig.from_dict({"data": "x", name: typo})


@pytest.mark.parametrize("values", [{"val_fraction": 0.0}, {"val_fraction": 1.0}, {"epochs": 0}, {"batch_size": 0},
                                    {"lr_mult": 0}, {"freeze_epochs": -1}, {"img_size": 8}, {"lr": -0.1},
                                    {"lr": 0.0}, {"weight_decay": -1.0}, {"label_smoothing": 1.5},
                                    {"cached_views": 0}, {"devices": 0}, {"max_steps": 0}])
def test_numeric_ranges(values):
    """Refused naming the flag (``--val-fraction``), whether it came as a flag, a YAML key or a keyword."""
    with pytest.raises(ConfigError, match="--" + next(iter(values)).replace("_", "-") + " must be"):
        TrainConfig.from_dict({"data": "x", **values})


def test_sections_hold_the_flat_keys():
    cfg = TrainConfig.from_dict({"data": "d", "model": "resnet18", "strategy": "scratch", "epochs": 3,
                                 "seed": 4, "val_fraction": 0.3})
    assert (cfg.data.path, cfg.model.name, cfg.strategy.name, cfg.optim.epochs, cfg.runtime.seed,
            cfg.data.val_fraction) == ("d", "resnet18", "scratch", 3, 4, 0.3)
    assert list(cfg.to_dict()) == list(OPTIONS)  # one flat key per option, in section order
    assert cfg.get("epochs") == 3


def test_replace_returns_a_new_config_and_leaves_the_original():
    cfg = TrainConfig.from_dict({"data": "d"})
    other = cfg.replace(batch_size=4, run_dir="r")
    assert (other.optim.batch_size, other.runtime.run_dir) == (4, "r")
    assert (cfg.optim.batch_size, cfg.runtime.run_dir) == (32, None)
    with pytest.raises(ConfigError):
        cfg.replace(batch_size=0)


# ----------------------------------------------------------------------------- YAML
def test_yaml_round_trip_of_every_kind_of_value(tmp_path):
    cfg = TrainConfig.from_dict({"data": "some dir/with space", "val": "v.csv", "epochs": 3, "lr": 0.002,
                                 "img_size": 48, "strategy": "progressive", "limit_train_batches": 0.5,
                                 "limit_val_batches": 2, "early_stopping": 2, "progress": False,
                                 "cache_images": True, "workers": 0})
    path = tmp_path / "config.yaml"
    cfg.save(path)
    assert yaml.safe_load(path.read_text())["data"] == "some dir/with space"
    loaded = TrainConfig.load(path)
    assert loaded == cfg
    assert isinstance(loaded.runtime.limit_val_batches, int) and isinstance(loaded.runtime.limit_train_batches, float)


def test_yaml_dashed_keys_old_keys_bad_shapes_and_missing_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: d\nbatch-size: 4\nval-fraction: 0.3\nstrategy_dist: ddp\n")
    cfg = TrainConfig.load(path)
    assert (cfg.optim.batch_size, cfg.data.val_fraction) == (4, 0.3)
    assert cfg.runtime.distributed == "ddp"  # the key of earlier releases still reads
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        TrainConfig.load(path)
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.load(tmp_path / "missing.yaml")
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML"):
        TrainConfig.load(path)
    path.write_text("")  # an empty file is an empty mapping: only the defaults
    assert TrainConfig.load(path) == TrainConfig()


def test_cli_precedence_flag_over_file_over_default(tmp_path):
    path = tmp_path / "run config.yaml"
    path.write_text(yaml.safe_dump({"data": "from-file", "epochs": 7, "lr": 0.01, "batch_size": 16,
                                    "augment": "light", "seed": 5}))
    cfg = parse("train", "--config", str(path), "--epochs", "2", "--augment", "none")
    assert (cfg.optim.epochs, cfg.data.augment) == (2, "none")  # flags win
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.runtime.seed, cfg.data.path) == (0.01, 16, 5, "from-file")
    assert cfg.model.img_size is None and cfg.optim.optimizer == "adamw"  # neither: defaults
    assert parse("train", "other data", "--config", str(path)).data.path == "other data"  # positional DATA wins
    (tmp_path / "bad.yaml").write_text("data: folder\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        parse("train", "--config", str(tmp_path / "bad.yaml"))


def test_python_api_config_precedence(tmp_path, monkeypatch):
    """visiontune.train(config=FILE, **kw): keyword arguments override the file."""
    import visiontune.pipeline.train as pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run_training", lambda cfg, started=None: seen.setdefault("cfg", cfg))
    path = tmp_path / "c.yaml"
    path.write_text("data: file-data\nepochs: 7\nseed: 3\n")
    visiontune.train(config=str(path), epochs=2)
    cfg = seen["cfg"]
    assert (cfg.data.path, cfg.optim.epochs, cfg.runtime.seed) == ("file-data", 2, 3)


def test_python_api_rejects_unknown_keyword_before_creating_anything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="epochs"):
        visiontune.train(tmp_path / "nowhere", epoch=3)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the train flags
def test_cli_flag_types_and_untouched_defaults():
    cfg = parse("train", "d", "--img-size", "32", "--lr", "0.5", "--limit-train-batches", "3",
                "--limit-val-batches", "0.5", "--no-progress", "--workers", "0", "--cache-images")
    assert cfg.model.img_size == 32 and isinstance(cfg.model.img_size, int)
    assert cfg.optim.lr == 0.5 and cfg.runtime.limit_val_batches == 0.5
    assert cfg.runtime.limit_train_batches == 3 and isinstance(cfg.runtime.limit_train_batches, int)
    assert cfg.runtime.progress is False and cfg.data.workers == 0 and cfg.data.cache_images is True
    given = {"data", "img_size", "lr", "limit_train_batches", "limit_val_batches", "progress", "workers",
             "cache_images"}
    defaults = TrainConfig.from_dict({"data": "d"})
    for key in OPTIONS:
        if key not in given:
            assert cfg.get(key) == defaults.get(key), key


def test_lever_flags_reach_the_config():
    """--ema, --tta, --mixup/--cutmix, --cache-images, --augment; the option matrix's
    in-memory-crop-flip-ema-mixup-tta run trains with them."""
    cfg = parse("train", "d", "--ema", "--tta", "flip", "--mixup", "0.2", "--cutmix", "0.2", "--cache-images",
                "--augment", "crop-flip")
    assert (cfg.get("ema"), cfg.get("tta"), cfg.get("mixup"), cfg.get("cutmix")) == (True, "flip", 0.2, 0.2)
    assert cfg.get("cache_images") is True and cfg.get("augment") == "crop-flip"


def test_every_option_has_a_train_flag():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions}
    missing = set(OPTIONS) - dests
    assert not missing, f"options without a train flag: {missing}"


def test_the_task_choices_are_auto_and_the_task_registry_with_its_descriptions():
    from visiontune.task import TASKS as TASK_KINDS
    from visiontune.training.registry import TASKS

    # the parser's copy (it must not import torch, which visiontune.task does) stays in step
    assert TASKS.names() == ("auto", *TASK_KINDS)
    assert all(TASKS.help(name) == task.description for name, task in TASK_KINDS.items())


def test_old_flag_spelling_still_works():
    assert parse("train", "d", "--strategy-dist", "ddp_spawn").runtime.distributed == "ddp_spawn"
    assert parse("train", "d", "--distributed", "ddp").runtime.distributed == "ddp"


def test_cli_requires_data_or_resume_and_rejects_abbreviations(capsys):
    code, _, err = vt_main(capsys, "train")
    assert code == 2 and "DATA" in err
    assert parse("train", "--resume", "runs/x").runtime.resume == "runs/x"
    code, _, err = vt_main(capsys, "train", "d", "--epo", "3")  # no silent prefix matching
    assert code == 2 and "--epo" in err
    code, _, err = vt_main(capsys, "train", "d", "--optimizer", "adamx")
    assert code == 2 and "adamw" in err


# ----------------------------------------------------------------------------- each command its own options
@pytest.mark.parametrize("command,flag", [("lr-find", "--resume"), ("lr-find", "--devices"),
                                          ("lr-find", "--epochs"), ("lr-find", "--no-report"),
                                          ("compare", "--strategy"), ("compare", "--resume"),
                                          ("compare", "--no-report"), ("compare", "--devices")])
def test_commands_refuse_train_options_they_do_not_use(capsys, command, flag):
    code, _, err = vt_main(capsys, command, "d", flag, "1")
    assert code == 2
    assert f"{flag} is not an option of this command" in err and "Traceback" not in err


def test_help_groups_options_by_section(capsys):
    code, out, _ = vt_main(capsys, "train", "--help")
    assert code == 0
    for title in ("data options", "model options", "strategy options", "optimisation options", "runtime options"):
        assert title in out
    code, out, _ = vt_main(capsys, "lr-find", "--help")
    assert code == 0 and "--steps" in out and "--resume" not in out and "--epochs" not in out


def test_config_file_keys_a_command_does_not_use_are_dropped_with_a_note(tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text("data: d\nepochs: 9\nresume: runs/x\nbatch_size: 4\n")
    cfg = parse("lr-find", "--config", str(path))
    err = capsys.readouterr().err
    assert "ignoring epochs, resume" in err
    assert cfg.runtime.resume is None and cfg.optim.epochs == 10 and cfg.optim.batch_size == 4


def test_unsupported_options_are_refused_by_name(ml_data, tmp_path):
    with pytest.raises(ConfigError, match="balanced_accuracy is for single-label"):
        visiontune.train(ml_data, select_metric="balanced_accuracy", run_dir=str(tmp_path / "a"), **FAST)
    single = make_folder(tmp_path / "f", per_class=3)
    with pytest.raises(ConfigError, match="multi-label"):
        visiontune.train(single, select_metric="map", run_dir=str(tmp_path / "c"), **FAST)
    assert not any((tmp_path / name).exists() for name in "ac")
