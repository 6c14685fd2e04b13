"""Fast paths must not change results: feature cache keys, bf16 vs fp32, draft decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.config import TrainConfig
from visiontune.data.cache import FeatureCache, model_key
from visiontune.data.image import load_image
from visiontune.data.scan import discover
from visiontune.data.transforms import draft_size
from visiontune.evaluation.predictor import Classifier
from visiontune.hardware import cpu_supports_bf16
from visiontune.models import build_model
from visiontune.training.context import TrainContext
from visiontune.training.features import cached_features


def _images(folder, n_per_class=4, size=48):
    rng = np.random.default_rng(0)
    for ci, name in enumerate(("a", "b")):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            arr[..., ci] = 255
            Image.fromarray(arr).save(folder / name / f"{i}.png")
    return folder


@pytest.fixture()
def ctx(tmp_path):
    data = _images(tmp_path / "data")
    cfg = TrainConfig(data=str(data), img_size=32, batch_size=4, workers=0, cache_dir=str(tmp_path / "cache"))
    splits = discover(cfg.data, seed=0)
    model, arch, pre = build_model("efficientnet_lite0", 2)
    pre["input_size"] = [3, 32, 32]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return TrainContext(cfg, run_dir, model, arch, pre, splits, "32")


def test_feature_cache_reuses_and_invalidates(ctx, capsys):
    first, labels = cached_features(ctx, ctx.splits.train)
    assert "0 cached" in capsys.readouterr().out
    again, _ = cached_features(ctx, ctx.splits.train)
    out = capsys.readouterr().out
    assert f"{len(ctx.splits.train)} cached, 0 computed" in out
    torch.testing.assert_close(first, again)

    # editing one file (same path) recomputes exactly that file
    path, _ = ctx.splits.train[0]
    arr = np.zeros((48, 48, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    changed, _ = cached_features(ctx, ctx.splits.train)
    assert f"{len(ctx.splits.train) - 1} cached, 1 computed" in capsys.readouterr().out
    assert not torch.allclose(changed[0], first[0])
    torch.testing.assert_close(changed[1:], first[1:])
    assert labels.tolist() == [label for _, label in ctx.splits.train]


def test_feature_cache_key_depends_on_weights_and_preprocessing(ctx):
    base = model_key(ctx.model, ctx.arch.name, ctx.preprocessing, {"views": [-1]})
    other_pre = {**ctx.preprocessing, "input_size": [3, 64, 64]}
    assert model_key(ctx.model, ctx.arch.name, other_pre, {"views": [-1]}) != base
    assert model_key(ctx.model, ctx.arch.name, ctx.preprocessing, {"views": [0, 1]}) != base
    with torch.no_grad():
        next(ctx.model.parameters()).add_(1e-3)
    assert model_key(ctx.model, ctx.arch.name, ctx.preprocessing, {"views": [-1]}) != base


def test_cached_views_are_deterministic_augmentations(ctx):
    ctx.cfg.augment = "standard"
    feats, _ = cached_features(ctx, ctx.splits.train, views=2)
    assert feats.shape[:2] == (len(ctx.splits.train), 2)
    assert not torch.allclose(feats[:, 0], feats[:, 1])  # two different crops
    ctx.cfg.cache_dir = str(ctx.run_dir / "fresh-cache")
    again, _ = cached_features(ctx, ctx.splits.train, views=2)
    torch.testing.assert_close(feats, again)  # recomputed from scratch: the same views


def test_truncated_cache_shard_is_recomputed(tmp_path):
    cache = FeatureCache(tmp_path, "k")
    cache.put({"x:0": torch.ones(3)})
    shard = next((tmp_path / "k").glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:10])
    assert FeatureCache(tmp_path, "k").get(["x:0"]) == {}


@pytest.mark.skipif(not cpu_supports_bf16(), reason="CPU without bf16 support: bf16 path not used here")
def test_bf16_and_fp32_predictions_agree_on_top1(tmp_path):
    from visiontune.models import save_model

    data = _images(tmp_path / "data", n_per_class=6, size=200)
    model, arch, pre = build_model("efficientnet_lite0", 2)
    meta = {"architecture": arch.to_dict(), "class_names": ["a", "b"], "preprocessing": pre}
    save_model(tmp_path / "model", model, meta)
    files = sorted(str(p) for p in data.rglob("*.png"))
    fp32 = Classifier.load(tmp_path / "model", precision="32").predict(files)
    bf16 = Classifier.load(tmp_path / "model", precision="bf16").predict(files)
    assert [r["label"] for r in fp32] == [r["label"] for r in bf16]
    diff = max(abs(a["probability"] - b["probability"]) for a, b in zip(fp32, bf16))
    assert diff < 0.05


def test_jpeg_draft_decodes_no_smaller_than_needed(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1500), (10, 200, 30)).save(path, quality=90)
    pre = {"input_size": [3, 224, 224], "crop_pct": 0.875, "resize_mode": "crop", "jpeg_draft": True}
    need = draft_size(pre)
    img = load_image(path, need)
    assert min(img.size) >= need and img.size[0] < 2000  # decoded at reduced scale
    assert draft_size({**pre, "jpeg_draft": False}) is None
