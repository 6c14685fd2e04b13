"""On-disk cache of backbone features, keyed by model weights, preprocessing and file content.

A frozen backbone maps the same image to the same features every epoch and every run; computing
them once turns linear probing and frozen warm-up epochs from minutes into seconds. Keys:

- model key: hash of the architecture, every weight tensor, the preprocessing and the view spec
  (so new weights, another input size or another augmentation never reuse stale features);
- file key: hash of the file's bytes (so an edited image is recomputed even at the same path).

Entries are append-only safetensors shards under ``<cache_dir>/<model_key>/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

HASH_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    env = os.environ.get("VISIONTUNE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "visiontune"


def file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digests(paths: list[str], workers: int = 8) -> list[str]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(file_digest, paths))


def model_key(model: nn.Module, arch_name: str, preprocessing: dict[str, Any], views: dict[str, Any]) -> str:
    """Hash of everything that determines a feature vector except the image itself."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"arch": arch_name, "pre": preprocessing, "views": views}, sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """Maps ``(file digest, view)`` to a feature vector for one model key.

    Example:
        cache = FeatureCache(default_cache_dir(), "abc123")
        found = cache.get(["<digest>:0"])
    """

    def __init__(self, root: str | Path, key: str):
        self.dir = Path(root) / key
        self._entries: dict[str, torch.Tensor] | None = None

    def _load(self) -> dict[str, torch.Tensor]:
        if self._entries is None:
            self._entries = {}
            for shard in sorted(self.dir.glob("shard-*.safetensors")):
                try:
                    self._entries.update(load_file(str(shard)))
                except Exception:  # a shard cut short by a crash is simply recomputed
                    shard.unlink(missing_ok=True)
        return self._entries

    def get(self, keys: list[str]) -> dict[str, torch.Tensor]:
        entries = self._load()
        return {k: entries[k] for k in keys if k in entries}

    def put(self, features: dict[str, torch.Tensor]) -> None:
        if not features:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".shard-", suffix=".tmp")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in features.items()}, tmp)
        number = len(list(self.dir.glob("shard-*.safetensors")))
        while (target := self.dir / f"shard-{number:05d}.safetensors").exists():
            number += 1
        os.replace(tmp, target)  # atomic: readers never see half a shard
        self._load().update(features)

    def __len__(self) -> int:
        return len(self._load())
