"""The unknown-score (models/unknown.py, training/unknown.py, evaluation/unknown_metrics.py): its
scores' invariants, the selection over held-out classes, the threshold, untrusted statistics
files, and the same unknown decisions from predict, the Python API, ONNX and both serving APIs."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, make_folder, vt, vt_main
from PIL import Image

import visiontune
from visiontune.core.errors import ArtifactError, DataError
from visiontune.models.card import ModelCard
from visiontune.models.unknown import (
    FEATURE_SCORES,
    FUSED,
    NORMED,
    UNKNOWN_FILE,
    UNKNOWN_SCORES,
    UnknownScore,
    load_score,
    save_score,
)
from visiontune.training.unknown import (
    FUSED_MARGIN,
    NORMED_MARGIN,
    STAGE_MARGIN,
    class_folds,
    fit_score,
    prefer,
    select,
    threshold_at,
)


def clusters(n_per_class: int = 40, classes: int = 5, dim: int = 8, seed: int = 0):
    """Well separated Gaussian classes: (features, logits of a nearest-mean classifier, targets)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 6
    y = torch.arange(classes).repeat_interleave(n_per_class)
    f = centres[y] + torch.randn(len(y), dim, generator=g)
    return f, -torch.cdist(f, centres), y, centres


@pytest.mark.parametrize("kind", ["mahalanobis", "knn", FUSED])
def test_feature_scores_rank_training_like_images_above_strangers(kind):
    f, z, y, centres = clusters()
    score = fit_score(kind, f, y, logits_width=5, reference=clusters(n_per_class=10, seed=2)[0])
    far = centres.mean(0, keepdim=True) + torch.randn(20, 8) * 0.5  # between the classes, near none
    with torch.no_grad():
        inside, outside = score(f, z), score(far, -torch.cdist(far, centres))
    assert inside.shape == (len(f),) and outside.shape == (20,)
    assert inside.min() > outside.max()


def test_the_normed_score_is_mahalanobis_of_the_moved_and_scaled_features():
    """mahalanobis-normed moves the features by their training mean and scales them to unit length,
    then scores them as Mahalanobis does: fitted on those features, it gives the same scores; a
    feature's length from that mean does not change its score; and images in a direction no class
    takes score below every training image."""
    from visiontune.models.unknown import normed

    f, z, y, centres = clusters()
    score = fit_score(NORMED, f, y, logits_width=5)
    origin = f.double().mean(0).float()
    plain = fit_score("mahalanobis", normed(f, origin), y, logits_width=5)
    probe = torch.cat([f, clusters(n_per_class=10, seed=3)[0]])
    with torch.no_grad():
        ours = score(probe, torch.zeros(len(probe), 5))
        assert torch.allclose(ours, plain(normed(probe, origin), torch.zeros(len(probe), 5)), rtol=1e-4, atol=1e-4)
        longer = score(origin + 3.0 * (probe - origin), torch.zeros(len(probe), 5))
        assert torch.allclose(longer, ours, rtol=1e-4, atol=1e-4)
        # a direction from the mean that no class takes: orthogonal to every class mean's
        basis = torch.linalg.svd((centres - origin).double(), full_matrices=True).Vh[-1].float()
        strangers = origin + basis * torch.linspace(2.0, 20.0, 8)[:, None]
        assert score(strangers, torch.zeros(8, 5)).max() < score(f, z).min()


def test_the_fused_score_is_its_parts_standardised_on_the_reference():
    """mahalanobis+knn is the sum of the two scores fitted on the same images, each standardised by
    its mean and spread on the reference (known images not fitted on), so both weigh alike there."""
    f, z, y, _ = clusters()
    reference = clusters(n_per_class=10, seed=2)[0]
    both = fit_score(FUSED, f, y, logits_width=5, reference=reference)
    maha, knn = (fit_score(kind, f, y, logits_width=5) for kind in ("mahalanobis", "knn"))
    with torch.no_grad():
        parts = [part(reference, z[:len(reference)]).double() for part in (maha, knn)]
        expected = sum((p - p.mean()) / p.std() for p in parts)
        fused = both(reference, z[:len(reference)]).double()
    assert torch.allclose(fused, expected, atol=1e-4)
    assert abs(float(fused.mean())) < 1e-4 and float(fused.std()) > 1.0  # each part: mean 0, spread 1 there
    with pytest.raises(DataError, match="val split"):
        fit_score(FUSED, f, y, logits_width=5)  # nothing to standardise on


def test_a_part_that_barely_varies_on_known_images_is_divided_by_the_least_spread():
    """Near-duplicates of training images give kNN similarities a spread of ~1e-5: the part is divided
    by min_spread of its mean instead, so float32 rounding cannot decide (and the file still loads)."""
    from visiontune.models.unknown import min_spread

    f, z, y, _ = clusters()
    both = fit_score(FUSED, f, y, logits_width=5, reference=f[:10] + 1e-7)  # training images again: kNN ~1
    assert float(both.scale[3]) == pytest.approx(min_spread(float(both.scale[2])))
    assert float(both.scale[1]) > min_spread(float(both.scale[0]))  # the Mahalanobis part varies


