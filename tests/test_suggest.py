"""``visiontune suggest``: the ranking methods' invariants, the tasks' uncertainty, and the command
end to end (CSV, HTML, the run's own images left out, bad input refused with nothing written)."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import CLASS_NAMES, make_folder, vt_main, write_corrupt_files

import visiontune
from visiontune.core.errors import ConfigError
from visiontune.pipeline.suggest import CSV_COLUMNS, SUGGEST_METHODS, badge, kcenter, rank
from visiontune.task import get_task


def cloud(n: int = 60, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.rand(n, generator=g)


def test_margin_picks_the_least_sure_and_random_is_seeded():
    feats, doubt = cloud()
    picked = rank("margin", doubt, feats, None, n=5, candidates=4.0, seed=0).order
    assert picked == doubt.argsort(descending=True)[:5].tolist()
    assert rank("random", doubt, feats, None, 5, 4.0, seed=3).order == rank("random", doubt, feats, None, 5, 4.0,
                                                                             seed=3).order
    assert len(set(rank("random", doubt, feats, None, 60, 4.0, seed=1).order)) == 60


@pytest.mark.parametrize("method", SUGGEST_METHODS.names())
def test_every_method_picks_n_distinct_images_and_at_most_the_pool(method):
    feats, doubt = cloud(n=30)
    scale = get_task("single").gradient_if_decided(torch.softmax(feats[:, :3], dim=1))
    for n in (1, 7, 30, 100):
        order = rank(method, doubt, feats, None, n=n, candidates=2.0, seed=0, scale=scale).order
        assert len(order) == min(n, 30) and len(set(order)) == len(order)
        assert all(0 <= i < 30 for i in order)


def test_margin_kcenter_stays_in_its_short_list_and_spreads_out():
    """The picks come from the C x N least sure images, and among them k-center's picks are farther
    apart than the N least sure ones (the short-list's duplicates are not picked twice)."""
    base, doubt = cloud(n=40, seed=1)
    feats = torch.cat([base[:1].repeat(10, 1) + 0.001 * torch.randn(10, 8), base[10:]])  # 10 near-copies
    doubt = torch.cat([torch.full((10,), 0.99), doubt[10:] * 0.9])  # the copies are the least sure
    n, c = 4, 5.0
    short = set(doubt.argsort(descending=True)[:int(n * c)].tolist())
    order = rank("margin-kcenter", doubt, feats, None, n=n, candidates=c, seed=0).order
    assert set(order) <= short and sum(i < 10 for i in order) == 1
    assert sum(i < 10 for i in rank("margin", doubt, feats, None, n, c, 0).order) == n


def test_kcenter_keeps_away_from_the_labelled_images():
    unit = torch.nn.functional.normalize(torch.eye(4), dim=1)
    labelled = unit[:2]
    picked = kcenter(unit, labelled, n=2, first=0)
    assert set(picked.order) == {2, 3} and all(d == pytest.approx(1.0) for d in picked.distance)


def test_uncertainty_is_one_at_a_tie_and_zero_when_sure():
    single, multi = get_task("single"), get_task("multi")
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.6, 0.3, 0.1]])
    assert single.uncertainty(probs).tolist() == pytest.approx([1.0, 0.0, 0.7])
    assert "a 0.60 vs b 0.30" == single.uncertainty_reason(probs[2], ["a", "b", "c"])
    sig = torch.tensor([[0.3, 0.9], [0.0, 1.0], [0.05, 0.45]])
    assert multi.uncertainty(sig, [0.3, 0.5]).tolist() == pytest.approx([1.0, 0.0, 0.9], abs=1e-6)
    assert multi.uncertainty_reason(sig[2], ["x", "y"], [0.3, 0.5]) == "y 0.45 at its threshold 0.50"


