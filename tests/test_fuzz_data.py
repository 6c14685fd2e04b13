"""Fuzzing the readers of data and model descriptions from strangers: labels CSVs (every reader of
one: data/label_tables.py, data/scan.py, the ``predict --resume`` reader in inference/bulk.py),
``model.json`` (models/card.py) and the JSON reader under it (models/artifact.py).

Whatever the bytes, reading ends in a result or in visiontune's own error, never anything else,
and one small file never makes a reader allocate more than a bounded amount.
"""

from __future__ import annotations

import copy
import json
import tracemalloc
from pathlib import Path

import pytest
from conftest import save_image
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from visiontune.core.errors import ArtifactError, VisiontuneError
from visiontune.data.label_tables import read_label_table
from visiontune.data.scan import discover, discover_eval, read_csv_list, read_split_csv
from visiontune.inference.bulk import rows_done
from visiontune.inference.rows import csv_header
from visiontune.models.artifact import read_json
from visiontune.models.card import ModelCard
from visiontune.task import get_task

pytestmark = pytest.mark.fuzz
PEAK_BYTES = 64 * 2**20


def _bounded(call):
    """Run ``call``; only visiontune's errors may escape, and Python allocations stay bounded."""
    tracemalloc.start()
    try:
        return call()
    except VisiontuneError:
        return None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < PEAK_BYTES, f"peak {peak / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- CSV text
# pieces a CSV is made of, and the ones parsers trip on: quotes, separators, line ends of three
# kinds, NUL and other control characters, invisible and wide characters, a lone surrogate
# (written as bytes that are not UTF-8), the headers and cells that make rows valid
TOKENS = ["a.png", "b.png", "missing.png", "/abs/c.png", "../up.png", "cat", "dog", "cat dog", "0", "1", "1.0", "",
          "path", "labels", "label", "tags", "image", "#", "# comment", " ", ",", '"', '""', "\n", "\r", "\r\n", "\0",
          "\x1b[31m", "\x07", "\t", "\u200b", "\ufeff", "é", "猫", "\U0001f408", "\udce9", "x" * 300]
LONG_CELLS = ["y" * 140_000, "z " * 70_000, '"' + "q\n" * 5_000]
cells = st.one_of(st.sampled_from(TOKENS), st.text(max_size=30), st.sampled_from(LONG_CELLS))
rows = st.lists(st.lists(cells, max_size=6).map(",".join), max_size=12)
HEADERS = ["", "path,labels\n", "path,label\n", "path,cat,dog\n", "path,cat,cat\n", "path,labels,labels\n",
           "\ufeffpath,tags\n"]


@st.composite
def csv_bytes(draw) -> bytes:
    """A CSV file's bytes: arbitrary bytes, or a header and rows of tokens (mostly UTF-8)."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=3000))
    end = draw(st.sampled_from(["\n", "\r\n", "\r", ""]))
    text = draw(st.sampled_from(HEADERS)) + end.join(draw(rows)) + end
    return text.encode("utf-8", "surrogateescape" if draw(st.booleans()) else "surrogatepass")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A folder with two real images, so that some fuzzed rows are valid."""
    folder = tmp_path_factory.mktemp("fuzz data")
    save_image(Image.new("RGB", (8, 8), (200, 30, 30)), folder / "a.png")
    save_image(Image.new("RGB", (8, 8), (30, 30, 200)), folder / "b.png")
    # once, before memory is measured: the lazy imports of a multi-label split (iterstrat, scikit-learn)
    discover(_write(folder, b"path,labels\na.png,cat dog\nb.png,cat\n"), val_fraction=0.5)
    return folder


def _write(folder: Path, raw: bytes, name: str = "labels.csv") -> Path:
    path = folder / name
    path.write_bytes(raw)
    return path


@given(raw=csv_bytes(), delim=st.sampled_from([" ", "|", ""]))
@example(raw=b"path,labels\na.png,cat\nb.png,caf\xe9\n", delim=" ")
@example(raw=b"path,cat,cat,dog\na.png,1,0,1\n", delim=" ")
@example(raw=b"a.png," + b"x" * 200_000 + b"\n", delim=" ")
def test_label_table_reads_or_fails_clearly(data_dir, raw, delim):
    path = _write(data_dir, raw)
    for task in ("auto", "single", "multi"):
        table = _bounded(lambda: read_label_table(path, delim, task))  # noqa: B023 (called at once)
        if table is not None:
            assert table.rows and table.kind in ("one-hot", "labels", "plain")
            assert all(isinstance(p, str) and isinstance(labels, list) for p, labels in table.rows)


@given(raw=csv_bytes())
@example(raw=b"a\0.png,cat\n")
@example(raw=b"path,label,split\na.png,cat,train\n")
def test_class_list_reads_or_fails_clearly(data_dir, raw):
    path = _write(data_dir, raw)
    classes = _bounded(lambda: read_csv_list(path))
    if classes is not None:
        assert classes and all(files for files in classes.values())


@given(raw=csv_bytes(), task=st.sampled_from(["auto", "single", "multi"]))
@example(raw=b"path,labels\na.png,cat dog\nb.png,cat\n", task="auto")
@example(raw=b"a.png,cat\nb.png,dog\n", task="single")
@example(raw=b"path,cat,dog\na.png,1,0\nb.png,0,1\n", task="multi")
@example(raw=b"a.png,cat\xff\n", task="auto")
def test_discover_with_a_scan_finds_splits_or_fails_clearly(data_dir, raw, task):
    path = _write(data_dir, raw)
    splits = _bounded(lambda: discover(path, task=task, val_fraction=0.5, scan=True))
    if splits is not None:
        assert splits.class_names and len(set(splits.class_names)) == len(splits.class_names)
        assert {p for p, _ in splits.train}.isdisjoint(p for p, _ in splits.val)


