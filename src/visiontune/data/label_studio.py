"""Label Studio's JSON: an export read as labelled data, and predictions written as tasks to import.

**Reading** (``visiontune train export.json``): Label Studio's "JSON" export is a list of tasks,
each with its image (``data.image``, or the task's only string field) and its annotations. The
first annotation that was not cancelled and holds a ``choices`` result gives the task's labels
(one for single-label projects, any number for ``choice="multiple"`` ones); tasks without one
are skipped and counted. Image references are resolved to local files:

- ``/data/local-files/?d=REL``: ``REL`` under ``$LOCAL_FILES_DOCUMENT_ROOT`` (Label Studio's own
  setting for local files storage), else under the export's folder;
- ``/data/upload/...``: under ``$LABEL_STUDIO_BASE_DATA_DIR/media/upload/`` (where Label Studio
  keeps uploaded files);
- a plain path: as is, relative to the export's folder;
- ``http(s)://`` URLs are refused: visiontune reads local files (download them first).

The tasks become a ``path,label`` CSV (single-label) or a one-hot CSV (multi-label) in
visiontune's cache, which the usual CSV reader then checks like any other.

**Writing** (``visiontune predict MODEL IMAGES --out tasks.json --label-studio ROOT``): one task per
image with the model's answer as a prediction (pre-annotation) and its probability as the score;
images under ``ROOT`` (the folder Label Studio serves as local files) are referenced as
``/data/local-files/?d=...``. Beside the tasks, ``tasks.xml`` is the labelling config the
predictions fit (an ``Image`` named ``image`` and ``Choices`` named ``choice``).

Example:
    >>> export = [{"data": {"image": "/data/local-files/?d=cats/1.jpg"},
    ...            "annotations": [{"was_cancelled": False, "result": [
    ...                {"type": "choices", "value": {"choices": ["cat"]}}]}]},
    ...           {"data": {"image": "dogs/2.jpg"}, "annotations": []}]
    >>> rows, skipped = tasks_to_rows(export, Path("/exports"), "export.json", env={})
    >>> rows, skipped
    ([('/exports/cats/1.jpg', ['cat'])], 1)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from ..core.errors import DataError
from ..core.safe_io import atomic_write_text

MAX_EXPORT_BYTES = 512 * 2**20  # a JSON export larger than this is refused before it is parsed
FROM_NAME, TO_NAME = "choice", "image"  # the names in the labelling config the predictions fit
REMEDY = "export the project again from Label Studio as 'JSON'"


def is_export(path: Path) -> bool:
    """Whether ``path`` is a file to read as a Label Studio JSON export (by its suffix)."""
    return path.suffix.lower() == ".json" and path.is_file()


def read_export(path: Path) -> list[Any]:
    """The parsed export (a list of tasks), refused with a :class:`DataError` naming the remedy when
    it is too large, not JSON, or not a list."""
    size = path.stat().st_size
    if size > MAX_EXPORT_BYTES:
        raise DataError(f"{path}: {size / 2**20:.0f} MiB, over the {MAX_EXPORT_BYTES // 2**20} MiB a Label Studio "
                        "export may have; export the tasks in parts")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a JSON file ({exc}); {REMEDY}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a Label Studio export is a list of tasks, this is a {type(data).__name__}; {REMEDY}")
    return data


def resolve_image(ref: str, folder: Path, env: Mapping[str, str]) -> str:
    """A task's image reference as a local path (see the module's rules)."""
    if ref.startswith(("http://", "https://", "s3://", "gs://")):
        raise DataError(f"image {ref!r} is a URL; visiontune reads local files: download the images and serve them "
                        "as Label Studio local files (or give their paths)")
    parsed = urlparse(ref)
    if parsed.path.endswith("/data/local-files/") or parsed.path.endswith("/data/local-files"):
        rel = parse_qs(parsed.query).get("d", [""])[0]
        if not rel:
            raise DataError(f"image {ref!r} names no file (?d=...)")
        return str(Path(env.get("LOCAL_FILES_DOCUMENT_ROOT") or folder) / rel)
    if parsed.path.startswith("/data/upload/"):
        base = env.get("LABEL_STUDIO_BASE_DATA_DIR")
        if not base:
            raise DataError(f"image {ref!r} was uploaded to Label Studio: set LABEL_STUDIO_BASE_DATA_DIR to its data "
                            "folder (the uploads are in media/upload/ there), or use local files storage")
        return str(Path(base) / "media" / parsed.path.removeprefix("/data/"))
    return str(folder / ref)


def _image_ref(task: dict[str, Any], where: str) -> str:
    data = task.get("data")
    if not isinstance(data, dict):
        raise DataError(f"{where}: a task without its 'data' object; {REMEDY}")
    ref = data.get("image")
    if ref is None:
        strings = [v for v in data.values() if isinstance(v, str)]
        ref = strings[0] if len(strings) == 1 else None
    if not isinstance(ref, str) or not ref:
        raise DataError(f"{where}: no image in the task's data (expected data.image); {REMEDY}")
    return ref


def _choices(task: dict[str, Any], where: str) -> list[str] | None:
    """The labels of the task's first usable annotation, or None (nothing annotated)."""
    annotations = task.get("annotations", [])
    if not isinstance(annotations, list):
        raise DataError(f"{where}: 'annotations' is not a list; {REMEDY}")
    for annotation in annotations:
        if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
            continue
        for result in annotation.get("result") or []:
            value = result.get("value") if isinstance(result, dict) else None
            choices = value.get("choices") if isinstance(value, dict) else None
            if choices is None:
                continue
            if not isinstance(choices, list) or not all(isinstance(c, str) and c for c in choices):
                raise DataError(f"{where}: choices {choices!r} are not a list of names; {REMEDY}")
            return list(choices)
    return None


