"""``visiontune demo``: the whole pipeline offline on scikit-learn's digits."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("demo", help="offline demo: fine-tune the embedded model on scikit-learn's digits")
    p.add_argument("--run-dir", default=None, metavar="PATH", help="where to write (default: runs/demo-N)")
    p.add_argument("--epochs", type=int, default=None, metavar="N", help="override the demo's epochs")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..pipeline.demo import run_demo  # lazy: the parser builds without torch

    run_demo(run_dir=args.run_dir, epochs=args.epochs)
    return 0