def test_the_selections_sum_is_the_fused_score_standardised_on_the_folds_known_images(monkeypatch):
    """In a fold the sum's row is the AUROC of fit_score(FUSED) fitted on the kept classes and
    standardised on the kept classes' val images only (never the held-out ones)."""
    import visiontune.training.unknown as unknown

    monkeypatch.setattr(unknown, "class_folds", lambda n, seed=0: [[1, 4]])
    f, z, y, _ = clusters(classes=6)
    vf, vz, vy, _ = clusters(n_per_class=15, classes=6, seed=1)
    row = next(r for r in select((f, z, y), (vf, vz, vy), 1.0) if r["score"] == FUSED)
    kept = torch.isin(y, torch.tensor([0, 2, 3, 5]))
    known = torch.isin(vy, torch.tensor([0, 2, 3, 5]))
    remap = torch.tensor([0, -1, 1, 2, -1, 3])
    score = fit_score(FUSED, f[kept], remap[y[kept]], 4, reference=vf[known])
    with torch.no_grad():
        s = score(vf, vz).numpy()
    assert row["auroc"] == pytest.approx(unknown.auroc(s[known.numpy()], s[~known.numpy()]), abs=1e-4)


def test_logit_scores_follow_their_definitions():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.4, 0.3]])
    features = torch.zeros(2, 4)
    ml = UnknownScore("max_logit", 3, 4)(features, logits)
    energy = UnknownScore("energy", 3, 4)(features, logits)
    msp = UnknownScore("msp", 3, 4, temperature=2.0)(features, logits)
    assert torch.equal(ml, torch.tensor([2.0, 0.5]))
    assert torch.allclose(energy, torch.logsumexp(logits, -1))
    assert torch.allclose(msp, torch.softmax(logits / 2.0, -1).max(-1).values)


def test_threshold_accepts_the_stated_share_and_sits_on_no_image():
    known = np.random.default_rng(0).normal(size=200)
    for tpr in (0.5, 0.9, 0.95, 0.99):
        t = threshold_at(known, tpr)
        assert (known >= t).mean() == pytest.approx(np.ceil(tpr * 200) / 200)
        assert not np.any(known == t)
    assert (np.ones(5) >= threshold_at(np.ones(5), 0.95)).all()  # all equal: all accepted


def test_selection_holds_classes_out_and_ranks_every_candidate():
    assert class_folds(2) == [[0], [1]]
    folds = class_folds(6)
    assert len(folds) == 5 and all(len(h) == 2 and len(set(h)) == 2 for h in folds)
    f, z, y, _ = clusters(classes=6)
    val = clusters(n_per_class=15, classes=6, seed=1)
    table = select((f, z, y), val[:1] + val[1:2] + val[2:3], temperature=1.0)
    assert {row["score"] for row in table} == set(UNKNOWN_SCORES.names())
    # best first, then the tie-breaks, which move one row first within their margins
    assert table == prefer(sorted(table, key=lambda row: -row["auroc"]))
    assert table[0]["auroc"] >= max(row["auroc"] for row in table) - (2 * STAGE_MARGIN + FUSED_MARGIN + NORMED_MARGIN)
    assert all(0.0 <= row["auroc"] <= 1.0 and row["folds"] == 5 for row in table)


def test_the_selection_measures_the_feature_scores_on_each_source():
    """Features of a second layer add a row per feature score; the logit scores are measured once."""
    f, z, y, _ = clusters(classes=6)
    val = clusters(n_per_class=15, classes=6, seed=1)
    wide = {None: f, "blocks.6": torch.cat([f, f.flip(1)], 1)}
    table = select((wide, z, y), ({None: val[0], "blocks.6": torch.cat([val[0], val[0].flip(1)], 1)},) + val[1:3],
                   temperature=1.0)
    assert sorted((row["score"], row["layer"] or "") for row in table) == sorted(
        [(k, "") for k in UNKNOWN_SCORES.names()] + [(k, "blocks.6") for k in FEATURE_SCORES])


def test_the_last_stage_is_preferred_only_within_the_margin():
    """The same feature score on the last stage goes first when the classifier's input leads it by
    at most STAGE_MARGIN; a larger lead, or a logit score in front, keeps the order."""
    from visiontune.training.unknown import STAGE_MARGIN, prefer_stage

    def rows(first_kind, lead):
        return [{"score": first_kind, "layer": None, "auroc": 0.95},
                {"score": "mahalanobis", "layer": None, "auroc": 0.95 - 1e-4},
                {"score": "mahalanobis", "layer": "blocks.6", "auroc": 0.95 - lead}]

    assert prefer_stage(rows("mahalanobis", STAGE_MARGIN / 2)[::2])[0]["layer"] == "blocks.6"
    assert prefer_stage(rows("mahalanobis", STAGE_MARGIN * 2)[::2])[0]["layer"] is None
    assert prefer_stage(rows("energy", 0.0))[0]["score"] == "energy"
    table = rows("mahalanobis", 0.0)[::2]
    assert sorted(map(str, prefer_stage(table))) == sorted(map(str, table))  # reordered, nothing lost


