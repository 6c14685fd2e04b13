"""Progress bars for the long phases (feature extraction, evaluation, prediction): on an interactive
terminal only, so logs, CI output and piped runs stay line by line.

Example:
    >>> list(progress(range(3), "features", total=3, enabled=False))
    [0, 1, 2]
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
MIN_STEPS = 20  # a phase of fewer batches ends before a bar would tell anything


def progress(items: Iterable[T], what: str, total: int | None = None, enabled: bool | None = None) -> Iterator[T]:
    """``items``, with a tqdm bar named ``what`` on stderr when it is a terminal (``enabled=None``)
    and ``total`` (default ``len(items)``) is at least :data:`MIN_STEPS`; else ``items`` as they are."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else 0  # type: ignore[arg-type]
    show = sys.stderr.isatty() if enabled is None else enabled
    if not show or total < MIN_STEPS:
        yield from items
        return
    from tqdm import tqdm  # lazy: only a terminal shows a bar

    yield from tqdm(items, desc=what, total=total, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)
