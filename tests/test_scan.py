"""Dataset discovery: layouts, seeded stratified split with exact per-class sizes, aliases, CSV
quirks, explicit val, class checks, bad and ignored files at every level, evaluation sets."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, CLASSES, make_folder, make_multilabel, save_image, write_corrupt_files
from PIL import Image

from visiontune.core.errors import DataError
from visiontune.data.label_tables import iterative_split
from visiontune.data.labels import label_names, stack_targets
from visiontune.data.scan import discover, discover_eval, read_split_csv, write_split_csv


def paths(samples) -> set[str]:
    return {p for p, _ in samples}


def per_class(splits, samples) -> Counter:
    return Counter(splits.class_names[label] for _, label in samples)


@pytest.fixture()
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "my data")


@pytest.mark.parametrize("fraction", [0.2, 0.25, 0.5])
def test_split_sizes_are_exact_per_class_and_labels_follow_folders(folder, fraction):
    splits = discover(folder, val_fraction=fraction, seed=3)
    every = {str(p) for p in folder.rglob("*.png")}
    assert paths(splits.train) | paths(splits.val) == every
    assert not paths(splits.train) & paths(splits.val)
    n_val = round(12 * fraction)
    assert per_class(splits, splits.val) == {n: n_val for n in CLASSES}
    assert per_class(splits, splits.train) == {n: 12 - n_val for n in CLASSES}
    for path, label in splits.train + splits.val:
        assert Path(path).parent.name == splits.class_names[label]
    assert splits.train == sorted(splits.train) and splits.val == sorted(splits.val)


def test_two_image_classes_still_give_one_to_val(tmp_path):
    root = make_folder(tmp_path / "tiny", per_class=2)
    splits = discover(root, val_fraction=0.1)
    assert per_class(splits, splits.val) == {n: 1 for n in CLASSES}
    assert per_class(splits, splits.train) == {n: 1 for n in CLASSES}


def test_split_folder_aliases(tmp_path):
    make_folder(tmp_path / "d" / "training", per_class=3, seed=1)
    make_folder(tmp_path / "d" / "validation", per_class=2, seed=2)
    splits = discover(tmp_path / "d")
    assert splits.layout == "split" and (len(splits.train), len(splits.val), len(splits.test)) == (9, 6, 0)


def test_csv_labels_need_not_match_folders_and_missing_rows_are_skipped(tmp_path):
    root = make_folder(tmp_path / "csv data" / "images", per_class=5)
    csv_path = tmp_path / "csv data" / "labels.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)  # no header row
        for p in sorted(root.rglob("*.png")):
            writer.writerow([str(p.relative_to(csv_path.parent)), f"class {p.parent.name}"])
        writer.writerow(["images/red/ghost.png", "class red"])
    splits = discover(csv_path, val_fraction=0.2)
    assert splits.layout == "csv"
    assert splits.class_names == [f"class {n}" for n in CLASS_NAMES]
    assert paths(splits.train) | paths(splits.val) == {str(p) for p in root.rglob("*.png")}
    assert [p for p, _ in splits.skipped] == [str(csv_path.parent / "images/red/ghost.png")]
    for path, label in splits.train + splits.val:
        assert splits.class_names[label] == f"class {Path(path).parent.name}"


def test_csv_with_absolute_paths_and_bad_row(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=2)
    good = tmp_path / "abs.csv"
    good.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(root.rglob("*.png"))))
    assert len(discover(good).train) + len(discover(good).val) == 6
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nonly-one-column\n")
    with pytest.raises(DataError, match="path,label"):
        discover(bad)


def test_explicit_val_keeps_all_training_images(tmp_path):
    train_root = make_folder(tmp_path / "train data", per_class=6, seed=1)
    val_root = make_folder(tmp_path / "val data", per_class=2, seed=2)
    splits = discover(train_root, val=val_root)
    assert splits.layout == "explicit-val"
    assert paths(splits.train) == {str(p) for p in train_root.rglob("*.png")}
    assert paths(splits.val) == {str(p) for p in val_root.rglob("*.png")}


def test_explicit_val_may_lack_a_class_but_not_add_one(tmp_path):
    train_root = make_folder(tmp_path / "train", per_class=4)
    only_red = make_folder(tmp_path / "val red", per_class=2, classes={"red": CLASSES["red"]})
    splits = discover(train_root, val=only_red)
    assert splits.class_names == CLASS_NAMES and per_class(splits, splits.val) == {"red": 2}
    extra = make_folder(tmp_path / "val extra", per_class=1, classes={"yellow": (230, 230, 0)})
    with pytest.raises(DataError, match="yellow"):
        discover(train_root, val=extra)
    with pytest.raises(DataError, match="not found"):
        discover(train_root, val=tmp_path / "no val here")


def test_test_split_class_missing_from_train_is_named(tmp_path):
    make_folder(tmp_path / "d" / "train", per_class=2)
    make_folder(tmp_path / "d" / "test", per_class=1, classes={"teal": (0, 128, 128)})
    with pytest.raises(DataError, match="teal"):
        discover(tmp_path / "d")


def test_class_with_only_unreadable_files_is_named(folder):
    write_corrupt_files(folder / "broken")
    with pytest.raises(DataError, match="broken"):
        discover(folder)


def test_missing_data_and_folder_without_classes(tmp_path):
    with pytest.raises(DataError, match="not found"):
        discover(tmp_path / "nowhere")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    with pytest.raises(DataError, match="class folders"):
        discover(flat)


def test_junk_at_root_and_in_class_folders_is_silent(folder):
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    for checkpoints in (folder / ".ipynb_checkpoints", folder / "green" / ".ipynb_checkpoints"):
        checkpoints.mkdir()
        Image.new("RGB", (40, 40)).save(checkpoints / "green_00-checkpoint.png")  # a readable image
    (folder / "red" / "._red_00.png").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble file
    (folder / "blue" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "blue" / "README.txt").write_text("not an image extension")
    splits = discover(folder)
    assert splits.class_names == CLASS_NAMES
    assert splits.skipped == []
    found = paths(splits.train) | paths(splits.val)
    assert found == {str(p) for c in CLASSES for p in (folder / c).glob("*.png") if not p.name.startswith(".")}


def test_unreadable_files_in_a_split_layout(tmp_path):
    root = tmp_path / "d"
    make_folder(root / "train", per_class=3)
    make_folder(root / "val", per_class=1)
    bad_val = write_corrupt_files(root / "val" / "blue")
    bad_train = write_corrupt_files(root / "train" / "red" / "nested")
    splits = discover(root)
    assert {p for p, _ in splits.skipped} == {str(p) for p in [*bad_val.values(), *bad_train.values()]}
    assert len(splits.train) == 9 and len(splits.val) == 3
    assert all(reason for _, reason in splits.skipped)


def test_nested_subfolders_belong_to_their_top_class(folder):
    nested = folder / "red" / "batch 2" / "more"
    nested.mkdir(parents=True)
    Image.new("RGB", (40, 40), (250, 0, 0)).save(nested / "deep.png")
    splits = discover(folder)
    labels = dict(splits.train + splits.val)
    assert splits.class_names[labels[str(nested / "deep.png")]] == "red"


# --- evaluation sets ---------------------------------------------------------------------------


def test_discover_eval_prefers_test_then_val(tmp_path):
    root = tmp_path / "d"
    make_folder(root / "train", per_class=2)
    make_folder(root / "val", per_class=1, seed=1)
    make_folder(root / "test", per_class=3, seed=2)
    samples, skipped = discover_eval(root, CLASS_NAMES)
    assert paths(samples) == {str(p) for p in (root / "test").rglob("*.png")} and skipped == []
    import shutil

    shutil.rmtree(root / "test")
    samples, _ = discover_eval(root, CLASS_NAMES)
    assert paths(samples) == {str(p) for p in (root / "val").rglob("*.png")}


def test_discover_eval_uses_model_class_order_and_reports_bad_files(tmp_path):
    root = make_folder(tmp_path / "eval", per_class=2, classes={"green": CLASSES["green"]})
    bad = write_corrupt_files(root / "green")
    order = ["red", "green", "blue"]  # a model's own class order, not alphabetical
    samples, skipped = discover_eval(root, order)
    assert {label for _, label in samples} == {1}
    assert {p for p, _ in skipped} == {str(p) for p in bad.values()}
    with pytest.raises(DataError, match="green"):
        discover_eval(root, ["red", "blue"])
    with pytest.raises(DataError):
        discover_eval(tmp_path / "missing", order)


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


def test_split_csv_round_trip_keeps_known_labels(tmp_path, image_folder):
    splits = discover(image_folder)
    path = tmp_path / "val.csv"
    write_split_csv(splits.val, splits.class_names, path)
    back = read_split_csv(path, splits.class_names)
    assert [label for _, label in back] == [label for _, label in splits.val]
    assert all(Path(p).is_absolute() for p, _ in back)
    assert read_split_csv(path, ["red"]) == [(p, 0) for p, label in back if splits.class_names[label] == "red"]


def test_one_class_is_refused_with_the_remedy(tmp_path):
    root = make_folder(tmp_path / "one", per_class=4, classes={"cat": (200, 0, 0)})
    with pytest.raises(DataError, match="at least 2.*another class"):
        discover(root)


def test_files_outside_the_data_folder_are_named(tmp_path):
    """A symlink out of the data root and a CSV's '..' / absolute paths: used as listed, but named."""
    import os

    root = make_folder(tmp_path / "data", per_class=4)
    elsewhere = make_folder(tmp_path / "elsewhere", per_class=1, seed=5)
    outside = next(elsewhere.rglob("*.png"))
    name = outside.parent.name
    os.symlink(outside, root / name / "linked.png")
    splits = discover(root)
    assert splits.outside_root == [str(root / name / "linked.png")]
    assert "1 file(s) resolve outside the data folder" in splits.outside_warning()
    listing = tmp_path / "data" / "list.csv"
    inside = sorted(root.rglob("*_0*.png"))
    listing.write_text("path,label\n" + "".join(f"{p.relative_to(root)},{p.parent.name}\n" for p in inside)
                       + f"../elsewhere/{name}/{outside.name},{name}\n{outside},{name}\n")
    splits = discover(listing)
    assert len(splits.outside_root) == 2 and all("elsewhere" in p for p in splits.outside_root)
    assert discover(make_folder(tmp_path / "clean", per_class=4)).outside_root == []