def test_the_sum_of_the_feature_scores_is_preferred_only_within_the_margin():
    """mahalanobis+knn on the leading feature score's source goes first when that score leads it by at
    most FUSED_MARGIN; a larger lead, the sum on another source, or a logit score in front keep the order."""
    from visiontune.training.unknown import FUSED_MARGIN, prefer_fused

    def rows(first_kind, lead, layer="blocks.6"):
        return [{"score": first_kind, "layer": "blocks.6", "auroc": 0.99},
                {"score": FUSED, "layer": layer, "auroc": 0.99 - lead},
                {"score": "knn", "layer": "blocks.6", "auroc": 0.9}]

    assert prefer_fused(rows("mahalanobis", FUSED_MARGIN / 2))[0]["score"] == FUSED
    assert prefer_fused(rows("knn", FUSED_MARGIN / 2)[:2])[0]["score"] == FUSED
    assert prefer_fused(rows("mahalanobis", FUSED_MARGIN * 2))[0]["score"] == "mahalanobis"
    assert prefer_fused(rows("mahalanobis", 0.0, layer=None))[0]["score"] == "mahalanobis"
    assert prefer_fused(rows("energy", 0.0))[0]["score"] == "energy"
    assert prefer_fused(rows(NORMED, FUSED_MARGIN / 2))[0]["score"] == NORMED  # not one of the sum's parts
    table = rows("mahalanobis", 0.0)
    assert sorted(map(str, prefer_fused(table))) == sorted(map(str, table))  # reordered, nothing lost


def test_the_normed_score_is_preferred_only_within_its_margin():
    """mahalanobis-normed on the leading feature score's source goes first when that score leads it by
    at most NORMED_MARGIN; a larger lead, the normed score on another source, or a logit score in
    front keep the order (prefer's last tie-break); split 2's estimate of bench/openset.py ends on it."""

    def rows(first_kind, lead, layer="blocks.6"):
        return [{"score": first_kind, "layer": "blocks.6", "auroc": 0.99},
                {"score": NORMED, "layer": layer, "auroc": 0.99 - lead},
                {"score": "knn", "layer": "blocks.6", "auroc": 0.9}]

    assert prefer(rows(FUSED, NORMED_MARGIN / 2))[0]["score"] == NORMED
    assert prefer(rows("mahalanobis", NORMED_MARGIN / 2))[0]["score"] == NORMED
    assert prefer(rows(FUSED, NORMED_MARGIN * 1.5))[0]["score"] == FUSED
    assert prefer(rows(FUSED, 0.0, layer=None))[0]["score"] == FUSED
    assert prefer(rows("energy", 0.0))[0]["score"] == "energy"
    table = rows(FUSED, 0.0)
    assert sorted(map(str, prefer(table))) == sorted(map(str, table))  # reordered, nothing lost
    # the selection's order on one of bench/openset.py's splits (split 2's estimate)
    split2 = [{"score": FUSED, "layer": "blocks.6", "auroc": 0.955}, {"score": "mahalanobis", "layer": None,
              "auroc": 0.942}, {"score": NORMED, "layer": "blocks.6", "auroc": 0.908}]
    assert (prefer(split2)[0]["score"], prefer(split2)[0]["layer"]) == (NORMED, "blocks.6")
    # on the classifier's input the estimate decides: the margin's evidence is the last stage's
    on_input = [{"score": "knn", "layer": None, "auroc": 0.970}, {"score": FUSED, "layer": None, "auroc": 0.965},
                {"score": FUSED, "layer": "blocks.6", "auroc": 0.950}, {"score": NORMED, "layer": "blocks.6",
                "auroc": 0.945}, {"score": NORMED, "layer": None, "auroc": 0.930}]
    assert (prefer(on_input)[0]["score"], prefer(on_input)[0]["layer"]) == (FUSED, None)


def test_the_tie_breaks_end_on_the_last_stage():
    """The sum on the classifier's input moved first by prefer_fused gives way to the sum on the last
    stage within STAGE_MARGIN (prefer runs prefer_stage again)."""
    from visiontune.training.unknown import prefer

    rows = [{"score": "knn", "layer": None, "auroc": 0.970}, {"score": FUSED, "layer": None, "auroc": 0.965},
            {"score": FUSED, "layer": "blocks.6", "auroc": 0.962}, {"score": "knn", "layer": "blocks.6", "auroc": 0.95}]
    assert (prefer(rows)[0]["score"], prefer(rows)[0]["layer"]) == (FUSED, "blocks.6")
    assert sorted(map(str, prefer(rows))) == sorted(map(str, rows))


def test_a_two_class_selection_measures_the_feature_scores():
    """Holding one of two classes out leaves one: no head to refit, so only the feature scores are
    measured (the logit scores of one class say nothing)."""
    f, z, y, _ = clusters(classes=2)
    val = clusters(n_per_class=15, classes=2, seed=1)
    table = select((f, z, y), val[:3], temperature=1.0)
    assert {row["score"] for row in table} == set(FEATURE_SCORES)
    assert all(row["folds"] == 2 for row in table)


