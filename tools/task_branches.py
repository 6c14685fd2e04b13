"""Count the places outside ``visiontune.task`` that branch on the task kind (issue 26).

A branch is an ``if``, a conditional expression, a comprehension filter, a ``match`` or an
``and``/``or`` whose condition reads the kind: ``multi_label``, ``.multi``, ``is_multi``, a
comparison with ``"multi"``/``"single"`` or a task's ``name``, ``thresholds is (not) None``,
``.dim() == 2`` of targets or labels, or an ``isinstance`` test of a label. Asking the task
(``task.probabilities(...)``) or looking a part up by ``task.name`` in a registry is not a branch.

Usage:
    python tools/task_branches.py            # the count and every branch, file:line: condition
    python tools/task_branches.py --max 5    # exit 1 if there are more than 5
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "visiontune"
KIND = re.compile(r"multi_label|\.multi\b|\bis_multi\b|[\"'](multi|single)[\"']|task\.name\s*[=!]=|"
                  r"thresholds is (not )?None|(target|targets|label|labels|y)\.dim\(\) == 2|"
                  r"isinstance\((label|y|labels\[0\]), ")


def conditions(tree: ast.AST):
    """(line, condition source node) of every branching construct."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp, ast.While)):
            yield node.lineno, node.test
        elif isinstance(node, ast.comprehension):
            for test in node.ifs:
                yield test.lineno, test
        elif isinstance(node, ast.BoolOp):
            for value in node.values[:-1]:  # the last operand is a value, not a condition
                yield value.lineno, value
        elif isinstance(node, ast.Match):
            yield node.lineno, node.subject


def branches(root: Path = ROOT) -> list[tuple[str, int, str]]:
    found = set()
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).parts[0] == "task":
            continue
        source = path.read_text()
        for line, test in conditions(ast.parse(source)):
            text = ast.get_source_segment(source, test) or ""
            if KIND.search(text):
                found.add((str(path.relative_to(root.parent.parent)), line, " ".join(text.split())))
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max", type=int, default=None, help="exit 1 when there are more branches than this")
    args = parser.parse_args(argv)
    found = branches()
    for path, line, text in found:
        print(f"{path}:{line}: {text[:100]}")
    print(f"{len(found)} task-kind branches outside src/visiontune/task")
    return 1 if args.max is not None and len(found) > args.max else 0


if __name__ == "__main__":
    sys.exit(main())
