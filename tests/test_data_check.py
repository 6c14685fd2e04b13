"""``visiontune data check``: planted duplicates, leaks, corrupt files and relabelled images are found."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
from conftest import CLASSES, make_folder, make_image, make_multilabel, vt_main
from PIL import Image

from visiontune.evaluation.data_check import check_data, dhash, format_check

PLANT_CLASSES = {**CLASSES, "yellow": (220, 210, 30)}


def plant_image(rng: np.random.Generator, colour) -> Image.Image:
    """An unambiguous member of its class: the class colour with mild noise, plus one small patch
    of a random colour (so no two images are near-duplicates of each other)."""
    arr = np.clip(np.array(colour, dtype=np.float64) + rng.normal(0, 12, (40, 40, 3)), 0, 255)
    x0, y0 = rng.integers(0, 30, 2)
    arr[y0:y0 + 10, x0:x0 + 10] = rng.integers(0, 256, 3)
    return Image.fromarray(arr.astype(np.uint8))


def plant_folder(root: Path, train_per_class: int = 16, val_per_class: int = 4, seed: int = 1) -> dict:
    """DATA/{train,val}/<class>/ with N=3 duplicate pairs, M=2 cross-split leaks, K=3 relabelled
    images, 1 near-duplicate and 3 corrupt files; returns what was planted."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for name, colour in PLANT_CLASSES.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                plant_image(rng, colour).save(root / split / name / f"{name}_{i:02d}.png")
    t = root / "train"
    duplicates = []
    for name, i in (("red", 0), ("green", 1), ("yellow", 2)):  # N = 3 pairs within train
        copy = t / name / f"{name}_{i:02d}_copy.png"
        shutil.copyfile(t / name / f"{name}_{i:02d}.png", copy)
        duplicates.append({str(t / name / f"{name}_{i:02d}.png"), str(copy)})
    leaks = []
    for name, i in (("blue", 3), ("green", 4)):  # M = 2 train images also in val
        leak = root / "val" / name / f"leak_{name}_{i:02d}.png"
        shutil.copyfile(t / name / f"{name}_{i:02d}.png", leak)
        leaks.append({str(t / name / f"{name}_{i:02d}.png"), str(leak)})
    relabelled = []
    for k, (true, folder) in enumerate((("red", "blue"), ("green", "yellow"), ("blue", "red"))):  # K = 3
        path = t / folder / f"zz_relabelled_{k}.png"
        plant_image(rng, PLANT_CLASSES[true]).save(path)
        relabelled.append(str(path))
    near_src = t / "blue" / "blue_05.png"
    near = t / "blue" / "blue_05_resized.png"
    Image.open(near_src).resize((36, 36), Image.Resampling.BICUBIC).save(near)
    corrupt = {"zero-size": t / "red" / "empty.png", "truncated": t / "green" / "truncated.png",
               "non-image": t / "blue" / "notes.jpg"}
    corrupt["zero-size"].write_bytes(b"")
    corrupt["truncated"].write_bytes((t / "green" / "green_05.png").read_bytes()[:300])
    corrupt["non-image"].write_text("this is not a picture\n")
    (t / "red" / "README.txt").write_text("ignored: not an image extension\n")
    return {"duplicates": duplicates, "leaks": leaks, "relabelled": relabelled, "near": {str(near_src), str(near)},
            "corrupt": {kind: str(p) for kind, p in corrupt.items()}}