def test_a_graph_whose_outputs_and_metadata_disagree_is_refused(trained_run, tmp_path):
    """An exported graph is untrusted: an unknown_score output without its threshold in the
    metadata (or the reverse) is refused with the remedy, not silently half-used."""
    import onnx

    from visiontune.core.errors import ExportError
    from visiontune.export.exporter import export_model

    path = Path(export_model(trained_run[0].run_dir, "onnx", dynamic_batch=True,
                             out=tmp_path / "g" / "model.onnx")["file"])
    (path.parent / "model.json").unlink()  # the graph's own metadata decides
    graph = onnx.load(str(path))
    kept = [p for p in graph.metadata_props if p.key != "unknown"]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    onnx.save(graph, str(path))
    with pytest.raises(ExportError, match="no threshold in its metadata"):
        visiontune.load(path)


def test_statistics_files_are_checked_before_use(tmp_path):
    f, z, y, _ = clusters()
    score = fit_score("mahalanobis", f, y, logits_width=5)
    save_score(tmp_path, score)
    section = {"score": "mahalanobis", "threshold": -3.0, "tpr": 0.95}
    loaded = load_score(tmp_path, section, 5, 8)
    assert torch.allclose(loaded(f, z), score(f, z))
    with pytest.raises(ArtifactError, match="do not belong together"):
        load_score(tmp_path, section, 5, 9)  # another classifier's width
    with pytest.raises(ArtifactError, match="do not belong together"):
        load_score(tmp_path, {**section, "score": "knn"}, 5, 8)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / UNKNOWN_FILE).symlink_to(tmp_path / UNKNOWN_FILE)
    with pytest.raises(ArtifactError, match="is a link"):
        load_score(tmp_path / "other", section, 5, 8)  # a link is never read
    with pytest.raises(ArtifactError, match="missing"):
        load_score(tmp_path / "nothing", section, 5, 8)
    save_score(tmp_path, fit_score("mahalanobis", f, torch.arange(len(f)) % 5, logits_width=5))
    with pytest.raises(ArtifactError, match="do not belong together"):
        load_score(tmp_path, section, 3, 8)  # 5 class means for a 3-class model
    save_score(tmp_path, fit_score("knn", f * float("nan"), None, 5))
    with pytest.raises(ArtifactError, match="non-finite"):
        load_score(tmp_path, {**section, "score": "knn"}, 5, 8)
    both = fit_score(FUSED, f, y, logits_width=5, reference=f[::3])
    save_score(tmp_path, both)
    loaded = load_score(tmp_path, {**section, "score": FUSED}, 5, 8)
    assert torch.allclose(loaded(f, z), both(f, z))
    with pytest.raises(ArtifactError, match="do not belong together"):
        load_score(tmp_path, section, 5, 8)  # the sum's file read as Mahalanobis alone
    normed_score = fit_score(NORMED, f, y, logits_width=5)
    save_score(tmp_path, normed_score)
    loaded = load_score(tmp_path, {**section, "score": NORMED}, 5, 8)
    assert torch.allclose(loaded(f, z), normed_score(f, z)) and torch.equal(loaded.origin, normed_score.origin)
    with pytest.raises(ArtifactError, match="do not belong together"):
        load_score(tmp_path, section, 5, 8)  # the normed score's file read as plain Mahalanobis
    for bad_origin, message in ((torch.zeros(9), "do not belong together"), (torch.full((8,), float("nan")),
                                                                            "non-finite")):
        broken = fit_score(NORMED, f, y, logits_width=5)
        broken._buffers["origin"] = bad_origin
        save_score(tmp_path, broken)
        with pytest.raises(ArtifactError, match=message):
            load_score(tmp_path, {**section, "score": NORMED}, 5, 8)
    with pytest.raises(DataError, match="needs class targets"):
        fit_score(NORMED, f, None, logits_width=5)  # one Gaussian: nothing left to measure once scaled
    save_score(tmp_path, both)
    for bad in (-1.0, 1e-9):  # a negative spread flips the part's sign; a tiny one scales rounding into the decision
        both.scale[3] = bad
        save_score(tmp_path, both)
        with pytest.raises(ArtifactError, match="spread under the least"):
            load_score(tmp_path, {**section, "score": FUSED}, 5, 8)


@pytest.mark.parametrize("section, message", [
    ({"score": "magic", "threshold": 0.0, "tpr": 0.95}, "unknown.score"),
    ({"score": "knn", "threshold": "high", "tpr": 0.95}, "unknown.threshold"),
    ({"score": "knn", "threshold": 0.1, "tpr": 1.5}, "unknown.tpr"),
    ([1, 2], "unknown must be a JSON object"),
    ({"score": "knn", "layer": "../model", "threshold": 0.1, "tpr": 0.95}, "unknown.layer"),
    ({"score": "knn", "layer": 6, "threshold": 0.1, "tpr": 0.95}, "unknown.layer"),
])
def test_card_refuses_a_bad_unknown_section(section, message):
    card = {"format": "visiontune-model", "class_names": ["a", "b"], "unknown": section,
            "architecture": {"source": "timm", "name": "resnet18", "num_classes": 2, "classifier": "fc"},
            "preprocessing": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}}
    with pytest.raises(ArtifactError, match=message):
        ModelCard.from_dict(card)


