"""``python tests/slow_checkpoints.py SECONDS ARGS...``: ``visiontune ARGS`` in a process whose
checkpoint renames wait SECONDS first.

A test uses it to signal or kill a run while a checkpoint's temp file exists (written and synced,
not yet renamed into place), which is the moment crash-safety is about. The production code has no
such switch: this process's ``os.replace`` is wrapped, nothing else changes.
"""

from __future__ import annotations

import os
import sys
import time

from visiontune.cli import main
from visiontune.training.checkpoint_io import TEMP_MARK


def run(seconds: float, args: list[str]) -> int:
    real_replace = os.replace

    def slow_replace(src, dst, *rest, **options):
        if TEMP_MARK in os.fspath(src):
            time.sleep(seconds)
        return real_replace(src, dst, *rest, **options)

    os.replace = slow_replace  # this process only
    return main(args)


if __name__ == "__main__":
    sys.exit(run(float(sys.argv[1]), sys.argv[2:]))