def test_data_check_finds_planted_problems(tmp_path, capsys):
    planted = plant_folder(tmp_path / "planted data")
    code, out, _ = vt_main(capsys, "data", "check", tmp_path / "planted data", "--json", "--strict")
    report = json.loads(out)
    assert code == 1 and not report["ok"]  # unreadable files and leaks are errors under --strict

    found_dups = [{f["path"] for f in g["files"]} for g in report["duplicates"]]
    assert all(pair in found_dups for pair in planted["duplicates"]) and len(found_dups) == 3
    found_leaks = [{f["path"] for f in g["files"]} for g in report["leaks"]]
    assert all(pair in found_leaks for pair in planted["leaks"]) and len(found_leaks) == 2
    kinds = {u["path"]: u["kind"] for u in report["unreadable"]}
    assert kinds == {path: kind for kind, path in planted["corrupt"].items()}
    assert any({p["a"], p["b"]} == planted["near"] for p in report["near_duplicates"])
    assert [Path(p).name for p in report["ignored_files"]] == ["README.txt"]

    k = len(planted["relabelled"])
    top = [issue["path"] for issue in report["label_issues"][:2 * k]]
    recall = sum(p in top for p in planted["relabelled"]) / k
    print(f"label-issue recall in the top {2 * k}: {recall:.2f} "
          f"({report['label_check']['method']}, {len(report['label_issues'])} suggested, "
          f"out-of-fold accuracy {report['label_check']['out_of_fold_accuracy']})")
    assert recall == 1.0
    suggested = {i["path"]: i["suggested"] for i in report["label_issues"]}
    assert suggested[planted["relabelled"][0]] == "red"
    assert "likely label errors" in format_check(report)


def test_data_check_clean_folder_passes_strict(tmp_path, capsys):
    data = make_folder(tmp_path / "clean", per_class=12)
    code, out, _ = vt_main(capsys, "data", "check", data, "--strict", "--no-label-check", "--min-per-class", "10")
    assert code == 0, out
    assert "ok: no errors" in out
    report = check_data(data, label_check=False, min_per_class=20, min_size=64)
    assert report["ok"] and len(report["few_images"]) == 3 and len(report["small_images"]) == 36
    assert report["imbalance"]["ratio"] == 1.0


def test_dhash_is_stable_under_resizing():
    rng = np.random.default_rng(3)
    img = make_image(rng, (200, 40, 40), size=64)
    other = make_image(rng, (200, 40, 40), size=64)
    same = bin(dhash(img) ^ dhash(img.resize((50, 50)))).count("1")
    different = bin(dhash(img) ^ dhash(other)).count("1")
    assert same <= 4 < different


def test_data_check_names_outside_files_and_a_single_class(tmp_path):
    import os

    root = make_folder(tmp_path / "data", per_class=4)
    outside = next(make_folder(tmp_path / "elsewhere", per_class=1, seed=5).rglob("*.png"))
    os.symlink(outside, root / "red" / "linked.png")
    report = check_data(root, label_check=False)
    assert report["outside_root"] == [str(root / "red" / "linked.png")]
    assert any("outside the data folder" in w for w in report["warnings"]) and report["ok"]
    single = check_data(make_folder(tmp_path / "one", per_class=4, classes={"cat": (200, 0, 0)}), label_check=False)
    assert not single["ok"] and any("at least 2" in e for e in single["errors"])


def test_data_check_counts_labels_pairs_and_searches_label_errors(tmp_path, capsys):
    from conftest import vt_main

    data = make_multilabel(tmp_path / "my data", n=30)
    rows = list(csv.reader(open(data)))[1:]
    code, out, _ = vt_main(capsys, "data", "check", str(data), "--json", "--workers", "0")
    report = json.loads(out)
    assert code == 0 and report["task"] == "multi"
    for name in CLASSES:
        assert report["classes"][name]["train"] == sum(name in r[1].split() for r in rows)
    pairs = {tuple(p["labels"]): p["images"] for p in report["cooccurrence"]}
    assert pairs[("blue", "red")] == sum({"blue", "red"} <= set(r[1].split()) for r in rows)
    assert sum(report["labels_per_image"].values()) == 30
    assert report["label_check"]["method"].startswith("cleanlab.multilabel_classification")
    paths = {str(data.parent / r[0]) for r in rows}
    assert all(issue["path"] in paths and set(issue["suggested"]) <= set(CLASSES) for issue in report["label_issues"])


def test_data_check_explains_a_catch_all_class(tmp_path):
    """A class folder named like 'other' is a warning that names both ways to answer "none of these"."""
    data = make_folder(tmp_path / "d", per_class=4)
    shutil.copytree(data / next(iter(CLASSES)), data / "Other")
    warnings = check_data(data, label_check=False)["warnings"]
    (text,) = [w for w in warnings if "catch-all" in w]
    assert "'Other'" in text and "--unknown" in text
    shutil.rmtree(data / "Other")
    assert not any("catch-all" in w for w in check_data(data, label_check=False)["warnings"])