def strangers(folder, n: int = 6):
    """Images of no class of the test data (which is plain colours): noise and stripes."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 255, (40, 40, 3)).astype(np.uint8) if i % 2 else np.tile(
            (np.arange(40) % 8 < 4)[:, None, None] * np.array([255, 255, 0], np.uint8), (1, 40, 1))
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"odd {i}.png")
    return folder


def test_training_fits_a_score_and_every_surface_decides_alike(trained_run, tmp_path):
    """The acceptance test: predict (CLI CSV), the Python API, the ONNX graph, /v1/predict and the
    Open Inference Protocol give each image the same unknown decision."""
    httpx = pytest.importorskip("httpx")
    from test_serve import running_server

    from visiontune.export.exporter import export_model

    run, data = trained_run
    card = json.loads((run.model_dir / "model.json").read_text())
    section = card["unknown"]
    assert section["score"] in UNKNOWN_SCORES.names() and 0.5 <= section["val_accepted"] <= 1.0
    assert (run.model_dir / UNKNOWN_FILE).is_file()
    odd = sorted(str(p) for p in strangers(tmp_path / "odd").iterdir())
    files = sorted(str(p) for p in data.rglob("*.png"))[::3] + odd
    api = visiontune.load(run.run_dir, precision="32").predict(files, top_k=1)
    threshold = section["threshold"]
    clear = [abs(r["unknown_score"] - threshold) > 1e-3 * max(1.0, abs(threshold)) for r in api]
    decisions = [r["unknown"] for r in api]
    assert all((r["label"] == "unknown") == r["unknown"] for r in api)
    assert all(r["unknown"] == (r["unknown_score"] < threshold) for r in api)
    known_rows, odd_rows = api[:-len(odd)], api[-len(odd):]
    assert sum(r["unknown"] for r in odd_rows) >= 1  # noise and stripes are like no training image
    assert sum(not r["unknown"] for r in known_rows) >= len(known_rows) / 2  # training images mostly accepted

    exported = export_model(run.run_dir, "onnx", dynamic_batch=True, out=tmp_path / "onnx" / "model.onnx")
    assert exported["passed"] and exported["unknown_agreement"] >= 0.995  # the export's own parity check
    onnx = visiontune.load(exported["file"]).predict(files, top_k=1)
    assert [r["unknown"] for r, c in zip(onnx, clear) if c] == [d for d, c in zip(decisions, clear) if c]
    assert np.allclose([r["unknown_score"] for r in onnx], [r["unknown_score"] for r in api], rtol=1e-3, atol=1e-3)

    proc = vt("predict", run.run_dir, *files, "--top-k", "1", "--precision", "32")
    header, *rows = [line.split(",") for line in proc.stdout.strip().splitlines()]
    column = header.index("unknown")
    assert header[column + 1] == "unknown_score"
    assert [r[column] == "true" for r, c in zip(rows, clear) if c] == [d for d, c in zip(decisions, clear) if c]

    clf = visiontune.load(run.run_dir, precision="32")
    with running_server(clf) as url:
        sent = [("files", (f"{i}.png", open(f, "rb").read())) for i, f in enumerate(files)]
        v1 = httpx.post(f"{url}/v1/predict?top_k=1", files=sent, timeout=60).json()["predictions"]
        assert [r["unknown"] for r, c in zip(v1, clear) if c] == [d for d, c in zip(decisions, clear) if c]
        blobs = [open(f, "rb").read() for f in files]
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(blobs)],
                            "data": [__import__("base64").b64encode(b).decode() for b in blobs],
                            "parameters": {"content_type": "base64"}}]}
        v2 = httpx.post(f"{url}/v2/models/visiontune/infer", json=body, timeout=60)
        assert v2.status_code == 200, v2.text
        out = {o["name"]: o["data"] for o in v2.json()["outputs"]}
        assert np.allclose(out["unknown_score"], [r["unknown_score"] for r in api], rtol=1e-3, atol=1e-3)
        assert [lab == "unknown" for lab, c in zip(out["labels"], clear) if c] == [
            d for d, c in zip(decisions, clear) if c]
        meta = httpx.get(f"{url}/v2/models/visiontune", timeout=10).json()
        assert "unknown_score" in [o["name"] for o in meta["outputs"]]


@pytest.mark.parametrize("kind", [FUSED, NORMED])
def test_a_score_of_the_last_stage_decides_alike_everywhere(trained_run, tmp_path, kind):
    """A score fitted on the pooled output of the network's last feature stage (the card's
    ``layer``; the sum of Mahalanobis and kNN, the widest graph, and Mahalanobis on moved and scaled
    features, the one graph that normalises): the card names it, the Python API
    and the ONNX, OpenVINO and TorchScript exports give the same scores (and the graphs the same
    decisions), and the score is the one its statistics give on that layer's features."""
    from visiontune.data.image import load_image
    from visiontune.data.scan import read_split_csv
    from visiontune.export.exporter import export_model
    from visiontune.export.torchscript_export import load_torchscript
    from visiontune.models.unknown import feature_layer, tapped_forward
    from visiontune.training.unknown import fit_unknown, store_unknown

    run, data = trained_run
    copy = tmp_path / "run with layer"
    shutil.copytree(run.run_dir, copy)
    clf = visiontune.load(copy, precision="32")
    layer = feature_layer(clf.model, clf.card.architecture.classifier, clf.preprocessing.input_size)
    assert layer == "blocks.6"  # EfficientNet-Lite0's last block, before the 1x1 head convolution
    names = clf.class_names
    fitted = fit_unknown(clf, read_split_csv(copy / "splits" / "train.csv", names),
                         read_split_csv(copy / "splits" / "val.csv", names), kind=kind, layer=layer)
    assert fitted.score.layer == layer and fitted.section["layer"] == layer
    assert fitted.section["selection"]["method"] == f"none (asked for {kind}@{layer})"
    store_unknown(copy / "model", fitted)
    assert json.loads((copy / "model" / "model.json").read_text())["unknown"]["layer"] == layer

    odd = sorted(str(p) for p in strangers(tmp_path / "odd").iterdir())
    files = sorted(str(p) for p in data.rglob("*.png"))[::3] + odd
    loaded = visiontune.load(copy, precision="32")
    assert loaded.runner.model.score.layer == layer
    api = loaded.predict(files, top_k=1)
    feats, _, ok = loaded.taps_of(files, (layer,), batch_size=4)
    with torch.no_grad():
        direct = fitted.score(feats[layer], torch.zeros(len(files), len(names))).numpy()
    assert ok.all() and np.allclose(direct, [r["unknown_score"] for r in api], rtol=1e-4, atol=1e-4)
    assert all(r["unknown"] == (r["unknown_score"] < fitted.section["threshold"]) for r in api)

    exported = export_model(copy, "onnx", dynamic_batch=True, out=tmp_path / "onnx" / "model.onnx")
    assert exported["passed"] and exported["unknown_agreement"] >= 0.995
    onnx = visiontune.load(exported["file"]).predict(files, top_k=1)
    assert np.allclose([r["unknown_score"] for r in onnx], [r["unknown_score"] for r in api], rtol=1e-3, atol=1e-3)
    clear = [abs(r["unknown_score"] - fitted.section["threshold"]) > 1e-3 * max(1.0, abs(fitted.section["threshold"]))
             for r in api]
    assert [r["unknown"] for r, c in zip(onnx, clear) if c] == [r["unknown"] for r, c in zip(api, clear) if c]
    graph_card = visiontune.load(exported["file"]).card.unknown
    assert graph_card["layer"] == layer  # the graph's own metadata names the source too
    scores = [r["unknown_score"] for r in api]
    if importlib.util.find_spec("openvino"):  # the test extra installs it
        ov = export_model(copy, "openvino", dynamic_batch=True, out=tmp_path / "ov" / "model.xml")
        assert ov["passed"] and ov["unknown_agreement"] >= 0.995
        rows = visiontune.load(ov["file"]).predict(files, top_k=1)
        assert np.allclose([r["unknown_score"] for r in rows], scores, rtol=1e-3, atol=1e-3)
        assert [r["unknown"] for r, c in zip(rows, clear) if c] == [r["unknown"] for r, c in zip(api, clear) if c]
    script = export_model(copy, "torchscript", out=tmp_path / "ts" / "model.pt")
    assert script["passed"]
    module, _ = load_torchscript(script["file"])
    with torch.no_grad():  # its third output is the score, of the same views the Python API averages
        traced = module(torch.stack([loaded.transform(load_image(f)) for f in files]))[2]
    assert np.allclose(traced.numpy(), scores, rtol=1e-3, atol=1e-3)
    with torch.no_grad():  # the hook reads the same rows tapped_forward does
        x = torch.zeros(2, *loaded.preprocessing.input_size)
        (f,), _ = tapped_forward(loaded.model, clf.card.architecture.classifier, x, False, (layer,))
    assert f.shape == (2, fitted.score.means.shape[1])