def test_suggest_command_writes_the_picks_and_leaves_the_runs_images_out(trained_run, tmp_path, capsys):
    run, data = trained_run
    pool = make_folder(tmp_path / "pool images", per_class=5, seed=7)
    known = sorted(data.rglob("*.png"))[:4]
    for i, path in enumerate(known):  # the run's own images, reached through another name
        (pool / f"known_{i}.png").symlink_to(path)
    write_corrupt_files(pool / "broken")
    out = tmp_path / "picks"
    code, stdout, err = vt_main(capsys, "suggest", run.run_dir, pool, "--n", "6", "--out", out, "--workers", "0")
    assert code == 0, err
    assert "suggested 6 of 22 image(s); left out 4 image(s) the run already knows; 3 unreadable" in err
    rows = list(csv.DictReader(open(out / "suggestions.csv")))
    assert list(rows[0]) == CSV_COLUMNS and [int(r["rank"]) for r in rows] == list(range(1, 7))
    assert not any("known_" in r["path"] or "broken" in r["path"] for r in rows)
    assert all(r["why"].startswith("uncertain: ") and 0.0 <= float(r["uncertainty"]) <= 1.0 for r in rows)
    assert all(r["predicted"] in CLASS_NAMES for r in rows)
    assert all(r["distance"] != "" for r in rows)  # k-center: the run's training images seeded it
    page = (out / "suggestions.html").read_text()
    assert page.count("<figure") == 6 and "data:image/jpeg;base64," in page
    assert rows[0]["path"] in stdout


def test_suggest_api_margin_ranks_by_uncertainty(trained_run, tmp_path):
    run, _ = trained_run
    pool = make_folder(tmp_path / "pool", per_class=4, seed=3)
    result = visiontune.suggest(run.run_dir, pool, n=12, method="margin", out=tmp_path / "out", workers=0)
    doubts = [r["uncertainty"] for r in result.rows]
    assert doubts == sorted(doubts, reverse=True) and len(result.rows) == 12
    assert all(r["distance"] is None for r in result.rows)


def test_suggest_refuses_bad_input_and_writes_nothing(trained_run, tmp_path, capsys):
    run, data = trained_run
    empty = tmp_path / "empty pool"
    empty.mkdir()
    code, _, err = vt_main(capsys, "suggest", run.run_dir, empty, "--out", tmp_path / "o1")
    assert code == 2 and "no images found" in err and "Traceback" not in err
    code, _, err = vt_main(capsys, "suggest", run.run_dir, data, "--out", tmp_path / "o2")
    assert code == 2 and "already in the run's training data" in err
    link = tmp_path / "linked"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    pool = make_folder(tmp_path / "pool", per_class=1)
    code, _, err = vt_main(capsys, "suggest", run.run_dir, pool, "--out", link)
    assert code != 0 and "symbolic link" in err
    code, _, err = vt_main(capsys, "suggest", run.run_dir, pool, "--n", "0")
    assert code == 2 and "--n" in err
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "elsewhere"))
    with pytest.raises(ConfigError, match="did you mean 'margin'"):
        visiontune.suggest(run.run_dir, pool, method="margn")


