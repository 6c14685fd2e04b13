r"""Reading CSV files visiontune may not have written: one row reader for every CSV it reads
(labels, class lists, a run's splits, the predictions ``predict --resume`` continues).

A CSV comes from anyone: a spreadsheet's export, a script's output, a file cut short. Reading
one ends in rows or in a :class:`DataError` naming the file, the line and the remedy, never in
a traceback, and never allocates more than a bounded row:

- the text is UTF-8 (a byte-order mark, as spreadsheets write, is accepted); another encoding
  is refused at its first bad byte;
- a cell holding a NUL character is refused (no name or path holds one; a UTF-16 file is full of them);
- a line or a row (a quoted cell may span lines) longer than :data:`MAX_ROW_CHARS` and a cell
  longer than :data:`MAX_CELL_CHARS` are refused before the next one is read, so an unclosed
  quote cannot turn the rest of a big file into one cell;
- whatever else the csv module refuses is refused with the line.

Rows are streamed, so a caller can stop reading as soon as the data passes one of its bounds.

Example:
    >>> rows = csv_rows(io.StringIO("path,label\n# a comment\n\na.png,cat\n"), "l.csv")
    >>> list(rows)
    [(1, ['path', 'label']), (4, ['a.png', 'cat'])]
    >>> try:
    ...     list(csv_rows(io.StringIO("a.png,caf\udce9\n"), "l.csv"))
    ... except DataError as exc:
    ...     print(exc)  # doctest: +ELLIPSIS
    l.csv:1: not UTF-8 text (byte 0xe9); save it as UTF-8...
"""

from __future__ import annotations

import csv
import io  # noqa: F401  (used by the doctest)
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from ..core.errors import DataError
from .labels import shown

# Characters of one CSV row (all its lines): a one-hot header (or a predictions row) of MAX_LABELS
# names of MAX_CLASS_NAME characters (data/labels.py) fits; a row beyond it is no CSV visiontune reads.
MAX_ROW_CHARS = 4 * 2**20
# Characters of one cell: the csv module's default limit, enforced here whatever another
# library in the process set the module-wide csv.field_size_limit() to.
MAX_CELL_CHARS = 131_072
# A byte that is not UTF-8, as the "surrogateescape" error handler decodes it: U+DC80-U+DCFF
# (valid UTF-8 never decodes to a surrogate).
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def open_csv(path: str | os.PathLike) -> TextIO:
    """``path`` opened for :func:`csv_rows`: UTF-8 with an optional byte-order mark, bytes that
    are not UTF-8 kept (as surrogates) for :func:`csv_rows` to refuse with their line, and line
    ends untranslated as the csv module needs; :class:`DataError` if the file cannot be opened."""
    try:
        return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}; check that it is a readable file") from None


def read_csv_rows(path: str | os.PathLike, comments: bool = True) -> Iterator[tuple[int, list[str]]]:
    """The rows of the CSV file ``path`` as ``(line, cells)``, streamed; see :func:`csv_rows`."""
    with open_csv(path) as fh:
        yield from csv_rows(fh, str(path), comments)


def csv_rows(text: TextIO, source: str, comments: bool = True) -> Iterator[tuple[int, list[str]]]:
    """The rows of CSV ``text`` as ``(line where the row starts, cells)``; blank lines and, with
    ``comments``, lines whose first cell starts with ``#`` are skipped.

    ``text`` is a file from :func:`open_csv` or a string's ``io.StringIO``; ``source`` names it in
    messages. Raises :class:`DataError` naming ``source``, the line and the remedy for a byte
    that is not UTF-8, a NUL, a row or cell over its bound, or a row the csv module refuses.
    """
    lines = _Lines(text, source)
    reader = csv.reader(lines)
    while True:
        start = lines.number + 1
        lines.row_chars = 0
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{source}:{start}: not a readable CSV row ({exc}); fix the row (an unclosed quote "
                            "makes the rest of the file one cell)") from None
        if not row or (comments and row[0].startswith("#")):
            continue
        long = next((cell for cell in row if len(cell) > MAX_CELL_CHARS), None)
        if long is not None:
            raise DataError(f"{source}:{start}: a cell of {len(long)} characters (at most {MAX_CELL_CHARS}); "
                            "fix the row (an unclosed quote makes the rest of the file one cell)")
        nul = next((cell for cell in row if "\0" in cell), None)
        if nul is not None:  # never in a name or a path; the cell is named (a label or a path)
            raise DataError(f"{source}:{start}: {shown(nul)} holds a NUL character, which no name or path holds; fix "
                            "the cell (a NUL throughout: the file is UTF-16 or binary, save it as UTF-8 text)")
        yield start, row


class _Lines:
    """The lines of ``text`` for ``csv.reader``, each checked before the csv module sees it."""

    def __init__(self, text: TextIO, source: str):
        self.text, self.source = text, source
        self.number = 0  # lines read so far
        self.row_chars = 0  # characters of the row being read (reset by csv_rows for each row)

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self.text.readline(MAX_ROW_CHARS + 1)  # bounded: a file without line ends is not read whole
        if not line:
            raise StopIteration
        self.number += 1
        self.row_chars += len(line)
        where = f"{self.source}:{self.number}"
        if self.row_chars > MAX_ROW_CHARS:
            raise DataError(f"{where}: a row longer than {MAX_ROW_CHARS} characters; close the quote that is not "
                            "closed, or give a CSV of labels (this is none)")
        bad = _UNDECODABLE.search(line)
        if bad is not None:
            raise DataError(f"{where}: not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x}); save it as UTF-8 "
                            "(in a spreadsheet: 'CSV UTF-8')")
        return line


def read_text(path: Path) -> str:
    """The whole text of a file :func:`open_csv` opens (bytes that are not UTF-8 kept as
    surrogates, for :func:`csv_rows` to refuse with their line)."""
    with open_csv(path) as fh:
        try:
            return fh.read()
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror or exc}; check that it is a readable file") from None
