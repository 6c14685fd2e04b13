"""Fast paths must not change results: the feature cache (keys, invalidation, views), bf16 vs
fp32 inference, reduced-scale JPEG decoding; and unreadable files leave the features cleanly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.core.hardware import cpu_supports_bf16
from visiontune.data.cache import FeatureCache, model_key
from visiontune.data.image import load_image
from visiontune.data.preprocess import Preprocessing
from visiontune.data.scan import discover
from visiontune.inference.classifier import Classifier
from visiontune.inference.features import FeatureExtractor
from visiontune.models.artifact import save_model
from visiontune.models.card import ModelCard
from visiontune.models.factory import build_model


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
def setup(tmp_path):
    data = _images(tmp_path / "data")
    splits = discover(data, seed=0)
    model, arch, pre = build_model("efficientnet_lite0", 2)
    extractor = FeatureExtractor(model, arch.classifier, arch.name, pre.with_size(32), "32",
                                 cache_dir=tmp_path / "cache", batch_size=4, workers=0)
    return extractor, splits, tmp_path


def test_feature_cache_reuses_and_invalidates(setup, capsys):
    extractor, splits, _ = setup
    first, labels, kept = extractor.features(splits.train)
    assert "0 cached" in capsys.readouterr().out and kept == list(range(len(splits.train)))
    again, _, _ = extractor.features(splits.train)
    assert f"{len(splits.train)} cached, 0 computed" in capsys.readouterr().out
    torch.testing.assert_close(first, again)

    # editing one file (same path) recomputes exactly that file
    path, _ = splits.train[0]
    Image.fromarray(np.zeros((48, 48, 3), dtype=np.uint8)).save(path)
    changed, _, _ = extractor.features(splits.train)
    assert f"{len(splits.train) - 1} cached, 1 computed" in capsys.readouterr().out
    assert not torch.allclose(changed[0], first[0])
    torch.testing.assert_close(changed[1:], first[1:])
    assert labels.tolist() == [label for _, label in splits.train]


def test_unreadable_file_is_left_out_and_never_cached(setup, capsys):
    extractor, splits, _ = setup
    path, _ = splits.train[1]
    with open(path, "wb") as fh:
        fh.write(b"no longer an image")
    feats, labels, kept = extractor.features(splits.train)
    assert 1 not in kept and len(kept) == len(splits.train) - 1 and len(feats) == len(labels) == len(kept)
    capsys.readouterr()
    extractor.features(splits.train)  # nothing was cached for the bad file: it is tried again
    assert f"{len(splits.train) - 1} cached, 0 computed" in capsys.readouterr().out


def test_feature_cache_key_depends_on_weights_and_preprocessing(setup):
    extractor, _, _ = setup
    model, name, pre = extractor.model, extractor.arch_name, extractor.preprocessing.to_dict()
    base = model_key(model, name, pre, {"views": [-1]})
    assert model_key(model, name, {**pre, "input_size": [3, 64, 64]}, {"views": [-1]}) != base
    assert model_key(model, name, pre, {"views": [0, 1]}) != base
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert model_key(model, name, pre, {"views": [-1]}) != base


def test_cached_views_are_deterministic_augmentations(setup):
    extractor, splits, tmp_path = setup
    feats, _, _ = extractor.features(splits.train, views=2, augment="standard")
    assert feats.shape[:2] == (len(splits.train), 2)
    assert not torch.allclose(feats[:, 0], feats[:, 1])  # two different crops
    extractor.cache_root = tmp_path / "fresh-cache"
    again, _, _ = extractor.features(splits.train, views=2, augment="standard")
    torch.testing.assert_close(feats, again)  # recomputed from scratch: the same views


def test_truncated_cache_shard_is_recomputed(tmp_path):
    cache = FeatureCache(tmp_path, "k")
    cache.put({"x:0": torch.ones(3)})
    shard = next((tmp_path / "k").glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:10])
    assert FeatureCache(tmp_path, "k").get(["x:0"]) == {}


@pytest.mark.skipif(not cpu_supports_bf16(), reason="CPU without bf16 support: bf16 path not used here")
def test_bf16_and_fp32_predictions_agree_on_top1(tmp_path):
    data = _images(tmp_path / "data", n_per_class=6, size=200)
    model, arch, pre = build_model("efficientnet_lite0", 2)
    samples = discover(data, seed=0).train
    feats, labels, _ = FeatureExtractor(model, arch.classifier, arch.name, pre, "32", tmp_path / "cache",
                                        workers=0).features(samples)
    with torch.no_grad():  # a nearest-centroid head: decisions with clear margins, as a trained model has
        centroids = torch.stack([feats[labels == c, 0].mean(0) for c in (0, 1)])
        head = model.get_submodule(arch.classifier)
        head.weight.copy_(centroids)
        head.bias.copy_(-0.5 * (centroids ** 2).sum(1))
    save_model(tmp_path / "model", model, ModelCard(["a", "b"], pre, arch))
    files = [p for p, _ in samples]
    fp32 = Classifier.load(tmp_path / "model", precision="32").predict(files)
    bf16 = Classifier.load(tmp_path / "model", precision="bf16").predict(files)
    assert min(r["probability"] for r in fp32) > 0.9  # margins far beyond bf16's rounding
    assert [r["label"] for r in fp32] == [r["label"] for r in bf16]
    diff = max(abs(a["probability"] - b["probability"]) for a, b in zip(fp32, bf16))
    assert diff < 0.05


def test_jpeg_draft_decodes_no_smaller_than_needed(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1500), (10, 200, 30)).save(path, quality=90)
    pre = Preprocessing.from_dict({"input_size": [3, 224, 224], "mean": [0.5] * 3, "std": [0.5] * 3})
    need = pre.draft_size()
    img = load_image(path, need)
    assert min(img.size) >= need and img.size[0] < 2000  # decoded at reduced scale
    assert Preprocessing.from_dict({**pre.to_dict(), "jpeg_draft": False}).draft_size() is None
