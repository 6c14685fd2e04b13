"""Print the CLI reference (every subcommand's --help) as it appears in README.md.

Run `python tools/cli_reference.py --write` to refresh README.md after changing the CLI.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- cli-reference:begin -->", "<!-- cli-reference:end -->"


def reference() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width; fix it
    from visiontune.cli import build_parser

    parser = build_parser()
    parts = [parser.format_help()]
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        parts.append(f"$ visiontune {name} --help\n{sub.format_help()}")
    return "```text\n$ visiontune --help\n" + "\n".join(parts).rstrip() + "\n```"


def render(text: str) -> str:
    block = f"{BEGIN}\n{reference()}\n{END}"
    return re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)


if __name__ == "__main__":
    if "--write" in sys.argv:
        README.write_text(render(README.read_text()))
    else:
        print(reference())
