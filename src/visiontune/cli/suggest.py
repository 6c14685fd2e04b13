"""``visiontune suggest``: which unlabelled images to label next."""

from __future__ import annotations

import argparse
import sys

from ..pipeline.suggest import SuggestOptions
from .common import add_options, options_from_args


def register(sub) -> None:
    p = sub.add_parser("suggest", help="rank unlabelled images to label next (uncertain and diverse)")
    p.add_argument("run", help="run dir or model/ dir whose model scores the pool")
    p.add_argument("pool", help="a folder of unlabelled images (recursive), a file or a glob pattern")
    add_options(p, SuggestOptions)
    p.set_defaults(func=cmd_suggest)


def cmd_suggest(args: argparse.Namespace) -> int:
    from ..pipeline.suggest import suggest  # lazy: the parser builds without torch

    result = suggest(args.run, args.pool, **options_from_args(args).to_dict())
    left = (f"; left out {result.excluded} image(s) the run already knows" if result.excluded else "") + (
        f"; {result.unreadable} unreadable" if result.unreadable else "")
    print(f"suggested {len(result.rows)} of {result.pool} image(s){left}: wrote {result.csv} and {result.html}",
          file=sys.stderr)
    for row in result.rows[:10]:
        print(f"{row['rank']:>4}  {row['path']}  {row['why']}")
    if len(result.rows) > 10:
        print(f"      ... {len(result.rows) - 10} more in {result.csv}")
    return 0