class _Net(torch.nn.Module):
    """A tiny network for the layer checks: ``act`` runs twice per pass, ``stage`` gives NHWC."""

    def __init__(self, channels_last: bool = False):
        super().__init__()
        self.conv, self.act, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Linear(8, 2)
        self.stage = torch.nn.Identity()
        self.channels_last = channels_last
        self.feature_info = [{"module": "stage", "num_chs": 8}]

    def forward(self, x):
        x = self.act(self.act(self.conv(x)))
        x = self.stage(x.permute(0, 2, 3, 1) if self.channels_last else x)
        return self.fc(x.mean(dim=(1, 2)) if self.channels_last else x.mean(dim=(2, 3)))


def test_layer_checks_refuse_what_a_score_cannot_read(tmp_path):
    """A name that is no registered module, a module run twice per pass, statistics written for
    another source: each a clear ArtifactError. A channels-last stage is not offered as a source."""
    from visiontune.models.unknown import feature_layer, layer_width

    net = _Net()
    assert layer_width(net, "stage", (3, 6, 6)) == 8 and feature_layer(net, "fc", (3, 6, 6)) == "stage"
    assert feature_layer(_Net(channels_last=True), "fc", (3, 6, 6)) is None  # its pooled rows would be 6 wide
    with pytest.raises(ArtifactError, match="once per pass"):
        layer_width(net, "act", (3, 6, 6))
    for name in ("nothing", "channels_last", "fc.weight"):
        with pytest.raises(ArtifactError, match="does not have"):
            layer_width(net, name, (3, 6, 6))
    f, z, y, _ = clusters()
    save_score(tmp_path, fit_score("mahalanobis", f, y, logits_width=5, layer="stage"))
    section = {"score": "mahalanobis", "threshold": -3.0, "tpr": 0.95}
    with pytest.raises(ArtifactError, match="do not belong together"):
        load_score(tmp_path, section, 5, 8)  # the file is for "stage", the card reads the classifier's input
    assert load_score(tmp_path, {**section, "layer": "stage"}, 5, 8).layer == "stage"


