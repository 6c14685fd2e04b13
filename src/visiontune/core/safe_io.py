"""Writing into folders visiontune did not make itself, without ever writing through a link.

A model or run folder can come from anyone. A symbolic link planted under the name of a file
visiontune writes (``misclassified.csv``, ``skipped_files.txt``, a temp file) would redirect the
write to any file the user can change. So every output is written to a fresh temp file created
exclusively in the same folder (``mkstemp``: ``O_CREAT | O_EXCL``, never following a link) and
renamed over the target, which replaces a link itself rather than its target; a target that is a
link is refused first, with a message, so nothing of the user's is silently replaced. Appends
(``metrics.csv``) open with ``O_NOFOLLOW``.

Example:
    >>> folder = Path(tempfile.mkdtemp()); (folder / "out.txt").symlink_to(folder / "victim.txt")
    >>> try:
    ...     atomic_write_text(folder / "out.txt", "x")
    ... except ArtifactError as exc:
    ...     print(exc.kind, "symbolic link" in str(exc), (folder / "victim.txt").exists())
    unsafe_path True False
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile  # noqa: F401  (also used by the doctest)
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import ArtifactError

# a cell starting with one of these runs as a formula when the CSV is opened in a spreadsheet
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: str) -> str:
    """``cell`` with a leading ``'`` when a spreadsheet would read it as a formula (CSV injection).

    Example:
        >>> spreadsheet_safe("=1+2"), spreadsheet_safe("@SUM(A1)"), spreadsheet_safe("cat.jpg")
        ("'=1+2", "'@SUM(A1)", 'cat.jpg')
    """
    return "'" + cell if cell.startswith(FORMULA_START) else cell


def refuse_link(path: str | os.PathLike) -> Path:
    """``path``, unless it or its folder is a symbolic link (then :class:`ArtifactError` naming the remedy)."""
    path = Path(path)
    for candidate in (path, path.parent):  # the file, and the folder it goes in (RUN/splits, RUN/model...)
        if candidate.is_symlink():
            raise ArtifactError(f"{candidate} is a symbolic link; visiontune never writes through one (it may "
                                "point at any file). Remove the link, or write the output elsewhere (--out)",
                                kind="unsafe_path")
    return path


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w", **open_kw: Any) -> Iterator[IO]:
    """A file object on a fresh temp file beside ``path``; renamed over ``path`` when the block
    ends without an error, removed otherwise (the previous file is kept)."""
    path = refuse_link(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kw) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise_space_error(path, exc)
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


SPACE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def raise_space_error(path: Path, exc: OSError) -> None:
    """A full disk or a file-size limit as one clear error (the previous file is kept)."""
    if exc.errno in SPACE_ERRORS:
        raise ArtifactError(f"cannot write {path}: {exc.strerror}; the previous file is kept. Free some disk "
                            "space (or raise the file-size limit) and run the command again",
                            kind="no_space") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temp file beside ``path`` for a writer that takes a file name (timm, safetensors):
    renamed over ``path`` when the block ends without an error, removed otherwise."""
    path = refuse_link(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    with atomic_writer(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_writer(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def save_figure(fig, path: str | os.PathLike, **savefig_kw: Any) -> Path:
    """``fig.savefig`` into ``path`` the same safe way (PNG unless ``format`` says otherwise)."""
    with atomic_writer(path, "wb") as fh:
        fig.savefig(fh, format=savefig_kw.pop("format", "png"), **savefig_kw)
    return Path(path)


def open_append(path: str | os.PathLike, newline: str = "") -> IO:
    """``path`` opened for appending text, refusing a symbolic link (``O_NOFOLLOW``)."""
    path = refuse_link(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        raise ArtifactError(f"cannot append to {path}: {exc.strerror}", kind="unsafe_path") from None
    return os.fdopen(fd, "a", newline=newline)