# --- multi-label CSVs: formats, task detection, label sets ------------------------------------------


@pytest.mark.parametrize("fmt,delim", [("labels", " "), ("labels", "|"), ("onehot", " ")])
def test_each_input_format_gives_the_same_label_sets(tmp_path, fmt, delim):
    csv_path = make_multilabel(tmp_path / "d", n=24, fmt=fmt, delim=delim)
    splits = discover(csv_path, task="auto", label_delim=delim, scan=False)
    assert splits.task.name == "multi" and splits.class_names == sorted(CLASSES)
    reference = discover(make_multilabel(tmp_path / "ref", n=24), scan=False)
    got = {Path(p).name: label_names(y, splits.class_names) for p, y in splits.train + splits.val}
    want = {Path(p).name: label_names(y, reference.class_names) for p, y in reference.train + reference.val}
    assert got == want
    assert any(not labels for labels in got.values()), "images with no label are valid samples"
    assert "multi-label" in splits.task_note


def test_single_label_csv_is_still_single_label(tmp_path, shared_folder):
    csv_path = tmp_path / "single.csv"
    rows = [(str(p), p.parent.name) for p in sorted(shared_folder.rglob("*.png"))]
    with open(csv_path, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label"), *rows])
    splits = discover(csv_path)
    assert splits.task.name == "single" and isinstance(splits.train[0][1], int)
    assert splits.task_note.startswith("task: single-label")


def test_auto_keeps_class_names_with_spaces_single_label(tmp_path):
    for name in ("a", "b", "c", "d"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / f"{name}.png")
    (tmp_path / "breeds.csv").write_text("a.png,golden retriever\nb.png,pug\nc.png,golden retriever\nd.png,pug\n")
    splits = discover(tmp_path / "breeds.csv", scan=False)
    assert splits.task.name == "single" and splits.class_names == ["golden retriever", "pug"]
    assert "--task multi" in splits.task_note
    (tmp_path / "tags.csv").write_text("a.png,cat dog\nb.png,cat\nc.png,dog\nd.png,dog\n")  # parts found alone
    assert discover(tmp_path / "tags.csv", scan=False).task.name == "multi"


def test_task_single_refuses_multi_label_rows_and_multi_refuses_folders(tmp_path, shared_folder):
    csv_path = make_multilabel(tmp_path / "d", n=12)
    with pytest.raises(DataError, match="--task multi"):
        discover(csv_path, task="single", scan=False)
    with pytest.raises(DataError, match="CSV"):
        discover(shared_folder, task="multi", scan=False)


def test_duplicate_rows_of_one_image_merge_into_one_sample(tmp_path):
    save_image(Image.new("RGB", (8, 8)), tmp_path / "a.png")
    save_image(Image.new("RGB", (8, 8)), tmp_path / "b.png")
    (tmp_path / "l.csv").write_text("path,labels\na.png,cat\na.png,dog\nb.png,\n")
    splits = discover(tmp_path / "l.csv", val_fraction=0.5)
    samples = {Path(p).name: label_names(y, splits.class_names) for p, y in splits.train + splits.val}
    assert samples == {"a.png": ["cat", "dog"], "b.png": []}


def test_unknown_labels_in_evaluation_data_are_named(tmp_path):
    save_image(Image.new("RGB", (8, 8)), tmp_path / "a.png")
    (tmp_path / "e.csv").write_text("path,labels\na.png,cat zebra\n")
    with pytest.raises(DataError, match="zebra"):
        discover_eval(tmp_path / "e.csv", ["cat", "dog"], task="multi")


def test_split_csv_round_trips_label_sets(tmp_path):
    names = ["cat", "dog", "car"]
    samples = [("/x/a.png", torch.tensor([1.0, 0.0, 1.0])), ("/x/b.png", torch.zeros(3))]
    write_split_csv(samples, names, tmp_path / "val.csv")
    back = read_split_csv(tmp_path / "val.csv", names)
    assert [p for p, _ in back] == ["/x/a.png", "/x/b.png"]
    assert torch.equal(stack_targets([y for _, y in back]), stack_targets([y for _, y in samples]))


def test_split_keeps_every_label_in_train_and_val():
    rng = np.random.default_rng(0)
    common = (rng.random((200, 6)) < 0.4).astype(np.float32)
    rare = np.zeros((200, 3), dtype=np.float32)
    rare[[5, 77], 0] = 1  # two images: one must go to each side
    rare[[1, 50, 120], 1] = 1
    rare[[9, 10, 11, 12], 2] = 1
    targets = torch.from_numpy(np.concatenate([common, rare], 1))
    train, val = iterative_split(targets, 0.2, seed=3)
    assert sorted(train + val) == list(range(200)) and not set(train) & set(val)
    assert abs(len(val) - 40) <= 2
    for label in range(targets.shape[1]):
        assert targets[train, label].sum() > 0 and targets[val, label].sum() > 0, label
    assert iterative_split(targets, 0.2, seed=3) == (train, val)  # seeded


def test_a_large_split_holds_out_at_most_its_cap_and_splits_the_same_again(folder, monkeypatch):
    """Unless the user gives the share, a split holds out at most MAX_HELD_OUT images (here 4 of 36);
    the share it reports splits the data the same way again (what resume, report and export do)."""
    import visiontune.data.scan as scan

    monkeypatch.setattr(scan, "MAX_HELD_OUT", 4)
    monkeypatch.setattr(scan, "MIN_HELD_OUT_PER_CLASS", 1)
    capped = discover(folder, seed=1, cap_val=True)
    assert len(capped.val) <= 4 and set(per_class(capped, capped.val).values()) == {1}
    assert capped.val_fraction == pytest.approx(4 / 36)
    again = discover(folder, val_fraction=capped.val_fraction, seed=1)
    assert (again.train, again.val) == (capped.train, capped.val)
    assert len(discover(folder, seed=1).val) == 6  # the share itself where the caller gave it (no cap)
    # many classes: at least MIN_HELD_OUT_PER_CLASS each, as the share allows
    monkeypatch.setattr(scan, "MIN_HELD_OUT_PER_CLASS", 2)
    assert set(per_class(capped, discover(folder, seed=1, cap_val=True).val).values()) == {2}


def test_a_split_of_the_datas_own_reports_no_share(tmp_path):
    root = tmp_path / "split data"
    make_folder(root / "train"), make_folder(root / "val", per_class=3, seed=1)
    splits = discover(root, cap_val=True)
    assert splits.val_fraction is None and len(splits.val) == 9