def test_a_card_naming_a_layer_the_network_lacks_is_refused(trained_run, tmp_path, capsys):
    copy = tmp_path / "model"
    shutil.copytree(trained_run[0].model_dir, copy)
    card = json.loads((copy / "model.json").read_text())
    card["unknown"]["layer"] = "blocks.99"
    (copy / "model.json").write_text(json.dumps(card))
    code, _, err = vt_main(capsys, "predict", copy, next(trained_run[1].rglob("*.png")))
    assert code != 0 and "does not have" in err and "Traceback" not in err


def test_evaluate_measures_the_score_on_unknown_images(trained_run, tmp_path, capsys):
    run, data = trained_run
    odd = strangers(tmp_path / "odd images")
    code, out, err = vt_main(capsys, "evaluate", run.run_dir, data, "--unknown", odd, "--no-save", "--json")
    assert code == 0, err
    u = json.loads(out)["unknown"]
    assert 0.0 <= u["auroc"] <= 1.0 and 0.0 <= u["fpr_at_95_tpr"] <= 1.0
    assert u["num_unknown"] == 6 and u["num_known"] == 30
    curve = u["accuracy_coverage"]
    assert [row["coverage"] for row in curve] == sorted(row["coverage"] for row in curve)
    code, out, _ = vt_main(capsys, "evaluate", run.run_dir, data, "--unknown", odd, "--no-save")
    assert "AUROC" in out and "FPR at 95% TPR" in out
    code, _, err = vt_main(capsys, "evaluate", run.run_dir, data, "--unknown", tmp_path / "nothing here", "--no-save")
    assert code != 0 and "no images found" in err


def test_without_a_score_nothing_changes(tmp_path, trained_run, capsys):
    """--no-unknown trains no score; --unknown on such a model names the remedy; a model folder
    whose score file is gone names the remedy too."""
    data = make_folder(tmp_path / "d", per_class=6)
    run = visiontune.train(data, epochs=1, run_dir=str(tmp_path / "run"), unknown=False, img_size=32, batch_size=4,
                           workers=0, report=False, progress=False, time="none")
    assert "unknown" not in json.loads((run.model_dir / "model.json").read_text())
    assert "unknown" not in visiontune.load(run.run_dir).predict([next(data.rglob("*.png"))])[0]
    code, _, err = vt_main(capsys, "evaluate", run.run_dir, data, "--unknown", data, "--no-save")
    assert code != 0 and "--no-unknown" in err
    copy = tmp_path / "copy"
    shutil.copytree(trained_run[0].model_dir, copy)
    (copy / UNKNOWN_FILE).unlink()
    code, _, err = vt_main(capsys, "predict", copy, next(data.rglob("*.png")))
    assert code != 0 and "copy the whole model folder" in err


def test_a_multi_label_model_rejects_to_no_labels(ml_run, ml_data, tmp_path):
    section = json.loads((ml_run.model_dir / "model.json").read_text())["unknown"]
    assert section["score"] == "knn" and section["selection"]["candidates"] == []
    clf = visiontune.load(ml_run.run_dir)
    rows = clf.predict(sorted(str(p) for p in strangers(tmp_path / "odd").iterdir()), top_k=1)
    for row in rows:
        assert row["unknown"] == (row["unknown_score"] < section["threshold"])
        assert not row["unknown"] or row["labels"] == []


def test_the_threshold_moves_to_another_share_of_known_images(trained_run, tmp_path, capsys):
    """--threshold-tpr reads the val scores' stored percentiles: a lower share accepts fewer images;
    the share it was set at gives the stored threshold; a model without a score refuses it."""
    from visiontune.models.unknown import threshold_for

    run, data = trained_run
    section = json.loads((run.model_dir / "model.json").read_text())["unknown"]
    assert len(section["val_quantiles"]) == 101
    assert threshold_for(section, section["tpr"]) == section["threshold"]
    assert threshold_for(section, 0.5) >= threshold_for(section, 0.9) >= threshold_for(section, 1.0)
    files = sorted(str(p) for p in data.rglob("*.png"))
    clf = visiontune.load(run.run_dir, precision="32")
    clf.move_unknown_threshold(0.5)
    assert clf.unknown_threshold == pytest.approx(threshold_for(section, 0.5))
    strict = sum(r["unknown"] for r in clf.predict(files, top_k=1))
    code, out, err = vt_main(capsys, "predict", run.run_dir, *files, "--threshold-tpr", "0.5", "--precision", "32")
    assert code == 0, err
    header, *rows = [line.split(",") for line in out.strip().splitlines()]
    assert sum(r[header.index("unknown")] == "true" for r in rows) == strict
    assert strict >= sum(r["unknown"] for r in visiontune.load(run.run_dir, precision="32").predict(files, top_k=1))
    code, _, err = vt_main(capsys, "predict", run.run_dir, *files, "--threshold-tpr", "1.5")
    assert code != 0 and "--threshold-tpr" in err


