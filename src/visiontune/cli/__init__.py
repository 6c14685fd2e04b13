"""``visiontune`` command line: parses each command's own flags and calls the Python API, nothing more.

Every command module registers its parser and handler; the handlers import the library lazily,
so ``visiontune --help`` and argument errors answer without loading torch.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ..core.errors import VisiontuneError
from . import demo, export, predict, report, serve, suggest, train
from .common import StrictParser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visiontune", allow_abbrev=False,
                                     description="Transfer-learn an image classifier from a folder of labelled images.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=StrictParser)
    train.register(sub)
    predict.register(sub)
    report.register(sub, StrictParser)
    export.register(sub)
    serve.register(sub)
    suggest.register(sub)
    demo.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning internals, not actionable
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VisiontuneError as exc:
        print(f"visiontune: {'error: ' if exc.exit_code == 2 else ''}{exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("visiontune: interrupted", file=sys.stderr)
        return 130