def test_margin_cluster_takes_the_least_sure_of_each_cluster():
    """Three tight clusters in the short-list: one pick each, and each pick is its cluster's least sure."""
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 6)
    feats = torch.cat([c + 0.01 * torch.randn(5, 6, generator=g) for c in centres])  # rows 0-4, 5-9, 10-14
    doubt = torch.linspace(0.9, 0.2, 15)[torch.randperm(15, generator=g)]
    order = rank("margin-cluster", doubt, feats, None, n=3, candidates=5.0, seed=0).order
    assert sorted(i // 5 for i in order) == [0, 1, 2]
    assert all(doubt[i] == doubt[(i // 5) * 5:(i // 5) * 5 + 5].max() for i in order)


def test_the_gradient_if_decided_is_the_probabilities_minus_the_decision():
    single, multi = get_task("single"), get_task("multi")
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.0, 1.0, 0.0]])
    assert single.gradient_if_decided(probs).flatten().tolist() == pytest.approx([-0.4, 0.3, 0.1, 0.0, 0.0, 0.0])
    sig = torch.tensor([[0.35, 0.45]])  # x above its threshold 0.3, y below 0.5
    assert multi.gradient_if_decided(sig, [0.3, 0.5])[0].tolist() == pytest.approx([-0.65, 0.45])


def test_badge_starts_with_the_longest_gradient_never_repeats_and_is_seeded():
    """The first pick is the image whose gradient is longest; an exact copy of a pick is at distance
    0 from it and is not picked while any other image is left; the same seed gives the same picks."""
    feats, _ = cloud(n=20, seed=2)
    scale = get_task("single").gradient_if_decided(torch.softmax(3 * feats[:, :4], dim=1))
    longest = int(((scale * scale).sum(1) * (feats * feats).sum(1)).argmax())
    copies = torch.cat([feats, feats[longest:longest + 1].repeat(5, 1)])  # rows 20-24 copy the longest
    scales = torch.cat([scale, scale[longest:longest + 1].repeat(5, 1)])
    for seed in range(5):
        order = badge(scales, copies, n=10, seed=seed).order
        assert order[0] in {longest, *range(20, 25)}
        assert len({i if i < 20 else longest for i in order}) == 10  # one of the six copies at most
        assert order == badge(scales, copies, n=10, seed=seed).order
    sure = torch.zeros(3, 4)  # the model is sure of every image: every gradient is 0, taken in pool order
    assert badge(sure, feats[:3], n=3, seed=0).order == [0, 1, 2] and badge(sure, feats[:3], 0, 0).order == []


def test_badge_distances_are_those_of_the_explicit_gradient_embeddings():
    """The kernel trick (a_i . a_j)(f_i . f_j) gives each pick's distance to its nearest earlier pick
    exactly as the [C x D] embeddings built by hand do."""
    g = torch.Generator().manual_seed(4)
    feats, scale = torch.randn(25, 6, generator=g), torch.randn(25, 3, generator=g)
    picked = badge(scale, feats, n=8, seed=1)
    embedded = torch.stack([torch.kron(a, f) for a, f in zip(scale.double(), feats.double())])
    assert picked.order[0] == int(embedded.norm(dim=1).argmax()) and picked.distance[0] is None
    for k in range(1, 8):
        nearest = (embedded[picked.order[:k]] - embedded[picked.order[k]]).norm(dim=1).min()
        assert picked.distance[k] == pytest.approx(float(nearest), rel=1e-6)


def test_badge_ranks_multi_label_models_by_their_thresholds():
    """Multi-label: each label's gradient is sigmoid - the decision at its threshold, so an image on
    a threshold has the longest gradient and is picked first; a sure one has (nearly) none."""
    multi = get_task("multi")
    probs = torch.tensor([[0.99, 0.01], [0.31, 0.02], [0.9, 0.95], [0.02, 0.49]])
    scale = multi.gradient_if_decided(probs, [0.3, 0.5])
    assert scale[1].tolist() == pytest.approx([-0.69, 0.02]) and scale[3].tolist() == pytest.approx([0.02, 0.49])
    feats = torch.ones(4, 3)
    assert rank("badge", multi.uncertainty(probs, [0.3, 0.5]), feats, None, 1, 4.0, 0, scale).order == [1]


def test_suggest_badge_end_to_end(trained_run, tmp_path):
    run, _ = trained_run
    pool = make_folder(tmp_path / "pool", per_class=4, seed=5)
    result = visiontune.suggest(run.run_dir, pool, n=5, method="badge", out=tmp_path / "out", workers=0)
    assert len({r["path"] for r in result.rows}) == 5
    assert result.rows[0]["distance"] is None and "the longest gradient" in result.rows[0]["why"]
    assert all(r["distance"] >= 0 and "gradient far from the earlier picks'" in r["why"] for r in result.rows[1:])
    again = visiontune.suggest(run.run_dir, pool, n=5, method="badge", out=tmp_path / "again", workers=0)
    assert [r["path"] for r in again.rows] == [r["path"] for r in result.rows]