def test_report_shows_the_unknown_images_it_would_accept(trained_run, tmp_path, capsys):
    """report --unknown DIR: the score's measures and its two galleries, in the self-contained page."""
    run, _ = trained_run
    copy = tmp_path / "run copy"
    shutil.copytree(run.run_dir, copy)  # the session's run stays as it is
    code, out, err = vt_main(capsys, "report", copy, "--unknown", strangers(tmp_path / "odd"), "--no-gradcam")
    assert code == 0, err
    page = (copy / "report.html").read_text()
    section = page[page.index('<section id="unknown">'):]
    section = section[:section.index("</section>")]
    assert "AUROC" in section and "Unknown images most like the training images" in section
    assert section.count("<figure") >= 6  # the 6 unknown images, and the least typical known ones


def test_the_score_runs_in_float32_under_bf16_autocast():
    """A bf16 network's features feed a float32 score: the distances keep their digits."""
    from visiontune.models.unknown import ScoredModel

    f, z, y, _ = clusters()
    score = fit_score("mahalanobis", f, y, logits_width=5)
    net = torch.nn.Sequential(torch.nn.Identity())
    net.add_module("head", torch.nn.Linear(8, 5))
    scored = ScoredModel(net, "head", score).eval()
    with torch.no_grad():
        reference = scored(f)[:, -1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = scored(f)[:, -1]
    assert low.dtype == torch.float32
    assert torch.allclose(low, reference, rtol=1e-5, atol=1e-5)


def test_the_finish_reads_the_val_images_once_for_metrics_views_and_score(tmp_path, monkeypatch):
    """--tta auto's measurement and the unknown-score's fit share the finish's one pass over the val
    split (both views, kept apart): no other pass reads a val image, and the score fitted from that
    pass is the one a fit that reads the images again gets."""
    from visiontune.data.scan import read_split_csv
    from visiontune.inference.classifier import Classifier
    from visiontune.training.unknown import fit_unknown

    data = make_folder(tmp_path / "data", per_class=10)
    reads = []
    view_taps = Classifier.view_taps

    def recording(self, inputs, layers, tta, *args, **kwargs):
        reads.append((set(map(str, inputs)), tta))
        return view_taps(self, inputs, layers, tta, *args, **kwargs)

    monkeypatch.setattr(Classifier, "view_taps", recording)
    run = visiontune.train(data, epochs=2, tta="auto", run_dir=str(tmp_path / "run"), **FAST)
    monkeypatch.undo()
    card = json.loads((run.model_dir / "model.json").read_text())
    names = card["class_names"]
    train = read_split_csv(run.run_dir / "splits" / "train.csv", names)
    val = read_split_csv(run.run_dir / "splits" / "val.csv", names)
    val_paths = {str(p) for p, _ in val}
    readers = [tta for inputs, tta in reads if inputs & val_paths]
    assert readers == ["flip-zoom"], reads  # one pass, with the second view --tta auto measures
    assert "tta_choice" in card["training"]

    again = fit_unknown(Classifier.load(run.run_dir), train, val, card["unknown"]["tpr"], 16, 0)
    assert (again.section["score"], again.section.get("layer")) == (card["unknown"]["score"],
                                                                   card["unknown"].get("layer"))
    assert again.section["threshold"] == pytest.approx(card["unknown"]["threshold"], rel=1e-4, abs=1e-4)
    assert again.section["val_accepted"] == card["unknown"]["val_accepted"]


def test_a_val_split_over_the_fits_share_is_read_again_for_its_share_only(tmp_path, monkeypatch):
    """Where the val split is larger than the images the fit uses (MAX_VAL_IMAGES, made 4 here), the
    finish's pass keeps no features of it, and the fit reads its own share of it."""
    from visiontune.inference.classifier import Classifier
    from visiontune.pipeline import train as pipeline_train
    from visiontune.training import unknown as unknown_fit

    monkeypatch.setattr(pipeline_train, "MAX_VAL_IMAGES", 4)
    monkeypatch.setattr(unknown_fit, "MAX_VAL_IMAGES", 4)
    data = make_folder(tmp_path / "data", per_class=10)
    reads = []
    view_taps = Classifier.view_taps

    def recording(self, inputs, layers, tta, *args, **kwargs):
        reads.append((len(inputs), tuple(layers)))
        return view_taps(self, inputs, layers, tta, *args, **kwargs)

    monkeypatch.setattr(Classifier, "view_taps", recording)
    run = visiontune.train(data, epochs=1, tta="none", run_dir=str(tmp_path / "run"), **FAST)
    n_val = len((run.run_dir / "splits" / "val.csv").read_text().strip().splitlines()) - 1
    card = json.loads((run.model_dir / "model.json").read_text())
    assert n_val > 4 and (n_val, ()) in reads  # the finish's pass over the whole split keeps no features
    assert any(n == 4 and layers for n, layers in reads)  # the fit's share, read with its features
    assert card["unknown"]["score"] and 0.5 <= card["unknown"]["val_accepted"] <= 1.0