@given(raw=csv_bytes(), task=st.sampled_from(["single", "multi"]))
@example(raw=b"path,labels\na.png,cat\n", task="multi")
def test_discover_eval_finds_samples_or_fails_clearly(data_dir, raw, task):
    path = _write(data_dir, raw)
    _bounded(lambda: discover_eval(path, ["cat", "dog"], task=task))


@given(raw=csv_bytes())
@example(raw=b"path,label\n/x/a.png,cat\n")
@example(raw=b"path,cat,dog\n/x/a.png,1,0\n/x/b.png,1\n")
def test_split_csv_reads_or_fails_clearly(data_dir, raw):
    path = _write(data_dir, raw, "split.csv")
    _bounded(lambda: read_split_csv(path, ["cat", "dog"]))


RESUME_HEADER = csv_header(2, ["a", "b"], task=get_task("single"))


@given(raw=csv_bytes(), with_header=st.booleans(), spreadsheet=st.booleans())
@example(raw=b"a.png,cat,0.9,cat,0.9,dog,0.1,\nb.png,caf\xc3", with_header=True, spreadsheet=False)
def test_resume_reader_counts_rows_or_fails_clearly(tmp_path_factory, raw, with_header, spreadsheet):
    out = tmp_path_factory.mktemp("resume") / "predictions.csv"
    out.write_bytes((",".join(RESUME_HEADER) + "\n").encode() * with_header + raw)
    inputs = ["a.png", "b.png", "c.png"]
    done = _bounded(lambda: rows_done(out, inputs, RESUME_HEADER, spreadsheet))
    if done is not None:
        assert 0 <= done <= len(inputs)
        if done:  # what is kept is read again the same way
            assert rows_done(out, inputs, RESUME_HEADER, spreadsheet) == done


# ----------------------------------------------------------------------------- model.json
HUGE = 10**400  # valid JSON; math.isfinite() and float() overflow on it
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from([HUGE, -HUGE, 2**63, -1, 0])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40) | st.sampled_from(TOKENS[:30]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20)
VALID_CARD = {"format": "visiontune-model", "format_version": 1, "created": "2025-01-01T00:00:00+00:00",
              "class_names": ["cat", "dog"],
              "architecture": {"source": "timm", "name": "resnet18", "num_classes": 2, "classifier": "fc"},
              "preprocessing": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
                                "interpolation": "bilinear", "crop_pct": 0.875},
              "inference": {"task": "multi", "thresholds": [0.5, 0.4], "tta": "flip"},
              "calibration": {"temperature": 1.5}, "metrics": {"val": {"accuracy": 0.9}},
              "training": {"epochs": 2}, "versions": {"python": "3.11"}}


def _paths(value, prefix=()):
    """Every path (tuple of keys and indices) into a JSON value, the root's included."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        yield from _paths(inner, (*prefix, key))


@st.composite
def mutated_cards(draw) -> dict:
    """The valid card with a few places replaced by arbitrary JSON values, or deleted."""
    card = copy.deepcopy(VALID_CARD)
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(card) if p]
        path = draw(st.sampled_from(paths))
        parent = card
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.integers(0, 4)) == 0:
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return card


def _check_card(values):
    card = _bounded(lambda: ModelCard.from_dict(values))
    if card is not None:  # a card that validated writes a model.json that validates again
        again = ModelCard.from_dict(json.loads(json.dumps(card.to_dict())))
        assert again.class_names == card.class_names and again.num_classes == card.num_classes


@given(values=json_values)
def test_arbitrary_json_is_a_card_or_an_artifact_error(values):
    _check_card(values)


@given(values=mutated_cards())
@example(values={**VALID_CARD, "calibration": {"temperature": HUGE}})
@example(values={**VALID_CARD, "architecture": []})
@example(values={**VALID_CARD, "class_names": ["cat", "dog\x1b[2J"]})
@example(values={**VALID_CARD, "inference": {"task": "multi", "thresholds": [HUGE, 0.5]}})
@example(values={**VALID_CARD, "preprocessing": {**VALID_CARD["preprocessing"], "mean": [HUGE, 0.5, 0.5]}})
@example(values={**VALID_CARD, "preprocessing": {**VALID_CARD["preprocessing"], "input_size": [3, HUGE, 32]}})
def test_mutated_cards_validate_or_fail_with_an_artifact_error(values):
    _check_card(values)


@given(raw=st.binary(max_size=3000) | json_values.map(lambda v: json.dumps(v).encode()))
@example(raw=b"\xef\xbb\xbf{}")
@example(raw=b'{"format": "visiontune-model", "class_names": ["\\ud800"]}')
def test_read_json_parses_or_fails_with_an_artifact_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("json") / "model.json"
    path.write_bytes(raw)
    _check_card(_bounded(lambda: read_json(path)))  # whatever parsed (None: an error) is a card or refused


@pytest.mark.parametrize("raw", [b"[" * 100_000, b"1" * 5_000], ids=["deep-nesting", "long-integer"])
def test_read_json_of_deep_nesting_or_a_huge_integer_is_an_artifact_error(tmp_path, raw):
    path = tmp_path / "model.json"
    path.write_bytes(raw)
    with pytest.raises(ArtifactError):
        read_json(path)
