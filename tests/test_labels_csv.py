"""Labels CSVs from anyone: one row reader for every CSV (encodings, huge cells, headers), bounds
on labels checked while the CSV streams (a label bomb is refused at discovery in bounded memory),
and class names validated at discovery by the same rules as model.json.

Every crafted CSV is written here, in tmp_path; no wall-clock assertions, memory is measured
with tracemalloc (Python allocations, numpy's and torch's CPU tensors included).
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, make_folder, save_image
from PIL import Image

from visiontune.core.errors import ArtifactError, DataError
from visiontune.data.csvfile import MAX_CELL_CHARS, MAX_ROW_CHARS, read_csv_rows
from visiontune.data.label_tables import _reach_both, read_label_table
from visiontune.data.labels import MAX_CLASS_NAME, MAX_CLASSES, MAX_LABEL_MATRIX, MAX_LABELS, check_class_names
from visiontune.data.scan import discover, discover_eval, read_csv_list, read_split_csv
from visiontune.inference.bulk import rows_done
from visiontune.models.card import ModelCard

BOMB_PEAK_BYTES = 200 * 2**20  # a refused bomb costs a few MB; before the bound it cost 4.5 GB


def peak_of(fn, *args, **kwargs) -> tuple[BaseException | None, int]:
    """(the exception ``fn`` raised or None, the peak of traced memory while it ran, in bytes)."""
    tracemalloc.start()
    try:
        fn(*args, **kwargs)
        error = None
    except Exception as exc:  # returned for the caller to check
        error = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return error, peak


def two_images(folder: Path) -> None:
    for name in ("a.png", "b.png"):
        save_image(Image.new("RGB", (8, 8), (200, 30, 30)), folder / name)


# ----------------------------------------------------------------------------- finding 4: label bounds
def write_bomb(path: Path, rows: int, per_row: int = 200, header: bool = True) -> Path:
    """``rows`` images of ``per_row`` labels each, every label unique (2.8 MB for 1,000 rows)."""
    suffixes = [f"-{j:04d}" for j in range(per_row)]
    with open(path, "w") as fh:
        if header:
            fh.write("path,labels\n")
        for r in range(rows):
            prefix = f"lab{r:05d}"
            fh.write(f"img/{r:06d}.png," + " ".join(prefix + s for s in suffixes) + "\n")
    return path


@pytest.mark.parametrize("rows", [1_000, 10_000])
def test_a_label_bomb_is_refused_at_discovery_in_bounded_memory(tmp_path, rows):
    bomb = write_bomb(tmp_path / "bomb.csv", rows)
    assert bomb.stat().st_size >= rows * 2_700  # the audit's 2.7 MB, and ten times that
    error, peak = peak_of(discover, bomb)  # streaming: stops at the row that passes MAX_LABELS
    assert isinstance(error, DataError), error
    assert f"more than {MAX_LABELS} distinct labels" in str(error) and "drop rare labels" in str(error)
    assert f"{bomb}:{MAX_LABELS // 200 + 2}:" in str(error)  # the line of the first label past the bound
    assert peak < BOMB_PEAK_BYTES, f"peak {peak / 2**20:.0f} MiB"


def test_a_headerless_bomb_stops_at_the_class_bound(tmp_path):
    """A plain CSV is read before the task is known, under the single-label bound."""
    bomb = write_bomb(tmp_path / "bomb.csv", 1_000, header=False)
    error, peak = peak_of(discover, bomb)
    assert isinstance(error, DataError) and f"more than {MAX_CLASSES} distinct labels" in str(error), error
    assert peak < BOMB_PEAK_BYTES, f"peak {peak / 2**20:.0f} MiB"
    error, peak = peak_of(discover, bomb, task="multi")
    assert isinstance(error, DataError) and f"more than {MAX_LABELS} distinct labels" in str(error), error
    assert peak < BOMB_PEAK_BYTES


def test_a_one_hot_header_of_too_many_labels_is_refused_at_the_header(tmp_path):
    wide = tmp_path / "wide.csv"
    columns = MAX_LABELS + 1
    wide.write_text("path," + ",".join(f"c{i}" for i in range(columns)) + "\na.png" + ",0" * columns + "\n")
    with pytest.raises(DataError, match=rf"wide.csv:1: the one-hot header names {MAX_LABELS + 1} labels"):
        discover(wide)


def test_the_dense_label_matrix_is_bounded(tmp_path):
    images = MAX_LABEL_MATRIX // MAX_LABELS + 1  # every label allowed, one image too many for the matrix
    big = tmp_path / "big.csv"
    with open(big, "w") as fh:
        fh.write("path,labels\nimg/0.png," + " ".join(f"t{i}" for i in range(MAX_LABELS)) + "\n")
        fh.writelines(f"img/{i}.png,t0\n" for i in range(1, images + 50))
    error, peak = peak_of(discover, big, scan=False)
    assert isinstance(error, DataError), error
    assert f"{images} images x {MAX_LABELS} labels" in str(error) and "split the data" in str(error)
    assert f"big.csv:{images + 1}:" in str(error)  # refused at the image that passes it, not at the end
    assert peak < BOMB_PEAK_BYTES


def test_a_plain_csv_found_multi_label_is_held_to_the_multi_label_bounds(tmp_path):
    """``--task auto`` reads a header-less CSV under the class bound, then finds it multi-label."""
    plain = tmp_path / "plain.csv"
    rows = [f"{i}.png,x{i}" for i in range(MAX_LABELS + 1)] + ["both.png,x0 x1"]  # parts found alone: multi
    plain.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=rf"{MAX_LABELS + 1} distinct labels, more than {MAX_LABELS}"):
        discover(plain, scan=False)


def test_single_label_csv_refuses_more_classes_than_a_model_can_have(tmp_path):
    many = tmp_path / "many.csv"
    many.write_text("".join(f"{i}.png,class {i}\n" for i in range(MAX_CLASSES + 5)))
    for read in (read_csv_list, lambda p: discover(p, task="single", scan=False)):
        with pytest.raises(DataError, match=f"many.csv:{MAX_CLASSES + 1}: more than {MAX_CLASSES}"):
            read(many)


def _reach_both_reference(y: np.ndarray, train: set[int], val: set[int]) -> None:
    """The quadratic implementation the linear one replaced (recounts a side for every label)."""
    total = y.sum(0)
    for _ in range(3):
        moved = False
        for label in np.argsort(total, kind="stable"):
            if total[label] < 2:
                continue
            for source, target in ((train, val), (val, train)):
                if any(y[i, label] for i in target) or len(source) < 2:
                    continue
                side = y[sorted(source)].sum(0)
                candidates = [i for i in source if y[i, label]
                              and all(side[c] >= 2 or total[c] < 2 for c in np.flatnonzero(y[i]) if c != label)]
                if candidates:
                    pick = min(candidates, key=lambda i: (y[i].sum(), i))
                    source.discard(pick)
                    target.add(pick)
                    moved = True
        if not moved:
            return


@pytest.mark.parametrize("seed", range(12))
def test_reach_both_moves_the_images_the_quadratic_version_moved(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(2, 60)), int(rng.integers(1, 25))
    y = (rng.random((n, c)) < rng.uniform(0.02, 0.5)).astype(int)
    val = set(int(i) for i in rng.choice(n, size=max(1, n // 5), replace=False))
    train = set(range(n)) - val
    want_train, want_val = set(train), set(val)
    _reach_both_reference(y, want_train, want_val)
    _reach_both(y, train, val)
    assert (train, val) == (want_train, want_val)
    assert all(isinstance(i, int) for i in train | val)


# ----------------------------------------------------------------------------- finding 6: class names
BAD_LABELS = {"nul": "cat\0", "escape": "red\x1b[31m", "long": "x" * 300}


@pytest.mark.parametrize("kind", sorted(BAD_LABELS))
@pytest.mark.parametrize("fmt", ["labels", "plain", "one-hot"])
def test_bad_label_names_are_refused_at_discovery_naming_the_label_and_line(tmp_path, kind, fmt):
    two_images(tmp_path)
    bad = BAD_LABELS[kind]
    path = tmp_path / "bad.csv"
    rows = {"labels": ["path,labels", "a.png,dog", f"b.png,dog {bad}"],
            "plain": ["a.png,dog", f"b.png,{bad}"],
            "one-hot": [f"path,dog,{bad}", "a.png,1,0", "b.png,0,1"]}[fmt]
    path.write_text("\n".join(rows) + "\n")
    line = 1 if fmt == "one-hot" else len(rows)
    shown = repr(bad[:40])[1:-1]  # a long name is cut in the message; --task single reads 'dog <bad>' as one
    for task in ("auto", "multi", "single"):
        with pytest.raises(DataError) as info:
            discover(path, task=task)
        assert f"bad.csv:{line}:" in str(info.value) and shown in str(info.value), (task, str(info.value))
    if fmt != "one-hot":
        with pytest.raises(DataError, match=f"bad.csv:{line}:"):
            discover_eval(path, ["dog"], task="multi")
        with pytest.raises(DataError, match=f"bad.csv:{line}:"):
            discover_eval(path, ["dog"])


def test_bad_class_folder_names_are_refused_at_discovery(tmp_path):
    for name, why in (("red\x1b[0m", "control"), ("y" * (MAX_CLASS_NAME + 1), "1-200 characters"),
                      ("\u200bblue", "invisible")):
        root = make_folder(tmp_path / f"data{len(name)}", per_class=2)
        save_image(Image.new("RGB", (8, 8)), root / name / "x.png")
        with pytest.raises(DataError, match=why) as info:
            discover(root)
        assert repr(name[:40])[1:-1] in str(info.value) and "rename it" in str(info.value)
        split = make_folder(tmp_path / f"split{len(name)}" / "train", per_class=2)
        make_folder(split.parent / "val", per_class=1, classes={name: (1, 2, 3)})
        with pytest.raises(DataError, match=why):
            discover(split.parent)


def test_names_follow_one_rule_set_with_each_layers_error():
    """model.json keeps raising ArtifactError through the same function the data layer uses."""
    card = {"format": "visiontune-model", "class_names": ["a", "b\x07"],
            "architecture": {"source": "timm", "name": "resnet18", "num_classes": 2, "classifier": "fc"},
            "preprocessing": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}}
    with pytest.raises(ArtifactError, match=r"model.json: class_names: 'b\\x07' contains a control"):
        ModelCard.from_dict(card)
    with pytest.raises(DataError, match=r"class_names: 'b\\x07' contains a control"):
        check_class_names(["a", "b\x07"])
    with pytest.raises(ArtifactError, match="lists 'a' twice"):
        ModelCard.from_dict({**card, "class_names": ["a", "a"]})
    assert check_class_names(["golden retriever", "éclair", "猫"]) == ["golden retriever", "éclair", "猫"]


# ----------------------------------------------------------------------------- finding 7: one CSV reader
def readers(path: Path) -> dict:
    """Every reader of a labels or split CSV, by name."""
    return {"discover": lambda: discover(path, scan=False), "multi": lambda: discover(path, task="multi", scan=False),
            "single": lambda: discover(path, task="single", scan=False), "read_csv_list": lambda: read_csv_list(path),
            "read_label_table": lambda: read_label_table(path), "read_split_csv": lambda: read_split_csv(path, ["a"]),
            "discover_eval": lambda: discover_eval(path, ["cat"])}


def test_a_huge_cell_is_a_data_error_with_its_line(tmp_path):
    path = tmp_path / "huge.csv"
    path.write_text("path,labels\na.png,cat\nb.png," + "x" * 200_000 + "\n")
    for name, read in readers(path).items():
        with pytest.raises(DataError, match=r"huge.csv:3: .*(field larger|characters)") as info:
            read()
        assert len(str(info.value)) < 400, name  # the cell is not quoted whole


def test_an_unclosed_quote_is_refused_before_the_rest_of_the_file_is_one_cell(tmp_path):
    path = tmp_path / "quote.csv"
    path.write_text('path,labels\na.png,"cat\n' + "b.png,dog\n" * 50_000)
    error, peak = peak_of(lambda: list(read_csv_rows(path)))
    assert isinstance(error, DataError) and "quote.csv:2:" in str(error) and "unclosed quote" in str(error)
    assert peak < 16 * 2**20
    endless = tmp_path / "endless.csv"
    endless.write_text("a.png," + "cat " * (MAX_ROW_CHARS // 4 + 10))  # no line end at all
    with pytest.raises(DataError, match="endless.csv:1: a row longer than"):
        list(read_csv_rows(endless))
    assert MAX_CELL_CHARS < MAX_ROW_CHARS


def test_latin1_bytes_name_the_file_and_line_and_say_save_as_utf8(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("path,labels\na.png,cat\nb.png,caf\xe9\n".encode("latin-1"))
    for read in readers(path).values():
        with pytest.raises(DataError, match=r"latin.csv:3: not UTF-8 text \(byte 0xe9\); save it as UTF-8"):
            read()


def test_a_byte_order_mark_is_accepted_and_comments_and_blank_lines_are_skipped(tmp_path):
    two_images(tmp_path)
    path = tmp_path / "bom.csv"
    path.write_bytes("path,labels\r\n# a comment\r\n\r\na.png,cat dog\r\nb.png,cat\r\n".encode("utf-8-sig"))
    table = read_label_table(path)
    assert table.kind == "labels" and table.lines == {str(tmp_path / "a.png"): 4, str(tmp_path / "b.png"): 5}
    splits = discover(path, val_fraction=0.5)
    assert splits.task.name == "multi" and splits.class_names == ["cat", "dog"]
    plain = tmp_path / "plain.csv"
    plain.write_bytes("path,label\n# skipped\n\na.png,cat\nb.png,dog\n".encode("utf-8-sig"))
    assert read_csv_list(plain) == {"cat": [str(tmp_path / "a.png")], "dog": [str(tmp_path / "b.png")]}


def test_duplicate_one_hot_columns_are_named(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("path,cat,cat,dog\na.png,1,0,1\n")
    with pytest.raises(DataError, match=r"dup.csv:1: the one-hot header names \['cat'\] more than once"):
        discover(path, scan=False)


@pytest.mark.parametrize("header", ["path,labels,labels", "path,label,split", "image,tags,source,note"])
def test_columns_after_the_labels_column_are_refused_by_name(tmp_path, header):
    path = tmp_path / "extra.csv"
    path.write_text(header + "\na.png,cat,x\n")
    extra = header.split(",")[2:]
    with pytest.raises(DataError, match="extra.csv:1: the header has columns after") as info:
        discover(path, scan=False)
    assert str(extra) in str(info.value)
    with pytest.raises(DataError, match="extra.csv:1: .* would be ignored") as info:
        read_csv_list(path)  # a header only when it is 'path,label': else a row with a cell too many
    assert str(extra) in str(info.value)


def test_cells_after_the_labels_cell_are_refused(tmp_path):
    path = tmp_path / "unquoted.csv"
    path.write_text("path,labels\na.png,cat,dog\n")
    with pytest.raises(DataError, match=r"unquoted.csv:2: cells after the labels cell would be ignored: \['dog'\]"):
        discover(path, scan=False)
    trailing = tmp_path / "trailing.csv"  # spreadsheets pad rows with empty cells: nothing is lost
    trailing.write_text("a.png,cat,\nb.png,dog,,\n")
    assert read_csv_list(trailing) == {"cat": [str(tmp_path / "a.png")], "dog": [str(tmp_path / "b.png")]}


def test_one_hot_rows_of_another_width_still_fail(tmp_path):
    path = tmp_path / "oh.csv"
    path.write_text("path,cat,dog\na.png,1,0\nb.png,1\n")
    with pytest.raises(DataError, match="oh.csv:3: 2 cells, but the header has 3"):
        discover(path, scan=False)


def test_resume_reader_refuses_bad_bytes_and_huge_cells_and_keeps_a_cut_character(tmp_path):
    header = ["path", "label", "probability"]
    inputs = ["a.png", "b.png", "c.png"]
    out = tmp_path / "preds.csv"
    good = b"path,label,probability\na.png,cat,0.9\nb.png,dog,0.8\n"
    out.write_bytes(good + "c.png,caf\xc3".encode("latin-1"))  # cut inside a two-byte character
    assert rows_done(out, inputs, header) == 2 and out.read_bytes() == good
    out.write_bytes(good.replace(b"cat", b"caf\xe9"))
    with pytest.raises(DataError, match=r"--resume: .*preds.csv:2: not UTF-8 text .*save it as UTF-8.*--out"):
        rows_done(out, inputs, header)
    out.write_bytes(good.replace(b"cat", b"x" * 200_000))
    with pytest.raises(DataError, match=r"--resume: .*preds.csv:2: .*(field larger|characters)"):
        rows_done(out, inputs, header)
    out.write_bytes(good.replace(b"cat", b"c\0t"))
    with pytest.raises(DataError, match="NUL"):
        rows_done(out, inputs, header)


def test_a_nul_in_a_path_is_refused_with_the_cell(tmp_path):
    path = tmp_path / "nul.csv"
    path.write_text("a\0.png,cat\nb.png,dog\n")
    for read in (lambda: discover(path), lambda: read_csv_list(path)):
        with pytest.raises(DataError, match=r"nul.csv:1: 'a\\x00.png' holds a NUL"):
            read()


def test_labels_of_every_colour_still_read_as_before(tmp_path):
    """The fixtures' own CSV shapes go through the new reader unchanged."""
    from conftest import make_multilabel

    for fmt in ("labels", "onehot"):
        table = read_label_table(make_multilabel(tmp_path / fmt, n=12, fmt=fmt))
        assert {label for _, labels in table.rows for label in labels} <= set(CLASSES)
        assert len(table.rows) == 12 and min(table.lines.values()) == 2
