"""Every command's options come from one dataclass: its flags, its Python API's keywords and their
defaults agree, and a wrong name is refused with the closest one suggested."""

from __future__ import annotations

import argparse
import inspect

import pytest

from visiontune.cli import build_parser
from visiontune.core.errors import ConfigError
from visiontune.evaluation.report_options import DataCheckOptions, ReportOptions
from visiontune.export.export_options import CompressOptions, ExportOptions
from visiontune.pipeline.scoring import EvaluateOptions, PredictOptions
from visiontune.pipeline.suggest import SuggestOptions
from visiontune.serve.settings import ServeSettings
from visiontune.training.config import OPTIONS, CompareOptions, LrFindOptions

# command -> (its options dataclass, flags that only choose how the CLI shows the result)
COMMANDS = {
    ("predict",): (PredictOptions, set()),
    ("evaluate",): (EvaluateOptions, {"json"}),
    ("report",): (ReportOptions, set()),
    ("data", "check"): (DataCheckOptions, {"json", "strict"}),
    ("export",): (ExportOptions, set()),
    ("compress",): (CompressOptions, set()),
    ("serve",): (ServeSettings, set()),
    ("lr-find",): (LrFindOptions, set()),
    ("compare",): (CompareOptions, set()),
    ("suggest",): (SuggestOptions, set()),
}


def subparser(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def flag_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_each_commands_flags_are_its_options_dataclass(path):
    options, presentation = COMMANDS[path]
    dests = flag_dests(subparser(*path))
    train_keys = set(getattr(options, "TRAIN_KEYS", ())) - {"data"}
    assert dests == set(options.options()) | presentation | train_keys


def api_keywords(fn, *skip: str) -> dict[str, object]:
    params = inspect.signature(fn).parameters
    return {n: p.default for n, p in list(params.items())[1:] if n not in skip and p.kind != p.VAR_KEYWORD}


def test_the_python_api_takes_the_same_names_with_the_same_defaults():
    from visiontune.evaluation.data_check import check_data
    from visiontune.evaluation.report import write_report
    from visiontune.export.compress import compress
    from visiontune.export.exporter import export_model
    from visiontune.training.lr_find import lr_find

    apis = [(export_model, ExportOptions, ("check", "log")), (compress, CompressOptions, ("log",)),
            (write_report, ReportOptions, ("val_logits",)), (check_data, DataCheckOptions, ()),
            (lr_find, LrFindOptions, ())]
    for fn, options, internal in apis:
        defaults = {k: i.default for k, i in options.options().items()}
        assert api_keywords(fn, *internal) == defaults, fn.__name__


@pytest.mark.parametrize("options", [PredictOptions, EvaluateOptions, ServeSettings, CompressOptions])
def test_unknown_or_mistyped_options_are_refused_by_name(options):
    key = next(iter(options.options()))
    with pytest.raises(ConfigError, match="did you mean"):
        options.from_dict({key + "x": 1})
    with pytest.raises(ConfigError, match="--" + key.replace("_", "-")):  # named as its flag
        options.from_dict({key: object()})


def test_one_meaning_per_flag_name_across_commands():
    """A flag spelled the same in two commands takes the same values there (--backend was the CPU
    runtime for predict and the int8 runtime for compress)."""
    seen: dict[str, tuple] = {}
    for path in COMMANDS:
        for action in subparser(*path)._actions:
            for spelling in action.option_strings:
                if spelling in ("-h", "--help", "--config") or action.dest in OPTIONS:
                    continue
                choices = tuple(action.choices) if action.choices else None
                if spelling in seen:
                    assert seen[spelling] == choices, f"{spelling} differs between commands"
                seen[spelling] = choices
    assert "--int8-backend" in seen and seen["--backend"] == ("auto", "eager", "onnxruntime", "openvino")