def tasks_to_rows(tasks: list[Any], folder: Path, source: str, env: Mapping[str, str] | None = None
                  ) -> tuple[list[tuple[str, list[str]]], int]:
    """``(image path, labels)`` of every annotated task, and how many tasks had no usable annotation."""
    env = os.environ if env is None else env
    rows, skipped = [], 0
    for i, task in enumerate(tasks):
        where = f"{source}: task {i + 1}"
        if not isinstance(task, dict):
            raise DataError(f"{where} is not an object; {REMEDY}")
        ref, choices = _image_ref(task, where), _choices(task, where)  # every task well-formed, annotated or not
        if choices is None:
            skipped += 1
            continue
        rows.append((resolve_image(ref, folder, env), choices))
    return rows, skipped


def as_csv(path: Path, cache: Path | None = None) -> Path:
    """The export at ``path`` as a CSV visiontune reads (``path,label``, or one-hot when any task has
    other than one label), written once per export content in ``cache`` (default: the temp folder)."""
    rows, skipped = tasks_to_rows(read_export(path), path.resolve().parent, str(path))
    if not rows:
        raise DataError(f"{path}: none of its {skipped} task(s) has an annotation with choices; label some images "
                        f"in Label Studio, then {REMEDY}")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if all(len(labels) == 1 for _, labels in rows):
        writer.writerow(["path", "label"])
        writer.writerows((p, labels[0]) for p, labels in rows)
    else:
        names = sorted({name for _, labels in rows for name in labels})
        writer.writerow(["path", *names])
        writer.writerows([p, *("1" if n in labels else "0" for n in names)] for p, labels in rows)
    text = buf.getvalue()
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]  # the CSV's own content names it
    folder = (cache or Path(tempfile.gettempdir())) / "visiontune-label-studio"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{path.stem}-{digest}.csv"
    if not out.is_file():
        atomic_write_text(out, text)
    if skipped:
        print(f"label studio: {path}: {len(rows)} annotated task(s) read, {skipped} without an annotation skipped")
    return out


def prediction_tasks(rows: Sequence[dict[str, Any]], root: Path | None, model_version: str) -> list[dict[str, Any]]:
    """Label Studio tasks for prediction rows: the image (a local-files URL under ``root``), and the
    model's labels with its probability as a prediction. Unreadable images and answers of
    ``unknown`` get a task without a prediction: a person decides."""
    tasks = []
    for row in rows:
        tasks.append({"data": {"image": image_url(row["path"], root)}})
        labels = row.get("labels", [row.get("label")] if row.get("label") is not None else [])
        if row.get("error") or row.get("unknown") or not labels:
            continue
        score = float(row.get("probability") if row.get("probability") is not None else
                      min((row.get("scores") or {}).get(n, 1.0) for n in labels))
        tasks[-1]["predictions"] = [{"model_version": model_version, "score": round(score, 6), "result": [
            {"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": list(labels)}}]}]
    return tasks


def image_url(path: str, root: Path | None) -> str:
    """``/data/local-files/?d=REL`` for a file under ``root``, else the path itself."""
    if root is not None:
        try:
            rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
        except ValueError:
            return path
        return "/data/local-files/?d=" + rel.as_posix()
    return path


def label_config(class_names: Sequence[str], multiple: bool) -> str:
    """The labelling config the prediction tasks fit (names escaped for XML attributes)."""
    from xml.sax.saxutils import quoteattr

    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in class_names)
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image"/>\n  <Choices name="{FROM_NAME}" toName="{TO_NAME}" '
            f'choice="{"multiple" if multiple else "single"}" showInline="true">\n{choices}\n  </Choices>\n</View>\n')
