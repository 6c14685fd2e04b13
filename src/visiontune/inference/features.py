"""Frozen-backbone features: the input of the classifier layer, computed once and cached.

A frozen backbone maps an image to the same features every epoch and every run, so linear
probing, frozen warm-up epochs and ``data check``'s label search compute them once (K augmented
views per image when asked) into the on-disk :class:`~visiontune.data.cache.FeatureCache`,
keyed by the weights, the preprocessing, the views and the file's content.

Example:
    model, arch, pre = build_model("efficientnet_lite0", 2)
    extractor = FeatureExtractor(model, arch.classifier, arch.name, pre)
    feats, labels, kept = extractor.features([("ant.jpg", 0)])
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..core.hardware import autocast, inference_precision
from ..core.hardware import device as best_device
from ..core.progress import progress
from ..data.cache import FeatureCache, default_cache_dir, file_digests, model_key
from ..data.dataset import InputDataset, input_loader
from ..data.labels import stack_targets
from ..data.preprocess import Preprocessing
from ..data.scan import Sample
from ..data.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)
EVAL_VIEW = -1


class _ViewDataset(InputDataset):
    """Images to encode: view -1 is the deterministic eval view, others seeded augmentations."""

    def __init__(self, items: list[tuple[str, int, int]], spec: Preprocessing, augment: str):
        super().__init__([path for path, _, _ in items], eval_transform(spec), spec.draft_size())
        self.items = items
        self.train_tf = train_transform(spec, augment)

    def transform_item(self, index: int, image: Image.Image) -> torch.Tensor:
        _, view, seed = self.items[index]
        if view == EVAL_VIEW:
            return self.transform(image)
        torch.manual_seed(seed)  # the same view of the same file is the same crop in every run
        return self.train_tf(image)


def view_ids(views: int) -> list[int]:
    return [EVAL_VIEW] if views <= 1 else list(range(views))


class FeatureExtractor:
    """Pooled backbone features (the input of the module ``classifier``) with an on-disk cache.

    Args:
        model: the network; only its forward pass up to ``classifier`` matters.
        classifier: dotted name of the classifier module, whose input is the feature vector.
        arch_name: architecture name (part of the cache key).
        preprocessing: the input spec.
        precision: the run's precision (:func:`~visiontune.core.hardware.autocast` of the forward passes:
            ``bf16``, ``16`` on a CUDA GPU, else fp32).
        cache_dir: cache root (default: ``$VISIONTUNE_CACHE`` or ``~/.cache/visiontune``).
        batch_size: images per forward pass.
        workers: decoding processes (default: one per core).
        seed: seeds the augmented views (with each view's own key).
    """

    def __init__(self, model: nn.Module, classifier: str, arch_name: str, preprocessing: Preprocessing,
                 precision: str = "32", cache_dir: str | os.PathLike | None = None, batch_size: int = 64,
                 workers: int | None = None, seed: int = 0, progress: bool | None = None):
        self.model, self.classifier, self.arch_name = model, classifier, arch_name
        self.progress = progress  # a progress bar: None on a terminal only, or as told
        self.preprocessing, self.precision = preprocessing, precision
        self.cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
        self.batch_size, self.workers, self.seed = batch_size, workers, seed

    def features(self, samples: list[Sample], views: int = 1, augment: str = "none"
                 ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Features ``[n, V, d]``, labels ``[n]`` and the indices of ``samples`` they belong to.

        Only what the cache lacks is computed. A file that cannot be read is left out (with a
        warning) and nothing is cached for it; see :mod:`visiontune.data.dataset`.
        """
        ids = view_ids(views)
        augment = augment if views > 1 else "none"
        key = model_key(self.model, self.arch_name, self.preprocessing.to_dict(),
                        {"views": ids, "augment": augment, "precision": inference_precision(self.precision)})
        cache = FeatureCache(self.cache_root, key)
        digests = file_digests([p for p, _ in samples])
        keys = [[f"{d}:{v}" for v in ids] for d in digests]
        found = cache.get([k for row in keys for k in row])
        missing = sorted({(p, v, k) for (p, _), row in zip(samples, keys) for v, k in zip(ids, row) if k not in found})
        computed: dict[str, torch.Tensor] = {}
        if missing:
            computed, failed = self._encode(missing, augment)
            found.update(computed)
            cache.put(computed)
            for path in sorted(failed):
                log.warning("cannot read %s (%s): left out of the features", path, failed[path])
        print(f"features: {len(samples) * len(ids) - len(missing)} cached, {len(computed)} computed "
              f"({cache.dir})", flush=True)
        kept = [i for i, row in enumerate(keys) if all(k in found for k in row)]
        feats = torch.stack([torch.stack([found[k] for k in keys[i]]) for i in kept]) if kept else torch.zeros(0)
        labels = stack_targets([samples[i][1] for i in kept], len(samples[0][1]) if samples and isinstance(
            samples[0][1], torch.Tensor) else None)  # [n] class indices, or [n, C] multi-hot
        return feats, labels, kept

    def _encode(self, missing: list[tuple[str, int, str]], augment: str
                ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        items = [(path, view, zlib.crc32(key.encode()) + self.seed) for path, view, key in missing]
        dataset = _ViewDataset(items, self.preprocessing, augment)
        captured: dict[int, torch.Tensor] = {}
        failed: dict[str, str] = {}
        pending: list[int] = []
        head = self.model.get_submodule(self.classifier)

        def keep(module, inputs, output):
            for index, row in zip(pending, inputs[0].float().flatten(1).cpu()):
                captured[index] = row.clone()

        hook = head.register_forward_hook(keep)
        dev = best_device()
        # Convert outside inference mode: parameters re-created inside it could never train again.
        model = self.model.eval().to(dev, memory_format=torch.channels_last)
        try:
            with torch.inference_mode():
                for indices, batch, errors in progress(input_loader(dataset, self.batch_size, self.workers),
                                                       "features", enabled=self.progress):
                    failed.update({items[i][0]: error for i, error in errors})
                    if batch is None:
                        continue
                    pending[:] = indices
                    with autocast(self.precision, dev):
                        model(batch.to(dev).contiguous(memory_format=torch.channels_last))
        finally:
            hook.remove()
            self.model.to("cpu")
        return {missing[i][2]: row for i, row in captured.items()}, failed
