"""Pieces every subcommand shares: the strict parser, train-option flags built from the config's
own fields, and loader flags. Each command module registers its parsers and calls the Python API."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from ..core.options import CommandOptions, OptionInfo
from ..training.config import OPTIONS, SECTIONS, TrainConfig, read_yaml

SECTION_TITLES = {"data": "data", "model": "model", "strategy": "strategy", "optim": "optimisation",
                  "runtime": "runtime"}
# flags of earlier releases: old spelling -> current option key (kept working, not shown in --help)
OLD_FLAGS = {"--strategy-dist": "distributed"}
T = TypeVar("T", bound=CommandOptions)


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


def add_option(group, info: OptionInfo) -> None:
    """The flag of one option, generated from its field: a bool that defaults to True is
    ``--no-KEY``, a three-state bool ``--KEY/--no-KEY``, choices list the registry's names with
    their help. The default stays the dataclass's (argparse leaves absent options out)."""
    text = info.help.replace("%", "%%")
    kwargs: dict[str, Any] = {"dest": info.key, "default": argparse.SUPPRESS, "help": text}
    if info.type == "bool" and info.default is True:
        group.add_argument("--no-" + info.key.replace("_", "-"), action="store_false",
                           **{**kwargs, "help": "do not " + text[:1].lower() + text[1:]})
        return
    if info.type == "bool":
        group.add_argument(flag(info.key), action="store_true", **kwargs)
        return
    if info.type == "bool | None":  # three states: on, off, or left to visiontune (the default)
        group.add_argument(flag(info.key), action=argparse.BooleanOptionalAction, **kwargs)
        return
    if info.choices is not None:
        names = info.choices.names()
        kwargs["choices"] = names
        kwargs["metavar"] = "{" + ",".join(names) + "}"
        default = "" if info.default is None else f" ({info.default})"  # None: the help says who decides
        kwargs["help"] = f"{info.help}: {info.choices.describe()}{default}".replace("%", "%%")
    elif info.type in ("float", "float | None"):
        kwargs.update(type=float, metavar=info.metavar or "X")
    elif info.type == "float | int | None":
        kwargs.update(type=_int_or_float, metavar=info.metavar or "N|X")
    elif info.type in ("int", "int | None"):
        kwargs.update(type=int, metavar=info.metavar or "N")
    else:
        kwargs["metavar"] = info.metavar or "NAME"
    group.add_argument(flag(info.key), **kwargs)
    old = next((f for f, k in OLD_FLAGS.items() if k == info.key), None)
    if old:
        group.add_argument(old, **{**kwargs, "help": argparse.SUPPRESS})


def add_options(parser: argparse.ArgumentParser, options: type[CommandOptions]) -> None:
    """The flags of a command's options dataclass."""
    infos = options.options()
    parser.set_defaults(options_class=options)
    for info in infos.values():
        add_option(parser, info)


def options_from_args(args: argparse.Namespace, options: type[T] | None = None) -> T:
    """The options dataclass of a command's parsed flags (absent flags keep the dataclass's defaults)."""
    cls = options or args.options_class
    given = vars(args)
    return cls.from_dict({k: given[k] for k in cls.options() if k in given})


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
                add_option(group, info)
    for key, info in OPTIONS.items():
        if key not in keys:
            negative = ["--no-" + key.replace("_", "-")] if info.type.startswith("bool") else []
            for spelling in [flag(key), *(f for f, k in OLD_FLAGS.items() if k == key), *negative]:
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
