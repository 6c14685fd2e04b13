"""Pieces every subcommand shares: the strict parser, train-option flags built from the config's
own fields, and loader flags. Each command module registers its parsers and calls the Python API."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Iterable
from typing import Any

from ..core.registry import PRECISIONS
from ..training.config import OPTIONS, SECTIONS, OptionInfo, TrainConfig, read_yaml

SECTION_TITLES = {"data": "data", "model": "model", "strategy": "strategy", "optim": "optimisation",
                  "runtime": "runtime"}
# flags of earlier releases: old spelling -> current option key (kept working, not shown in --help)
OLD_FLAGS = {"--strategy-dist": "distributed"}


class StrictParser(argparse.ArgumentParser):
    """No abbreviated flags; an unknown flag fails naming the closest valid one, and a train
    option given to a command that does not use it says so."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        self.foreign: dict[str, str] = {}  # flag -> the command it belongs to

    def parse_known_args(self, args=None, namespace=None):
        parsed, extra = super().parse_known_args(args, namespace)
        flags = [a for a in extra if a.startswith("--")]
        if flags:
            flag = flags[0].split("=")[0]
            if flag in self.foreign:
                self.error(f"{flag} is not an option of this command ({self.foreign[flag]})")
            options = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(flag, options, n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]}?" if close else ""
            self.error(f"unknown option {flags[0]}{hint}")
        return parsed, extra

    def error(self, message: str):
        # one line with the remedy, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_or_float(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _add_option(group, info: OptionInfo) -> None:
    kwargs: dict[str, Any] = {"dest": info.key, "default": argparse.SUPPRESS, "help": info.help.replace("%", "%%")}
    if info.key == "report":
        group.add_argument("--no-report", action="store_false", **{**kwargs, "help": "do not write RUN/report.html"})
        return
    if info.key == "progress":
        group.add_argument("--no-progress", action="store_false",
                           **{**kwargs, "help": "no progress bars (epoch lines are still printed)"})
        return
    if info.type == "bool":
        group.add_argument(flag(info.key), action="store_true", **kwargs)
        return
    if info.type == "bool | None":  # three states: on, off, or left to visiontune (the default)
        group.add_argument(flag(info.key), action=argparse.BooleanOptionalAction, **kwargs)
        return
    if info.choices is not None:
        kwargs["choices"] = info.choices.names()
        kwargs["metavar"] = "{" + ",".join(info.choices.names()) + "}"
        kwargs["help"] = f"{info.help}: {info.choices.describe()} ({info.default})".replace("%", "%%")
    elif info.type in ("float", "float | None"):
        kwargs.update(type=float, metavar="X")
    elif info.type == "float | int | None":
        kwargs.update(type=_int_or_float, metavar="N|X")
    elif info.type in ("int", "int | None"):
        kwargs.update(type=int, metavar="N")
    else:
        kwargs["metavar"] = info.metavar or "NAME"
    group.add_argument(flag(info.key), **kwargs)
    old = next((f for f, k in OLD_FLAGS.items() if k == info.key), None)
    if old:
        group.add_argument(old, **{**kwargs, "help": argparse.SUPPRESS})


def add_train_options(parser: StrictParser, keys: Iterable[str], command: str) -> None:
    """``--config`` and the flags of ``keys`` (train option keys), grouped by config section.

    The data positional is added when ``data`` is among the keys; every other train option is
    refused by name (``lr-find --resume``: "not an option of this command").
    """
    keys = [k for k in OPTIONS if k in set(keys)]
    parser.set_defaults(train_keys=keys, command_name=command)
    if "data" in keys:
        parser.add_argument("data", nargs="?", help=OPTIONS["data"].help)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file of options (flags given here override it; keys this command does not "
                             "use are ignored with a note)")
    for section in SECTIONS:
        in_section = [OPTIONS[k] for k in keys if OPTIONS[k].section == section and k != "data"]
        if in_section:
            group = parser.add_argument_group(f"{SECTION_TITLES[section]} options",
                                              SECTIONS[section].__doc__.strip().splitlines()[0])
            for info in in_section:
                _add_option(group, info)
    for key in OPTIONS:
        if key not in keys:
            for spelling in [flag(key), *(f for f, k in OLD_FLAGS.items() if k == key),
                             *(("--no-report",) if key == "report" else ()),
                             *(("--no-progress",) if key == "progress" else ())]:
                parser.foreign[spelling] = f"`visiontune train {spelling}`; {command} does not use it"


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of a command's flags over its ``--config`` file.

    Keys the file holds that this command does not use are dropped with a note on stderr.
    """
    keys = set(args.train_keys)
    values: dict[str, Any] = read_yaml(args.config) if getattr(args, "config", None) else {}
    unused = sorted(k for k in values if k in OPTIONS and k not in keys)
    if unused:
        print(f"visiontune {args.command_name}: ignoring {', '.join(unused)} from {args.config} "
              "(not used by this command)", file=sys.stderr)
        values = {k: v for k, v in values.items() if k not in unused}
    values.update({k: v for k, v in vars(args).items() if k in keys and v is not None})
    return TrainConfig.from_dict(values)


BACKEND_CHOICES = ("auto", "eager", "onnxruntime", "openvino")  # inference.accelerated.BACKENDS (light import)


def add_backend_argument(p: argparse.ArgumentParser) -> None:
    """``--backend`` for the commands that run a PyTorch model folder on the CPU (predict, evaluate, serve)."""
    p.add_argument("--backend", default=os.environ.get("VISIONTUNE_BACKEND", "auto"), choices=BACKEND_CHOICES,
                   help="CPU runtime of a model folder: auto (default, or $VISIONTUNE_BACKEND): the fastest of eager "
                        "PyTorch, ONNX Runtime and OpenVINO measured on this CPU once per model, each graph verified "
                        "against eager fp32 (cached in the user cache); eager: PyTorch; onnxruntime/openvino: that "
                        "runtime when verified")


def add_loader_arguments(p: argparse.ArgumentParser, batch_size: int = 64) -> None:
    """``--batch-size``, ``--workers``, ``--precision`` for the commands that run a model."""
    p.add_argument("--batch-size", type=int, default=batch_size, metavar="N", help=f"images per batch ({batch_size})")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="decoding processes (default: one per core)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS.names(),
                   metavar="{" + ",".join(PRECISIONS.names()) + "}",
                   help="inference precision; auto: bf16 where the hardware makes it pay")
