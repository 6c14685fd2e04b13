"""Dataset discovery: layouts, seeded stratified split, class checks, bad and ignored files."""

from __future__ import annotations

import pytest

from visiontune.data.scan import DataError, discover

from conftest import CLASSES, make_folder


def test_class_folders_stratified_seeded_split(image_folder):
    a = discover(image_folder, val_fraction=0.25, seed=3)
    b = discover(image_folder, val_fraction=0.25, seed=3)
    c = discover(image_folder, val_fraction=0.25, seed=4)
    assert a.class_names == sorted(CLASSES)
    assert a.train == b.train and a.val == b.val
    assert a.val != c.val
    assert not {p for p, _ in a.train} & {p for p, _ in a.val}
    assert a.counts("val") == {name: 3 for name in sorted(CLASSES)}  # 25% of 12 per class
    assert len(a.train) + len(a.val) == 36 and a.layout == "folders"


def test_split_layout_detected(tmp_path):
    make_folder(tmp_path / "train", per_class=4)
    make_folder(tmp_path / "val", per_class=2, seed=1)
    make_folder(tmp_path / "test", per_class=2, seed=2)
    s = discover(tmp_path)
    assert s.layout == "split" and (len(s.train), len(s.val), len(s.test)) == (12, 6, 6)


def test_csv_with_relative_paths(image_folder):
    csv_path = image_folder / "list.csv"
    rows = [f"{cls}/{cls}_{i:02d}.png,{cls}" for cls in CLASSES for i in range(6)]
    csv_path.write_text("path,label\n" + "\n".join(rows) + "\n")
    s = discover(csv_path, val_fraction=0.5)
    assert s.layout == "csv" and len(s.train) + len(s.val) == 18 and len(s.val) == 9


def test_explicit_val(tmp_path):
    train = make_folder(tmp_path / "a", per_class=4)
    val = make_folder(tmp_path / "b", per_class=2, seed=5)
    s = discover(train, val=val)
    assert len(s.val) == 6 and all(str(val) in p for p, _ in s.val)


def test_val_class_missing_from_train(tmp_path):
    make_folder(tmp_path / "train", per_class=3)
    make_folder(tmp_path / "val", per_class=2)
    (tmp_path / "val" / "purple").mkdir()
    (tmp_path / "val" / "green").rename(tmp_path / "val" / "purple" / "x")
    with pytest.raises(DataError, match="purple"):
        discover(tmp_path)


def test_empty_class_named(image_folder):
    (image_folder / "yellow").mkdir()
    with pytest.raises(DataError, match="yellow"):
        discover(image_folder)


def test_junk_ignored_and_bad_files_listed(image_folder):
    (image_folder / "red" / ".DS_Store").write_bytes(b"\x00junk")
    (image_folder / "red" / "Thumbs.db").write_bytes(b"junk")
    (image_folder / "blue" / ".ipynb_checkpoints").mkdir()
    (image_folder / "blue" / ".ipynb_checkpoints" / "x-checkpoint.png").write_bytes(b"junk")
    (image_folder / "green" / "empty.jpg").write_bytes(b"")
    (image_folder / "green" / "text.jpg").write_text("not an image")
    good = (image_folder / "red" / "red_00.png").read_bytes()
    (image_folder / "red" / "cut.png").write_bytes(good[: len(good) // 2])
    s = discover(image_folder)
    skipped = {p.split("/")[-1] for p, _ in s.skipped}
    assert skipped == {"empty.jpg", "text.jpg", "cut.png"}
    used = {p.split("/")[-1] for p, _ in s.train + s.val}
    assert not used & (skipped | {".DS_Store", "Thumbs.db", "x-checkpoint.png"})
    assert len(used) == 36
